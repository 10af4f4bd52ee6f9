//! The one error type of the secure component library. Every variant names what was wrong.
//! Sections are grouped by module; add variants in your module's section.

use protocol::refusal::Refusal;
use thiserror::Error;

/// Everything that can go wrong in the secure component, one variant per kind of failure.
/// The agent API turns each variant into an HTTP status and a `code`
/// ([`crate::service::http::status_and_code`]; docs/CLOUD-API.md, "Secure component agent");
/// the CLI prints the message.
#[derive(Debug, Error)]
pub enum Error {
    // ---- configuration and I/O -------------------------------------------------------
    /// An operating-system call failed (open, read, ioctl, spawning a program). Answers 500
    /// `io_error`.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "reading /etc/skydd/sc.toml"; it comes first in the message.
        context: String,
        /// The OS error itself (its errno decides some recoveries, e.g. EBUSY on unmount).
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable: TOML that does not parse, an unknown key, a bad value,
    /// TLS files that do not load ([`crate::config::AgentConfig`]). Stops `serve` at start-up;
    /// answers 500 `config_error` should it reach the API.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The host lacks something the secure component needs (prerequisites.rs).
    #[error("this host lacks what the secure component needs: {0}")]
    Prerequisites(String),

    // ---- TPM (tpm/) ----------------------------------------------------------------
    /// A TPM command failed in tss-esapi or in the TPM (docs/TPM.md, "Objects in the host TPM").
    /// Answers 500 `tpm_failed`; a refused policy session is [`Error::BindingKeyRefused`] instead.
    #[error("TPM operation {operation} failed: {detail}")]
    Tpm {
        /// The TPM command or step, e.g. "Quote", "RSA_Decrypt", "ActivateCredential".
        operation: &'static str,
        /// What the TSS or the TPM reported (a TPM response code in words).
        detail: String,
    },
    /// The TPM itself refused the binding key (policy session not satisfied).
    #[error("the TPM refused to use the binding key: {0}")]
    BindingKeyRefused(String),
    /// Manufacturing, starting or talking to the swtpm simulator failed ([`crate::swtpm`]; tests
    /// and the all-in-one cloud). Answers 500 `tpm_failed`.
    #[error("swtpm: {0}")]
    Swtpm(String),
    /// A key blob or the stored PCR selection under `<state_dir>/tpm` does not decode (a
    /// truncated file, a file from another tool). Enrolling again rewrites them. Answers 500
    /// `tpm_failed`.
    #[error("TPM state in {path} is unusable: {detail}")]
    TpmState {
        /// The state file that does not decode.
        path: String,
        /// Why it does not decode (e.g. "not a marshalled TPMT_PUBLIC").
        detail: String,
    },

    // ---- volumes (volume/, xts.rs) -----------------------------------------------------
    /// A volume backend could not open, list or close a mapping, or an attachment record could
    /// not be encoded or read. Answers 500 `volume_failed`.
    #[error("volume error: {0}")]
    Volume(String),
    /// The kernel has no usable device-mapper (/dev/mapper/control missing or silent).
    /// `backend = "auto"` catches it and uses the userspace engine; with `backend = "dm-crypt"`
    /// start-up fails. docs/DMCRYPT.md, "When there is no device-mapper".
    #[error("device-mapper is not available on this kernel: {0}")]
    DeviceMapperUnavailable(String),
    /// The AES-256-XTS engine refused a key or buffer (key not [`skydd_volume::xts::KEY_LEN`] bytes or
    /// with two identical halves, buffer not whole data units) or OpenSSL failed. Answers 500
    /// `volume_failed`.
    #[error("AES-XTS engine: {0}")]
    Xts(String),
    /// A format-2 volume that does not verify against the TTP's anchor, or that this backend
    /// or mode cannot serve with its integrity (docs/FORMAT.md "Version 2").
    #[error("{message}")]
    Integrity {
        /// `integrity_violation`, `integrity_rollback` or `integrity_unsupported`.
        refusal: Refusal,
        /// What did not verify or why it cannot be served.
        message: String,
    },

