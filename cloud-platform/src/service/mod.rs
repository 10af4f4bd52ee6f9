//! The cloud platform's flows (docs/CLOUD-API.md, "Cloud platform behaviour"): domains,
//! instances, hosts and attachments. The CP routes and stores; it checks no signature itself
//! (the TTP checks every one) and never holds a key. It does check who may ask for what by the
//! caller's TLS identity: only a domain's owner creates, changes or deletes it; only its owner
//! and the managers it is shared with see it and attach it.
//!
//! [`CloudPlatform`] is one type; its methods live by concept: `hosts` (compute hosts and
//! the placement of instances), `domains` (create, read, update, share, delete, quota),
//! `pending` (updates written ahead and finished after an interruption), `attachments`
//! (attach and detach, the single-writer rule, placement signing), `reconcile` (the
//! reconciliation of records with the compute hosts) and `agents` (the pool of clients of
//! the hosts' secure components). This module holds the type, its constructor, the
//! per-domain locks and the bridge to the blocking store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use net::{Identity, Role};

use crate::error::{Error, Result};
use crate::store::CpStore;
use crate::volumes::Volumes;

mod agents;
mod attachments;
mod domains;
mod hosts;
mod pending;
mod reconcile;

pub use agents::AGENT_TIMEOUT;
pub use reconcile::HostReconciliation;

/// The cloud platform's flows over the store, the volume files, the TTP client and one
/// client per secure component (docs/CLOUD-API.md, "Cloud platform behaviour"). Shared by all
/// request handlers behind an `Arc`.
pub struct CloudPlatform {
    store: Arc<dyn CpStore>,
    volumes: Volumes,
    ttp: net::Client,
    /// The CP's TLS files; clients of secure components follow them (revocation lists).
    agent_tls: net::TlsFiles,
    /// The key of the CP's own certificate (role cloud-platform): signs the placement of a VM
    /// on its host for each attach, which the TTP checks before it releases a key.
    placer: protocol::signing::SignatureKey,
    agents: std::sync::Mutex<HashMap<String, (String, net::Client)>>,
    /// One lock per domain: create, update, delete, attach and detach of one domain run one
    /// at a time, so a revocation cannot miss an attachment that is being made.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    reconcile_interval: Duration,
    quota: crate::config::Quota,
}

/// Now in Unix seconds (0 if the clock is before 1970); the time stamps of records.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Runs blocking work (SQLite, file I/O) off the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Store(format!("blocking task failed: {e}")))?
}

fn require_role(caller: &Identity, roles: &[Role], action: &str) -> Result<()> {
    if roles.contains(&caller.role) {
        return Ok(());
    }
    let allowed: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    Err(Error::Forbidden(format!("{} may not {action}: that needs a {} certificate", caller, allowed.join(" or "))))
}

/// Whether a failed step was refused (the request can never succeed as it is) rather than
/// interrupted (TTP unreachable, a server error, a volume or database failure).
fn is_refusal(error: &Error) -> bool {
    match error {
        Error::Upstream { status, .. } => (400..500).contains(status),
        Error::BadRequest(_)
        | Error::InvalidSize(_)
        | Error::Forbidden(_)
        | Error::OwnerMismatch(_)
        | Error::QuotaExceeded(_)
        | Error::NotFound { .. }
        | Error::Conflict { .. }
        | Error::DomainDeleted(_) => true,
        Error::Unreachable { .. } | Error::Volume(_) | Error::Store(_) | Error::Config(_) => false,
    }
}

impl CloudPlatform {
    /// `ttp` talks to the TTP with the CP's certificate; `agent_tls` are the CP's TLS files,
    /// from which a client for each secure component (server role secure-component) is made;
    /// `placer` is the key of the CP's certificate, which signs placements.
    pub fn new(
        store: Arc<dyn CpStore>,
        volumes: Volumes,
        ttp: net::Client,
        agent_tls: net::TlsFiles,
        placer: protocol::signing::SignatureKey,
    ) -> Self {
        Self {
            store,
            volumes,
            ttp,
            agent_tls,
            placer,
            agents: std::sync::Mutex::new(HashMap::new()),
            locks: std::sync::Mutex::new(HashMap::new()),
            reconcile_interval: Duration::from_secs(crate::config::DEFAULT_RECONCILE_INTERVAL_SECS),
            quota: crate::config::Quota::default(),
        }
    }

    /// The per-owner limits [`Self::create_domain`] enforces.
    pub fn with_quota(mut self, quota: crate::config::Quota) -> Self {
        self.quota = quota;
        self
    }

    /// How often [`Self::reconcile_hosts`] runs in the server.
    pub fn with_reconcile_interval(mut self, interval: Duration) -> Self {
        self.reconcile_interval = interval;
        self
    }

    /// How often the server reconciles attachments with the compute hosts.
    pub fn reconcile_interval(&self) -> Duration {
        self.reconcile_interval
    }

    /// The volume files this CP manages.
    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    fn lock_of(&self, domain_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(domain_id.to_string()).or_default().clone()
    }

    async fn store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn CpStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        blocking(move || work(store.as_ref())).await
    }
}
