//! The agent's HTTPS API (docs/CLOUD-API.md): thin axum handlers over [`AttachmentService`].
//! Errors answer `{"code", "message"}`; a refusal by the TTP keeps the TTP's code and message.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use net::{ApiError, Identity, PeerCertificates, Role};
use protocol::cloud::{AgentAttachRequest, AgentAttachment, AgentAttachmentList, AgentRotateRequest, AgentRotation};
use protocol::refusal::Refusal;
use serde::Serialize;

use super::{AttachmentService, Cloud};
use crate::error::Error;
use crate::launch::{LaunchRequest, LaunchedVm};

/// Largest request body: a header record with a full ACL and certificates fits easily.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The agent's routes (`POST`/`GET /v1/attachments`, `DELETE /v1/attachments/{id}`,
/// `POST`/`GET /v1/vms`, `DELETE /v1/vms/{vm_id}` (trusted launch), `GET /v1/health`) over `service`, with the [`MAX_BODY_BYTES`] limit. Callers other
/// than the cloud platform are refused with 403 `forbidden`.
pub fn router(service: Arc<AttachmentService>) -> Router {
    Router::new()
        .route("/v1/attachments", get(list).post(attach))
        .route("/v1/attachments/{attachment_id}", delete(detach))
        .route("/v1/attachments/{attachment_id}/rotation", post(rotate))
        .route("/v1/vms", get(list_vms).post(launch_vm))
        .route("/v1/vms/{vm_id}", delete(stop_vm))
        .route("/v1/health", get(health))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
}

/// The status and code of an agent error: a TTP refusal keeps the TTP's own, every other
/// error answers its [`Refusal`].
pub fn status_and_code(error: &Error) -> (StatusCode, String) {
    match error {
        Error::TtpRefused { status, code, .. } => {
            (StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY), code.clone())
        }
        other => {
            let refusal = other.refusal();
            let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, refusal.code().to_string())
        }
    }
}

/// The error answer; a TTP refusal carries the TTP's own message unchanged.
pub fn api_error(error: Error) -> ApiError {
    let (status, code) = status_and_code(&error);
    let message = match &error {
        Error::TtpRefused { message, .. } => message.clone(),
        other => other.to_string(),
    };
    if status.is_server_error() {
        tracing::error!(%code, error = %error, "request failed");
    } else {
        tracing::info!(%code, error = %error, "request refused");
    }
    ApiError::new(status, &code, message)
}

/// The cloud `caller` is the cloud platform of (home or a `[[partner]]`); refused
/// otherwise with 403 `forbidden`.
fn cloud_of(service: &AttachmentService, caller: &Identity, chain: &PeerCertificates) -> Result<Cloud, ApiError> {
    require_cloud_platform(caller)?;
    service.cloud_of(caller, &chain.0).map_err(api_error)
}

/// Trusted launch serves the home cloud only: a partner's cloud platform places VMs its own
/// cloud runs on this host, it does not start processes here.
fn require_home(service: &AttachmentService, caller: &Identity, chain: &PeerCertificates) -> Result<(), ApiError> {
    match cloud_of(service, caller, chain)? {
        Cloud::Home => Ok(()),
        Cloud::Partner(name) => Err(ApiError::refused(
            Refusal::Forbidden,
            format!(
                "{caller} is the cloud platform of partner {name:?}; only the home cloud platform launches VMs here"
            ),
        )),
    }
}

/// Only the cloud platform calls the agent (the TLS configuration already refuses any other
/// role; this keeps a misconfiguration from opening it up).
fn require_cloud_platform(caller: &Identity) -> Result<(), ApiError> {
    if caller.role == Role::CloudPlatform {
        Ok(())
    } else {
        Err(ApiError::refused(
            Refusal::Forbidden,
            format!("{caller} may not call the secure component; only the cloud platform may"),
        ))
    }
}

async fn attach(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
    body: Result<Json<AgentAttachRequest>, JsonRejection>,
) -> Result<Json<AgentAttachment>, ApiError> {
    let cloud = cloud_of(&service, &caller, &chain)?;
    let Json(request) = body.map_err(|r| ApiError::rejected_body(r.status(), r.body_text()))?;
    tracing::info!(caller = %caller, ttp = cloud.ttp_name(), attachment = %request.attachment_id, vm = %request.vm_id, mode = %request.mode, "attach requested");
    net::run_to_completion(
        "attach",
        async move { service.attach_for(&cloud, request).await.map(Json).map_err(api_error) },
    )
    .await
}

