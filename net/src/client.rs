//! A small mutual-TLS JSON client for the links between Skydd parties.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::files::TlsFiles;
use crate::response::ErrorBody;
use protocol::pki::Role;

/// How often a client built from TLS files compares their modification times.
pub const TLS_FILES_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A pooled (keep-alive) connection unused for this long is closed by the client. Shorter
/// than the servers' `ServeOptions::idle_timeout` (60 s by default), so a client never sends
/// a request on a connection the server is just closing for being idle.
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(30);

/// Default largest response body read (bigger ones are refused with [`Error::TooLarge`]).
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// A JSON-over-HTTPS client that presents our certificate and checks the server's (its chain
/// and its role, per the `rustls::ClientConfig` from `protocol::pki::client_config`).
#[derive(Clone, Debug)]
pub struct Client {
    http: Http,
    /// The replicas' base URLs, in the order given; requests go to `preferred` first.
    bases: Arc<[String]>,
    /// The replica that answered last: requests stay on it until it stops answering.
    preferred: Arc<std::sync::atomic::AtomicUsize>,
    max_body: usize,
}

/// Where the HTTP client of the next request comes from.
#[derive(Clone, Debug)]
enum Http {
    /// Built once from a TLS configuration.
    Fixed(reqwest::Client),
    /// Built from TLS files and rebuilt when they change ([`Client::from_files`]).
    Reloading(Arc<Reloading>),
}

impl Http {
    fn current(&self) -> reqwest::Client {
        match self {
            Http::Fixed(http) => http.clone(),
            Http::Reloading(reload) => reload.current(),
        }
    }
}

/// A client's TLS files and what was last built from them: a revocation list (or
/// certificate) replaced on disk is used for the next request within
/// [`TLS_FILES_CHECK_EVERY`], without a restart, as the servers do.
#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    server_role: Role,
    timeout: Duration,
    state: Mutex<ReloadState>,
}

#[derive(Debug)]
struct ReloadState {
    checked_at: Instant,
    stamp: Vec<Option<(std::time::SystemTime, u64)>>,
    http: reqwest::Client,
}

impl Reloading {
    /// The HTTP client for the next request: rebuilt (with a new connection pool, so no
    /// connection checked under the old lists is reused) when the files changed. Files that
    /// changed but do not load keep the previous client, and are tried again next check.
    fn current(&self) -> reqwest::Client {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked_at.elapsed() >= TLS_FILES_CHECK_EVERY {
            state.checked_at = Instant::now();
            let stamp = crate::server::tls_files_stamp(&self.files);
            if stamp != state.stamp {
                match self.files.client_config(self.server_role).and_then(|tls| http_client(tls, self.timeout)) {
                    Ok(http) => {
                        state.http = http;
                        state.stamp = stamp;
                        tracing::info!(revocation_lists = self.files.crl.len(), server_role = %self.server_role,
                            "TLS files changed: the next requests use the reloaded certificates and revocation lists");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS files changed but do not load; still using the previous ones")
                    }
                }
            }
        }
        state.http.clone()
    }
}

fn http_client(tls: rustls::ClientConfig, timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(CLIENT_POOL_IDLE)
        .timeout(timeout)
        .build()
        .map_err(|e| Error::Config(format!("building the HTTP client failed: {e}")))
}

impl Client {
    /// `base_url` like `https://ttp.cloud:7443` (the host must be in the server's SANs), or
    /// several replicas' URLs separated by commas (`https://ttp-1:7443,https://ttp-2:7443`):
    /// a request the replica in use never received (no connection, a refused handshake, a
    /// connection-limit refusal), and a GET that got no answer, is made again at the next
    /// replica, which is then used from that request on. No proxy is used: Skydd links are
    /// point to point.
    pub fn new(base_url: &str, tls: rustls::ClientConfig) -> Result<Self> {
        Self::with_timeout(base_url, tls, Duration::from_secs(30))
    }

