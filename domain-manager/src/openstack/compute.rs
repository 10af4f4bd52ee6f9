//! The part of Compute v2.1 that `openstack server add volume` / `server remove volume` and
//! `volume list` need: the cloud's VMs as servers, and `os-volume_attachments` mapped onto the
//! same grant-then-attach as Cinder's attachments. A domain manager cannot list the cloud's
//! instances (the topology is the operator's), so the servers are those named with `--server`
//! and the VMs in the owner's policies and attachments.

use std::collections::BTreeSet;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use protocol::cloud::{Attachment, AttachmentStatus};
use serde_json::{json, Value};

use super::errors::{ApiError, ApiResult};
use super::ids::{from_uuid, to_uuid};
use super::versions::{self, Microversion};
use super::volumes::volume_label;
use super::{Gateway, Shared};

impl Gateway {
    /// The VMs the gateway answers as servers, and the owner's attachments.
    async fn servers(&self) -> ApiResult<(BTreeSet<String>, Vec<Attachment>)> {
        let holdings = self.holdings().await?;
        let mut servers: BTreeSet<String> = self.options.servers.iter().cloned().collect();
        for domain in &holdings.domains {
            servers.extend(domain.acl.iter().map(|e| e.vm_id.clone()));
        }
        let open: Vec<Attachment> =
            holdings.attachments.into_iter().filter(|a| a.status != AttachmentStatus::Detached).collect();
        servers.extend(open.iter().map(|a| a.instance_id.clone()));
        Ok((servers, open))
    }

    async fn known_server(&self, server_id: &str) -> ApiResult<Vec<Attachment>> {
        let (servers, open) = self.servers().await?;
        if servers.contains(server_id) {
            Ok(open)
        } else {
            Err(ApiError::not_found(format!(
                "Instance {server_id} could not be found. (The gateway knows the VMs given with --server and those \
                 in your volumes' policies.)"
            )))
        }
    }
}

fn server_view(server_id: &str, attachments: &[Attachment], base: &str) -> Value {
    let volumes: Vec<Value> = attachments
        .iter()
        .filter(|a| a.instance_id == server_id)
        .map(|a| json!({"id": to_uuid(&a.domain_id), "delete_on_termination": false}))
        .collect();
    let host = attachments.iter().find(|a| a.instance_id == server_id).map(|a| a.host.clone());
    json!({
        "id": server_id,
        "name": server_id,
        "status": "ACTIVE",
        "tenant_id": "",
        "user_id": "",
        "metadata": {},
        "addresses": {},
        "image": "",
        "flavor": {"id": "", "links": []},
        "created": "1970-01-01T00:00:00Z",
        "updated": "1970-01-01T00:00:00Z",
        "hostId": "",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-SRV-ATTR:host": host,
        "OS-EXT-STS:power_state": 1,
        "OS-EXT-STS:vm_state": "active",
        "OS-EXT-STS:task_state": Value::Null,
        "os-extended-volumes:volumes_attached": volumes,
        "links": [{"rel": "self", "href": format!("{base}/v2.1/servers/{server_id}")}],
    })
}

/// Filter of the server lists: `name` (a substring, as Nova's regular expression matches).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ServerQuery {
    name: Option<String>,
}

/// `GET /v2.1/servers` and `/servers/detail`.
pub async fn list_servers(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<ServerQuery>,
) -> ApiResult<Json<Value>> {
    let (servers, open) = gateway.servers().await?;
    let base = versions::base_url(&headers);
    let views: Vec<Value> = servers
        .iter()
        .filter(|s| query.name.as_deref().is_none_or(|name| s.contains(name)))
        .map(|s| server_view(s, &open, &base))
        .collect();
    Ok(Json(json!({ "servers": views })))
}

/// `GET /v2.1/flavors[/detail]`: none (Skydd does not size VMs; `server list` looks them up).
pub async fn no_flavors() -> Json<Value> {
    Json(json!({ "flavors": [] }))
}

/// `GET /v2.1/servers/{id}`.
pub async fn show_server(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    Path(server_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let open = gateway.known_server(&server_id).await?;
    Ok(Json(json!({ "server": server_view(&server_id, &open, &versions::base_url(&headers)) })))
}

/// A `volumeAttachment` with the fields of the microversion in force.
fn volume_attachment_view(attachment: &Attachment, version: Microversion) -> Value {
    let volume_id = to_uuid(&attachment.domain_id);
    let mut view = json!({
        "id": volume_id,
        "serverId": attachment.instance_id,
        "volumeId": volume_id,
        "device": attachment.device,
    });
    if version.at_least(2, 70) {
        view["tag"] = Value::Null;
    }
    if version.at_least(2, 79) {
        view["delete_on_termination"] = Value::Bool(false);
    }
    view
}

/// `POST /v2.1/servers/{id}/os-volume_attachments`: `{"volumeAttachment": {"volumeId"}}`.
pub async fn attach_volume(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(server_id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<Json<Value>> {
    let volume_id = body
        .pointer("/volumeAttachment/volumeId")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Invalid input: volumeAttachment.volumeId is required"))?;
    gateway.known_server(&server_id).await?;
    let domain = gateway.domain_of_volume(volume_id).await?;
    let attachment = gateway.attach_domain(&domain.id, &volume_label(&domain), &server_id, None).await?;
    Ok(Json(json!({ "volumeAttachment": volume_attachment_view(&attachment, version) })))
}

fn attachments_of(open: &[Attachment], server_id: &str) -> Vec<Attachment> {
    open.iter().filter(|a| a.instance_id == server_id).cloned().collect()
}

/// `GET /v2.1/servers/{id}/os-volume_attachments`.
pub async fn list_volume_attachments(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(server_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let open = gateway.known_server(&server_id).await?;
    let views: Vec<Value> =
        attachments_of(&open, &server_id).iter().map(|a| volume_attachment_view(a, version)).collect();
    Ok(Json(json!({ "volumeAttachments": views })))
}

async fn attachment_of(gateway: &Gateway, server_id: &str, volume_id: &str) -> ApiResult<Attachment> {
    let open = gateway.known_server(server_id).await?;
    let domain_id = from_uuid(volume_id);
    attachments_of(&open, server_id)
        .into_iter()
        .find(|a| Some(&a.domain_id) == domain_id.as_ref())
        .ok_or_else(|| ApiError::not_found(format!("volume_id not found: {volume_id} is not attached to {server_id}")))
}

/// `GET /v2.1/servers/{id}/os-volume_attachments/{volume_id}`.
pub async fn show_volume_attachment(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path((server_id, volume_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let attachment = attachment_of(&gateway, &server_id, &volume_id).await?;
    Ok(Json(json!({ "volumeAttachment": volume_attachment_view(&attachment, version) })))
}

/// `DELETE /v2.1/servers/{id}/os-volume_attachments/{volume_id}`: the cloud platform's detach.
pub async fn detach_volume(
    State(gateway): State<Shared>,
    Path((server_id, volume_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let attachment = attachment_of(&gateway, &server_id, &volume_id).await?;
    gateway.dm.detach_attachment(&attachment.id).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
