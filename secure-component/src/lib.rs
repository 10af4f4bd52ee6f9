//! The secure component: runs on every compute host beside the hypervisor, unseals domain
//! keys in the host TPM and opens volumes with dm-crypt or the userspace engine.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod host;
pub mod hypervisor;
pub mod integrity_client;
pub mod key_release;
pub mod launch;
pub mod measure;
pub mod prerequisites;
pub mod service;
pub mod swtpm;
pub mod sys;
pub mod tpm;
pub mod volume;

pub use error::{Error, Result};
