//! The one error type of the cloud platform library. Every refusal carries a stable code
//! (the `code` of the JSON error body) and a message naming what was wrong. Refusals of the
//! TTP and of a secure component keep their own code and message ([`Error::Upstream`]), so
//! a domain manager sees e.g. `vm_not_in_acl: vm-7 is not in the access list of ...`.

use axum::http::StatusCode;
use net::ApiError;
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
        /// The stable code: `domain_unknown`, `instance_unknown`, `host_unknown` or
        /// `attachment_unknown`.
        code: &'static str,
        /// What was not found, by id (and, where it helps, how to make it exist).
        message: String,
    },
    /// A conflict with the current state; `code` is e.g. `domain_exists`, `already_attached`.
    #[error("{message}")]
    Conflict {
        /// The stable code: `domain_exists`, `already_attached` or `single_writer`.
        code: &'static str,
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
        code: &'static str,
        /// Who could not be reached (the TTP, or the host and its URL) and why.
        message: String,
    },
    /// A volume file could not be created, read, written or destroyed, or it holds no valid
    /// header ([`crate::volumes`], docs/FORMAT.md). Answers 500 `volume_error`.
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
            Error::BadRequest(_) => "bad_request",
            Error::InvalidSize(_) => "invalid_size",
            Error::Forbidden(_) => "forbidden",
            Error::OwnerMismatch(_) => "owner_mismatch",
            Error::QuotaExceeded(_) => "quota_exceeded",
            Error::NotFound { code, .. } | Error::Conflict { code, .. } | Error::Unreachable { code, .. } => code,
            Error::DomainDeleted(_) => "domain_deleted",
            Error::Upstream { code, .. } => code,
            Error::Volume(_) => "volume_error",
            Error::Store(_) => "store_error",
            Error::Config(_) => "config_error",
        }
    }

    /// The HTTP status the API answers with: 400, 403, 404, 409, 410, 500 or 502; a peer's
    /// refusal keeps the peer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::InvalidSize(_) => StatusCode::BAD_REQUEST,
            Error::Forbidden(_) | Error::OwnerMismatch(_) | Error::QuotaExceeded(_) => StatusCode::FORBIDDEN,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::DomainDeleted(_) => StatusCode::GONE,
            Error::Upstream { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            Error::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Error::Volume(_) | Error::Store(_) | Error::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
    pub fn from_peer(error: net::Error, unreachable_code: &'static str, who: impl FnOnce() -> String) -> Self {
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
