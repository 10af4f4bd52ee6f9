//! Volumes are Skydd domains: `POST /v3/volumes` signs a first descriptor (the volume's name,
//! description and properties become domain metadata, its `skydd:acl` property or the gateway's
//! default the access policy) and asks the cloud platform for a `size` GiB volume; `DELETE`
//! crypto-shreds it. The volume object carries the fields the clients print.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::cloud::{Attachment, AttachmentStatus, DomainView};
use protocol::domain::AclEntry;
use serde_json::{json, Value};

use super::errors::{ApiError, ApiResult};
use super::ids::{from_uuid, timestamp, to_uuid};
use super::{versions, Gateway, Shared};

/// Domain metadata key holding the volume's name.
pub const NAME_KEY: &str = "openstack:name";
/// Domain metadata key holding the volume's description.
pub const DESCRIPTION_KEY: &str = "openstack:description";
/// The volume property that sets the access policy at creation: `vm-a:rw,vm-b:ro`. It is not
/// domain metadata (metadata never changes; the policy does): the volume shows the policy in
/// force under this key.
pub const ACL_PROPERTY: &str = "skydd:acl";
/// Read-only properties the gateway adds to show the domain: its owner and version.
const OWNER_PROPERTY: &str = "skydd:owner";
const VERSION_PROPERTY: &str = "skydd:version";

const GIB: u64 = 1 << 30;
/// The one volume type: an encrypted Skydd domain.
pub const VOLUME_TYPE: &str = "skydd";

/// What the cloud platform holds for the owner: its domains and their attachments.
pub struct Holdings {
    /// Every domain the owner sees.
    pub domains: Vec<DomainView>,
    /// Every attachment of those domains.
    pub attachments: Vec<Attachment>,
}

impl Gateway {
    /// Reads the owner's domains and attachments from the cloud platform.
    pub async fn holdings(&self) -> ApiResult<Holdings> {
        Ok(Holdings { domains: self.dm.list().await?, attachments: self.dm.attachments().await? })
    }

