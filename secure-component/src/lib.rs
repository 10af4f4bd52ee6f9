//! The secure component: runs on every compute host beside the hypervisor, unseals domain
//! keys in the host TPM and opens volumes with dm-crypt or the userspace engine.

pub mod error;
pub mod volume;

pub use error::{Error, Result};
