//! The cloud platform's HTTPS API (docs/CLOUD-API.md): thin axum handlers over
//! [`CloudPlatform`]. Every error answers `{"code", "message"}`. Handlers that change
//! something run to completion even when the domain manager disconnects
//! ([`net::run_to_completion`]).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use net::{ApiError, Identity};
use protocol::cloud::{
    Attachment, AttachmentList, ComputeHost, CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody,
    DomainList, DomainView, Instance, InstanceList, UpdateDomainRequest,
};
use serde::{Deserialize, Serialize};

use crate::service::CloudPlatform;
use crate::store::Page;

/// Largest request body: a descriptor with a full ACL and certificates fits easily.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

type Cp = State<Arc<CloudPlatform>>;
type Answer<T> = Result<Json<T>, ApiError>;

/// The cloud platform's routes (docs/CLOUD-API.md, "Cloud platform") over `cp`, with the
/// [`MAX_BODY_BYTES`] limit. Who may call what is checked in [`CloudPlatform`] by the caller's
/// TLS identity.
pub fn router(cp: Arc<CloudPlatform>) -> Router {
    Router::new()
        .route("/v1/hosts", post(register_host).get(list_hosts))
        .route("/v1/instances", post(register_instance).get(list_instances))
        .route("/v1/domains", post(create_domain).get(list_domains))
        .route("/v1/domains/{domain_id}", get(get_domain).delete(delete_domain))
        .route("/v1/domains/{domain_id}/descriptor", put(update_domain))
        .route("/v1/domains/{domain_id}/rotations", post(rotate_domain))
        .route("/v1/attachments", post(attach).get(list_attachments))
        .route("/v1/attachments/{attachment_id}", get(get_attachment).delete(detach))
        .route("/v1/health", get(health))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(cp)
}

/// Query parameters of the list endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Page size: 50 if absent, at most 500; 0 is refused with 400 `bad_request`.
    pub limit: Option<usize>,
    /// The last id of the previous page (its `next_marker`); the list starts after it.
    pub marker: Option<String>,
    /// `GET /v1/attachments` only: the attachments of one domain.
    pub domain_id: Option<String>,
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value)
        .map_err(|rejection| ApiError::rejected_body(rejection.status(), rejection.body_text()))
}

fn query(q: Result<Query<ListQuery>, QueryRejection>) -> Result<(ListQuery, Page), ApiError> {
    let Query(q) = q.map_err(|rejection| ApiError::rejected_body(rejection.status(), rejection.body_text()))?;
    let page = Page::new(q.limit, q.marker.clone())?;
    Ok((q, page))
}

fn answer<T>(result: crate::Result<T>) -> Answer<T> {
    result.map(Json).map_err(ApiError::from)
}

async fn register_host(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    body: Result<Json<ComputeHost>, JsonRejection>,
) -> Answer<ComputeHost> {
    answer(cp.register_host(&caller, json_body(body)?).await)
}

/// The answer to `GET /v1/hosts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostList {
    /// Every registered compute host, by id.
    pub hosts: Vec<ComputeHost>,
}

async fn list_hosts(State(cp): Cp, Extension(caller): Extension<Identity>) -> Answer<HostList> {
    answer(cp.hosts(&caller).await.map(|hosts| HostList { hosts }))
}

async fn register_instance(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    body: Result<Json<Instance>, JsonRejection>,
) -> Answer<Instance> {
    answer(cp.register_instance(&caller, json_body(body)?).await)
}

async fn list_instances(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer<InstanceList> {
    let (_, page) = query(q)?;
    answer(cp.instances(&caller, page).await)
}

async fn create_domain(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    body: Result<Json<CreateDomainRequest>, JsonRejection>,
) -> Answer<DomainView> {
    let request = json_body(body)?;
    net::run_to_completion("create domain", async move { answer(cp.create_domain(&caller, request).await) }).await
}

async fn list_domains(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer<DomainList> {
    let (_, page) = query(q)?;
    answer(cp.list_domains(&caller, page).await)
}

async fn get_domain(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
) -> Answer<DomainView> {
    answer(cp.get_domain(&caller, &domain_id).await)
}

async fn update_domain(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<UpdateDomainRequest>, JsonRejection>,
) -> Answer<DomainView> {
    let request = json_body(body)?;
    net::run_to_completion("update domain", async move { answer(cp.update_domain(&caller, &domain_id, request).await) })
        .await
}

async fn rotate_domain(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<protocol::cloud::RotateDomainRequest>, JsonRejection>,
) -> Answer<DomainView> {
    let request = json_body(body)?;
    net::run_to_completion(
        "rotate domain key",
        async move { answer(cp.rotate_domain(&caller, &domain_id, request).await) },
    )
    .await
}

async fn delete_domain(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    Path(domain_id): Path<String>,
    body: Result<Json<DeleteDomainBody>, JsonRejection>,
) -> Answer<DomainView> {
    let request = json_body(body)?;
    net::run_to_completion("delete domain", async move { answer(cp.delete_domain(&caller, &domain_id, request).await) })
        .await
}

async fn attach(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    body: Result<Json<CreateAttachmentRequest>, JsonRejection>,
) -> Answer<Attachment> {
    let request = json_body(body)?;
    net::run_to_completion("attach", async move { answer(cp.attach(&caller, request).await) }).await
}

async fn list_attachments(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Answer<AttachmentList> {
    let (q, page) = query(q)?;
    answer(cp.attachments(&caller, q.domain_id, page).await)
}

async fn get_attachment(
    State(cp): Cp,
    Extension(caller): Extension<Identity>,
    Path(id): Path<String>,
) -> Answer<Attachment> {
    answer(cp.attachment(&caller, &id).await)
}

async fn detach(State(cp): Cp, Extension(caller): Extension<Identity>, Path(id): Path<String>) -> Answer<Attachment> {
    net::run_to_completion("detach", async move { answer(cp.detach(&caller, &id).await) }).await
}

async fn health() -> &'static str {
    "ok"
}
