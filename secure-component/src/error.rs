//! The one error type of the secure component library. Every variant names what was wrong.
//! Sections are grouped by module; add variants in your module's section.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    // ---- configuration and I/O -------------------------------------------------------
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),

    // ---- TPM (tpm.rs) ----------------------------------------------------------------
    #[error("TPM operation {operation} failed: {detail}")]
    Tpm { operation: &'static str, detail: String },

    // ---- volumes (volume/, xts.rs) -----------------------------------------------------
    #[error("volume error: {0}")]
    Volume(String),
    #[error("device-mapper is not available on this kernel: {0}")]
    DeviceMapperUnavailable(String),

    // ---- protocol --------------------------------------------------------------------
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    pub fn tpm(operation: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Tpm { operation, detail: detail.to_string() }
    }
}
