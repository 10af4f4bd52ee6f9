//! The trusted third party: derives domain keys, checks access and attestation, audits.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod attestation;
#[cfg(feature = "service")]
pub mod config;
pub mod error;
#[cfg(feature = "service")]
pub mod http;
#[cfg(feature = "service")]
pub mod master_key;
#[cfg(feature = "service")]
pub mod server;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "service")]
pub mod store;

pub use error::{Error, Result};
