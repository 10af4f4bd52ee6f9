//! The per-peer bookkeeping behind [`ServeOptions`](crate::ServeOptions)' connection
//! hygiene: connections still in their TLS handshake per peer IP address, open connections
//! per verified identity, and each identity's request-rate token bucket.
//!
//! Every count is released by a guard's `Drop`, so a connection task that ends in any way
//! (error, timeout, drain, panic) gives its slot back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use protocol::pki::Identity;

/// A per-identity request rate: a token bucket refilled at `per_second` tokens a second that
/// holds at most `burst`; every request takes one token, and a request that finds none is
/// answered 429 `rate_limited`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second an identity may make (all its connections together).
    pub per_second: f64,
    /// How many requests an identity may make at once after being quiet (the bucket's size).
    pub burst: u32,
}

/// How many connections of one identity may be answered `too_many_connections` at the same
/// time; further ones over its cap are closed right after the handshake without an answer, so
/// refusing does not itself hold many connection slots.
pub(crate) const REFUSING_PER_IDENTITY: usize = 8;

/// A connection answered `too_many_connections` is closed this long after its accept (or
/// at `first_request_timeout`, if sooner): time to send its request and read the refusal.
pub(crate) const REFUSAL_WINDOW: Duration = Duration::from_secs(2);

/// At most one log line per identity and kind of refusal in this interval (the others are
/// counted and the count is logged with the next line).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Start pruning the identity table (identities with no connection and a full bucket) once
/// it holds this many entries.
const PRUNE_AT: usize = 1024;

/// Logs at most once per [`LOG_EVERY`]; counts what it held back.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    /// `Some(held back since the last line)` if a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct IdentityState {
    /// Connections admitted and being served.
    open: usize,
    /// Connections over the cap being answered `too_many_connections`.
    refusing: usize,
    bucket: Option<Bucket>,
    refused_log: LogThrottle,
    rate_log: LogThrottle,
}

impl IdentityState {
    fn idle(&self, rate: Option<RateLimit>, now: Instant) -> bool {
        if self.open > 0 || self.refusing > 0 {
            return false;
        }
        match (&self.bucket, rate) {
            (Some(b), Some(r)) => {
                b.tokens + now.duration_since(b.at).as_secs_f64() * r.per_second >= f64::from(r.burst)
            }
            _ => true,
        }
    }
}

/// What a connection of a verified identity may do.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Served normally; the guard holds one of the identity's connection slots.
    Admitted(ConnectionSlot),
    /// Over the identity's cap: every request on it is answered 429 `too_many_connections`
    /// and it is closed shortly.
    Refusing(ConnectionSlot),
    /// Over the cap and already [`REFUSING_PER_IDENTITY`] refusals under way: close it.
    Closed,
}

/// The shared tables of one accept loop.
#[derive(Debug)]
pub(crate) struct Limits {
    per_identity: usize,
    per_ip_handshakes: usize,
    rate: Option<RateLimit>,
    identities: Mutex<IdentityTable>,
    handshakes: Mutex<HashMap<IpAddr, usize>>,
}

