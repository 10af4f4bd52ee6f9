//! The TLS handshake of an accepted connection, bounded in time: the verified peer
//! [`Identity`], or a [`HandshakeFailure`] logged and reported with the rule that failed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use protocol::pki::{self, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::ServeOptions;

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

/// Complete the handshake of `tcp` within the handshake and first-request deadlines and
/// return the stream with the identity the verifier approved; `None` (logged, reported) if
/// it fails.
pub(super) async fn handshake(
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
