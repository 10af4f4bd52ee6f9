//! Cinder's (and Nova's) error shape: `{"badRequest": {"code": 400, "message": "..."}}`, the
//! key named after the status as Cinder's fault wrapper names it. python-openstackclient and
//! python-cinderclient print the `message`; they branch on the status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::refusal::Refusal;

use crate::error::Error;

/// An answer of the gateway that is not a success: a status and the message a user reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong and, where the user can do something, what to do.
    pub message: String,
}

/// `Result` of a gateway handler.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    /// 400 badRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 403 forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// 404 itemNotFound.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 409 conflictingRequest.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 501 notImplemented: a call of the Block Storage or Compute API the gateway does not
    /// answer (docs/OPENSTACK.md lists them and what answers for each instead).
    pub fn not_implemented(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "Skydd's OpenStack gateway does not implement {method} {path} (snapshots, backups, volume types, \
                 quotas and the rest of the API are not Skydd operations; see docs/OPENSTACK.md)"
            ),
        )
    }

    /// The key of the error body for this status, as Cinder's `Fault` names it
    /// (cinder/api/openstack/wsgi.py `_fault_names`); any other status is `computeFault`.
    pub fn fault_name(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "badRequest",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "itemNotFound",
            405 => "badMethod",
            409 => "conflictingRequest",
            413 | 429 => "overLimit",
            415 => "badMediaType",
            501 => "notImplemented",
            503 => "serviceUnavailable",
            _ => "computeFault",
        }
    }

    /// The JSON body: `{"<fault name>": {"code": STATUS, "message": MESSAGE}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ self.fault_name(): { "code": self.status.as_u16(), "message": self.message } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A failure of the domain manager (a party's refusal keeps its status and message, the
/// domain manager's hint included; the Skydd code is named so it can be looked up).
impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::Refused { code, .. } => Refusal::from_code(code)
                .and_then(|r| StatusCode::from_u16(r.http_status()).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Error::Usage(_) => StatusCode::BAD_REQUEST,
            Error::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Error::Config(_) | Error::Protocol(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // A deleted domain is, to an OpenStack client, a volume that is not there.
        let status = if status == StatusCode::GONE { StatusCode::NOT_FOUND } else { status };
        // Refusals quote names and values others chose; keep them printable.
        Self::new(status, crate::render::printable(&error.to_string()))
    }
}

impl From<protocol::Error> for ApiError {
    fn from(error: protocol::Error) -> Self {
        Self::bad_request(crate::render::printable(&error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_cinders_shape() {
        let error = ApiError::bad_request("Invalid volume: in-use");
        assert_eq!(error.body(), serde_json::json!({"badRequest": {"code": 400, "message": "Invalid volume: in-use"}}));
        assert_eq!(ApiError::not_found("x").fault_name(), "itemNotFound");
        assert_eq!(ApiError::forbidden("x").fault_name(), "forbidden");
        assert_eq!(ApiError::conflict("x").fault_name(), "conflictingRequest");
        assert_eq!(ApiError::not_implemented("GET", "/v3/snapshots").fault_name(), "notImplemented");
        assert_eq!(ApiError::new(StatusCode::NOT_ACCEPTABLE, "x").fault_name(), "computeFault");
        assert_eq!(ApiError::new(StatusCode::BAD_GATEWAY, "x").fault_name(), "computeFault");
    }

    #[test]
    fn refusals_keep_their_status() {
        let refused = |code: &str| Error::Refused {
            party: "cloud platform",
            code: code.into(),
            message: "because".into(),
            hint: String::new(),
        };
        assert_eq!(ApiError::from(refused("vm_not_in_acl")).status, StatusCode::FORBIDDEN);
        assert_eq!(ApiError::from(refused("single_writer")).status, StatusCode::CONFLICT);
        assert_eq!(ApiError::from(refused("domain_unknown")).status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::from(refused("domain_deleted")).status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::from(refused("not_a_code")).status, StatusCode::INTERNAL_SERVER_ERROR);
        let message = ApiError::from(refused("single_writer")).message;
        assert!(message.contains("single_writer") && message.contains("because"), "{message}");
        assert_eq!(ApiError::from(Error::Usage("no".into())).status, StatusCode::BAD_REQUEST);
    }
}