    /// The domain of a volume id (a UUID or 32 hex); 404 itemNotFound for anything else,
    /// names included (clients then list with `?name=`).
    pub async fn domain_of_volume(&self, volume_id: &str) -> ApiResult<DomainView> {
        let not_found = || ApiError::not_found(format!("Volume {volume_id} could not be found."));
        let domain_id = from_uuid(volume_id).ok_or_else(not_found)?;
        match self.dm.show(&domain_id).await {
            Ok(domain) => Ok(domain),
            Err(error) if matches!(error.code(), Some("domain_unknown" | "domain_deleted" | "forbidden")) => {
                Err(not_found())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The volume object of `domain` (`attachments` are all of the owner's; those of this
    /// domain are picked).
    pub fn volume_view(&self, domain: &DomainView, attachments: &[Attachment], base: &str) -> Value {
        let open: Vec<&Attachment> =
            attachments.iter().filter(|a| a.domain_id == domain.id && a.status != AttachmentStatus::Detached).collect();
        let reserved = self.reservations().values().any(|r| r.domain_id == domain.id);
        let status = if open.iter().any(|a| a.status == AttachmentStatus::Attaching) || reserved {
            "attaching"
        } else if open.iter().any(|a| a.status == AttachmentStatus::Detaching) {
            "detaching"
        } else {
            match domain.status.as_str() {
                "available" | "in-use" | "deleting" | "creating" => domain.status.as_str(),
                "deleted" => "deleting",
                _ => "error",
            }
        };
        let id = to_uuid(&domain.id);
        let mut properties: BTreeMap<String, String> = domain
            .metadata
            .iter()
            .filter(|(key, _)| key.as_str() != NAME_KEY && key.as_str() != DESCRIPTION_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        properties.insert(ACL_PROPERTY.into(), format_acl(&domain.acl));
        properties.insert(OWNER_PROPERTY.into(), domain.owner.clone());
        properties.insert(VERSION_PROPERTY.into(), domain.version.to_string());
        let attachment_views: Vec<Value> = open
            .iter()
            .map(|a| {
                json!({
                    "id": id,
                    "attachment_id": to_uuid(&a.id),
                    "volume_id": id,
                    "server_id": a.instance_id,
                    "host_name": a.host,
                    "device": a.device,
                    "attached_at": Value::Null,
                })
            })
            .collect();
        json!({
            "id": id,
            "name": domain.metadata.get(NAME_KEY),
            "description": domain.metadata.get(DESCRIPTION_KEY),
            "status": status,
            "size": domain.size_bytes.div_ceil(GIB),
            "availability_zone": "nova",
            "created_at": timestamp(domain.created_at),
            "updated_at": Value::Null,
            "attachments": attachment_views,
            "bootable": "false",
            "encrypted": true,
            "multiattach": false,
            "metadata": properties,
            "volume_type": VOLUME_TYPE,
            "volume_type_id": Value::Null,
            "snapshot_id": Value::Null,
            "source_volid": Value::Null,
            "consistencygroup_id": Value::Null,
            "group_id": Value::Null,
            "replication_status": Value::Null,
            "migration_status": Value::Null,
            "user_id": domain.owner,
            "os-vol-tenant-attr:tenant_id": domain.owner,
            "provider_id": Value::Null,
            "service_uuid": Value::Null,
            "shared_targets": false,
            "cluster_name": Value::Null,
            "consumes_quota": true,
            "links": [{"rel": "self", "href": format!("{base}/v3/volumes/{id}")}],
        })
    }
}

/// How messages name a volume: its name, or its id when it has none.
pub fn volume_label(domain: &DomainView) -> String {
    domain.metadata.get(NAME_KEY).cloned().unwrap_or_else(|| to_uuid(&domain.id))
}

/// `vm-a:rw,vm-b:ro`.
pub fn format_acl(acl: &[AclEntry]) -> String {
    acl.iter().map(|e| format!("{}:{}", e.vm_id, e.mode)).collect::<Vec<_>>().join(",")
}

/// Parses the `skydd:acl` property: entries `VM:ro` / `VM:rw` separated by commas or spaces.
pub fn parse_acl_property(text: &str) -> ApiResult<Vec<AclEntry>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            crate::ops::parse_acl_entry(entry).map_err(|e| {
                ApiError::bad_request(format!("Invalid input: property {ACL_PROPERTY}: {e} (e.g. vm-a:rw,vm-b:ro)"))
            })
        })
        .collect()
}

/// The size of a create request in bytes: `size` in GiB, a positive integer.
fn size_bytes(size: Option<&Value>) -> ApiResult<u64> {
    let gib = match size {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|&gib| gib > 0)
    .ok_or_else(|| ApiError::bad_request("Invalid input: 'size' must be a positive whole number of GiB"))?;
    gib.checked_mul(GIB).ok_or_else(|| ApiError::bad_request(format!("Invalid input: size {gib} GiB is too large")))
}

/// Fields of a create request for things a Skydd volume cannot come from.
const UNSUPPORTED_SOURCES: &[(&str, &str)] = &[
    ("snapshot_id", "snapshots"),
    ("source_volid", "cloning"),
    ("imageRef", "images"),
    ("backup_id", "backups"),
    ("group_id", "groups"),
    ("consistencygroup_id", "consistency groups"),
];

/// `POST /v3/volumes`: a new domain owned by this gateway's manager.
pub async fn create(State(gateway): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> ApiResult<Response> {
    let volume = body
        .get("volume")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("Invalid input: the body must be {\"volume\": {...}}"))?;
    for (field, what) in UNSUPPORTED_SOURCES {
        if volume.get(*field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(format!(
                "Invalid input: '{field}': a Skydd volume is created empty; {what} are not supported (see docs/OPENSTACK.md)"
            )));
        }
    }
    if let Some(kind) = volume.get("volume_type").and_then(Value::as_str).filter(|t| *t != VOLUME_TYPE) {
        return Err(ApiError::not_found(format!(
            "Volume type with name {kind} could not be found. (Every Skydd volume is of type {VOLUME_TYPE}.)"
        )));
    }
    let size = size_bytes(volume.get("size"))?;
    let mut metadata = BTreeMap::new();
    let mut acl = gateway.options.default_acl.clone();
    if let Some(properties) = volume.get("metadata").and_then(Value::as_object) {
        for (key, value) in properties {
            let value = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            if key == ACL_PROPERTY {
                acl = parse_acl_property(&value)?;
            } else if [NAME_KEY, DESCRIPTION_KEY, OWNER_PROPERTY, VERSION_PROPERTY].contains(&key.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "Invalid input: property {key} is set by the gateway; use the volume's own field"
                )));
            } else {
                metadata.insert(key.clone(), value);
            }
        }
    }
    for (field, key) in [("name", NAME_KEY), ("description", DESCRIPTION_KEY)] {
        if let Some(text) = volume.get(field).and_then(Value::as_str).filter(|t| !t.is_empty()) {
            metadata.insert(key.to_string(), text.to_string());
        }
    }
    let domain = gateway.dm.create(metadata, acl, Vec::new(), size).await?;
    let view = gateway.volume_view(&domain, &[], &versions::base_url(&headers));
    Ok((StatusCode::ACCEPTED, Json(json!({ "volume": view }))).into_response())
}

