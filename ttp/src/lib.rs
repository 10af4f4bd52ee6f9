//! The trusted third party: derives domain keys, checks access and attestation, audits.

pub mod error;

pub use error::{Error, Result};
