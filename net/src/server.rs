//! The mutual-TLS HTTPS accept loop every Skydd service runs.
//!
//! Each accepted TCP connection gets its own task: TLS 1.3 handshake (bounded in time), then
//! HTTP/1.1 or HTTP/2 (hyper-util auto) serving the axum router. The verified peer
//! [`Identity`] and the peer address (`ConnectInfo<SocketAddr>`) are put into every request's
//! extensions, so handlers take `Extension<Identity>`. A failed handshake is logged with the
//! peer address and the reason, and the loop goes on.
//!
//! Connection hygiene (see [`ServeOptions`] for the limits and their defaults), so that one
//! party cannot hold the slots every other party needs:
//!
//! - from one IP address only so many connections may be in their TLS handshake at once;
//! - a connection must complete its first request's headers within a deadline from its
//!   accept (handshake included), and one with no request in flight for a while is closed
//!   (HTTP/1: no more keep-alive; HTTP/2: GOAWAY; dropped after a grace period);
//! - one verified identity may have only so many connections open: the next ones are
//!   answered 429 `too_many_connections` and closed;
//! - one verified identity may make only so many requests a second (a token bucket shared by
//!   its connections): the next ones are answered 429 `rate_limited` with `Retry-After`,
//!   before the router sees them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::response::Response;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use protocol::pki::{self, Identity, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::error::{Error, Result};
use crate::files::TlsFiles;
pub use crate::limits::RateLimit;
use crate::limits::{Admission, HandshakeSlot, Limits, REFUSAL_WINDOW};
use crate::response::error_response;

/// A connection whose TLS handshake failed, as reported to [`ServeOptions::failures`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeFailure {
    /// The address the failed connection came from.
    pub peer: SocketAddr,
    /// Which rule failed, in words ("no client certificate presented", "certificate is not
    /// issued by a trusted CA", "client certificate of \"x\" has role domain-manager, this
    /// endpoint accepts secure-component", "certificate expired at ...").
    pub reason: String,
}

/// Tuning of [`serve_with`]. `Default` suits every service; each default is chosen for a
/// hospital cloud, where a few hundred parties (compute hosts, domain managers, the cloud
/// platform) talk to each service over keep-alive connections, answers take milliseconds,
/// and any one authenticated party may be hostile (a tenant's domain manager) and must not be
/// able to starve the others.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A TLS handshake not finished within this is dropped (slow or idle clients). Default
    /// 10 s; the handshake is also bounded by [`first_request_timeout`](Self::first_request_timeout).
    pub handshake_timeout: Duration,
    /// At most this many connections at once (in their handshake or served); further ones
    /// wait in the kernel backlog. Default 1,024.
    pub max_connections: usize,
    /// On shutdown, open connections get this long to finish their requests.
    pub drain_timeout: Duration,
    /// If set, every failed handshake is also sent here (tests, metrics), and so is every
    /// connection refused before its handshake (too many handshakes from its address).
    pub failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
    /// A connection whose first request's headers are not complete this long after it was
    /// accepted (TLS handshake included) is closed. Default 10 s: an honest Skydd client
    /// sends its request right behind its handshake, which takes milliseconds even on a
    /// loaded 2-core host; a party that connects and says nothing is holding a slot.
    pub first_request_timeout: Duration,
    /// A connection with no request in flight (no request being read or handled, no
    /// response being written) for this long is closed. Default 60 s: long enough that a
    /// party's pooled keep-alive connection survives the gaps between its calls (the
    /// [`Client`](crate::Client) drops pooled connections after
    /// [`CLIENT_POOL_IDLE`](crate::client::CLIENT_POOL_IDLE), 30 s, so it never reuses one the
    /// server is closing), short enough that held-open idle connections cannot pile up.
    /// hyper's own header timeout does not cover a connection that sends nothing, and
    /// HTTP/2 has none.
    pub idle_timeout: Duration,
    /// After a connection is told to close for being idle or too slow (HTTP/1: no
    /// keep-alive; HTTP/2: GOAWAY), it is dropped this long later if it has not closed.
    /// Nothing is in flight then, so this only covers the close itself and a request that
    /// arrived just as it was decided. Default 5 s.
    pub close_grace: Duration,
    /// At most this many connections of one verified identity (certificate name and role)
    /// at once. Default 64: a Skydd party keeps one pooled connection per concurrent call,
    /// and no party makes anywhere near 64 calls at once to one service, while 16 hostile
    /// identities would still be needed to fill [`max_connections`](Self::max_connections).
    /// A connection over the cap is answered 429 `too_many_connections` (and closed within
    /// 2 s, at most 8 such at a time per identity; beyond that it is closed right after the
    /// handshake), and the refusal is logged naming the identity.
    pub max_connections_per_identity: usize,
    /// At most this many connections from one IP address may be in their TLS handshake at
    /// once; a further one is closed before its handshake (and reported to
    /// [`failures`](Self::failures)). Default 64: a handshake takes milliseconds, so even a
    /// NAT in front of many parties rarely has more than a few under way, while
    /// unauthenticated sockets from one address can no longer fill `max_connections`.
    pub max_handshakes_per_ip: usize,
    /// Each identity's request rate, all its connections together; `None`: unlimited.
    /// Default 100 requests/s sustained with bursts of 200: the busiest honest caller (the
    /// cloud platform reconciling its hosts, a host attaching many volumes at boot) stays
    /// far below it, and it bounds what one identity can make the service do. A request
    /// over it is answered 429 `rate_limited` with a `Retry-After` header.
    pub request_rate: Option<RateLimit>,
}

