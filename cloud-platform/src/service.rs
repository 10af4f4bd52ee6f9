//! The cloud platform's flows (DESIGN §3, docs/CLOUD-API.md): domains, instances, hosts and
//! attachments. The CP routes and stores; it checks no signature itself (the TTP checks every
//! one) and never holds a key. It does check who may ask for what by the caller's TLS
//! identity: only a domain's owner creates, changes or deletes it; only its owner and the
//! managers it is shared with see it and attach it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use net::{Identity, Role};
use protocol::cloud::{
    AgentAttachRequest, AgentAttachment, AgentAttachmentList, Attachment, AttachmentList, ComputeHost,
    CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody, DomainList, DomainView, Instance, InstanceList,
    UpdateDomainRequest,
};
use protocol::domain::{validate_name, AccessMode, Descriptor};
use protocol::messages::{grant_digest, Placement};
use protocol::messages::{DeleteDomainRequest, Deletion, HeaderRecord, RegisterDomainRequest, RegisterDomainResponse};
use protocol::signing::{SignatureContext, SignedEnvelope};

use crate::error::{Error, Result};
use crate::store::{
    AttachmentFilter, CpStore, DomainRecord, Page, PendingUpdate, ATTACHED, ATTACHING, DETACHED, DETACHING,
};
use crate::volumes::Volumes;

/// What one reconciliation with the compute hosts did ([`CloudPlatform::reconcile_hosts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostReconciliation {
    /// Mappings of attaches the CP never heard back about, now recorded as attached.
    pub adopted: usize,
    /// Mappings detached on their host: orphans, `detaching` ones, ones no longer allowed.
    pub detached: usize,
    /// Records of mappings the host does not have (any more), marked detached.
    pub marked_detached: usize,
    /// Hosts whose list of mappings could not be read; they are tried again next round.
    pub hosts_unreachable: usize,
}

impl HostReconciliation {
    /// Whether the round adopted, detached or marked anything (worth logging).
    pub fn changed_anything(&self) -> bool {
        self.adopted + self.detached + self.marked_detached > 0
    }
}

