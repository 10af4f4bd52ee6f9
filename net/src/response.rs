//! The JSON error body every Skydd service answers with:
//! `{"code": "not-in-acl", "message": "vm-7 is not in the ACL of domain 3f2a..., version 4"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// The JSON body of every Skydd error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A short, stable, machine-readable code (kebab-case).
    pub code: String,
    /// What exactly was wrong, for a person.
    pub message: String,
}

/// The error response with `status` and the body `{"code": code, "message": message}`.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { code: code.to_string(), message: message.into() })).into_response()
}

/// An error a handler can return (`Result<Json<T>, ApiError>`); renders with [`error_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status to answer with.
    pub status: StatusCode,
    /// The stable, machine-readable code (see [`ErrorBody::code`]).
    pub code: String,
    /// What exactly was wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with any `status`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, code: code.to_string(), message: message.into() }
    }
    /// 400: the request is malformed or invalid.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 403: the caller is authenticated but not allowed to do this.
    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    /// 404: the named resource does not exist.
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    /// 409: the request conflicts with the current state (e.g. a stale version).
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 500: the service failed; not the caller's fault.
    pub fn internal(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }
}

/// Runs a handler's work in its own task, so it finishes even when the caller goes away:
/// hyper drops a handler's future when the client disconnects, and a change dropped
/// half-way (between the TTP and the volume header, or while a mapping is being made) would
/// release its locks with the work half done. The answer is lost with the caller; the work
/// is not.
pub async fn run_to_completion<T: Send + 'static>(
    what: &'static str,
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(work).await {
        Ok(outcome) => outcome,
        Err(join) => Err(ApiError::internal("internal", format!("{what} failed: {join}"))),
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.code, self.message)
    }
}
