//! Skydd's volume data plane, shared by the secure component (which serves volumes to VMs)
//! and the image pipeline (which archives images in the same format):
//!
//! - [`layout`]: where the encrypted data area of a volume starts and how it is cut into
//!   sectors (docs/FORMAT.md, "Data area");
//! - [`xts`]: the AES-256-XTS engine that encrypts it, byte for byte what dm-crypt does;
//! - [`integrity`]: format 2's sector tags, hash tree, crash recovery and freshness anchor;
//! - [`device`]: whole-sector plaintext access to a volume of either format;
//! - [`reencrypt`]: moving a format-1 volume to a rotated key, crash-safe, in place;
//! - [`io`]: the I/O channel those read and write through (a file, or memory in tests);
//! - [`scrub`]: wiping the registers and stack a thread used for key work.
//!
//! All I/O goes through the [`io::BlockIo`] it is handed: opening files, loop devices and
//! FUSE mounts is the secure component's job.

#![warn(missing_docs)]

pub mod device;
pub mod integrity;
pub mod io;
pub mod layout;
pub mod reencrypt;
pub mod scrub;
pub mod xts;

pub use protocol::integrity::ViolationKind;

/// Why the data plane refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The AES-256-XTS engine refused a key or buffer (key not [`xts::KEY_LEN`] bytes or
    /// with two identical halves, buffer not whole data units) or OpenSSL failed.
    #[error("AES-XTS engine: {0}")]
    Xts(String),
    /// A request or volume whose geometry is wrong (not whole sectors, out of range, a
    /// format-2 layout that does not fit the volume's length).
    #[error("volume layout: {0}")]
    Layout(String),
    /// Reading or writing the volume failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Part of a format-2 volume does not verify: the provider altered or rolled it back.
    #[error("integrity violation ({}){}: {detail}", kind.as_str(), sector.map(|s| format!(" at data sector {s}")).unwrap_or_default())]
    Integrity {
        /// What did not verify.
        kind: ViolationKind,
        /// The data sector concerned, when one is.
        sector: Option<u64>,
        /// What was expected and found.
        detail: String,
    },
    /// A format-2 volume that cannot be served this way (read-only before its first commit,
    /// or written through a read-only mapping).
    #[error("format-2 volume: {0}")]
    Unsupported(String),
    /// A key rotation's re-encryption cannot go on: its header record is damaged, or a
    /// hotzone sector matches neither checksum (docs/FORMAT.md "Key rotation").
    #[error("key rotation: {0}")]
    Rotation(String),
    /// The TTP did not accept a root commit; the writes stay uncommitted.
    #[error("committing the integrity root to the TTP failed: {0}")]
    Commit(String),
}

impl Error {
    /// An I/O failure with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