/// How long the reconciliation waits for a host's list of mappings.
const HOST_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the CP waits for a secure component (an attach runs attestation, a TPM
/// decryption and possibly mkfs).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(300);

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

/// Says, on an attach whose answer never came, how it is settled.
fn settled_later(error: Error, attachment_id: &str) -> Error {
    error.with_note(&format!(
        "; attachment {attachment_id} stays `attaching` until the cloud platform's reconciliation with the host records it as attached or detached (`attachment list` tells)"
    ))
}

/// Says, on an interrupted update, that the CP keeps it and finishes it later.
fn kept_for_later(error: Error, version: u64) -> Error {
    error.with_note(&format!(
        "; the cloud platform keeps version {version} and finishes it on the next request for this domain or at its next start (`domain show` tells when it is in force)"
    ))
}

/// Whether `descriptor` still lets the attachment's VM mount with the attachment's mode.
fn allows(descriptor: &Descriptor, attachment: &Attachment) -> bool {
    descriptor.access_of(&attachment.instance_id).is_some_and(|m| m.covers(attachment.mode))
}

fn decode_descriptor(envelope: &protocol::signing::SignedEnvelope) -> Result<Descriptor> {
    Descriptor::decode(&envelope.message).map_err(|e| Error::BadRequest(format!("descriptor: {e}")))
}

fn domain_view(record: &DomainRecord, header: HeaderRecord, status: &str) -> Result<DomainView> {
    let (descriptor, _) =
        header.unverified_contents().map_err(|e| Error::Volume(format!("header of domain {}: {e}", record.id)))?;
    Ok(DomainView {
        id: record.id.clone(),
        owner: descriptor.owner,
        version: descriptor.version,
        metadata: descriptor.metadata,
        acl: descriptor.acl,
        shared_with: descriptor.shared_with,
        size_bytes: record.size_bytes,
        status: status.to_string(),
        created_at: record.created_at,
        header,
    })
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

    // ---- hosts and instances -----------------------------------------------------------------

    /// `POST /v1/hosts`: records (or replaces) where a host's secure component listens.
    /// Only the operator (role cloud-platform) may; a bad host id or `agent_url` is 400
    /// `bad_request`.
    pub async fn register_host(&self, caller: &Identity, host: ComputeHost) -> Result<ComputeHost> {
        require_role(caller, &[Role::CloudPlatform], "register a compute host")?;
        validate_name("host id", &host.id).map_err(|e| Error::BadRequest(e.to_string()))?;
        net::Client::from_files(&host.agent_url, &self.agent_tls, Role::SecureComponent, AGENT_TIMEOUT)
            .map_err(|e| Error::BadRequest(format!("agent_url of host {}: {e}", host.id)))?;
        let stored = host.clone();
        self.store(move |s| s.put_host(&stored)).await?;
        tracing::info!(host = %host.id, agent_url = %host.agent_url, by = %caller.name, "host registered");
        Ok(host)
    }

    /// `GET /v1/hosts`: every registered host. The topology is the operator's: a tenant
    /// learns nothing of other tenants' hosts and VMs (403 `forbidden` for other roles).
    pub async fn hosts(&self, caller: &Identity) -> Result<Vec<ComputeHost>> {
        require_role(caller, &[Role::CloudPlatform], "list the compute hosts")?;
        self.store(|s| s.hosts()).await
    }

    /// `POST /v1/instances`: records which host a VM runs on. Placement is the operator's
    /// alone (role cloud-platform): a tenant who could register or move a VM could have
    /// another tenant's key released to a host of its choosing. An unregistered host is 404
    /// `host_unknown`.
    pub async fn register_instance(&self, caller: &Identity, instance: Instance) -> Result<Instance> {
        require_role(caller, &[Role::CloudPlatform], "place an instance on a host")?;
        validate_name("instance id", &instance.id).map_err(|e| Error::BadRequest(e.to_string()))?;
        let stored = instance.clone();
        self.store(move |s| {
            if s.host(&stored.host)?.is_none() {
                return Err(Error::NotFound {
                    code: "host_unknown",
                    message: format!(
                        "host {} is not registered; the operator registers it with POST /v1/hosts before instances can run on it",
                        stored.host
                    ),
                });
            }
            s.put_instance(&stored)
        })
        .await?;
        tracing::info!(instance = %instance.id, host = %instance.host, by = %caller.name, "instance registered");
        Ok(instance)
    }

    /// `GET /v1/instances`: one page of instances, by id; the operator's only (see
    /// [`CloudPlatform::hosts`]).
    pub async fn instances(&self, caller: &Identity, page: Page) -> Result<InstanceList> {
        require_role(caller, &[Role::CloudPlatform], "list the instances")?;
        let p = page.clone();
        let rows = self.store(move |s| s.instances(&p)).await?;
        let (instances, next_marker) = page.finish(rows, |i| &i.id);
        Ok(InstanceList { instances, next_marker })
    }

    // ---- domains ---------------------------------------------------------------------------

    /// The stored record of a domain that exists and is not deleted, and that `caller`
    /// manages (owner or shared with).
    async fn managed_domain(&self, caller: &Identity, domain_id: &str) -> Result<DomainRecord> {
        let id = domain_id.to_string();
        let record = self.store(move |s| s.domain(&id)).await?.ok_or_else(|| Error::NotFound {
            code: "domain_unknown",
            message: format!("domain {domain_id} does not exist"),
        })?;
        if !record.is_manager(&caller.name) {
            // Says nothing of the domain beyond what the caller asked with: not its owner.
            return Err(Error::Forbidden(format!(
                "{} does not manage domain {domain_id}: only its owner and the domain managers it is shared with do",
                caller.name
            )));
        }
        if let Some(at) = record.deleted_at {
            return Err(Error::DomainDeleted(format!(
                "domain {domain_id} was deleted at {at} (unix time): its header is destroyed and its key can never be released again"
            )));
        }
        Ok(record)
    }

    fn require_owner(caller: &Identity, record: &DomainRecord, action: &str) -> Result<()> {
        if caller.name != record.owner {
            return Err(Error::OwnerMismatch(format!(
                "only the owner {} may {action} domain {}; {} is not the owner",
                record.owner, record.id, caller.name
            )));
        }
        Ok(())
    }

    async fn read_header(&self, record: &DomainRecord) -> Result<crate::volumes::VolumeHeader> {
        let volumes = self.volumes.clone();
        let path = record.volume_path.clone();
        blocking(move || volumes.read_header(&path)).await
    }

    async fn status_of(&self, domain_id: &str) -> Result<&'static str> {
        let id = domain_id.to_string();
        let open = self.store(move |s| s.open_attachments_of_domain(&id)).await?;
        Ok(if open.is_empty() { "available" } else { "in-use" })
    }

    async fn register_with_ttp(&self, request: &RegisterDomainRequest) -> Result<RegisterDomainResponse> {
        self.ttp.post_json::<_, RegisterDomainResponse>("/v1/domains", request).await.map_err(|e| {
            Error::from_peer(e, "ttp_unreachable", || format!("cannot reach the TTP at {}", self.ttp.base_url()))
        })
    }

    /// `POST /v1/domains`: the owner registers version 1 with the TTP through the CP; the CP
    /// allocates the volume and writes the header.
    pub async fn create_domain(&self, caller: &Identity, request: CreateDomainRequest) -> Result<DomainView> {
        require_role(caller, &[Role::DomainManager], "create a domain")?;
        let descriptor = decode_descriptor(&request.descriptor)?;
        if descriptor.owner != caller.name {
            return Err(Error::OwnerMismatch(format!(
                "the descriptor of domain {} names {} as its owner, but the caller is {}; a domain manager can only create domains it owns",
                descriptor.domain_id, descriptor.owner, caller.name
            )));
        }
        self.volumes.check_size(request.size_bytes)?;
        // One owner's creations one at a time, so that two cannot both fit the last quota.
        let owner_lock = self.lock_of(&format!("owner {}", caller.name));
        let _owner_guard = owner_lock.lock().await;
        let owner = caller.name.clone();
        let (count, bytes) = self.store(move |s| s.owner_usage(&owner)).await?;
        let quota = self.quota;
        if count >= quota.max_domains || bytes.saturating_add(request.size_bytes) > quota.max_bytes {
            return Err(Error::QuotaExceeded(format!(
                "{} has {count} domains declaring {bytes} bytes; the quota is {} domains and {} bytes, and this one asks {} bytes more: delete a domain or ask the operator",
                caller.name, quota.max_domains, quota.max_bytes, request.size_bytes
            )));
        }
        let lock = self.lock_of(&descriptor.domain_id);
        let _guard = lock.lock().await;
        let id = descriptor.domain_id.clone();
        if self.store(move |s| s.domain(&id)).await?.is_some() {
            return Err(Error::Conflict {
                code: "domain_exists",
                message: format!("domain {} already exists; a new domain needs a fresh id", descriptor.domain_id),
            });
        }
        let response = self
            .register_with_ttp(&RegisterDomainRequest {
                descriptor: request.descriptor.clone(),
                previous_registration: None,
            })
            .await?;
        let header = HeaderRecord { descriptor: request.descriptor, registration: response.registration };
        let (volumes, id, size, h) =
            (self.volumes.clone(), descriptor.domain_id.clone(), request.size_bytes, header.clone());
        let volume_path = blocking(move || volumes.create(&id, size, &h)).await?;
        let record = DomainRecord {
            id: descriptor.domain_id.clone(),
            owner: descriptor.owner.clone(),
            shared_with: descriptor.shared_with.clone(),
            version: descriptor.version,
            size_bytes: request.size_bytes,
            created_at: now_unix(),
            volume_path,
            deleted_at: None,
        };
        let stored = record.clone();
        let volumes = self.volumes.clone();
        self.store(move |s| {
            s.insert_domain(&stored).inspect_err(|_| {
                let _ = volumes.destroy(&stored.volume_path);
            })
        })
        .await?;
        tracing::info!(domain = %record.id, owner = %record.owner, size = record.size_bytes, "domain created");
        domain_view(&record, header, "available")
    }

    /// `GET /v1/domains`: the live domains the caller owns or shares.
    pub async fn list_domains(&self, caller: &Identity, page: Page) -> Result<DomainList> {
        require_role(caller, &[Role::DomainManager], "list domains")?;
        let (name, p) = (caller.name.clone(), page.clone());
        let rows = self.store(move |s| s.domains_for(&name, &p)).await?;
        let (records, next_marker) = page.finish(rows, |d| &d.id);
        let mut domains = Vec::with_capacity(records.len());
        for record in records {
            let view = match self.read_header(&record).await {
                Ok(header) => domain_view(&record, header.record, self.status_of(&record.id).await?),
                Err(e) => Err(e),
            };
            match view {
                Ok(view) => domains.push(view),
                // One damaged volume must not hide the caller's other domains.
                Err(e) => {
                    tracing::error!(domain = %record.id, error = %e, "domain left out of the list: its header cannot be read")
                }
            }
        }
        Ok(DomainList { domains, next_marker })
    }

    /// `GET /v1/domains/{id}`: the domain with the header in force on its volume.
    pub async fn get_domain(&self, caller: &Identity, domain_id: &str) -> Result<DomainView> {
        require_role(caller, &[Role::DomainManager], "read a domain")?;
        let mut record = self.managed_domain(caller, domain_id).await?;
        let id = domain_id.to_string();
        if self.store(move |s| s.pending_update(&id)).await?.is_some() {
            // Show the domain as its owner last asked for it, not half-way.
            let lock = self.lock_of(domain_id);
            let _guard = lock.lock().await;
            self.finish_pending_update(&record).await?;
            record = self.managed_domain(caller, domain_id).await?;
        }
        let header = self.read_header(&record).await?;
        if let Some(skipped) = &header.skipped {
            if !skipped.contains("empty") {
                tracing::warn!(domain = %domain_id, %skipped, "volume header slot not usable; the other slot is in force");
            }
        }
        domain_view(&record, header.record, self.status_of(domain_id).await?)
    }

    /// `PUT /v1/domains/{id}/descriptor`: grant, revoke, share. The update is written ahead
    /// (a pending update), then the TTP registers the new version (monotonic, based on the
    /// registration in the header), the header is rewritten in the other slot, and
    /// attachments that lost access are detached. If the CP stops, loses the TTP or the
    /// volume write fails half-way, the pending update is finished later
    /// (`finish_pending_update`) instead of leaving the domain behind its registration.
    pub async fn update_domain(
        &self,
        caller: &Identity,
        domain_id: &str,
        request: UpdateDomainRequest,
    ) -> Result<DomainView> {
        require_role(caller, &[Role::DomainManager], "change a domain")?;
        let descriptor = decode_descriptor(&request.descriptor)?;
        if descriptor.domain_id != domain_id {
            return Err(Error::BadRequest(format!(
                "the descriptor is of domain {}, but the request is for domain {domain_id}",
                descriptor.domain_id
            )));
        }
        let lock = self.lock_of(domain_id);
        let _guard = lock.lock().await;
        let record = self.managed_domain(caller, domain_id).await?;
        Self::require_owner(caller, &record, "change")?;
        self.finish_pending_update(&record).await?;
        let current = self.read_header(&record).await?;
        let pending = PendingUpdate {
            domain_id: domain_id.to_string(),
            version: descriptor.version,
            descriptor: request.descriptor.clone(),
            recorded_at: now_unix(),
        };
        self.store(move |s| s.record_pending_update(&pending)).await?;
        let header = match self.apply_update(&record, request.descriptor, &descriptor, current).await {
            Ok(header) => header,
            Err(e) if is_refusal(&e) => {
                let id = domain_id.to_string();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                return Err(e);
            }
            Err(e) => return Err(kept_for_later(e, descriptor.version)),
        };
        self.detach_lost(domain_id, &descriptor, &format!("access revoked by version {}", descriptor.version)).await?;
        domain_view(&record, header, self.status_of(domain_id).await?)
    }

    /// Registers `envelope` with the TTP on top of the header in force (`current`), writes
    /// the new header into the other slot and records the version (which ends the pending
    /// update). The TTP answers a repeat of its newest registration with the same
    /// registration, so this is safe to run again after a crash.
    async fn apply_update(
        &self,
        record: &DomainRecord,
        envelope: SignedEnvelope,
        descriptor: &Descriptor,
        current: crate::volumes::VolumeHeader,
    ) -> Result<HeaderRecord> {
        let domain_id = record.id.clone();
        let response = self
            .register_with_ttp(&RegisterDomainRequest {
                descriptor: envelope.clone(),
                previous_registration: Some(current.record.registration.clone()),
            })
            .await?;
        let header = HeaderRecord { descriptor: envelope, registration: response.registration };
        let (volumes, path, h) = (self.volumes.clone(), record.volume_path.clone(), header.clone());
        let (slot, seq) = blocking(move || volumes.update_header(&path, &h)).await.map_err(|e| {
            Error::Volume(format!(
                "the TTP registered version {} of domain {domain_id}, but writing the volume header failed: {e}",
                descriptor.version
            ))
        })?;
        let (id, version, shared) = (domain_id.clone(), descriptor.version, descriptor.shared_with.clone());
        self.store(move |s| s.update_domain(&id, version, &shared)).await?;
        tracing::info!(domain = %domain_id, version, slot, seq, "domain updated");
        Ok(header)
    }

    /// Detaches every open attachment of the domain that `descriptor` no longer allows
    /// (VM gone from the access list, or a narrower mode than it mounted with).
    async fn detach_lost(&self, domain_id: &str, descriptor: &Descriptor, why: &str) -> Result<()> {
        let id = domain_id.to_string();
        let open = self.store(move |s| s.open_attachments_of_domain(&id)).await?;
        let lost: Vec<Attachment> = open.into_iter().filter(|a| !allows(descriptor, a)).collect();
        self.detach_all(lost, why).await
    }

    /// Finishes the domain's pending update, if it has one; the caller holds the domain's
    /// lock. The header in force tells how far it got: at the pending version already, only
    /// the CP's record was missing; behind it, the update is registered again (the TTP
    /// answers its own registration again if it had made it) and written. A TTP refusal
    /// ends it (the update never took effect); an unreachable TTP or a failed write keeps
    /// it for the next request and fails this one, since acting on a header the TTP no
    /// longer calls newest would be refused anyway.
    async fn finish_pending_update(&self, record: &DomainRecord) -> Result<()> {
        let id = record.id.clone();
        let Some(pending) = self.store(move |s| s.pending_update(&id)).await? else {
            return Ok(());
        };
        let current = self.read_header(record).await?;
        let (in_force, _) = current
            .record
            .unverified_contents()
            .map_err(|e| Error::Volume(format!("header of domain {}: {e}", record.id)))?;
        let why = format!("access revoked by version {} (finished after an interruption)", pending.version);
        if in_force.version >= pending.version {
            let (id, version, shared) = (record.id.clone(), in_force.version, in_force.shared_with.clone());
            self.store(move |s| s.update_domain(&id, version, &shared)).await?;
            tracing::warn!(domain = %record.id, version = in_force.version, "pending update had reached the volume header; recorded it");
            return self.detach_lost(&record.id, &in_force, &why).await;
        }
        let descriptor = match decode_descriptor(&pending.descriptor) {
            Ok(descriptor) => descriptor,
            Err(e) => {
                let id = record.id.clone();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                tracing::error!(domain = %record.id, error = %e, "pending update does not decode; dropped");
                return Ok(());
            }
        };
        match self.apply_update(record, pending.descriptor, &descriptor, current).await {
            Ok(_) => {
                tracing::warn!(domain = %record.id, version = pending.version, recorded_at = pending.recorded_at,
                    "finished an update that was interrupted");
                self.detach_lost(&record.id, &descriptor, &why).await
            }
            Err(e) if is_refusal(&e) => {
                let id = record.id.clone();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                tracing::warn!(domain = %record.id, version = pending.version, code = e.code(), error = %e,
                    "the TTP refused an interrupted update; dropped it");
                Ok(())
            }
            Err(e) => Err(kept_for_later(e, pending.version)),
        }
    }

    /// Finishes every pending update (start-up, before the attachments are reconciled).
    /// Returns how many were finished or dropped; one that cannot be finished now stays.
    pub async fn finish_pending_updates(&self) -> Result<usize> {
        let pending = self.store(|s| s.pending_updates()).await?;
        let mut finished = 0;
        for update in pending {
            let lock = self.lock_of(&update.domain_id);
            let _guard = lock.lock().await;
            let id = update.domain_id.clone();
            let Some(record) = self.store(move |s| s.domain(&id)).await? else { continue };
            match self.finish_pending_update(&record).await {
                Ok(()) => finished += 1,
                Err(e) => tracing::error!(domain = %update.domain_id, version = update.version, error = %e,
                    "cannot finish an interrupted update now; the next request for the domain retries"),
            }
        }
        Ok(finished)
    }

    /// Enforces the header in force on every open attachment, as at start-up: a cloud
    /// platform killed after writing a revoking (or narrowing) header but before detaching
    /// would otherwise leave a VM attached that has lost its access. Returns how many
    /// attachments were detached (or marked `detaching` when their host is unreachable).
    pub async fn reconcile_attachments(&self) -> Result<usize> {
        let mut open: HashMap<String, Vec<Attachment>> = HashMap::new();
        for attachment in self.open_attachments().await? {
            open.entry(attachment.domain_id.clone()).or_default().push(attachment);
        }
        let mut detached = 0;
        for (domain_id, attachments) in open {
            let lock = self.lock_of(&domain_id);
            let _guard = lock.lock().await;
            let id = domain_id.clone();
            let record = self.store(move |s| s.domain(&id)).await?;
            let allowed = match &record {
                Some(record) => match self.descriptor_in_force(record).await {
                    Ok(descriptor) => Some(descriptor),
                    Err(e) => {
                        tracing::error!(domain = %domain_id, error = %e, "cannot read the header in force; detaching every VM of the domain");
                        None
                    }
                },
                None => None,
            };
            let lost: Vec<Attachment> =
                attachments.into_iter().filter(|a| !allowed.as_ref().is_some_and(|d| allows(d, a))).collect();
            detached += lost.len();
            self.detach_all(lost, "reconciled at start-up: the header in force no longer allows it").await?;
        }
        Ok(detached)
    }

    /// Every attachment that is not detached, in pages of 500.
    async fn open_attachments(&self) -> Result<Vec<Attachment>> {
        let mut open = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = Page { limit: 500, marker: marker.clone() };
            let batch =
                self.store(move |s| s.attachments(&AttachmentFilter { manager: None, domain_id: None }, &page)).await?;
            let full = batch.len() == 500;
            marker = batch.last().map(|a| a.id.clone());
            open.extend(batch.into_iter().filter(|a| a.status != DETACHED));
            if !full {
                return Ok(open);
            }
        }
    }

    /// Settles what the CP and its compute hosts disagree on (at start-up, then every
    /// `reconcile_interval_secs`): a mapping the host holds whose attach the CP wrote ahead
    /// but never heard back about is adopted (if the header in force still allows it); a
    /// mapping the CP does not know as open (an orphan) is detached; a record the host does
    /// not have at all (`attaching` that never got there, `detaching` or `attached` that the
    /// host already undid) is marked detached; a `detaching` one the host still has is
    /// detached again. Each step runs under the domain's lock and re-reads
    /// the record, so it never races an attach or detach of this CP. An unreachable host is
    /// skipped until the next round.
    pub async fn reconcile_hosts(&self) -> Result<HostReconciliation> {
        let mut outcome = HostReconciliation::default();
        let open = self.open_attachments().await?;
        for host in self.store(|s| s.hosts()).await? {
            let listed = match self.agent_client(&host).await {
                Ok(client) => match tokio::time::timeout(
                    HOST_LIST_TIMEOUT,
                    client.get_json::<AgentAttachmentList>("/v1/attachments"),
                )
                .await
                {
                    Ok(answer) => answer.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} s", HOST_LIST_TIMEOUT.as_secs())),
                },
                Err(e) => Err(e.to_string()),
            };
            let mappings = match listed {
                Ok(list) => list.attachments,
                Err(e) => {
                    tracing::warn!(host = %host.id, error = %e, "reconciliation: cannot list the host's attachments; next round");
                    outcome.hosts_unreachable += 1;
                    continue;
                }
            };
            for mapping in mappings.iter().filter(|m| m.status != DETACHED) {
                self.settle_mapping(&host, mapping, &mut outcome).await?;
            }
            for record in open.iter().filter(|a| a.host == host.id && !mappings.iter().any(|m| m.attachment_id == a.id))
            {
                let lock = self.lock_of(&record.domain_id);
                let _guard = lock.lock().await;
                let id = record.id.clone();
                let Some(current) = self.store(move |s| s.attachment(&id)).await? else { continue };
                // Only a record unchanged since before the host's list was read: one attached
                // by this CP meanwhile is simply not in that list yet.
                if current.status == record.status {
                    let id = current.id.clone();
                    self.store(move |s| s.set_attachment_status(&id, DETACHED)).await?;
                    tracing::warn!(attachment = %current.id, vm = %current.instance_id, host = %host.id, was = %current.status,
                        "reconciliation: the host has no such mapping; marked detached");
                    outcome.marked_detached += 1;
                }
            }
        }
        Ok(outcome)
    }

    /// One mapping a host reported, against the CP's record of it (see [`Self::reconcile_hosts`]).
    async fn settle_mapping(
        &self,
        host: &ComputeHost,
        mapping: &AgentAttachment,
        outcome: &mut HostReconciliation,
    ) -> Result<()> {
        let lock = self.lock_of(&mapping.domain_id);
        let _guard = lock.lock().await;
        let id = mapping.attachment_id.clone();
        let record = self.store(move |s| s.attachment(&id)).await?;
        let as_known = Attachment {
            id: mapping.attachment_id.clone(),
            domain_id: mapping.domain_id.clone(),
            instance_id: mapping.vm_id.clone(),
            host: host.id.clone(),
            mode: mapping.mode,
            device: mapping.device.clone(),
            mount_path: mapping.mount_path.clone(),
            version: mapping.version,
            status: ATTACHED.to_string(),
        };
        match record.as_ref().map(|r| r.status.as_str()) {
            Some(ATTACHED) => {}
            Some(ATTACHING) if mapping.status == ATTACHED && self.header_allows(&as_known).await => {
                let stored = as_known.clone();
                self.store(move |s| s.complete_attachment(&stored)).await?;
                tracing::warn!(attachment = %as_known.id, vm = %as_known.instance_id, host = %host.id,
                    "reconciliation: the host finished an attach the CP never heard back about; recorded it as attached");
                outcome.adopted += 1;
            }
            status => {
                // An orphan (unknown, or detached here), a `detaching` record, or an attach
                // the host only half holds (stale) or the header in force no longer allows.
                match self.detach_on_host(&as_known).await {
                    Ok(()) => {
                        if record.is_some() {
                            let id = as_known.id.clone();
                            self.store(move |s| s.set_attachment_status(&id, DETACHED)).await?;
                        }
                        tracing::warn!(attachment = %as_known.id, vm = %as_known.instance_id, host = %host.id,
                            cp_status = status.unwrap_or("unknown"), "reconciliation: detached a mapping the CP does not hold open");
                        outcome.detached += 1;
                    }
                    Err(e) => tracing::error!(attachment = %as_known.id, host = %host.id, error = %e,
                        "reconciliation: detaching a mapping the CP does not hold open failed; next round"),
                }
            }
        }
        Ok(())
    }

    /// Whether the header in force on the domain's volume allows `attachment`'s VM and mode.
    async fn header_allows(&self, attachment: &Attachment) -> bool {
        let id = attachment.domain_id.clone();
        let Ok(Some(record)) = self.store(move |s| s.domain(&id)).await else { return false };
        if record.deleted_at.is_some() {
            return false;
        }
        self.descriptor_in_force(&record).await.is_ok_and(|descriptor| allows(&descriptor, attachment))
    }

    /// The descriptor of the header in force on the domain's volume.
    async fn descriptor_in_force(&self, record: &DomainRecord) -> Result<Descriptor> {
        decode_descriptor(&self.read_header(record).await?.record.descriptor)
    }

    /// `DELETE /v1/domains/{id}`: TTP tombstone, every attachment detached, both header
    /// slots destroyed, the file removed.
    pub async fn delete_domain(
        &self,
        caller: &Identity,
        domain_id: &str,
        body: DeleteDomainBody,
    ) -> Result<DomainView> {
        require_role(caller, &[Role::DomainManager], "delete a domain")?;
        let deletion =
            Deletion::decode(&body.deletion.message).map_err(|e| Error::BadRequest(format!("deletion: {e}")))?;
        if deletion.domain_id != domain_id {
            return Err(Error::BadRequest(format!(
                "the deletion is signed for domain {}, but the request is for domain {domain_id}",
                deletion.domain_id
            )));
        }
        let lock = self.lock_of(domain_id);
        let _guard = lock.lock().await;
        let mut record = self.managed_domain(caller, domain_id).await?;
        Self::require_owner(caller, &record, "delete")?;
        let header = self.read_header(&record).await.ok();
        let path = format!("/v1/domains/{domain_id}/delete");
        let outcome = self
            .ttp
            .post_json::<_, serde_json::Value>(&path, &DeleteDomainRequest { deletion: body.deletion })
            .await
            .map_err(|e| {
                Error::from_peer(e, "ttp_unreachable", || format!("cannot reach the TTP at {}", self.ttp.base_url()))
            });
        match outcome {
            Ok(_) => {}
            // A retried deletion (the CP stopped after the TTP's tombstone): finish locally.
            Err(Error::Upstream { code, .. }) if code == "domain_deleted" => {
                tracing::warn!(domain = %domain_id, "the TTP had already deleted the domain; finishing the deletion here");
            }
            Err(e) => return Err(e),
        }
        let id = domain_id.to_string();
        let open = self.store(move |s| s.open_attachments_of_domain(&id)).await?;
        self.detach_all(open, "domain deleted").await?;
        let (volumes, volume_path) = (self.volumes.clone(), record.volume_path.clone());
        blocking(move || volumes.destroy(&volume_path)).await?;
        let at = now_unix();
        let id = domain_id.to_string();
        self.store(move |s| s.mark_domain_deleted(&id, at)).await?;
        record.deleted_at = Some(at);
        tracing::info!(domain = %domain_id, by = %caller.name, "domain deleted; header destroyed");
        match header {
            Some(header) => domain_view(&record, header.record, "deleted"),
            None => Err(Error::DomainDeleted(format!(
                "domain {domain_id} is deleted; its volume header was already gone or unreadable, so there is no header to show"
            ))),
        }
    }

    // ---- attachments -----------------------------------------------------------------------

    async fn agent_client(&self, host: &ComputeHost) -> Result<net::Client> {
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

    async fn host_of(&self, host_id: &str) -> Result<ComputeHost> {
        let id = host_id.to_string();
        self.store(move |s| s.host(&id)).await?.ok_or_else(|| Error::NotFound {
            code: "host_unknown",
            message: format!("host {host_id} is not registered; the operator registers it with POST /v1/hosts"),
        })
    }

    fn agent_error(host: &ComputeHost) -> impl FnOnce() -> String + '_ {
        move || format!("cannot reach the secure component of host {} at {}", host.id, host.agent_url)
    }

    /// `POST /v1/attachments`: forwards to the secure component of the instance's host,
    /// with the header in force on the volume.
    pub async fn attach(&self, caller: &Identity, request: CreateAttachmentRequest) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager], "attach a domain")?;
        let lock = self.lock_of(&request.domain_id);
        let _guard = lock.lock().await;
        let record = self.managed_domain(caller, &request.domain_id).await?;
        let instance_id = request.instance_id.clone();
        let instance = self.store(move |s| s.instance(&instance_id)).await?.ok_or_else(|| Error::NotFound {
            code: "instance_unknown",
            message: format!("instance {} is not registered; register it with POST /v1/instances", request.instance_id),
        })?;
        let host = self.host_of(&instance.host).await?;
        // Every open attachment of the domain, read once under its lock: the same VM's is
        // `already_attached`, any other decides the single-writer rule below.
        let d = request.domain_id.clone();
        let open = self.store(move |s| s.open_attachments_of_domain(&d)).await?;
        if let Some(open) = open.iter().find(|a| a.instance_id == request.instance_id) {
            if open.status == ATTACHING {
                return Err(Error::Conflict {
                    code: "already_attached",
                    message: format!(
                        "an earlier attach of domain {} to {} (attachment {}) got no answer from host {}; the cloud platform settles it with the host within {} s, then attach again or detach",
                        open.domain_id, open.instance_id, open.id, open.host, self.reconcile_interval.as_secs()
                    ),
                });
            }
            return Err(Error::Conflict {
                code: "already_attached",
                message: format!(
                    "domain {} is already attached to {} ({}, attachment {}, status {}); detach it first",
                    open.domain_id, open.instance_id, open.mode, open.id, open.status
                ),
            });
        }
        // Single writer (docs/CLOUD-API.md, "Attachments"): ext4 is not a cluster file
        // system, so a second rw mount, or a ro mount beside a rw one, loses or garbles data
        // silently. Checked under the domain's lock, so two attaches cannot both pass.
        if let Some(other) = open.iter().find(|a| a.mode == AccessMode::Rw || request.mode == AccessMode::Rw) {
            return Err(Error::Conflict {
                code: "single_writer",
                message: format!(
                    "domain {} is attached to {} ({}, attachment {}); a domain has one read-write attachment and nothing beside it, or only read-only ones: detach {} first",
                    other.domain_id, other.instance_id, other.mode, other.id, other.instance_id
                ),
            });
        }
        // An interrupted update first: the TTP releases keys only for its newest version.
        self.finish_pending_update(&record).await?;
        let header = self.read_header(&record).await?;
        let attachment_id = hex::encode(rand::random::<[u8; 16]>());
        // The operator's word that this VM runs on this host, for this grant: the TTP
        // releases the key to no other host (docs/PROTOCOL.md "Placement").
        let placement = Placement {
            vm_id: instance.id.clone(),
            host_id: host.id.clone(),
            grant_digest: grant_digest(&request.grant),
            placed_at: now_unix(),
        };
        let agent_request = AgentAttachRequest {
            attachment_id: attachment_id.clone(),
            vm_id: instance.id.clone(),
            mode: request.mode,
            header: header.record,
            placement: self.placer.sign_envelope(SignatureContext::Placement, placement.encode()),
            grant: request.grant,
            volume_path: record.volume_path.to_string_lossy().into_owned(),
        };
        // Written ahead: if the answer never comes (the CP stops, the host is slow), the
        // reconciliation with the host finds this record and settles it (adopts the mapping
        // the host made, or marks it detached) instead of leaving an unknown mapping open.
        let mut attachment = Attachment {
            id: attachment_id,
            domain_id: record.id.clone(),
            instance_id: instance.id.clone(),
            host: host.id.clone(),
            mode: request.mode,
            device: String::new(),
            mount_path: String::new(),
            version: 0,
            status: ATTACHING.to_string(),
        };
        let client = self.agent_client(&host).await?;
        let stored = attachment.clone();
        self.store(move |s| s.insert_attachment(&stored, now_unix())).await?;
        let attached: AgentAttachment = match client.post_json("/v1/attachments", &agent_request).await {
            Ok(attached) => attached,
            Err(e) => {
                let never_sent = e.never_reached_peer();
                let e = Error::from_peer(e, "host_unreachable", Self::agent_error(&host));
                // Any answer of the host is final (it runs an attach to its end before it
                // answers), and so is a request that never reached it; only a request sent
                // without an answer leaves it open.
                if never_sent || matches!(e, Error::Upstream { .. }) || is_refusal(&e) {
                    let id = attachment.id.clone();
                    self.store(move |s| s.delete_attachment(&id)).await?;
                    return Err(e);
                }
                return Err(settled_later(e, &attachment.id));
            }
        };
        attachment.device = attached.device;
        attachment.mount_path = attached.mount_path;
        attachment.version = attached.version;
        attachment.status = ATTACHED.to_string();
        let stored = attachment.clone();
        if let Err(e) = self.store(move |s| s.complete_attachment(&stored)).await {
            // Do not leave a mapping open that the CP does not know about.
            let _ = self.detach_on_host(&attachment).await;
            return Err(e);
        }
        tracing::info!(attachment = %attachment.id, domain = %attachment.domain_id, vm = %attachment.instance_id,
            host = %attachment.host, mode = %attachment.mode, backend = %attached.backend, "attached");
        Ok(attachment)
    }

    /// Asks the host's secure component to detach. An attachment the host does not know
    /// (404) is already gone.
    async fn detach_on_host(&self, attachment: &Attachment) -> Result<()> {
        let host = self.host_of(&attachment.host).await?;
        let client = self.agent_client(&host).await?;
        match client.delete_json::<serde_json::Value>(&format!("/v1/attachments/{}", attachment.id)).await {
            Ok(_) => Ok(()),
            Err(net::Error::Api { status: 404, code, message }) => {
                tracing::warn!(attachment = %attachment.id, host = %host.id, %code, %message, "the host no longer has the attachment");
                Ok(())
            }
            Err(e) => Err(Error::from_peer(e, "host_unreachable", Self::agent_error(&host))),
        }
    }

    /// Detaches each attachment; one the host cannot confirm is marked `detaching` (a later
    /// `DELETE /v1/attachments/{id}` retries) and does not stop the others.
    async fn detach_all(&self, attachments: Vec<Attachment>, why: &str) -> Result<()> {
        for attachment in attachments {
            let status = match self.detach_on_host(&attachment).await {
                Ok(()) => {
                    tracing::info!(attachment = %attachment.id, vm = %attachment.instance_id, host = %attachment.host, %why, "detached");
                    DETACHED
                }
                Err(e) => {
                    tracing::error!(attachment = %attachment.id, vm = %attachment.instance_id, host = %attachment.host, %why,
                        error = %e, "detach failed; marked detaching");
                    DETACHING
                }
            };
            let id = attachment.id.clone();
            self.store(move |s| s.set_attachment_status(&id, status)).await?;
        }
        Ok(())
    }

    async fn managed_attachment(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        let id = attachment_id.to_string();
        let attachment = self.store(move |s| s.attachment(&id)).await?.ok_or_else(|| Error::NotFound {
            code: "attachment_unknown",
            message: format!("attachment {attachment_id} does not exist"),
        })?;
        let domain_id = attachment.domain_id.clone();
        let record = self.store(move |s| s.domain(&domain_id)).await?;
        if !record.is_some_and(|r| r.is_manager(&caller.name)) {
            // Not naming the attachment's domain: it belongs to another tenant.
            return Err(Error::Forbidden(format!(
                "{} does not manage the domain of attachment {attachment_id}",
                caller.name
            )));
        }
        Ok(attachment)
    }

    /// `GET /v1/attachments/{id}`: the operator (role cloud-platform) reads any attachment; a
    /// domain manager only one of a domain it owns or shares (otherwise 403 `forbidden`). An
    /// unknown id is 404 `attachment_unknown`.
    pub async fn attachment(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager, Role::CloudPlatform], "read an attachment")?;
        if caller.role == Role::CloudPlatform {
            let id = attachment_id.to_string();
            return self.store(move |s| s.attachment(&id)).await?.ok_or_else(|| Error::NotFound {
                code: "attachment_unknown",
                message: format!("attachment {attachment_id} does not exist"),
            });
        }
        self.managed_attachment(caller, attachment_id).await
    }

    /// `GET /v1/attachments`: a domain manager sees the attachments of its domains; the
    /// operator (cloud-platform role) sees all.
    pub async fn attachments(
        &self,
        caller: &Identity,
        domain_id: Option<String>,
        page: Page,
    ) -> Result<AttachmentList> {
        let manager = (caller.role != Role::CloudPlatform).then(|| caller.name.clone());
        let filter = AttachmentFilter { manager, domain_id };
        let p = page.clone();
        let rows = self.store(move |s| s.attachments(&filter, &p)).await?;
        let (attachments, next_marker) = page.finish(rows, |a| &a.id);
        Ok(AttachmentList { attachments, next_marker })
    }

    /// `DELETE /v1/attachments/{id}`: the host's secure component detaches; retried for an
    /// attachment left `detaching`. Detaching a detached attachment answers it unchanged.
    pub async fn detach(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager], "detach a domain")?;
        let attachment = self.managed_attachment(caller, attachment_id).await?;
        let lock = self.lock_of(&attachment.domain_id);
        let _guard = lock.lock().await;
        let mut attachment = self.managed_attachment(caller, attachment_id).await?;
        if attachment.status == DETACHED {
            return Ok(attachment);
        }
        self.detach_on_host(&attachment).await?;
        let id = attachment.id.clone();
        self.store(move |s| s.set_attachment_status(&id, DETACHED)).await?;
        attachment.status = DETACHED.to_string();
        tracing::info!(attachment = %attachment.id, vm = %attachment.instance_id, by = %caller.name, "detached");
        Ok(attachment)
    }
}
