//! The one error type of the protocol library.

use thiserror::Error;

/// Why a protocol object could not be built, decoded, signed or verified. Every variant names
/// the object or field at fault; none ever carries key material.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// An encoding or value breaks the format: wrong magic, truncation, trailing bytes, a bad
    /// name, a duplicate, a non-canonical form (docs/PROTOCOL.md "Canonical encoding").
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The object or field, e.g. "descriptor", "access list".
        what: &'static str,
        /// What is wrong with it, for a person.
        detail: String,
    },
    /// A field or list exceeds its limit; checked before anything is allocated for it.
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The field or list that is too large.
        what: &'static str,
        /// Its claimed size (bytes or entries).
        size: usize,
        /// The largest size allowed.
        limit: usize,
    },
    /// An ECDSA signature is not valid DER or does not verify over the signed bytes with the
    /// signer certificate's key (docs/PROTOCOL.md "Signatures").
    #[error("signature of {what} does not verify")]
    BadSignature {
        /// The kind of signed object, e.g. "descriptor" or "mount-grant".
        what: &'static str,
    },
    /// An ECDSA signature in its high-S form (s > n/2): the malleable twin of a valid
    /// signature. Skydd signs low-S only, so this is refused (docs/PROTOCOL.md "Signatures").
    #[error("signature of {what} is not canonical (high-S); Skydd signatures are low-S")]
    NonCanonicalSignature {
        /// The kind of signed object, e.g. "descriptor" or "mount-grant".
        what: &'static str,
    },
    /// A DSSE envelope (an image allowlist or provenance record, `crate::dsse`) that is not
    /// signed by the trusted signer, or not of the expected type; the reason says which.
    #[error("{subject} refused: {reason}")]
    Envelope {
        /// The file or object, e.g. "allowlist".
        subject: String,
        /// Which check failed.
        reason: String,
    },
    /// A private key that cannot be used: not PEM, not PKCS#8, or not ECDSA P-256.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A certificate that cannot be parsed, issued or accepted (chain, validity, role, name;
    /// docs/PKI.md "What each side checks"); the text says which check failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Neither volume header slot is usable (format.rs); each reason is kept.
    #[error("no valid volume header: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidHeader {
        /// Why slot 0 (offset 0) was rejected.
        slot0: Box<crate::format::SlotError>,
        /// Why slot 1 (offset 512 KiB) was rejected.
        slot1: Box<crate::format::SlotError>,
    },
}

/// Result with the protocol [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds [`Error::Malformed`] from any displayable detail.
    pub fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Malformed { what, detail: detail.to_string() }
    }
}
