//! image-pipeline: hardened, versioned, traceable Debian VM images from a trusted source
//! (docs/IMAGE-PIPELINE.md).
//!
//! - `build`: the Debian archive (InRelease signatures, Packages and .deb hashes) → mmdebstrap →
//!   hardening from a role profile → security checks → reproducible raw + qcow2 images, with a
//!   signed provenance record (`provenance`).
//! - `store`: a content-addressed image store with per-role version history, diff, patch,
//!   promote and a signed allowlist.
//! - `archive`: images encrypted with the project's AES-XTS engine under a domain key from the
//!   TTP; destruction by deleting the domain (crypto-shredding).

#![warn(missing_docs)]

pub mod archive;
pub mod boot;
pub mod build;
pub mod checks;
pub mod debian;
pub mod disk;
pub mod error;
pub mod harden;
pub mod pipeline;
pub mod process;
pub mod profile;
pub mod provenance;
pub mod store;
pub mod tree;

pub use error::{Error, Result};
