//! The shared language of Skydd: wire types, on-disk formats and crypto that every party
//! speaks. This crate does no I/O (no files, no sockets); see docs/PROTOCOL.md and
//! docs/FORMAT.md for the byte layouts each module implements.

#![warn(missing_docs)]

pub mod attest;
pub mod b64;
pub mod cloud;
pub mod domain;
pub mod dsse;
pub mod encoding;
pub mod error;
pub mod format;
pub mod image;
pub mod integrity;
pub mod kdf;
pub mod messages;
pub mod pki;
pub mod policy;
pub mod refusal;
pub mod secret;
pub mod signing;

pub use error::{Error, Result};
