//! Cinder's attachments API (microversion 3.27 and later) over Skydd's grants and the cloud
//! platform's attach and detach. An attachment of volume V to server S is an owner-signed
//! mount grant for VM S, refused here (403) unless the policy in force lets S mount V, then the
//! cloud platform's attach; deleting it is the cloud platform's detach. An attachment created
//! without a connector is only reserved (held by the gateway) until its `PUT` with one.

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use protocol::cloud::{Attachment, AttachmentStatus};
use protocol::domain::AccessMode;
use serde_json::{json, Value};

use super::errors::{ApiError, ApiResult};
use super::ids::{from_uuid, timestamp, to_uuid};
use super::versions::Microversion;
use super::volumes::volume_label;
use super::{no_content, Gateway, Reservation, Shared};
use crate::ops::DEFAULT_GRANT_SECS;

/// An attachment as the gateway knows it.
#[derive(Debug, Clone)]
pub enum Found {
    /// Reserved, not attached: (attachment id, reservation).
    Reserved(String, Reservation),
    /// The cloud platform's attachment.
    Cloud(Attachment),
}

impl Gateway {
    /// Attaches the domain to VM `instance_id`: checks the owner-signed policy in force (403
    /// when it does not name the VM, or names it read-only and `rw` is asked), signs a
    /// single-use mount grant and asks the cloud platform to attach.
    pub async fn attach_domain(
        &self,
        domain_id: &str,
        volume_label: &str,
        instance_id: &str,
        mode: Option<AccessMode>,
    ) -> ApiResult<Attachment> {
        protocol::domain::validate_name("server id", instance_id)?;
        // The descriptor is verified against the owner's signature: a policy the cloud altered
        // is refused before a grant is signed on it.
        let descriptor = self.dm.current_descriptor(domain_id).await?;
        let Some(entry) = descriptor.acl.iter().find(|e| e.vm_id == instance_id) else {
            let allowed = super::volumes::format_acl(&descriptor.acl);
            return Err(ApiError::forbidden(format!(
                "Policy doesn't allow server {instance_id} to attach volume {volume_label}: the owner's access policy \
                 (version {}) names {}; grant it first with `domain-manager domain grant {domain_id} --vm {instance_id}:rw` (or :ro)",
                descriptor.version,
                if allowed.is_empty() { "no VM".to_string() } else { allowed }
            )));
        };
        let mode = match mode {
            Some(AccessMode::Rw) if entry.mode == AccessMode::Ro => {
                return Err(ApiError::forbidden(format!(
                    "Policy doesn't allow server {instance_id} to attach volume {volume_label} read-write: its access is ro; \
                     attach with mode ro, or grant rw with `domain-manager domain grant {domain_id} --vm {instance_id}:rw`"
                )))
            }
            Some(mode) => mode,
            None => entry.mode,
        };
        Ok(self.dm.attach(domain_id, instance_id, mode, DEFAULT_GRANT_SECS).await?)
    }

    /// Looks an attachment id up: a reservation, one a reservation became, or the cloud
    /// platform's; 404 itemNotFound otherwise.
    pub async fn find_attachment(&self, attachment_id: &str) -> ApiResult<Found> {
        let not_found = || ApiError::not_found(format!("Attachment {attachment_id} could not be found."));
        let id = from_uuid(attachment_id).ok_or_else(not_found)?;
        if let Some(reservation) = self.reservations().get(&id) {
            return Ok(Found::Reserved(id, reservation.clone()));
        }
        let cloud_id = self.aliases().get(&id).cloned().unwrap_or(id);
        self.dm.attachments().await?.into_iter().find(|a| a.id == cloud_id).map(Found::Cloud).ok_or_else(not_found)
    }
}

