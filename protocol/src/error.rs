//! The one error type of the protocol library.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} is {size} bytes, more than the limit of {limit}")]
    TooLarge { what: &'static str, size: usize, limit: usize },
    #[error("signature of {what} does not verify")]
    BadSignature { what: &'static str },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("certificate: {0}")]
    Certificate(String),
    /// Neither volume header slot is usable (format.rs); each reason is kept.
    #[error("no valid volume header: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidHeader { slot0: Box<crate::format::SlotError>, slot1: Box<crate::format::SlotError> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Malformed { what, detail: detail.to_string() }
    }
}
