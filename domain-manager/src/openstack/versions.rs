//! Version discovery and microversions, as keystoneauth and the clients negotiate them:
//! `GET /` (300, the Block Storage versions document), `GET /v3/`, `GET /v2.1/`, and the
//! `OpenStack-API-Version: volume 3.N` / `compute 2.N` request header, answered with the version
//! in force and `Vary: OpenStack-API-Version`; a version outside the range is 406.

use axum::extract::Request;
use axum::http::header::{HeaderMap, HeaderName, HeaderValue, VARY};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors::{ApiError, ApiResult};

/// `OpenStack-API-Version`, the microversion header of every service.
pub const API_VERSION_HEADER: &str = "openstack-api-version";
/// Nova's legacy microversion header, still sent and read by older clients.
pub const NOVA_VERSION_HEADER: &str = "x-openstack-nova-api-version";

/// A microversion `MAJOR.MINOR`, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Microversion {
    /// 3 for Block Storage, 2 for Compute.
    pub major: u32,
    /// The microversion within the major version.
    pub minor: u32,
}

impl Microversion {
    /// Parses `3.27`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.trim().split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(major) || !digits(minor) {
            return None;
        }
        Some(Self { major: major.parse().ok()?, minor: minor.parse().ok()? })
    }

    /// True when this version is `major.minor` or newer.
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        self >= Microversion { major, minor }
    }
}

impl std::fmt::Display for Microversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One API the gateway serves and the range of microversions it answers.
#[derive(Debug, Clone, Copy)]
pub struct ApiVersion {
    /// The service name of the microversion header: `volume` or `compute`.
    pub service: &'static str,
    /// The version id of the versions document (`v3.0`, `v2.1`).
    pub id: &'static str,
    /// The path prefix (`/v3`, `/v2.1`).
    pub prefix: &'static str,
    /// The oldest microversion answered (also the one used when the client names none).
    pub min: Microversion,
    /// The newest microversion answered (what `latest` means).
    pub max: Microversion,
    /// The `updated` date of the versions document.
    pub updated: &'static str,
}

/// Block Storage v3: 3.0 to 3.71 (Cinder 2023.2 and later answer the same range); the
/// attachments API needs 3.27.
pub const VOLUME_API: ApiVersion = ApiVersion {
    service: "volume",
    id: "v3.0",
    prefix: "/v3",
    min: Microversion { major: 3, minor: 0 },
    max: Microversion { major: 3, minor: 71 },
    updated: "2023-08-31T00:00:00Z",
};

/// Compute v2.1: 2.1 to 2.79, enough for `server add/remove volume` with a tag and
/// `delete_on_termination` in the answer; newer microversions change fields the gateway does
/// not model, so clients negotiate down to 2.79.
pub const COMPUTE_API: ApiVersion = ApiVersion {
    service: "compute",
    id: "v2.1",
    prefix: "/v2.1",
    min: Microversion { major: 2, minor: 1 },
    max: Microversion { major: 2, minor: 79 },
    updated: "2013-07-23T11:33:21Z",
};

/// The API a path belongs to, if any (the path after the project id was taken out).
pub fn api_of_path(path: &str) -> Option<&'static ApiVersion> {
    [&VOLUME_API, &COMPUTE_API]
        .into_iter()
        .find(|api| path == api.prefix || path.starts_with(&format!("{}/", api.prefix)))
}

/// The microversion a request asks of `api`: the `OpenStack-API-Version` entry for its service
/// (or Nova's legacy header), `latest` meaning the newest, none meaning the oldest. 400 for a
/// malformed header, 406 for a version outside the range.
pub fn negotiate(api: &ApiVersion, headers: &HeaderMap) -> ApiResult<Microversion> {
    let mut asked: Option<String> = None;
    for value in headers.get_all(API_VERSION_HEADER) {
        let text = value.to_str().map_err(|_| ApiError::bad_request("OpenStack-API-Version is not ASCII"))?;
        for entry in text.split(',') {
            let mut words = entry.split_whitespace();
            if let (Some(service), Some(version)) = (words.next(), words.next()) {
                if service.eq_ignore_ascii_case(api.service) {
                    asked = Some(version.to_string());
                }
            }
        }
    }
    if asked.is_none() && api.service == "compute" {
        if let Some(value) = headers.get(NOVA_VERSION_HEADER) {
            asked = Some(value.to_str().unwrap_or("").to_string());
        }
    }
    let Some(asked) = asked else { return Ok(api.min) };
    if asked.eq_ignore_ascii_case("latest") {
        return Ok(api.max);
    }
    let version = Microversion::parse(&asked).ok_or_else(|| {
        ApiError::bad_request(format!(
            "Invalid API version request {asked:?}: a version is MAJOR.MINOR, e.g. {}",
            api.max
        ))
    })?;
    if version < api.min || version > api.max {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "Version {version} is not supported by the API. Minimum is {} and maximum is {}.",
                api.min, api.max
            ),
        ));
    }
    Ok(version)
}