/// Filters of the volume lists: `name` (exact, as Cinder), `status`, `limit`, `marker`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    name: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    marker: Option<String>,
}

async fn volume_list(gateway: &Gateway, query: &ListQuery, base: &str) -> ApiResult<Vec<Value>> {
    let holdings = gateway.holdings().await?;
    let mut views: Vec<Value> = holdings
        .domains
        .iter()
        .filter(|d| d.status != "deleted")
        .map(|d| gateway.volume_view(d, &holdings.attachments, base))
        .filter(|v| query.name.as_deref().is_none_or(|name| v["name"] == name))
        .filter(|v| query.status.as_deref().is_none_or(|status| v["status"] == status))
        .collect();
    if let Some(marker) = &query.marker {
        let marker = from_uuid(marker).map(|m| to_uuid(&m)).unwrap_or_else(|| marker.clone());
        match views.iter().position(|v| v["id"] == marker.as_str()) {
            Some(at) => views = views.split_off(at + 1),
            None => return Err(ApiError::not_found(format!("Marker {marker} could not be found."))),
        }
    }
    if let Some(limit) = query.limit {
        views.truncate(limit);
    }
    Ok(views)
}

/// `GET /v3/volumes/detail`.
pub async fn list_detail(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let views = volume_list(&gateway, &query, &versions::base_url(&headers)).await?;
    Ok(Json(json!({ "volumes": views })))
}

/// `GET /v3/volumes`: id, name and links only, as Cinder's summary list.
pub async fn list_summary(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let views = volume_list(&gateway, &query, &versions::base_url(&headers)).await?;
    let summaries: Vec<Value> =
        views.iter().map(|v| json!({"id": v["id"], "name": v["name"], "links": v["links"]})).collect();
    Ok(Json(json!({ "volumes": summaries })))
}

