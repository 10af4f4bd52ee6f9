//! The mutual-TLS HTTPS accept loop every Skydd service runs.
//!
//! Each accepted TCP connection gets its own task: TLS 1.3 handshake (bounded in time), then
//! HTTP/1.1 or HTTP/2 (hyper-util auto) serving the axum router. The verified peer
//! [`Identity`](crate::Identity) and the peer address (`ConnectInfo<SocketAddr>`) are put into every request's
//! extensions, so handlers take `Extension<Identity>`; so is the certificate chain the peer
//! presented ([`PeerCertificates`]), for a handler that decides by the trusted root it chains to. A failed handshake is logged with the
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
//!
//! # Where each piece lives
//! - `options`: [`ServeOptions`], the limits and timeouts, and their defaults;
//! - `accept`: [`serve`] / [`serve_with`], the accept loop and the drain on shutdown;
//! - `handshake`: the bounded TLS handshake and the peer [`Identity`](crate::Identity) it
//!   yields, or a [`HandshakeFailure`];
//! - `connection`: serving one connection: per-identity admission, rate limit, HTTP;
//! - `activity`: when a connection is idle or late, and must be closed;
//! - `tls_reload`: [`ServerTls`], rebuilding the configuration when its files change.

mod accept;
mod activity;
mod connection;
mod handshake;
mod options;
mod tls_reload;

pub use crate::limits::RateLimit;
pub use accept::{serve, serve_with};
pub use handshake::HandshakeFailure;
pub use options::ServeOptions;
pub use tls_reload::{ServerTls, TlsReload};

pub(crate) use tls_reload::tls_files_stamp;

/// The certificate chain a TLS peer presented (DER, its own certificate first), already
/// verified by the handshake; in every request's extensions beside the
/// [`Identity`](crate::Identity).
#[derive(Debug, Clone)]
pub struct PeerCertificates(pub std::sync::Arc<[rustls::pki_types::CertificateDer<'static>]>);
