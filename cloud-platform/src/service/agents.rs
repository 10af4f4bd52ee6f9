//! The clients of the compute hosts' secure components: one per host, made from the CP's
//! TLS files on first use and made again when the host's `agent_url` changes.

use std::time::Duration;

use net::Role;
use protocol::cloud::ComputeHost;

use super::CloudPlatform;
use crate::error::{Error, Result};

/// How long the CP waits for a secure component (an attach runs attestation, a TPM
/// decryption and possibly mkfs).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(300);

impl CloudPlatform {
    pub(super) async fn agent_client(&self, host: &ComputeHost) -> Result<net::Client> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((url, client)) = agents.get(&host.id) {
            if *url == host.agent_url {
                return Ok(client.clone());
            }
        }
        let client = net::Client::from_files(&host.agent_url, &self.agent_tls, Role::SecureComponent, AGENT_TIMEOUT)
            .map_err(|e| Error::Config(format!("secure component of host {} at {}: {e}", host.id, host.agent_url)))?;
        agents.insert(host.id.clone(), (host.agent_url.clone(), client.clone()));
        Ok(client)
    }

    pub(super) fn agent_error(host: &ComputeHost) -> impl FnOnce() -> String + '_ {
        move || format!("cannot reach the secure component of host {} at {}", host.id, host.agent_url)
    }
}