/// A server's TLS configuration and, when it was built from files, how to rebuild it.
#[derive(Clone)]
pub struct ServerTls {
    /// The configuration new connections are accepted with.
    pub config: Arc<rustls::ServerConfig>,
    /// If set, the files are watched and the configuration rebuilt when one changes: a new
    /// revocation list (`cloud-platform ca revoke`) takes effect for new connections without
    /// a restart, and so does a renewed certificate.
    pub reload: Option<TlsReload>,
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        ServerTls { config, reload: None }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("reload", &self.reload).finish_non_exhaustive()
    }
}

/// What [`ServerTls::reload`] watches and how the configuration is rebuilt.
#[derive(Debug, Clone)]
pub struct TlsReload {
    /// The TLS files the configuration is rebuilt from.
    pub files: TlsFiles,
    /// The client roles the rebuilt configuration accepts.
    pub allowed_client_roles: Vec<Role>,
    /// How often the files' modification times are compared.
    pub check_every: Duration,
}

impl TlsReload {
    /// Watch `files` every 2 s.
    pub fn new(files: TlsFiles, allowed_client_roles: &[Role]) -> Self {
        TlsReload { files, allowed_client_roles: allowed_client_roles.to_vec(), check_every: Duration::from_secs(2) }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(10),
            failures: None,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            close_grace: Duration::from_secs(5),
            max_connections_per_identity: 64,
            max_handshakes_per_ip: 64,
            request_rate: Some(RateLimit { per_second: 100.0, burst: 200 }),
        }
    }
}

/// Serve `router` over mutual TLS on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: impl Into<ServerTls>, router: Router) -> Result<()> {
    serve_with(listener, tls, router, ServeOptions::default(), CancellationToken::new()).await
}

