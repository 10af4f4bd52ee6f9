//! Skydd's volume data plane, shared by the secure component (which serves volumes to VMs)
//! and the image pipeline (which archives images in the same format):
//!
//! - [`layout`]: where the encrypted data area of a volume starts and how it is cut into
//!   sectors (docs/FORMAT.md, "Data area");
//! - [`xts`]: the AES-256-XTS engine that encrypts it, byte for byte what dm-crypt does;
//! - [`scrub`]: wiping the registers and stack a thread used for key work.
//!
//! No I/O beyond the CPU: opening files, loop devices and FUSE mounts is the secure
//! component's job.

#![warn(missing_docs)]

pub mod layout;
pub mod scrub;
pub mod xts;

/// Why the engine refused a key or a buffer, or OpenSSL failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The AES-256-XTS engine refused a key or buffer (key not [`xts::KEY_LEN`] bytes or
    /// with two identical halves, buffer not whole data units) or OpenSSL failed.
    #[error("AES-XTS engine: {0}")]
    Xts(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
