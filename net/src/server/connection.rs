//! Serving one connection after its handshake: admission under the identity's connection cap,
//! the identity's request rate, HTTP/1.1 or HTTP/2 with the router, and closing it when the
//! watchdog or the shutdown says so.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use protocol::pki::Identity;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::activity::{watchdog, Activity, CloseReason, TrackedBody};
use super::handshake::handshake;
use super::ServeOptions;
use crate::limits::{Admission, HandshakeSlot, Limits};
use crate::response::error_response;

/// One accepted TCP connection and what serving it needs.
pub(super) struct Connection {
    pub(super) acceptor: TlsAcceptor,
    pub(super) router: Router,
    pub(super) options: Arc<ServeOptions>,
    pub(super) limits: Arc<Limits>,
    pub(super) peer: SocketAddr,
    pub(super) accepted: Instant,
}

impl Connection {
    /// Handshake, admit, serve until the connection ends, is closed or is drained.
    pub(super) async fn run(self, tcp: TcpStream, handshake_slot: HandshakeSlot, shutdown: &CancellationToken) {
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
        // The verified chain as the client sent it (leaf first), for handlers that decide by
        // the trusted root a caller chains to (the secure component's partner clouds).
        let chain = super::PeerCertificates(
            tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::from(c.to_vec()))
                .unwrap_or_else(|| Arc::from(Vec::new())),
        );

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
            let chain = chain.clone();
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
                req.extensions_mut().insert(chain.clone());
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
