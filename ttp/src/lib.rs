//! The trusted third party: derives domain keys, checks access and attestation, audits.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod attestation;
pub mod config;
pub mod error;
pub mod http;
pub mod master_key;
pub mod server;
pub mod service;
pub mod store;

pub use error::{Error, Result};
