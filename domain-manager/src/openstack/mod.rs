//! `domain-manager serve-openstack`: a Block Storage v3 (and the Compute volume-attachment)
//! compatible gateway on the owner's machine. python-openstackclient, python-cinderclient and
//! tools built on the same API talk plain HTTP to it on loopback; it turns each call into Skydd
//! operations signed here with the owner's key and sent over mutual TLS to the cloud platform,
//! so the cloud never signs anything. docs/OPENSTACK.md says what is answered and what is 501.
//!
//! One module per API concept: `versions` (discovery, microversions), `volumes` (domains),
//! `attachments` (Cinder's attachments API over grants and attach/detach), `compute` (the
//! servers and `os-volume_attachments` the CLI's `server add/remove volume` call), `errors`
//! (Cinder's error shape), `ids` (OpenStack ids of Skydd objects).

pub mod attachments;
pub mod compute;
pub mod errors;
pub mod ids;
pub mod versions;
pub mod volumes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use protocol::domain::{AccessMode, AclEntry};

use crate::error::{Error, Result};
use crate::ops::DomainManager;
use errors::ApiError;

/// What `serve-openstack` was started with.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The access policy of a volume created without a `skydd:acl` property.
    pub default_acl: Vec<AclEntry>,
    /// The cloud's VMs, as the operator named them to the tenant: a domain manager cannot list
    /// the cloud's instances (the topology is the operator's), so the compute API answers
    /// these, and the VMs named in the policies and attachments of the owner's volumes.
    pub servers: Vec<String>,
}

/// A Cinder attachment reserved (`POST /v3/attachments` without a connector) and not yet
/// attached: it lives only in the gateway until its `PUT` with a connector.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The domain (volume) reserved.
    pub domain_id: String,
    /// The VM (server) it is reserved for.
    pub instance_id: String,
    /// The mode asked, if any (otherwise the VM's mode in the policy).
    pub mode: Option<AccessMode>,
    /// When it was reserved (unix seconds).
    pub created_at: u64,
}

/// The gateway's state: the owner's domain manager (key and mTLS clients) and the Cinder
/// attachments that exist only here.
pub struct Gateway {
    /// The connected domain manager: every change is signed by it.
    pub dm: DomainManager,
    /// How the gateway was started.
    pub options: GatewayOptions,
    /// Reserved attachments by attachment id (32 hex).
    pub reservations: Mutex<BTreeMap<String, Reservation>>,
    /// Attachment ids a client holds from a reservation, to the cloud platform's attachment id
    /// the reservation became.
    pub aliases: Mutex<BTreeMap<String, String>>,
}

/// The shared state of the handlers.
pub type Shared = Arc<Gateway>;

impl Gateway {
    /// A gateway over `dm`.
    pub fn new(dm: DomainManager, options: GatewayOptions) -> Self {
        Self { dm, options, reservations: Mutex::new(BTreeMap::new()), aliases: Mutex::new(BTreeMap::new()) }
    }