/// Middleware: negotiates the microversion of every `/v3` and `/v2.1` request, hands it to the
/// handler as a request extension and names it in the answer (`OpenStack-API-Version`, `Vary`).
pub async fn microversions(mut request: Request, next: Next) -> Response {
    let Some(api) = api_of_path(request.uri().path()) else { return next.run(request).await };
    let version = match negotiate(api, request.headers()) {
        Ok(version) => version,
        Err(error) => return error.into_response(),
    };
    request.extensions_mut().insert(version);
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("{} {version}", api.service)) {
        headers.insert(HeaderName::from_static(API_VERSION_HEADER), value);
    }
    let mut vary = String::from("OpenStack-API-Version");
    if api.service == "compute" {
        if let Ok(value) = HeaderValue::from_str(&version.to_string()) {
            headers.insert(HeaderName::from_static(NOVA_VERSION_HEADER), value);
        }
        vary.push_str(", X-OpenStack-Nova-API-Version");
    }
    headers.insert(VARY, HeaderValue::from_str(&vary).unwrap_or(HeaderValue::from_static("OpenStack-API-Version")));
    response
}

/// `http://HOST` of the request, from its `Host` header: the links of the versions documents
/// point where the client reached the gateway.
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// One entry of a versions document.
pub fn version_entry(api: &ApiVersion, base: &str) -> Value {
    let media_service = if api.service == "volume" { "volume" } else { "compute" };
    json!({
        "id": api.id,
        "status": "CURRENT",
        "version": api.max.to_string(),
        "min_version": api.min.to_string(),
        "updated": api.updated,
        "links": [
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
            {"rel": "self", "href": format!("{base}{}/", api.prefix)},
        ],
        "media-types": [{
            "base": "application/json",
            "type": format!("application/vnd.openstack.{media_service}+json;version={}", api.min.major),
        }],
    })
}

/// `GET /`: 300 Multiple Choices with the Block Storage versions (Cinder's root).
pub async fn root(headers: HeaderMap) -> Response {
    let base = base_url(&headers);
    (StatusCode::MULTIPLE_CHOICES, Json(json!({ "versions": [version_entry(&VOLUME_API, &base)] }))).into_response()
}

/// `GET /v3/`: the Block Storage v3 versions document.
pub async fn volume_version(headers: HeaderMap) -> Json<Value> {
    Json(json!({ "versions": [version_entry(&VOLUME_API, &base_url(&headers))] }))
}

/// `GET /v2.1/`: the Compute v2.1 version document.
pub async fn compute_version(headers: HeaderMap) -> Json<Value> {
    Json(json!({ "version": version_entry(&COMPUTE_API, &base_url(&headers)) }))
}

/// A service python-openstackclient builds a client for although the command never calls it
/// (`volume list` an Identity client, `volume create` an Image client): with `auth_type: none`
/// there is no Keystone catalogue, so the gateway answers a versions document for each (every
/// call behind it is 501).
#[derive(Debug, Clone, Copy)]
pub struct StubService {
    /// Path prefix: `/identity`, `/image`.
    pub prefix: &'static str,
    /// The version id the clients accept (`v3.14`, `v2.15`).
    pub id: &'static str,
    /// The path of that version below the prefix (`v3`, `v2`).
    pub version_path: &'static str,
}

/// Identity v3.
pub const IDENTITY_STUB: StubService = StubService { prefix: "/identity", id: "v3.14", version_path: "v3" };
/// Image v2.
pub const IMAGE_STUB: StubService = StubService { prefix: "/image", id: "v2.15", version_path: "v2" };

fn stub_entry(stub: &StubService, base: &str) -> Value {
    json!({
        "id": stub.id,
        "status": if stub.prefix == "/identity" { "stable" } else { "CURRENT" },
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{base}{}/{}/", stub.prefix, stub.version_path)}],
        "media-types": [{"base": "application/json", "type": "application/json"}],
    })
}

/// The versions document of a stub service (Keystone's shape `{"versions": {"values"}}` for
/// identity, Glance's `{"versions": [...]}` for image).
pub fn stub_versions(stub: &StubService, headers: &HeaderMap) -> Response {
    let entry = stub_entry(stub, &base_url(headers));
    let body = if stub.prefix == "/identity" {
        json!({ "versions": { "values": [entry] } })
    } else {
        json!({ "versions": [entry] })
    };
    (StatusCode::MULTIPLE_CHOICES, Json(body)).into_response()
}