#[derive(Debug)]
struct IdentityTable {
    map: HashMap<Identity, IdentityState>,
    prune_at: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing below panics while holding a lock; a poisoned one still holds whole counts.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Limits {
    pub(crate) fn new(per_identity: usize, per_ip_handshakes: usize, rate: Option<RateLimit>) -> Self {
        Limits {
            per_identity,
            per_ip_handshakes,
            rate,
            identities: Mutex::new(IdentityTable { map: HashMap::new(), prune_at: PRUNE_AT }),
            handshakes: Mutex::new(HashMap::new()),
        }
    }

    /// A handshake slot for a connection from `ip`, or `None` when `ip` already has
    /// `per_ip_handshakes` connections in their handshake.
    pub(crate) fn begin_handshake(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        let mut table = lock(&self.handshakes);
        let n = table.entry(ip).or_insert(0);
        if *n >= self.per_ip_handshakes {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot { limits: self.clone(), ip })
    }

    /// Admits a verified connection of `identity`, or says how it is refused. The second
    /// value is `Some(held back)` when the refusal may be logged now.
    pub(crate) fn admit(self: &Arc<Self>, identity: &Identity) -> (Admission, Option<u64>) {
        let now = Instant::now();
        let mut table = lock(&self.identities);
        if table.map.len() >= table.prune_at {
            let rate = self.rate;
            table.map.retain(|_, s| !s.idle(rate, now));
            table.prune_at = (table.map.len() * 2).max(PRUNE_AT);
        }
        let state = table.map.entry(identity.clone()).or_default();
        let slot = |refusing| ConnectionSlot { limits: self.clone(), identity: identity.clone(), refusing };
        if state.open < self.per_identity {
            state.open += 1;
            return (Admission::Admitted(slot(false)), None);
        }
        let log = state.refused_log.allow(now);
        if state.refusing < REFUSING_PER_IDENTITY {
            state.refusing += 1;
            (Admission::Refusing(slot(true)), log)
        } else {
            (Admission::Closed, log)
        }
    }

    /// Takes one request token of `identity`. `Err((retry_after, log))`: none is left; one
    /// will be in `retry_after`, and `log` is `Some(held back)` when it may be logged now.
    pub(crate) fn take_request(&self, identity: &Identity) -> Result<(), (Duration, Option<u64>)> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut table = lock(&self.identities);
        let state = table.map.entry(identity.clone()).or_default();
        let burst = f64::from(rate.burst);
        let bucket = state.bucket.get_or_insert(Bucket { tokens: burst, at: now });
        let refill = now.duration_since(bucket.at).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate.per_second);
        Err((wait, state.rate_log.allow(now)))
    }

    /// How many connections `identity` has open (admitted ones).
    #[cfg(test)]
    pub(crate) fn open_connections(&self, identity: &Identity) -> usize {
        lock(&self.identities).map.get(identity).map_or(0, |s| s.open)
    }
}

/// One connection of `ip` in its TLS handshake; released on drop.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut table = lock(&self.limits.handshakes);
        if let Some(n) = table.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// One open connection of an identity; released on drop.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    limits: Arc<Limits>,
    identity: Identity,
    refusing: bool,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let now = Instant::now();
        let rate = self.limits.rate;
        let mut table = lock(&self.limits.identities);
        if let Some(state) = table.map.get_mut(&self.identity) {
            if self.refusing {
                state.refusing = state.refusing.saturating_sub(1);
            } else {
                state.open = state.open.saturating_sub(1);
            }
            if state.idle(rate, now) {
                table.map.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pki::Role;

    fn id(name: &str) -> Identity {
        Identity { name: name.into(), role: Role::DomainManager }
    }

    #[test]
    fn identity_cap_then_bounded_refusals_then_closed() {
        let limits = Arc::new(Limits::new(2, 4, None));
        let a = id("a");
        let mut held = Vec::new();
        for _ in 0..2 {
            match limits.admit(&a).0 {
                Admission::Admitted(s) => held.push(s),
                other => panic!("{other:?}"),
            }
        }
        let mut refusing = Vec::new();
        for _ in 0..REFUSING_PER_IDENTITY {
            match limits.admit(&a).0 {
                Admission::Refusing(s) => refusing.push(s),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(limits.admit(&a).0, Admission::Closed));
        // Another identity is not affected.
        assert!(matches!(limits.admit(&id("b")).0, Admission::Admitted(_)));
        assert_eq!(limits.open_connections(&a), 2);
        held.pop();
        assert!(matches!(limits.admit(&a).0, Admission::Admitted(_)));
        drop((held, refusing));
        assert_eq!(limits.open_connections(&a), 0);
        assert!(lock(&limits.identities).map.is_empty(), "idle identities are forgotten");
    }

    #[test]
    fn handshakes_per_ip() {
        let limits = Arc::new(Limits::new(2, 2, None));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let first = limits.begin_handshake(ip).unwrap();
        let _second = limits.begin_handshake(ip).unwrap();
        assert!(limits.begin_handshake(ip).is_none());
        assert!(limits.begin_handshake([10, 0, 0, 2].into()).is_some());
        drop(first);
        assert!(limits.begin_handshake(ip).is_some());
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let rate = RateLimit { per_second: 10.0, burst: 5 };
        let limits = Limits::new(2, 2, Some(rate));
        let a = id("a");
        for _ in 0..5 {
            limits.take_request(&a).unwrap();
        }
        let (wait, log) = limits.take_request(&a).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(log, Some(0));
        // The second refusal within LOG_EVERY is held back.
        assert_eq!(limits.take_request(&a).unwrap_err().1, None);
        limits.take_request(&id("b")).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        limits.take_request(&a).unwrap();
    }
}