    /// The reservations (a poisoned lock only means a handler panicked; the map is still whole).
    pub(crate) fn reservations(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Reservation>> {
        self.reservations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn aliases(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.aliases.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Resources of Block Storage v3 and Compute v2.1 that may follow the version in a path; any
/// other segment there is a project id (`/v3/{project_id}/volumes`), which the gateway ignores:
/// it serves one owner.
const RESOURCES: &[&str] = &[
    "volumes",
    "attachments",
    "snapshots",
    "backups",
    "types",
    "os-quota-sets",
    "os-quota-class-sets",
    "limits",
    "extensions",
    "messages",
    "groups",
    "group_types",
    "group_snapshots",
    "os-services",
    "os-availability-zone",
    "scheduler-stats",
    "manageable_volumes",
    "manageable_snapshots",
    "os-volume-manage",
    "os-snapshot-manage",
    "workers",
    "clusters",
    "default-types",
    "resource_filters",
    "os-volume-transfer",
    "volume-transfers",
    "consistencygroups",
    "cgsnapshots",
    "qos-specs",
    "os-hosts",
    "capabilities",
    "os-backup-services",
    "servers",
    "flavors",
    "images",
    "os-hypervisors",
    "os-keypairs",
    "os-aggregates",
    "os-volumes",
    "os-server-groups",
    "os-simple-tenant-usage",
    "os-migrations",
    "os-networks",
    "os-security-groups",
];

/// The path without a project id: `/v3/{project}/volumes/x` is `/v3/volumes/x`; `None` when
/// the path has none.
pub fn without_project_id(path: &str) -> Option<String> {
    let api = versions::api_of_path(path)?;
    let rest = path.strip_prefix(api.prefix)?.strip_prefix('/')?;
    let (first, tail) = match rest.split_once('/') {
        Some((first, tail)) => (first, Some(tail)),
        None => (rest, None),
    };
    if first.is_empty() || RESOURCES.contains(&first) {
        return None;
    }
    Some(match tail {
        Some(tail) => format!("{}/{tail}", api.prefix),
        None => format!("{}/", api.prefix),
    })
}

/// The path as the client sent it, kept for messages and the access log.
#[derive(Debug, Clone)]
struct SentPath(String);

fn strip_project_id(mut request: Request) -> Request {
    let sent = request.uri().path().to_string();
    if let Some(path) = without_project_id(&sent) {
        let rebuilt = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        if let Ok(uri) = rebuilt.parse() {
            *request.uri_mut() = uri;
        }
    }
    request.extensions_mut().insert(SentPath(sent));
    request
}

/// One line per request on stderr: what the clients call and what they got (how
/// docs/OPENSTACK.md's list of 501 answers was made).
async fn access_log(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.extensions().get::<SentPath>().map(|p| p.0.clone()).unwrap_or_default();
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let response = next.run(request).await;
    eprintln!("{method} {} -> {}", crate::render::printable(&format!("{path}{query}")), response.status().as_u16());
    response
}

async fn not_implemented(method: Method, request: Request) -> ApiError {
    let path = request.extensions().get::<SentPath>().map(|p| p.0.clone()).unwrap_or_default();
    let mut error = ApiError::not_implemented(method.as_str(), &crate::render::printable(&path));
    if request.uri().path().starts_with("/v3/servers") {
        // One `--os-endpoint` serves every service at one URL; Compute is at /v2.1.
        error.message.push_str(
            "; compute calls (server ...) need the gateway's /v2.1: use a clouds.yaml with \
             compute_endpoint_override: http://HOST:PORT/v2.1 (as serve-openstack prints)",
        );
    }
    error
}

/// The gateway's routes (without the project-id rewriting, which must run before routing:
/// see [`serve`]).
pub fn router(gateway: Shared) -> Router {
    Router::new()
        .route("/", get(versions::root))
        .route("/v3", get(versions::volume_version))
        .route("/v3/", get(versions::volume_version))
        .route("/v3/volumes", get(volumes::list_summary).post(volumes::create))
        .route("/v3/volumes/detail", get(volumes::list_detail))
        .route("/v3/volumes/{volume_id}", get(volumes::show).delete(volumes::delete))
        .route("/v3/volumes/{volume_id}/metadata", post(volumes::set_metadata).put(volumes::set_metadata))
        .route("/v3/volumes/{volume_id}/metadata/{key}", axum::routing::delete(volumes::delete_metadata))
        .route("/v3/attachments", get(attachments::list).post(attachments::create))
        .route("/v3/attachments/detail", get(attachments::list))
        .route(
            "/v3/attachments/{attachment_id}",
            get(attachments::show).put(attachments::update).delete(attachments::delete),
        )
        .route("/v3/attachments/{attachment_id}/action", post(attachments::action))
        .route("/v2.1", get(versions::compute_version))
        .route("/v2.1/", get(versions::compute_version))
        .route("/v2.1/servers", get(compute::list_servers))
        .route("/v2.1/servers/detail", get(compute::list_servers))
        .route("/v2.1/servers/{server_id}", get(compute::show_server))
        .route("/v2.1/flavors", get(compute::no_flavors))
        .route("/v2.1/flavors/detail", get(compute::no_flavors))
        .route(
            "/v2.1/servers/{server_id}/os-volume_attachments",
            get(compute::list_volume_attachments).post(compute::attach_volume),
        )
        .route(
            "/v2.1/servers/{server_id}/os-volume_attachments/{volume_id}",
            get(compute::show_volume_attachment).delete(compute::detach_volume),
        )
        .merge(stub_routes(&versions::IDENTITY_STUB))
        .merge(stub_routes(&versions::IMAGE_STUB))
        .route("/image/v2/images", get(|| async { axum::Json(serde_json::json!({ "images": [] })) }))
        .fallback(not_implemented)
        .layer(axum::middleware::from_fn(versions::microversions))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(gateway)
}

/// The versions documents of a stub service, with and without the trailing slash.
fn stub_routes(stub: &'static versions::StubService) -> Router<Shared> {
    let versions_path = stub.prefix.to_string();
    let version_path = format!("{}/{}", stub.prefix, stub.version_path);
    let mut router = Router::new();
    for path in [versions_path.clone(), format!("{versions_path}/")] {
        router =
            router.route(&path, get(move |headers: HeaderMap| async move { versions::stub_versions(stub, &headers) }));
    }
    for path in [version_path.clone(), format!("{version_path}/")] {
        router =
            router.route(&path, get(move |headers: HeaderMap| async move { versions::stub_version(stub, &headers) }));
    }
    router
}

/// Refuses a listening address that is not loopback unless `allow_remote`: the gateway has no
/// authentication of its own (OpenStack clients use `auth_type: none` with it), and whoever
/// reaches it acts as the owner.
pub fn check_listen_address(address: &SocketAddr, allow_remote: bool) -> Result<()> {
    if address.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{address} is not a loopback address: anyone who reaches the gateway acts with your signing key \
             (it has no authentication of its own); listen on 127.0.0.1 or ::1, or pass --allow-remote if a \
             firewall or tunnel already restricts who can reach it"
        )))
    }
}

