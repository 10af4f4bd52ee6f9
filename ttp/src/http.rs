//! The TTP's HTTPS API (docs/PROTOCOL.md, "TTP API"): thin axum handlers over `service::Ttp`.
//! Every error answers `{"code", "message"}` with the code of `Error::code`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use net::{ApiError, Identity};
use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest};
use protocol::image::{LaunchReport, LaunchReportResponse};
use protocol::integrity::{
    IntegrityCommitRequest, IntegrityCommitResponse, IntegrityViolationReport, IntegrityViolationResponse,
};
use protocol::messages::{
    ChallengeResponse, DeleteDomainRequest, HistoryResponse, KeyReleaseRequest, KeyReleaseResponse,
    RegisterDomainRequest, RegisterDomainResponse, RotateKeyRequest,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::service::Ttp;
use protocol::refusal::Refusal;

/// Largest request body: a header record with a full ACL and certificates fits easily.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The axum router of every TTP route (docs/PROTOCOL.md "TTP API"), with the 1 MiB body
/// limit. It expects `net::serve` to insert the caller's verified `Identity`.
pub fn router(ttp: Arc<Ttp>) -> Router {
    Router::new()
        .route("/v1/enrollments", post(begin_enrollment))
        .route("/v1/enrollments/proof", post(finish_enrollment))
        .route("/v1/challenges", post(challenge))
        .route("/v1/domains", post(register_domain))
        .route("/v1/domains/{domain_id}/delete", post(delete_domain))
        .route("/v1/domains/{domain_id}/rotations", post(rotate_key))
        .route("/v1/domains/{domain_id}/history", get(history))
        .route("/v1/domains/{domain_id}/integrity/commits", post(commit_integrity_root))
        .route("/v1/domains/{domain_id}/integrity/violations", post(report_integrity_violation))
        .route("/v1/key-releases", post(release_key))
        .route("/v1/launches", post(report_launch))
        .route("/v1/health", get(health))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ttp)
}

fn status_of(error: &Error) -> StatusCode {
    StatusCode::from_u16(error.refusal().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn api_error(error: Error) -> ApiError {
    if status_of(&error) == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(code = error.code(), error = %error, "request failed");
    } else {
        tracing::info!(code = error.code(), error = %error, "request refused");
    }
    ApiError::new(status_of(&error), error.code(), error.to_string())
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| ApiError::rejected_body(rejection.status(), rejection.body_text()))
}

/// Runs a blocking decision (SQLite, RSA) off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(Json(value)),
        Ok(Err(error)) => Err(api_error(error)),
        Err(join) => Err(ApiError::refused(Refusal::Internal, format!("request handler failed: {join}"))),
    }
}

async fn begin_enrollment(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    body: Result<Json<EnrollmentRequest>, JsonRejection>,
) -> Result<Json<CredentialChallenge>, ApiError> {
    let request = json_body(body)?;
    blocking(move || ttp.begin_enrollment(&caller, &request)).await
}

/// Answer to `POST /v1/enrollments/proof`: the host is enrolled.
#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollmentResult {
    /// The enrolled host (its certificate name).
    pub host_id: String,
    /// The reference state whose PolicyPCR digest the binding key's policy matched; the host's
    /// quotes must match it from now on.
    pub reference_state: String,
    /// Hex SHA-256 of the host's EK certificate (DER).
    pub ek_fingerprint: String,
}

async fn finish_enrollment(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    body: Result<Json<EnrollmentProof>, JsonRejection>,
) -> Result<Json<EnrollmentResult>, ApiError> {
    let proof = json_body(body)?;
    blocking(move || {
        let host = ttp.finish_enrollment(&caller, &proof)?;
        Ok(EnrollmentResult {
            host_id: host.host_id,
            reference_state: host.reference_state,
            ek_fingerprint: host.ek_fingerprint,
        })
    })
    .await
}

async fn challenge(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    blocking(move || ttp.challenge(&caller)).await
}

async fn register_domain(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    body: Result<Json<RegisterDomainRequest>, JsonRejection>,
) -> Result<Json<RegisterDomainResponse>, ApiError> {
    let request = json_body(body)?;
    blocking(move || ttp.register_domain(&caller, &request)).await
}

async fn rotate_key(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<RotateKeyRequest>, JsonRejection>,
) -> Result<Json<RegisterDomainResponse>, ApiError> {
    let request = json_body(body)?;
    blocking(move || ttp.rotate_key(&caller, &domain_id, &request)).await
}

/// Answer to `POST /v1/domains/{id}/delete`: the domain is tombstoned.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deleted {
    /// The deleted domain.
    pub domain_id: String,
    /// Always `true`: a refused deletion answers an error instead.
    pub deleted: bool,
}

async fn delete_domain(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<DeleteDomainRequest>, JsonRejection>,
) -> Result<Json<Deleted>, ApiError> {
    let request = json_body(body)?;
    blocking(move || {
        let deletion = protocol::messages::Deletion::decode(&request.deletion.message)?;
        if deletion.domain_id != domain_id {
            return Err(Error::BadRequest(format!(
                "the deletion is signed for domain {}, not {domain_id}",
                deletion.domain_id
            )));
        }
        ttp.delete_domain(&caller, &request.deletion)?;
        Ok(Deleted { domain_id, deleted: true })
    })
    .await
}

/// `?since=SEQ`: the seq of the reader's last audit checkpoint.
#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<u64>,
}

async fn history(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let since = query.map_err(|rejection| ApiError::rejected_body(rejection.status(), rejection.body_text()))?.since;
    blocking(move || ttp.history_since(&caller, &domain_id, since)).await
}

async fn release_key(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    body: Result<Json<KeyReleaseRequest>, JsonRejection>,
) -> Result<Json<KeyReleaseResponse>, ApiError> {
    let request = json_body(body)?;
    blocking(move || ttp.release_key(&caller, &request)).await
}

async fn commit_integrity_root(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<IntegrityCommitRequest>, JsonRejection>,
) -> Result<Json<IntegrityCommitResponse>, ApiError> {
    let request = json_body(body)?;
    blocking(move || ttp.commit_integrity_root(&caller, &domain_id, &request)).await
}

async fn report_integrity_violation(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<IntegrityViolationReport>, JsonRejection>,
) -> Result<Json<IntegrityViolationResponse>, ApiError> {
    let report = json_body(body)?;
    blocking(move || ttp.report_integrity_violation(&caller, &domain_id, &report)).await
}

async fn report_launch(
    State(ttp): State<Arc<Ttp>>,
    Extension(caller): Extension<Identity>,
    body: Result<Json<LaunchReport>, JsonRejection>,
) -> Result<Json<LaunchReportResponse>, ApiError> {
    let report = json_body(body)?;
    blocking(move || ttp.report_launch(&caller, &report)).await
}

async fn health() -> &'static str {
    "ok"
}