/// The Cinder attachment object of a cloud platform attachment.
pub fn cloud_view(attachment: &Attachment) -> Value {
    let status = match attachment.status {
        AttachmentStatus::Attached => "attached",
        AttachmentStatus::Attaching => "attaching",
        AttachmentStatus::Detaching => "detaching",
        AttachmentStatus::Detached => "detached",
    };
    json!({
        "id": to_uuid(&attachment.id),
        "status": status,
        "instance": attachment.instance_id,
        "volume_id": to_uuid(&attachment.domain_id),
        "attach_mode": attachment.mode.to_string(),
        "attached_at": Value::Null,
        "detached_at": Value::Null,
        "connection_info": {
            "driver_volume_type": "skydd",
            "host": attachment.host,
            "device": attachment.device,
            "mount_path": attachment.mount_path,
            "version": attachment.version,
        },
    })
}

fn reserved_view(id: &str, reservation: &Reservation) -> Value {
    json!({
        "id": to_uuid(id),
        "status": "reserved",
        "instance": reservation.instance_id,
        "volume_id": to_uuid(&reservation.domain_id),
        "attach_mode": reservation.mode.map(|m| m.to_string()).unwrap_or_else(|| "null".into()),
        "attached_at": Value::Null,
        "detached_at": Value::Null,
        "created_at": timestamp(reservation.created_at),
        "connection_info": {},
    })
}

fn view(found: &Found) -> Value {
    match found {
        Found::Reserved(id, reservation) => reserved_view(id, reservation),
        Found::Cloud(attachment) => cloud_view(attachment),
    }
}

/// The attachments API exists from 3.27 on; earlier, Cinder answers 404 for its paths.
fn require_attachments_api(version: Microversion) -> ApiResult<()> {
    if version.at_least(3, 27) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "The resource could not be found: the attachments API needs microversion 3.27 or later (asked {version})"
        )))
    }
}

fn parse_mode(value: Option<&Value>) -> ApiResult<Option<AccessMode>> {
    match value.and_then(Value::as_str) {
        None | Some("null") => Ok(None),
        Some(text) => text
            .parse::<AccessMode>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("Invalid input: mode {text:?} must be rw or ro"))),
    }
}

/// A connector is given when it is a non-empty object: as Cinder (`if connector:`), an empty
/// one only reserves (python-openstackclient sends `{}` without `--connect`).
fn has_connector(attachment: &serde_json::Map<String, Value>) -> bool {
    attachment.get("connector").and_then(Value::as_object).is_some_and(|c| !c.is_empty())
}

/// `POST /v3/attachments`: `{"attachment": {"volume_uuid", "instance_uuid", "connector", "mode"}}`.
pub async fn create(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Json(body): Json<Value>,
) -> ApiResult<Json<Value>> {
    require_attachments_api(version)?;
    let request = body
        .get("attachment")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("Invalid input: the body must be {\"attachment\": {...}}"))?;
    let field = |name: &str| {
        request
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request(format!("Invalid input: '{name}' is required")))
    };
    let volume_id = field("volume_uuid")?;
    let instance_id = field("instance_uuid")?.to_string();
    let mode = parse_mode(request.get("mode"))?;
    let domain = gateway.domain_of_volume(volume_id).await?;
    if has_connector(request) {
        let attachment = gateway.attach_domain(&domain.id, &volume_label(&domain), &instance_id, mode).await?;
        return Ok(Json(json!({ "attachment": cloud_view(&attachment) })));
    }
    protocol::domain::validate_name("server id", &instance_id)?;
    let id = hex_id();
    let reservation =
        Reservation { domain_id: domain.id.clone(), instance_id, mode, created_at: crate::ops::now_unix() };
    let answer = reserved_view(&id, &reservation);
    gateway.reservations().insert(id, reservation);
    Ok(Json(json!({ "attachment": answer })))
}

fn hex_id() -> String {
    rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect()
}

/// Filters of `GET /v3/attachments`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    volume_id: Option<String>,
    instance_id: Option<String>,
}