/// Serves the gateway on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, gateway: Gateway) -> Result<()> {
    use axum::ServiceExt;
    let app = tower::util::MapRequestLayer::new(strip_project_id);
    let service = tower::Layer::layer(&app, router(Arc::new(gateway)));
    axum::serve(listener, ServiceExt::<Request>::into_make_service(service))
        .await
        .map_err(|e| Error::Config(format!("the OpenStack gateway stopped: {e}")))
}

/// 204 No Content.
pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_are_taken_out_of_paths() {
        assert_eq!(without_project_id("/v3/volumes/detail"), None);
        assert_eq!(without_project_id("/v3/admin/volumes/detail").as_deref(), Some("/v3/volumes/detail"));
        assert_eq!(
            without_project_id("/v3/0123456789abcdef0123456789abcdef/attachments").as_deref(),
            Some("/v3/attachments")
        );
        assert_eq!(without_project_id("/v3/admin").as_deref(), Some("/v3/"));
        assert_eq!(without_project_id("/v2.1/p1/servers/vm-a").as_deref(), Some("/v2.1/servers/vm-a"));
        assert_eq!(without_project_id("/v2.1/servers"), None);
        assert_eq!(without_project_id("/v3/"), None);
        assert_eq!(without_project_id("/"), None);
        assert_eq!(without_project_id("/identity/v3/projects"), None);
    }

    #[test]
    fn only_loopback_without_the_flag() {
        assert!(check_listen_address(&"127.0.0.1:8776".parse().unwrap(), false).is_ok());
        assert!(check_listen_address(&"[::1]:8776".parse().unwrap(), false).is_ok());
        let refused = check_listen_address(&"0.0.0.0:8776".parse().unwrap(), false).unwrap_err().to_string();
        assert!(refused.contains("--allow-remote"), "{refused}");
        assert!(check_listen_address(&"0.0.0.0:8776".parse().unwrap(), true).is_ok());
    }
}