/// Serve until `shutdown` is cancelled, then stop accepting, let open connections finish
/// their requests (up to [`ServeOptions::drain_timeout`]), close the rest and return.
///
/// Refused: options that could serve nothing (a zero limit or timeout, a rate limit of 0).
pub async fn serve_with(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    check_options(&options)?;
    let local = listener.local_addr().map_err(|e| Error::Serve(format!("listener has no address: {e}")))?;
    tracing::info!(
        %local,
        first_request_timeout = ?options.first_request_timeout,
        idle_timeout = ?options.idle_timeout,
        max_connections = options.max_connections,
        max_connections_per_identity = options.max_connections_per_identity,
        max_handshakes_per_ip = options.max_handshakes_per_ip,
        request_rate = ?options.request_rate,
        "serving mutual TLS"
    );
    let ServerTls { config, reload } = tls.into();
    let acceptor = Arc::new(RwLock::new(TlsAcceptor::from(config)));
    if let Some(reload) = reload {
        tokio::spawn(watch_tls_files(reload, acceptor.clone(), shutdown.clone()));
    }
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let limits = Arc::new(Limits::new(
        options.max_connections_per_identity,
        options.max_handshakes_per_ip,
        options.request_rate,
    ));
    let options = Arc::new(options);
    // Every connection task holds a clone of `open_tx`; when all are dropped, `open_rx`
    // sees the channel closed: every connection is done.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    // Cancelled when the drain timeout is over: connections still open are dropped.
    let kill = CancellationToken::new();

    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: transient; back off instead of spinning.
                    tracing::warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let accepted = Instant::now();
        let Some(handshake_slot) = limits.begin_handshake(peer.ip()) else {
            refuse_before_handshake(tcp, peer, &options);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Connection {
            acceptor: current_acceptor(&acceptor),
            router: router.clone(),
            options: options.clone(),
            limits: limits.clone(),
            peer,
            accepted,
        };
        let (shutdown, kill, open) = (shutdown.clone(), kill.clone(), open_tx.clone());
        tokio::spawn(async move {
            let _open = open;
            let _permit = permit;
            tokio::select! {
                _ = conn.run(tcp, handshake_slot, &shutdown) => {}
                _ = kill.cancelled() => {
                    tracing::debug!(%peer, "connection dropped: still open after the drain timeout");
                }
            }
        });
    }

    drop(listener);
    drop(open_tx);
    tracing::info!(%local, "shutting down: no new connections, draining open ones");
    tokio::select! {
        _ = open_rx.recv() => tracing::info!(%local, "all connections closed"),
        _ = tokio::time::sleep(options.drain_timeout) => {
            tracing::warn!(%local, "connections still open after the drain timeout; closing them");
            kill.cancel();
        }
    }
    Ok(())
}

fn check_options(options: &ServeOptions) -> Result<()> {
    let zero = |what: &str| Err(Error::Config(format!("{what} is 0: no connection could be served")));
    if options.max_connections == 0 {
        return zero("max_connections");
    }
    if options.max_connections_per_identity == 0 {
        return zero("max_connections_per_identity");
    }
    if options.max_handshakes_per_ip == 0 {
        return zero("max_handshakes_per_ip");
    }
    if options.handshake_timeout.is_zero() {
        return zero("handshake_timeout");
    }
    if options.first_request_timeout.is_zero() {
        return zero("first_request_timeout");
    }
    if options.idle_timeout.is_zero() {
        return zero("idle_timeout");
    }
    if let Some(rate) = options.request_rate {
        if !(rate.per_second.is_finite() && rate.per_second > 0.0) || rate.burst == 0 {
            return Err(Error::Config(format!(
                "request_rate of {} per second with a burst of {} would refuse every request \
                 (both must be above 0; no limit at all is request_rate None)",
                rate.per_second, rate.burst
            )));
        }
    }
    Ok(())
}

/// `peer` already has `max_handshakes_per_ip` connections in their handshake: this one is
/// closed before reading anything (it holds no slot while it is refused).
fn refuse_before_handshake(tcp: TcpStream, peer: SocketAddr, options: &ServeOptions) {
    let reason =
        format!("too many TLS handshakes in progress from {} (limit {})", peer.ip(), options.max_handshakes_per_ip);
    tracing::warn!(%peer, %reason, "connection refused before its TLS handshake");
    if let Some(tx) = &options.failures {
        let _ = tx.send(HandshakeFailure { peer, reason });
    }
    drop(tcp);
}

/// Why a served connection is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    /// No complete request headers within `first_request_timeout` of the accept.
    NoFirstRequest,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// A connection over its identity's cap has had its window to read the refusal.
    Refused,
    /// The server is shutting down.
    Drain,
}

/// One accepted TCP connection and what serving it needs.
struct Connection {
    acceptor: TlsAcceptor,
    router: Router,
    options: Arc<ServeOptions>,
    limits: Arc<Limits>,
    peer: SocketAddr,
    accepted: Instant,
}

