//! `[limits]`: the connection hygiene a service runs with, as an operator sets it in the
//! service's configuration file (docs/CLOUD-API.md "Connection limits"). Every key is
//! optional; the defaults are [`ServeOptions::default`]'s, chosen so that one identity
//! can never hold a service for the others.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::server::{RateLimit, ServeOptions};

/// The `[limits]` table of the TTP's, the cloud platform's and the secure component's
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once (in their handshake or served), all callers together.
    pub max_connections: usize,
    /// Connections one verified identity may hold at once (429 `too_many_connections` beyond).
    pub max_connections_per_identity: usize,
    /// Connections from one IP address in their TLS handshake at once.
    pub max_handshakes_per_ip: usize,
    /// Requests per second one identity may make, sustained; 0 turns the rate limit off.
    pub requests_per_second: u32,
    /// Requests one identity may make at once after a quiet spell (the bucket's size).
    pub request_burst: u32,
    /// Seconds from accept until the first request's headers must be in (handshake included).
    pub first_request_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight.
    pub idle_timeout_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        let options = ServeOptions::default();
        let rate = options.request_rate.unwrap_or(RateLimit { per_second: 0.0, burst: 0 });
        ConnectionLimits {
            max_connections: options.max_connections,
            max_connections_per_identity: options.max_connections_per_identity,
            max_handshakes_per_ip: options.max_handshakes_per_ip,
            requests_per_second: rate.per_second.round() as u32,
            request_burst: rate.burst,
            first_request_timeout_secs: options.first_request_timeout.as_secs(),
            idle_timeout_secs: options.idle_timeout.as_secs(),
        }
    }
}

impl ConnectionLimits {
    /// The server options these limits make, or what is wrong with them (in the words of
    /// the configuration file's keys).
    pub fn serve_options(&self) -> Result<ServeOptions, String> {
        let at_least_one = [
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_identity", self.max_connections_per_identity as u64),
            ("max_handshakes_per_ip", self.max_handshakes_per_ip as u64),
            ("first_request_timeout_secs", self.first_request_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(format!("[limits] {key} must be at least 1"));
        }
        if self.max_connections_per_identity > self.max_connections {
            return Err(format!(
                "[limits] max_connections_per_identity ({}) is above max_connections ({}): one identity could hold every connection",
                self.max_connections_per_identity, self.max_connections
            ));
        }
        let request_rate = if self.requests_per_second == 0 {
            None
        } else if self.request_burst == 0 {
            return Err("[limits] request_burst must be at least 1 when requests_per_second is set".into());
        } else {
            Some(RateLimit { per_second: f64::from(self.requests_per_second), burst: self.request_burst })
        };
        Ok(ServeOptions {
            max_connections: self.max_connections,
            max_connections_per_identity: self.max_connections_per_identity,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            request_rate,
            first_request_timeout: Duration::from_secs(self.first_request_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            ..ServeOptions::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_serve_defaults_and_overrides_apply() {
        let defaults = ServeOptions::default();
        let from_empty: ConnectionLimits = toml::from_str("").unwrap();
        let options = from_empty.serve_options().unwrap();
        assert_eq!(options.max_connections_per_identity, defaults.max_connections_per_identity);
        assert_eq!(options.request_rate, defaults.request_rate);
        assert_eq!(options.idle_timeout, defaults.idle_timeout);

        let set: ConnectionLimits =
            toml::from_str("max_connections_per_identity = 8\nrequests_per_second = 0\nidle_timeout_secs = 5").unwrap();
        let options = set.serve_options().unwrap();
        assert_eq!(options.max_connections_per_identity, 8);
        assert_eq!(options.request_rate, None);
        assert_eq!(options.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_limits_are_refused_naming_the_key() {
        for (text, key) in [
            ("max_connections = 0", "max_connections"),
            ("idle_timeout_secs = 0", "idle_timeout_secs"),
            ("max_connections = 10\nmax_connections_per_identity = 11", "max_connections_per_identity"),
            ("request_burst = 0", "request_burst"),
        ] {
            let limits: ConnectionLimits = toml::from_str(text).unwrap();
            let error = limits.serve_options().unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(toml::from_str::<ConnectionLimits>("max_conections = 3").is_err(), "a misspelt key is refused");
        assert!(toml::from_str::<ConnectionLimits>("requests_per_second = -1").is_err(), "a negative rate is refused");
    }
}
