//! The mutual-TLS HTTPS accept loop every Skydd service runs.
//!
//! Each accepted TCP connection gets its own task: TLS 1.3 handshake (bounded in time), then
//! HTTP/1.1 or HTTP/2 (hyper-util auto) serving the axum router. The verified peer
//! [`Identity`] and the peer address (`ConnectInfo<SocketAddr>`) are put into every request's
//! extensions, so handlers take `Extension<Identity>`. A failed handshake is logged with the
//! peer address and the reason, and the loop goes on.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use protocol::pki::{self, Identity, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::error::{Error, Result};
use crate::files::TlsFiles;

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

/// Tuning of [`serve_with`]. `Default` suits every service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A TLS handshake not finished within this is dropped (slow or idle clients).
    pub handshake_timeout: Duration,
    /// At most this many connections at once; further ones wait in the kernel backlog.
    pub max_connections: usize,
    /// On shutdown, open connections get this long to finish their requests.
    pub drain_timeout: Duration,
    /// If set, every failed handshake is also sent here (tests, metrics).
    pub failures: Option<mpsc::UnboundedSender<HandshakeFailure>>,
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
        TlsReload {
            files,
            allowed_client_roles: allowed_client_roles.to_vec(),
            check_every: Duration::from_secs(2),
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(10),
            failures: None,
        }
    }
}

/// Serve `router` over mutual TLS on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    router: Router,
) -> Result<()> {
    serve_with(
        listener,
        tls,
        router,
        ServeOptions::default(),
        CancellationToken::new(),
    )
    .await
}

/// Serve until `shutdown` is cancelled, then stop accepting, let open connections finish
/// their requests (up to [`ServeOptions::drain_timeout`]) and return.
pub async fn serve_with(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    router: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    if options.max_connections == 0 {
        return Err(Error::Config(
            "max_connections is 0: no connection could be served".into(),
        ));
    }
    let local = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("listener has no address: {e}")))?;
    tracing::info!(%local, "serving mutual TLS");
    let ServerTls { config, reload } = tls.into();
    let acceptor = Arc::new(RwLock::new(TlsAcceptor::from(config)));
    if let Some(reload) = reload {
        tokio::spawn(watch_tls_files(reload, acceptor.clone(), shutdown.clone()));
    }
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let options = Arc::new(options);

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
        let _ = tcp.set_nodelay(true);
        let acceptor = current_acceptor(&acceptor);
        let router = router.clone();
        let options = options.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let Some((tls_stream, identity)) = handshake(&acceptor, tcp, peer, &options).await
            else {
                return;
            };
            tracing::debug!(%peer, %identity, "connection accepted");
            let svc = tower::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(identity.clone());
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().call(req)
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A peer that starts a request but never finishes its headers is dropped
            // (hyper's default of 30 s, active once a timer is set).
            builder.http1().timer(TokioTimer::new());
            builder.http2().timer(TokioTimer::new());
            let conn =
                builder.serve_connection(TokioIo::new(tls_stream), TowerToHyperService::new(svc));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(%local, "shutting down: no new connections, draining open ones");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(%local, "all connections closed"),
        _ = tokio::time::sleep(options.drain_timeout) => {
            tracing::warn!(%local, "connections still open after the drain timeout; closing them")
        }
    }
    Ok(())
}

fn current_acceptor(acceptor: &RwLock<TlsAcceptor>) -> TlsAcceptor {
    // A poisoned lock only means a reload panicked; the acceptor inside is still whole.
    acceptor.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The files' modification times and sizes; a change in any means "reload".
pub(crate) fn tls_files_stamp(files: &TlsFiles) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .paths()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

async fn watch_tls_files(
    reload: TlsReload,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    shutdown: CancellationToken,
) {
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
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Identity)> {
    let result = tokio::time::timeout(
        options.handshake_timeout,
        acceptor.accept(tcp).into_fallible(),
    )
    .await;
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
            fail(
                format!("no TLS handshake within {:?}", options.handshake_timeout),
                false,
            );
            return None;
        }
        Ok(Err((e, tcp))) => {
            let (reason, refused) =
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
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
    let identity = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
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