impl Connection {
    async fn run(self, tcp: TcpStream, handshake_slot: HandshakeSlot, shutdown: &CancellationToken) {
        let peer = self.peer;
        let shake = handshake(&self.acceptor, tcp, peer, &self.options, self.accepted);
        let (tls_stream, identity) = tokio::select! {
            r = shake => match r {
                Some(x) => x,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        drop(handshake_slot);

        let (admission, log) = self.limits.admit(&identity);
        let cap = self.options.max_connections_per_identity;
        if let Some(held_back) = log {
            tracing::warn!(%peer, %identity, limit = cap, refused_since_last_line = held_back,
                "connection refused: this identity already has its maximum of connections open");
        }
        let (slot, refusing) = match admission {
            Admission::Admitted(slot) => (slot, false),
            Admission::Refusing(slot) => (slot, true),
            Admission::Closed => return,
        };
        tracing::debug!(%peer, %identity, refusing, "connection accepted");

        let activity = Arc::new(Activity::new(self.accepted));
        let svc = {
            let (activity, limits, router) = (activity.clone(), self.limits.clone(), self.router.clone());
            let identity = identity.clone();
            tower::service_fn(move |mut req: Request<Incoming>| {
                let busy = activity.begin();
                let refusal = if refusing {
                    Some(too_many_connections(&identity, cap, req.version()))
                } else {
                    match limits.take_request(&identity) {
                        Ok(()) => None,
                        Err((retry_after, log)) => {
                            if let Some(held_back) = log {
                                tracing::warn!(%peer, %identity, refused_since_last_line = held_back,
                                    "request refused: this identity is over its request rate");
                            }
                            Some(rate_limited(&identity, retry_after))
                        }
                    }
                };
                req.extensions_mut().insert(identity.clone());
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move {
                    let response = match refusal {
                        Some(r) => r,
                        None => router.oneshot(req).await?,
                    };
                    Ok::<_, Infallible>(response.map(|body| Body::new(TrackedBody { body, _busy: busy })))
                }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A peer that starts a later request but never finishes its headers is dropped
        // (hyper's default of 30 s, active once a timer is set); the first request and idle
        // connections are the watchdog's.
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls_stream), TowerToHyperService::new(svc));
        tokio::pin!(conn);

        let reason = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, %identity, error = %e, "connection ended with an error");
                }
                return;
            }
            reason = watchdog(&activity, &self.options, refusing) => reason,
            _ = shutdown.cancelled() => CloseReason::Drain,
        };
        match reason {
            CloseReason::NoFirstRequest => tracing::info!(%peer, %identity,
                "closing connection: no complete request within {:?} of accepting it",
                self.options.first_request_timeout),
            CloseReason::Idle => tracing::debug!(%peer, %identity,
                "closing connection: no request for {:?}", self.options.idle_timeout),
            CloseReason::Refused | CloseReason::Drain => {}
        }
        conn.as_mut().graceful_shutdown();
        match reason {
            // Finish what is in flight; serve_with drops it after its drain timeout.
            CloseReason::Drain => {
                let _ = conn.as_mut().await;
            }
            // Its window to read the refusal is over: no grace.
            CloseReason::Refused => {}
            CloseReason::NoFirstRequest | CloseReason::Idle => {
                if tokio::time::timeout(self.options.close_grace, conn.as_mut()).await.is_err() {
                    tracing::debug!(%peer, %identity, "connection dropped: not closed within the grace period");
                }
            }
        }
        drop(slot);
    }
}

/// 429 `too_many_connections` for a connection over its identity's cap (HTTP/1: and close).
fn too_many_connections(identity: &Identity, cap: usize, version: Version) -> Response {
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
        format!(
            "{identity} already has {cap} connections open to this service (the most one \
             identity may have); reuse them or close some"
        ),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if version <= Version::HTTP_11 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// 429 `rate_limited`, with `Retry-After` in whole seconds (at least 1).
fn rate_limited(identity: &Identity, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{identity} is over its request rate for this service; retry in {secs} s"),
    );
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// When a connection last did something: requests in flight and the end of the last one.
struct Activity {
    accepted: Instant,
    state: Mutex<ActivityState>,
    /// Signalled whenever a request stops being in flight.
    request_done: Notify,
}

struct ActivityState {
    in_flight: usize,
    requests: u64,
    last: Instant,
}

impl Activity {
    fn new(accepted: Instant) -> Self {
        Activity {
            accepted,
            state: Mutex::new(ActivityState { in_flight: 0, requests: 0, last: accepted }),
            request_done: Notify::new(),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A request's headers are complete: it is in flight until the guard (held by its
    /// response body) is dropped.
    fn begin(self: &Arc<Self>) -> Busy {
        let mut s = self.lock();
        s.in_flight += 1;
        s.requests += 1;
        Busy(self.clone())
    }
}

/// One request in flight; dropped when its response has been written (or abandoned).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut s = self.0.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last = Instant::now();
        }
        self.0.request_done.notify_one();
    }
}

