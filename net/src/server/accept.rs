//! The accept loop: [`serve`] and [`serve_with`] take connections off the listener within
//! the connection and per-address handshake limits, spawn one task per connection, and on
//! shutdown drain them.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connection::Connection;
use super::options::check_options;
use super::tls_reload::{current_acceptor, watch_tls_files};
use super::{HandshakeFailure, ServeOptions, ServerTls};
use crate::error::{Error, Result};
use crate::limits::Limits;

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