/// The version document of a stub service's one version.
pub fn stub_version(stub: &StubService, headers: &HeaderMap) -> Json<Value> {
    Json(json!({ "version": stub_entry(stub, &base_url(headers)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_static(name), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn parses_microversions() {
        assert_eq!(Microversion::parse("3.27"), Some(Microversion { major: 3, minor: 27 }));
        assert_eq!(Microversion::parse(" 2.1 "), Some(Microversion { major: 2, minor: 1 }));
        for bad in ["3", "3.", ".1", "3.x", "-3.1", "3.1.2", "99999999.1", ""] {
            assert_eq!(Microversion::parse(bad), None, "{bad}");
        }
        assert!(Microversion { major: 3, minor: 27 }.at_least(3, 27));
        assert!(!Microversion { major: 3, minor: 26 }.at_least(3, 27));
        assert!(Microversion { major: 3, minor: 10 } > Microversion { major: 3, minor: 9 });
    }

    #[test]
    fn negotiates_within_the_range() {
        assert_eq!(negotiate(&VOLUME_API, &headers(&[])).unwrap(), VOLUME_API.min);
        let asked = headers(&[(API_VERSION_HEADER, "volume 3.27")]);
        assert_eq!(negotiate(&VOLUME_API, &asked).unwrap(), Microversion { major: 3, minor: 27 });
        let latest = headers(&[(API_VERSION_HEADER, "volume latest")]);
        assert_eq!(negotiate(&VOLUME_API, &latest).unwrap(), VOLUME_API.max);
        // Another service's entry is not ours.
        let both = headers(&[(API_VERSION_HEADER, "compute 2.60, volume 3.44")]);
        assert_eq!(negotiate(&VOLUME_API, &both).unwrap(), Microversion { major: 3, minor: 44 });
        assert_eq!(negotiate(&COMPUTE_API, &both).unwrap(), Microversion { major: 2, minor: 60 });
        let legacy = headers(&[(NOVA_VERSION_HEADER, "2.49")]);
        assert_eq!(negotiate(&COMPUTE_API, &legacy).unwrap(), Microversion { major: 2, minor: 49 });
    }

    #[test]
    fn refuses_versions_outside_the_range() {
        let too_new = negotiate(&VOLUME_API, &headers(&[(API_VERSION_HEADER, "volume 3.99")])).unwrap_err();
        assert_eq!(too_new.status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(too_new.message, "Version 3.99 is not supported by the API. Minimum is 3.0 and maximum is 3.71.");
        let other_major = negotiate(&VOLUME_API, &headers(&[(API_VERSION_HEADER, "volume 2.0")])).unwrap_err();
        assert_eq!(other_major.status, StatusCode::NOT_ACCEPTABLE);
        let compute_old = negotiate(&COMPUTE_API, &headers(&[(API_VERSION_HEADER, "compute 2.0")])).unwrap_err();
        assert_eq!(compute_old.status, StatusCode::NOT_ACCEPTABLE);
        let malformed = negotiate(&VOLUME_API, &headers(&[(API_VERSION_HEADER, "volume three")])).unwrap_err();
        assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn paths_belong_to_their_api() {
        assert_eq!(api_of_path("/v3/volumes").map(|a| a.service), Some("volume"));
        assert_eq!(api_of_path("/v3").map(|a| a.service), Some("volume"));
        assert_eq!(api_of_path("/v2.1/servers").map(|a| a.service), Some("compute"));
        assert!(api_of_path("/v30/volumes").is_none());
        assert!(api_of_path("/").is_none());
        assert!(api_of_path("/identity/v3").is_none());
    }

    /// The middleware as routed: the version in force is named in the answer, with `Vary`; a
    /// version outside the range never reaches the handler.
    #[tokio::test]
    async fn the_middleware_names_the_version() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/v3/volumes", axum::routing::get(|| async { "ok" }))
            .route("/v2.1/servers", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(microversions));
        let request = |path: &str, header: Option<&str>| {
            let mut builder = axum::http::Request::builder().uri(path);
            if let Some(value) = header {
                builder = builder.header("OpenStack-API-Version", value);
            }
            builder.body(axum::body::Body::empty()).unwrap()
        };
        let answer = app.clone().oneshot(request("/v3/volumes", Some("volume 3.27"))).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()[API_VERSION_HEADER], "volume 3.27");
        assert_eq!(answer.headers()[VARY], "OpenStack-API-Version");
        let answer = app.clone().oneshot(request("/v2.1/servers", None)).await.unwrap();
        assert_eq!(answer.headers()[API_VERSION_HEADER], "compute 2.1");
        assert_eq!(answer.headers()[NOVA_VERSION_HEADER], "2.1");
        let refused = app.oneshot(request("/v3/volumes", Some("volume 3.72"))).await.unwrap();
        assert_eq!(refused.status(), StatusCode::NOT_ACCEPTABLE);
        let body = axum::body::to_bytes(refused.into_body(), 4096).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["computeFault"]["code"], 406, "{body}");
    }

    #[test]
    fn version_documents_link_back() {
        let entry = version_entry(&VOLUME_API, "http://127.0.0.1:8776");
        assert_eq!(entry["version"], "3.71");
        assert_eq!(entry["min_version"], "3.0");
        assert_eq!(entry["links"][1]["href"], "http://127.0.0.1:8776/v3/");
    }
}