    // ---- TTP (host.rs, key_release.rs) ------------------------------------------------------
    /// The TTP answered with an error code (docs/PROTOCOL.md, "Error codes"), e.g.
    /// `vm_not_in_acl` or `pcr_mismatch`. The secure component passes status, code and message
    /// through unchanged.
    #[error("the TTP refused the {step} ({code}): {message}")]
    TtpRefused {
        /// The exchange refused: "enrollment", "enrollment proof", "challenge" or "key release".
        step: &'static str,
        /// The TTP's HTTP status.
        status: u16,
        /// The TTP's machine-readable code, e.g. `grant_expired`.
        code: String,
        /// The TTP's message, saying exactly what was refused.
        message: String,
    },
    /// The TTP gave no usable answer: connection, TLS or timeout failure, or a body that did not
    /// decode. Answers 502 `ttp_unreachable`.
    #[error("the TTP could not be reached for the {step}: {detail}")]
    TtpUnreachable {
        /// The exchange that failed, as in [`Error::TtpRefused`].
        step: &'static str,
        /// The transport failure in words.
        detail: String,
    },

    // ---- agent service (service/, hypervisor/, config.rs) ---------------------------------
    /// A request the agent cannot act on (malformed id, header that does not decode, ...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A cloud platform that is neither this host's home cloud platform nor a configured
    /// `[[partner]]` (by name and trusted root) asked for an attach or detach. Answers 403
    /// `forbidden`.
    #[error("{0}")]
    CloudPlatformNotServed(String),
    /// No attachment with this id (the value) on this host. Answers 404 `attachment_unknown`.
    #[error("no attachment {0} on this host")]
    AttachmentUnknown(String),
    /// The attachment id, or the domain for that VM, is attached already (or in progress).
    #[error("{0}")]
    AttachmentConflict(String),
    /// A VM launch from an image that is not on the signed allowlist, or that could change
    /// after its check (docs/PROTOCOL.md "Trusted launch"). Answers 403 `image_not_allowed`.
    #[error("image not allowed: {0}")]
    ImageNotAllowed(String),
    /// The hypervisor driver could not give the device to the VM or take it back (mount
    /// failed, directory still in use, virsh failed). Answers 500 `hypervisor_failed`.
    #[error("hypervisor driver {driver}: {detail}")]
    Hypervisor {
        /// "local" or "libvirt".
        driver: &'static str,
        /// What failed, including virsh's or mount's own message.
        detail: String,
    },

    // ---- protocol --------------------------------------------------------------------
    /// A header record, grant or message the `protocol` crate could not decode or verify.
    /// Answers 400 `bad_request`.
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

/// `Result` with the secure component's [`Error`](enum@Error).
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// What this error is in the shared vocabulary (docs/PROTOCOL.md "Error codes"); a TTP
    /// refusal is the TTP's code (`forbidden` should the TTP send a code this build does not
    /// know: the answer keeps the TTP's own code and status anyway, see `service::http`).
    pub fn refusal(&self) -> Refusal {
        match self {
            Error::TtpRefused { code, .. } => Refusal::from_code(code).unwrap_or(Refusal::Forbidden),
            Error::TtpUnreachable { .. } => Refusal::TtpUnreachable,
            Error::BadRequest(_) | Error::Protocol(_) => Refusal::BadRequest,
            Error::AttachmentUnknown(_) => Refusal::AttachmentUnknown,
            Error::CloudPlatformNotServed(_) => Refusal::Forbidden,
            Error::AttachmentConflict(_) => Refusal::AttachmentConflict,
            Error::BindingKeyRefused(_) => Refusal::BindingKeyRefused,
            Error::Tpm { .. } | Error::Swtpm(_) | Error::TpmState { .. } => Refusal::TpmFailed,
            Error::Volume(_) | Error::DeviceMapperUnavailable(_) | Error::Xts(_) => Refusal::VolumeFailed,
            Error::Integrity { refusal, .. } => *refusal,
            Error::Hypervisor { .. } => Refusal::HypervisorFailed,
            Error::ImageNotAllowed(_) => Refusal::ImageNotAllowed,
            Error::Io { .. } => Refusal::IoError,
            Error::Config(_) => Refusal::ConfigError,
            Error::Prerequisites(_) => Refusal::HostUnprepared,
        }
    }

    /// Builds [`Error::Io`]; `context` says what was being done (for `map_err`).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    /// Builds [`Error::Tpm`] for the TPM command `operation`, e.g. "Quote" or "RSA_Decrypt".
    pub fn tpm(operation: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Tpm { operation, detail: detail.to_string() }
    }
}
