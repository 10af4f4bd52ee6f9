//! [`ServeOptions`]: the limits and timeouts of a server, their defaults and the check that
//! refuses options that could serve nothing.

use std::time::Duration;

use tokio::sync::mpsc;

use super::HandshakeFailure;
use crate::error::{Error, Result};
use crate::limits::RateLimit;

/// Tuning of [`serve_with`](super::serve_with). `Default` suits every service; each default is chosen for a
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

/// Refuses options that could serve nothing: a zero limit or timeout, a rate limit of 0.
pub(super) fn check_options(options: &ServeOptions) -> Result<()> {
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