/// `GET /v3/attachments` and `/detail`: reservations and the open attachments of the owner's
/// volumes.
pub async fn list(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    require_attachments_api(version)?;
    let volume = query.volume_id.as_deref().map(|v| from_uuid(v).unwrap_or_default());
    let mut found: Vec<Found> =
        gateway.reservations().iter().map(|(id, r)| Found::Reserved(id.clone(), r.clone())).collect();
    found.extend(
        gateway
            .dm
            .attachments()
            .await?
            .into_iter()
            .filter(|a| a.status != AttachmentStatus::Detached)
            .map(Found::Cloud),
    );
    let views: Vec<Value> = found
        .iter()
        .map(view)
        .filter(|v| volume.as_deref().is_none_or(|d| v["volume_id"] == to_uuid(d)))
        .filter(|v| query.instance_id.as_deref().is_none_or(|i| v["instance"] == i))
        .collect();
    Ok(Json(json!({ "attachments": views })))
}

/// `GET /v3/attachments/{id}`.
pub async fn show(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(attachment_id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_attachments_api(version)?;
    Ok(Json(json!({ "attachment": view(&gateway.find_attachment(&attachment_id).await?) })))
}

/// `PUT /v3/attachments/{id}` with a connector: a reservation is attached now.
pub async fn update(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(attachment_id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<Json<Value>> {
    require_attachments_api(version)?;
    let request = body.get("attachment").and_then(Value::as_object).filter(|a| has_connector(a)).ok_or_else(|| {
        ApiError::bad_request("Invalid input: the body must be {\"attachment\": {\"connector\": {...}}}")
    })?;
    match gateway.find_attachment(&attachment_id).await? {
        Found::Reserved(id, reservation) => {
            let mode = parse_mode(request.get("mode"))?.or(reservation.mode);
            let domain = gateway.domain_of_volume(&reservation.domain_id).await?;
            let attachment =
                gateway.attach_domain(&domain.id, &volume_label(&domain), &reservation.instance_id, mode).await?;
            gateway.reservations().remove(&id);
            gateway.aliases().insert(id, attachment.id.clone());
            Ok(Json(json!({ "attachment": cloud_view(&attachment) })))
        }
        Found::Cloud(attachment) => Err(ApiError::bad_request(format!(
            "Invalid attachment: {attachment_id} is {} already; only a reserved attachment takes a connector",
            cloud_view(&attachment)["status"].as_str().unwrap_or("attached")
        ))),
    }
}

/// `DELETE /v3/attachments/{id}`: a reservation is dropped, an attachment detached.
pub async fn delete(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(attachment_id): Path<String>,
) -> ApiResult<Json<Value>> {
    require_attachments_api(version)?;
    match gateway.find_attachment(&attachment_id).await? {
        Found::Reserved(id, _) => {
            gateway.reservations().remove(&id);
        }
        Found::Cloud(attachment) => {
            if attachment.status != AttachmentStatus::Detached {
                gateway.dm.detach_attachment(&attachment.id).await?;
            }
        }
    }
    Ok(Json(json!({ "attachments": [] })))
}

/// `POST /v3/attachments/{id}/action`: `os-complete` (the attachment is in use; nothing is left
/// to do, the cloud platform's attach finished before the answer). Other actions are 501.
pub async fn action(
    State(gateway): State<Shared>,
    Extension(version): Extension<Microversion>,
    Path(attachment_id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<Response> {
    require_attachments_api(version)?;
    if body.get("os-complete").is_none() {
        return Err(ApiError::not_implemented("POST", &format!("/v3/attachments/{attachment_id}/action")));
    }
    match gateway.find_attachment(&attachment_id).await? {
        Found::Cloud(_) => Ok(no_content()),
        Found::Reserved(..) => Err(ApiError::bad_request(format!(
            "Invalid attachment: {attachment_id} is only reserved; update it with a connector first"
        ))),
    }
}