/// A response body that keeps its request counted as in flight until it is written.
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Resolves when the connection should be closed: its first request is late, it has been
/// idle too long, or (a refused connection) its window to read the refusal is over.
async fn watchdog(activity: &Activity, options: &ServeOptions, refusing: bool) -> CloseReason {
    if refusing {
        let window = options.first_request_timeout.min(REFUSAL_WINDOW);
        tokio::time::sleep_until((activity.accepted + window).into()).await;
        return CloseReason::Refused;
    }
    loop {
        let now = Instant::now();
        let (deadline, reason) = {
            let s = activity.lock();
            if s.requests == 0 {
                (Some(activity.accepted + options.first_request_timeout), CloseReason::NoFirstRequest)
            } else if s.in_flight > 0 {
                (None, CloseReason::Idle)
            } else {
                (Some(s.last + options.idle_timeout), CloseReason::Idle)
            }
        };
        match deadline {
            // Busy: look again when a request is done (a permit is stored if it is done
            // before this waits).
            None => activity.request_done.notified().await,
            Some(deadline) if deadline <= now => return reason,
            Some(deadline) => {
                // A request that starts meanwhile is seen at the deadline.
                tokio::time::sleep_until(deadline.into()).await;
            }
        }
    }
}

fn current_acceptor(acceptor: &RwLock<TlsAcceptor>) -> TlsAcceptor {
    // A poisoned lock only means a reload panicked; the acceptor inside is still whole.
    acceptor.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The files' modification times and sizes; a change in any means "reload".
pub(crate) fn tls_files_stamp(files: &TlsFiles) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files.paths().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

async fn watch_tls_files(reload: TlsReload, acceptor: Arc<RwLock<TlsAcceptor>>, shutdown: CancellationToken) {
    let mut seen = tls_files_stamp(&reload.files);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(reload.check_every) => {}
        }
        let now = tls_files_stamp(&reload.files);
        if now == seen {
            continue;
        }
        seen = now;
        match reload.files.server_config(&reload.allowed_client_roles) {
            Ok(config) => {
                *acceptor.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
                tracing::info!(
                    revocation_lists = reload.files.crl.len(),
                    "TLS files changed: new connections use the reloaded certificates and revocation lists"
                );
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS files changed but do not load; still serving with the previous ones"
            ),
        }
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    options: &ServeOptions,
    accepted: Instant,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Identity)> {
    let limit = options.handshake_timeout.min(options.first_request_timeout);
    let result = tokio::time::timeout_at((accepted + limit).into(), acceptor.accept(tcp).into_fallible()).await;
    let fail = |reason: String, refused: bool| {
        if refused {
            tracing::warn!(%peer, %reason, "TLS handshake refused");
        } else {
            tracing::info!(%peer, %reason, "TLS handshake failed");
        }
        if let Some(tx) = &options.failures {
            let _ = tx.send(HandshakeFailure { peer, reason });
        }
    };
    let stream = match result {
        Err(_) => {
            fail(format!("no TLS handshake within {limit:?}"), false);
            return None;
        }
        Ok(Err((e, tcp))) => {
            let (reason, refused) = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => (pki::describe_tls_error(tls), true),
                None => (e.to_string(), false),
            };
            fail(reason, refused);
            linger(tcp).await;
            return None;
        }
        Ok(Ok(s)) => s,
    };
    // The verifier already checked chain and role; read the identity it approved.
    let identity = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(der) => match pki::identity_from_certificate(der) {
            Ok(id) => id,
            Err(e) => {
                fail(e.to_string(), true);
                return None;
            }
        },
        None => {
            fail("no client certificate presented".into(), true);
            return None;
        }
    };
    Some((stream, identity))
}

/// After a refused handshake the client has usually sent more (TLS 1.3: its request right
/// behind its Finished). Closing with unread data makes the kernel send RST, which can
/// destroy our alert before the client reads it. Half-close and drain briefly instead.
async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 256 * 1024usize;
    let drain = async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}
