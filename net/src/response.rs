//! The JSON error body every Skydd service answers with:
//! `{"code": "vm_not_in_acl", "message": "vm-7 is not in the access list of domain 3f2a..., version 4"}`;
//! the codes are `protocol::refusal::Refusal`'s.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::refusal::Refusal;
use serde::{Deserialize, Serialize};

/// The JSON body of every Skydd error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A short, stable, machine-readable code (snake_case; `protocol::refusal::Refusal`).
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
    /// An error with any `status` and `code`: for forwarding a peer's refusal unchanged.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, code: code.to_string(), message: message.into() }
    }

    /// The refusal `refusal` with its own HTTP status (docs/PROTOCOL.md "Error codes").
    pub fn refused(refusal: Refusal, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, refusal.code(), message)
    }

    /// A body axum could not take (too large 413, not JSON 415, malformed 400, wrong shape
    /// 422): `bad_request` with axum's status and its words.
    pub fn rejected_body(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, Refusal::BadRequest.code(), message)
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
        Err(join) => Err(ApiError::refused(Refusal::Internal, format!("{what} failed: {join}"))),
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
