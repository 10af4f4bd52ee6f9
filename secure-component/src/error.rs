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
    /// The host lacks something the secure component needs (prerequisites.rs).
    #[error("this host lacks what the secure component needs: {0}")]
    Prerequisites(String),

    // ---- TPM (tpm.rs) ----------------------------------------------------------------
    #[error("TPM operation {operation} failed: {detail}")]
    Tpm { operation: &'static str, detail: String },
    /// The TPM itself refused the binding key (policy session not satisfied).
    #[error("the TPM refused to use the binding key: {0}")]
    BindingKeyRefused(String),
    #[error("swtpm: {0}")]
    Swtpm(String),
    #[error("TPM state in {path} is unusable: {detail}")]
    TpmState { path: String, detail: String },

    // ---- volumes (volume/, xts.rs) -----------------------------------------------------
    #[error("volume error: {0}")]
    Volume(String),
    #[error("device-mapper is not available on this kernel: {0}")]
    DeviceMapperUnavailable(String),
    #[error("AES-XTS engine: {0}")]
    Xts(String),

    // ---- TTP (agent.rs) ----------------------------------------------------------------
    #[error("the TTP refused the {step} ({code}): {message}")]
    TtpRefused { step: &'static str, code: String, message: String },
    #[error("the TTP could not be reached for the {step}: {detail}")]
    TtpUnreachable { step: &'static str, detail: String },

    // ---- agent service (service/, hypervisor/, config.rs) ---------------------------------
    /// A request the agent cannot act on (malformed id, header that does not decode, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no attachment {0} on this host")]
    AttachmentUnknown(String),
    /// The attachment id, or the domain for that VM, is attached already (or in progress).
    #[error("{0}")]
    AttachmentConflict(String),
    #[error("hypervisor driver {driver}: {detail}")]
    Hypervisor { driver: &'static str, detail: String },

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