/// `POST /v1/attachments/{id}/rotation`: re-encrypt the attachment's volume online (202).
async fn rotate(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
    Path(attachment_id): Path<String>,
    body: Result<Json<AgentRotateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AgentRotation>), ApiError> {
    let cloud = cloud_of(&service, &caller, &chain)?;
    let Json(request) = body.map_err(|r| ApiError::rejected_body(r.status(), r.body_text()))?;
    tracing::info!(caller = %caller, attachment = %attachment_id, "online re-encryption requested");
    net::run_to_completion("rotate", async move {
        service
            .rotate_online_for(&cloud, &attachment_id, request)
            .await
            .map(|rotation| (StatusCode::ACCEPTED, Json(rotation)))
            .map_err(api_error)
    })
    .await
}

async fn list(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
) -> Result<Json<AgentAttachmentList>, ApiError> {
    let cloud = cloud_of(&service, &caller, &chain)?;
    let work = service.clone();
    match tokio::task::spawn_blocking(move || work.list_for(&cloud)).await {
        Ok(Ok(list)) => Ok(Json(list)),
        Ok(Err(e)) => Err(api_error(e)),
        Err(join) => Err(ApiError::refused(Refusal::Internal, format!("list failed: {join}"))),
    }
}

async fn detach(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
    Path(attachment_id): Path<String>,
) -> Result<Json<AgentAttachment>, ApiError> {
    let cloud = cloud_of(&service, &caller, &chain)?;
    tracing::info!(caller = %caller, ttp = cloud.ttp_name(), attachment = %attachment_id, "detach requested");
    net::run_to_completion("detach", async move {
        service.detach_for(&cloud, &attachment_id).await.map(Json).map_err(api_error)
    })
    .await
}

/// Runs blocking launcher work off the async workers (a launch hashes the whole image).
async fn with_launcher<T: Send + 'static>(
    service: Arc<AttachmentService>,
    what: &'static str,
    work: impl FnOnce(&crate::launch::Launcher) -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let outcome = tokio::task::spawn_blocking(move || service.launcher().and_then(work)).await;
    match outcome {
        Ok(result) => result.map_err(api_error),
        Err(join) => Err(ApiError::refused(Refusal::Internal, format!("{what} failed: {join}"))),
    }
}

async fn launch_vm(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
    body: Result<Json<LaunchRequest>, JsonRejection>,
) -> Result<Json<LaunchedVm>, ApiError> {
    require_home(&service, &caller, &chain)?;
    let Json(request) = body.map_err(|r| ApiError::rejected_body(r.status(), r.body_text()))?;
    tracing::info!(caller = %caller, vm = %request.vm_id, image = %request.image.display(), "launch requested");
    // To completion, so the report is sent even if the caller goes away; a report that does
    // not reach the TTP changes nothing in the answer (launch.rs, `report_to_ttp`).
    net::run_to_completion("launch", async move { service.launch_vm(request).await.0.map(Json).map_err(api_error) })
        .await
}

async fn list_vms(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
) -> Result<Json<Vec<LaunchedVm>>, ApiError> {
    require_home(&service, &caller, &chain)?;
    with_launcher(service, "list VMs", |launcher| Ok(launcher.list())).await.map(Json)
}

async fn stop_vm(
    State(service): State<Arc<AttachmentService>>,
    Extension(caller): Extension<Identity>,
    Extension(chain): Extension<PeerCertificates>,
    Path(vm_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_home(&service, &caller, &chain)?;
    tracing::info!(caller = %caller, vm = %vm_id, "VM stop requested");
    with_launcher(service, "stop", move |launcher| launcher.stop(&vm_id)).await.map(|()| StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct Health {
    host_id: String,
    backend: &'static str,
    hypervisor: &'static str,
}

async fn health(State(service): State<Arc<AttachmentService>>) -> Json<Health> {
    Json(Health {
        host_id: service.attested_host().host_id.clone(),
        backend: service.backend_kind(),
        hypervisor: service.driver_kind(),
    })
}