/// `GET /v3/volumes/{id}`.
pub async fn show(
    State(gateway): State<Shared>,
    headers: HeaderMap,
    Path(volume_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let domain = gateway.domain_of_volume(&volume_id).await?;
    let attachments = gateway.dm.attachments().await?;
    Ok(Json(json!({ "volume": gateway.volume_view(&domain, &attachments, &versions::base_url(&headers)) })))
}

/// `DELETE /v3/volumes/{id}`: crypto-shreds the domain (its key can never be derived again).
/// Refused while the volume is attached or reserved, as Cinder refuses an in-use volume.
pub async fn delete(State(gateway): State<Shared>, Path(volume_id): Path<String>) -> ApiResult<Response> {
    let domain = gateway.domain_of_volume(&volume_id).await?;
    let attachments = gateway.dm.attachments().await?;
    let open: Vec<&Attachment> =
        attachments.iter().filter(|a| a.domain_id == domain.id && a.status != AttachmentStatus::Detached).collect();
    let reserved = gateway.reservations().values().any(|r| r.domain_id == domain.id);
    if !open.is_empty() || reserved {
        let servers: Vec<&str> = open.iter().map(|a| a.instance_id.as_str()).collect();
        let label = volume_label(&domain);
        let remedy = match servers.first() {
            Some(server) => format!("openstack server remove volume {server} {label}"),
            None => "openstack volume attachment delete ATTACHMENT".to_string(),
        };
        return Err(ApiError::bad_request(format!(
            "Invalid volume: Volume status must be available or error, but current status is: in-use \
             (attached to {}). Detach it first: {remedy}",
            if servers.is_empty() { "a reserved attachment".to_string() } else { servers.join(", ") }
        )));
    }
    gateway.dm.delete(&domain.id).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `POST` or `PUT /v3/volumes/{id}/metadata` (`openstack volume set --property`): only
/// `skydd:acl` changes, as a new owner-signed version (the cloud platform detaches VMs that lost
/// access); every other property is domain metadata, bound into the key, and cannot change.
pub async fn set_metadata(
    State(gateway): State<Shared>,
    Path(volume_id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<Json<Value>> {
    let properties = body
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("Invalid input: the body must be {\"metadata\": {...}}"))?;
    let domain = gateway.domain_of_volume(&volume_id).await?;
    let mut new_acl = None;
    for (key, value) in properties {
        let value = value.as_str().unwrap_or_default();
        if key == ACL_PROPERTY {
            new_acl = Some(parse_acl_property(value)?);
        } else if domain.metadata.get(key).map(String::as_str) != Some(value) {
            return Err(ApiError::bad_request(format!(
                "Invalid input: property {key} is domain metadata, bound into the volume's key when it was created; it \
                 cannot change (only {ACL_PROPERTY}, the access policy, can)"
            )));
        }
    }
    let domain = match new_acl {
        Some(acl) => gateway.dm.set_acl(&domain.id, acl).await?,
        None => domain,
    };
    let view = gateway.volume_view(&domain, &[], "");
    Ok(Json(json!({ "metadata": view["metadata"] })))
}

/// `DELETE /v3/volumes/{id}/metadata/{key}`: refused, domain metadata never changes (an empty
/// policy is `skydd:acl=` through `volume set`).
pub async fn delete_metadata(Path((volume_id, key)): Path<(String, String)>) -> ApiError {
    ApiError::bad_request(format!(
        "Invalid input: property {} of volume {} is bound into the volume's key and cannot be removed",
        crate::render::printable(&key),
        crate::render::printable(&volume_id)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_properties_parse() {
        let acl = parse_acl_property("vm-a:rw, vm-b:ro").unwrap();
        assert_eq!(format_acl(&acl), "vm-a:rw,vm-b:ro");
        assert!(parse_acl_property("").unwrap().is_empty());
        let refused = parse_acl_property("vm-a:rx").unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(refused.message.contains(ACL_PROPERTY), "{}", refused.message);
    }

    #[test]
    fn sizes_are_whole_gib() {
        assert_eq!(size_bytes(Some(&json!(1))).unwrap(), GIB);
        assert_eq!(size_bytes(Some(&json!("2"))).unwrap(), 2 * GIB);
        for bad in [json!(0), json!(-1), json!(1.5), json!("x"), Value::Null] {
            assert_eq!(size_bytes(Some(&bad)).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(size_bytes(None).is_err());
    }
}
