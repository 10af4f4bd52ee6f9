//! The one error type of the cloud platform library. Every refusal carries a stable code
//! (the `code` of the JSON error body) and a message naming what was wrong. Refusals of the
//! TTP and of a secure component keep their own code and message ([`Error::Upstream`]), so
//! a domain manager sees e.g. `vm_not_in_acl: vm-7 is not in the access list of ...`.

use axum::http::StatusCode;
use net::ApiError;
use protocol::refusal::Refusal;
use thiserror::Error;

/// Every way a cloud platform request can fail. [`Error::code`] is the `code` of the JSON
/// error body and [`Error::status`] its HTTP status; the codes are listed in docs/CLOUD-API.md,
/// "Cloud platform behaviour".
#[derive(Debug, Error)]
pub enum Error {
    /// Malformed request (says which field).
    #[error("{0}")]
    BadRequest(String),
    /// A volume size that is not a positive multiple of 4096 or above the configured limit.
    #[error("{0}")]
    InvalidSize(String),
    /// The caller's role or name may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Someone other than the owner tried to create, change or delete a domain.
    #[error("{0}")]
    OwnerMismatch(String),
    /// A resource that does not exist; `code` is e.g. `domain_unknown`, `instance_unknown`.
    #[error("{message}")]
    NotFound {
        /// `domain_unknown`, `instance_unknown`, `host_unknown` or `attachment_unknown`.
        code: Refusal,
        /// What was not found, by id (and, where it helps, how to make it exist).
        message: String,
    },
    /// A conflict with the current state; `code` is e.g. `domain_exists`, `already_attached`.
    #[error("{message}")]
    Conflict {
        /// `domain_exists`, `already_attached` or `single_writer`.
        code: Refusal,
        /// What the request conflicts with.
        message: String,
    },
    /// Creating the domain would take its owner past the configured quota (403
    /// `quota_exceeded`): a number of domains or a total of declared bytes.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The domain was deleted (crypto-shredded).
    #[error("{0}")]
    DomainDeleted(String),
    /// The TTP or a secure component refused; its status, code and message are kept.
    #[error("{message}")]
    Upstream {
        /// The peer's HTTP status, answered unchanged (502 if it is not a valid status).
        status: u16,
        /// The peer's code, e.g. `vm_not_in_acl` or `version_rollback`.
        code: String,
        /// The peer's message, unchanged.
        message: String,
    },
    /// The TTP or a secure component could not be reached or answered nonsense;
    /// `code` is `ttp_unreachable` or `host_unreachable`.
    #[error("{message}")]
    Unreachable {
        /// `ttp_unreachable` or `host_unreachable`.
        code: Refusal,
        /// Who could not be reached (the TTP, or the host and its URL) and why.
        message: String,
    },
    /// A volume file could not be created, read, written or destroyed, or it holds no valid
    /// header ([`crate::volumes`], docs/FORMAT.md). Answers 500 `volume_failed`.
    #[error("volume: {0}")]
    Volume(String),
    /// The database failed ([`crate::store`]). Answers 500 `store_error`.
    #[error("store: {0}")]
    Store(String),
    /// The configuration or the TLS files are unusable; stops `serve` at start-up. Answers 500
    /// `config_error` should it reach the API.
    #[error("configuration: {0}")]
    Config(String),
}

/// `Result` with the cloud platform's [`Error`](enum@Error).
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The `code` of the JSON error body: the CP's own, or the TTP's or secure component's for
    /// [`Error::Upstream`] and the unreachable peer's for [`Error::Unreachable`].
    pub fn code(&self) -> &str {
        match self {
            Error::Upstream { code, .. } => code,
            own => own.refusal().unwrap_or(Refusal::Internal).code(),
        }
    }

    /// The CP's own refusal in the shared vocabulary (docs/PROTOCOL.md "Error codes"); `None`
    /// for a peer's refusal passed through ([`Error::Upstream`]).
    pub fn refusal(&self) -> Option<Refusal> {
        Some(match self {
            Error::BadRequest(_) => Refusal::BadRequest,
            Error::InvalidSize(_) => Refusal::InvalidSize,
            Error::Forbidden(_) => Refusal::Forbidden,
            Error::OwnerMismatch(_) => Refusal::OwnerMismatch,
            Error::QuotaExceeded(_) => Refusal::QuotaExceeded,
            Error::NotFound { code, .. } | Error::Conflict { code, .. } | Error::Unreachable { code, .. } => *code,
            Error::DomainDeleted(_) => Refusal::DomainDeleted,
            Error::Volume(_) => Refusal::VolumeFailed,
            Error::Store(_) => Refusal::StoreError,
            Error::Config(_) => Refusal::ConfigError,
            Error::Upstream { .. } => return None,
        })
    }

    /// The HTTP status the API answers with: the refusal's own, or the peer's unchanged for
    /// [`Error::Upstream`] (502 if it is not a valid status).
    pub fn status(&self) -> StatusCode {
        match (self, self.refusal()) {
            (Error::Upstream { status, .. }, _) => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            (_, Some(refusal)) => {
                StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            (_, None) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The same error with `note` appended to its message, where the message is the CP's
    /// own telling of a failure (unreachable or failing peer, volume, store); refusals stay
    /// as they are.
    pub fn with_note(self, note: &str) -> Self {
        match self {
            Error::Unreachable { code, message } => Error::Unreachable { code, message: message + note },
            Error::Upstream { status, code, message } => Error::Upstream { status, code, message: message + note },
            Error::Volume(message) => Error::Volume(message + note),
            Error::Store(message) => Error::Store(message + note),
            other => other,
        }
    }

    /// Classifies a failed call to the TTP or a secure component: a refusal keeps the
    /// peer's code and message; anything else names who could not be reached and why.
    pub fn from_peer(error: net::Error, unreachable_code: Refusal, who: impl FnOnce() -> String) -> Self {
        match error {
            net::Error::Api { status, code, message } => Error::Upstream { status, code, message },
            other => Error::Unreachable { code: unreachable_code, message: format!("{}: {other}", who()) },
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = error.status();
        if status.is_server_error() {
            tracing::error!(code = error.code(), error = %error, "request failed");
        } else {
            tracing::info!(code = error.code(), error = %error, "request refused");
        }
        ApiError::new(status, error.code(), error.to_string())
    }
}

/// The database layer's failures are the store's (`store_error`) or, for a malformed
/// `database_url`, the configuration's.
impl From<skydd_sql::Error> for Error {
    fn from(e: skydd_sql::Error) -> Self {
        match e {
            skydd_sql::Error::Store(message) => Error::Store(message),
            skydd_sql::Error::Config(message) => Error::Config(message),
        }
    }
}
