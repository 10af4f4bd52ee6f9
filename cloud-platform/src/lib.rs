//! The Skydd cloud platform (CP): an OpenStack-style REST API over mutual TLS for domains
//! (encrypted volumes), instances, compute hosts and attachments (docs/CLOUD-API.md). It
//! allocates sparse volume files, writes and rewrites their headers atomically, registers
//! domains with the TTP and forwards attach and detach to the secure component of the
//! instance's host. It never holds a key. Also the cloud CA (`ca`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod ca;
pub mod config;
pub mod error;
pub mod server;
pub mod service;
pub mod store;
pub mod volumes;

pub use config::CpConfig;
pub use error::{Error, Result};
pub use server::{build, serve, serve_limited};
pub use service::CloudPlatform;
