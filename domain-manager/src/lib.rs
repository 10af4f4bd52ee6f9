//! The domain manager: the hospital admin's side of Skydd. Builds and signs descriptors
//! (grant, revoke, share are new owner-signed versions), signs mount grants, talks to the
//! cloud platform for storage and attachments and to the TTP for the viewing history.
//! The CLI in main.rs only parses arguments and prints.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod openstack;
pub mod ops;
pub mod render;

pub use error::{Error, Result};