    /// As [`new`](Self::new), with a total per-request timeout.
    pub fn with_timeout(base_url: &str, tls: rustls::ClientConfig, timeout: Duration) -> Result<Self> {
        let bases = base_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                let base = url.trim_end_matches('/').to_string();
                if !base.starts_with("https://") {
                    return Err(Error::Config(format!(
                        "base URL {url:?} is not https://: Skydd links are mutual TLS only"
                    )));
                }
                reqwest::Url::parse(&base)
                    .map_err(|e| Error::Config(format!("base URL {url:?} does not parse: {e}")))?;
                Ok(base)
            })
            .collect::<Result<Vec<_>>>()?;
        if bases.is_empty() {
            return Err(Error::Config(format!("base URL {base_url:?} names no URL")));
        }
        Ok(Client {
            http: Http::Fixed(http_client(tls, timeout)?),
            bases: bases.into(),
            preferred: Arc::default(),
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// A client whose TLS configuration comes from `files` (server role `server_role`) and
    /// follows them: replaced certificates or revocation lists are used within
    /// [`TLS_FILES_CHECK_EVERY`] — a server certificate revoked while a long-running party
    /// talks to it is refused from then on, not at its next restart.
    pub fn from_files(base_url: &str, files: &TlsFiles, server_role: Role, timeout: Duration) -> Result<Self> {
        // Stamp first: a change while the files are read is seen at the first check.
        let stamp = crate::server::tls_files_stamp(files);
        let mut client = Self::with_timeout(base_url, files.client_config(server_role)?, timeout)?;
        let first = client.http.current();
        client.http = Http::Reloading(Arc::new(Reloading {
            files: files.clone(),
            server_role,
            timeout,
            state: Mutex::new(ReloadState { checked_at: Instant::now(), stamp, http: first }),
        }));
        Ok(client)
    }

    /// Refuse response bodies larger than `bytes`.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Replaces the response body limit (default [`DEFAULT_MAX_BODY`]); larger bodies are
    /// [`Error::TooLarge`].
    pub fn base_url(&self) -> &str {
        &self.bases[self.preferred.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()]
    }

    /// The base URL requests are made against, without a trailing slash.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.request_json::<(), T>(Method::GET, path, None).await
    }

    /// GET `path` (relative to the base URL) and parse the JSON answer as `T`.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.request_json(Method::POST, path, Some(body)).await
    }

    /// POST `body` as JSON to `path` and parse the JSON answer as `T`.
    pub async fn put_json<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.request_json(Method::PUT, path, Some(body)).await
    }

    /// PUT `body` as JSON to `path` and parse the JSON answer as `T`.
    /// DELETE `path` and parse the JSON answer as `T`.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.request_json::<(), T>(Method::DELETE, path, None).await
    }

    /// Any method; `body` is sent as JSON when given. An empty 2xx body reads as JSON `null`
    /// (so `T = ()` or `Option<_>` fit a 204).
    pub async fn request_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        use std::sync::atomic::Ordering;
        let first = self.preferred.load(Ordering::Relaxed) % self.bases.len();
        let mut tried = 0;
        loop {
            let index = (first + tried) % self.bases.len();
            tried += 1;
            match self.request_at(&self.bases[index], method.clone(), path, body).await {
                Ok(value) => {
                    if index != first {
                        self.preferred.store(index, Ordering::Relaxed);
                        tracing::warn!(replica = %self.bases[index], "failed over to another replica");
                    }
                    return Ok(value);
                }
                // Made again elsewhere only when it cannot have been acted on twice: never
                // received, or a GET (which changes nothing) that got no answer.
                Err(error)
                    if tried < self.bases.len()
                        && (error.never_reached_peer()
                            || (method == Method::GET
                                && matches!(
                                    error,
                                    Error::Timeout { .. } | Error::Connect { .. } | Error::Request { .. }
                                ))) =>
                {
                    tracing::warn!(replica = %self.bases[index], error = %error, "replica unreachable, trying the next");
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn request_at<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let url = format!("{base}/{}", path.trim_start_matches('/'));
        let mut req = self.http.current().request(method, &url).header("accept", "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| classify(&url, &e))?;
        let status = resp.status();
        let bytes = read_limited(resp, &url, self.max_body).await?;
        if !status.is_success() {
            return Err(api_error(status, &url, &bytes));
        }
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| Error::Json { url, detail: e.to_string() })
    }
}

async fn read_limited(mut resp: reqwest::Response, url: &str, limit: usize) -> Result<Vec<u8>> {
    if let Some(len) = resp.content_length() {
        if len > limit as u64 {
            return Err(Error::TooLarge { url: url.to_string(), limit });
        }
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(url, &e))? {
        if out.len() + chunk.len() > limit {
            return Err(Error::TooLarge { url: url.to_string(), limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn api_error(status: StatusCode, url: &str, body: &[u8]) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => Error::Api { status: status.as_u16(), code: b.code, message: b.message },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut excerpt: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
            if text.chars().count() > 200 {
                excerpt.push('…');
            }
            Error::Http { status: status.as_u16(), url: url.to_string(), body: excerpt }
        }
    }
}

/// Turn a reqwest failure into the error that says what happened: a TLS refusal (ours or the
/// server's, with the rule), a connection failure, a timeout.
fn classify(url: &str, e: &reqwest::Error) -> Error {
    let peer = e
        .url()
        .and_then(|u| u.host_str().map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(443))))
        .unwrap_or_else(|| url.to_string());
    let mut io_kind = None;
    if let Some(tls) = find_rustls(e, &mut io_kind, 0) {
        return Error::Tls { peer, reason: protocol::pki::describe_tls_error(tls) };
    }
    if e.is_timeout() {
        return Error::Timeout { url: url.to_string() };
    }
    use std::io::ErrorKind as K;
    // Refused, or failed while connecting: the request was never sent.
    let before_request = e.is_connect() || io_kind == Some(K::ConnectionRefused);
    match io_kind {
        Some(K::ConnectionRefused) => {
            Error::Connect { peer, reason: "connection refused (is the service running?)".into(), before_request }
        }
        Some(K::ConnectionReset) | Some(K::BrokenPipe) | Some(K::UnexpectedEof) => Error::Connect {
            peer,
            reason: "the server closed the connection (it may have refused our certificate)".into(),
            before_request,
        },
        Some(k) => Error::Connect { peer, reason: format!("{k}: {}", chain_text(e)), before_request },
        None if e.is_connect() => Error::Connect { peer, reason: chain_text(e), before_request },
        None => Error::Request { url: url.to_string(), detail: chain_text(e) },
    }
}

/// Depth-first through `source()` and through the payloads of `io::Error`s (whose `source()`
/// skips the payload itself), looking for the rustls error that says what failed.
fn find_rustls<'a>(
    err: &'a (dyn std::error::Error + 'static),
    io_kind: &mut Option<std::io::ErrorKind>,
    depth: usize,
) -> Option<&'a rustls::Error> {
    if depth > 16 {
        return None;
    }
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        if io.kind() != std::io::ErrorKind::Other {
            io_kind.get_or_insert(io.kind());
        }
        if let Some(inner) = io.get_ref() {
            if let Some(t) = find_rustls(inner, io_kind, depth + 1) {
                return Some(t);
            }
        }
    }
    err.source().and_then(|s| find_rustls(s, io_kind, depth + 1))
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut s = e.source();
    while let Some(x) = s {
        let t = x.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        s = x.source();
    }
    parts.join(": ")
}
