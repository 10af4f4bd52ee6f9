//! Domains: create (within the owner's quota), list, read, update (grant, revoke, share)
//! and delete. Only the owner creates, changes and deletes a domain; its owner and the
//! managers it is shared with read it. The TTP registers every version before the volume
//! header is written.

use net::{Identity, Role};
use protocol::cloud::{
    AgentRotateRequest, AgentRotation, Attachment, AttachmentStatus, CreateDomainRequest, DeleteDomainBody, DomainList,
    DomainView, RotateDomainRequest, UpdateDomainRequest,
};
use protocol::domain::{AccessMode, Descriptor, VolumeFormat};
use protocol::messages::{
    grant_digest, DeleteDomainRequest, Deletion, HeaderRecord, KeyRotation, MountGrant, Placement,
    RegisterDomainRequest, RegisterDomainResponse, RotateKeyRequest, RotationState,
};
use protocol::refusal::Refusal;
use protocol::signing::{SignatureContext, SignedEnvelope};

use super::attachments::allows;
use super::pending::{kept_for_later, rotation_kept_for_later, PENDING_ROTATION};
use super::{blocking, is_refusal, now_unix, require_role, CloudPlatform};
use crate::error::{Error, Result};
use crate::store::{DomainRecord, Page, PendingUpdate};

pub(super) fn decode_descriptor(envelope: &protocol::signing::SignedEnvelope) -> Result<Descriptor> {
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
        re_encryption: None,
    })
}

impl CloudPlatform {
    /// The stored record of a domain that exists and is not deleted, and that `caller`
    /// manages (owner or shared with).
    pub(super) async fn managed_domain(&self, caller: &Identity, domain_id: &str) -> Result<DomainRecord> {
        let id = domain_id.to_string();
        let record = self.store(move |s| s.domain(&id)).await?.ok_or_else(|| Error::NotFound {
            code: Refusal::DomainUnknown,
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

    pub(super) fn require_owner(caller: &Identity, record: &DomainRecord, action: &str) -> Result<()> {
        if caller.name != record.owner {
            return Err(Error::OwnerMismatch(format!(
                "only the owner {} may {action} domain {}; {} is not the owner",
                record.owner, record.id, caller.name
            )));
        }
        Ok(())
    }

    pub(super) async fn read_header(&self, record: &DomainRecord) -> Result<crate::volumes::VolumeHeader> {
        let volumes = self.volumes.clone();
        let path = record.volume_path.clone();
        blocking(move || volumes.read_header(&path)).await
    }

    pub(super) async fn status_of(&self, domain_id: &str) -> Result<&'static str> {
        let id = domain_id.to_string();
        let open = self.store(move |s| s.open_attachments_of_domain(&id)).await?;
        Ok(if open.is_empty() { "available" } else { "in-use" })
    }

    pub(super) async fn register_with_ttp(&self, request: &RegisterDomainRequest) -> Result<RegisterDomainResponse> {
        self.post_to_ttp("/v1/domains", request).await
    }

    /// POSTs `body` to the TTP: its refusal is passed on with its own code, and a TTP that
    /// cannot be reached is `ttp_unreachable` naming its address.
    async fn post_to_ttp<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R> {
        self.ttp.post_json(path, body).await.map_err(|e| {
            Error::from_peer(e, Refusal::TtpUnreachable, || format!("cannot reach the TTP at {}", self.ttp.base_url()))
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
                code: Refusal::DomainExists,
                message: format!("domain {} already exists; a new domain needs a fresh id", descriptor.domain_id),
            });
        }
        let response = self
            .register_with_ttp(&RegisterDomainRequest {
                descriptor: request.descriptor.clone(),
                previous_registration: None,
            })
            .await?;
        let header =
            HeaderRecord { descriptor: request.descriptor, registration: response.registration, rotation: None };
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
    pub(super) async fn apply_update(
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
        // A rotation in progress goes on under the new version: its previous registration
        // and progress are the volume's, not the descriptor's, read under the header lock
        // (a secure component re-encrypting online moves them; docs/PROTOCOL.md "Key rotation").
        let (volumes, path) = (self.volumes.clone(), record.volume_path.clone());
        let update = move |on_volume: &HeaderRecord| {
            Ok(HeaderRecord {
                descriptor: envelope,
                registration: response.registration,
                rotation: on_volume.rotation.clone(),
            })
        };
        let (slot, seq, header) = blocking(move || volumes.update_header(&path, update)).await.map_err(|e| {
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

    /// `POST /v1/domains/{id}/rotations`: a new key generation (docs/PROTOCOL.md "Key
    /// rotation"). The TTP registers it on the owner's signed request; the header is then
    /// rewritten like an update's, with the new registration, the previous one and a rotation
    /// at boundary 0. The next read-write attach re-encrypts the volume. Refused while a
    /// rotation is still in progress (`key_rotation_in_progress`).
    pub async fn rotate_domain(
        &self,
        caller: &Identity,
        domain_id: &str,
        request: RotateDomainRequest,
    ) -> Result<DomainView> {
        require_role(caller, &[Role::DomainManager], "rotate a domain's key")?;
        let rotation = KeyRotation::decode(&request.rotation.message)
            .map_err(|e| Error::BadRequest(format!("key rotation: {e}")))?;
        if rotation.domain_id != domain_id {
            return Err(Error::BadRequest(format!(
                "the rotation is signed for domain {}, but the request is for domain {domain_id}",
                rotation.domain_id
            )));
        }
        let lock = self.lock_of(domain_id);
        let _guard = lock.lock().await;
        let record = self.managed_domain(caller, domain_id).await?;
        Self::require_owner(caller, &record, "rotate the key of")?;
        self.finish_pending_update(&record).await?;
        let current = self.read_header(&record).await?.record;
        if current.rotation.is_some() {
            return Err(Error::Conflict {
                code: Refusal::KeyRotationInProgress,
                message: format!(
                    "the key of domain {domain_id} is being rotated already; attach it read-write once to finish the re-encryption, then rotate again"
                ),
            });
        }
        // Written ahead like an update: a TTP that registered the rotation but whose answer
        // never came, or a header write that failed, is finished by the cloud platform
        // itself (pending.rs), not left as a header the TTP calls stale.
        let pending = PendingUpdate {
            domain_id: domain_id.to_string(),
            version: PENDING_ROTATION,
            descriptor: request.rotation.clone(),
            recorded_at: now_unix(),
        };
        self.store(move |s| s.record_pending_update(&pending)).await?;
        let header = match self.register_rotation(&record, request.rotation, current).await {
            Ok(header) => header,
            Err(e) if is_refusal(&e) => {
                let id = domain_id.to_string();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                return Err(e);
            }
            Err(e) => return Err(rotation_kept_for_later(e)),
        };
        let re_encryption = self.re_encrypt_online(&record, &header, request.online_grant).await;
        tracing::info!(domain = %domain_id, %re_encryption, "key rotated");
        let mut view = domain_view(&record, header, self.status_of(domain_id).await?)?;
        view.re_encryption = Some(re_encryption);
        Ok(view)
    }

    /// Registers the owner's signed `rotation` with the TTP on top of the header in force
    /// (`current`), writes the header with the new and the previous registration, and ends
    /// the pending rotation. The TTP answers a repeat (its newest generation is already
    /// `from_generation + 1`) with a fresh registration, so this is safe to run again.
    pub(super) async fn register_rotation(
        &self,
        record: &DomainRecord,
        rotation: SignedEnvelope,
        current: HeaderRecord,
    ) -> Result<HeaderRecord> {
        let domain_id = record.id.clone();
        let body = RotateKeyRequest { rotation, current_registration: current.registration.clone() };
        let response: RegisterDomainResponse =
            self.post_to_ttp(&format!("/v1/domains/{domain_id}/rotations"), &body).await?;
        let header = HeaderRecord {
            descriptor: current.descriptor,
            registration: response.registration,
            rotation: Some(RotationState { previous_registration: current.registration, boundary: 0, hotzone: None }),
        };
        let (volumes, path, h) = (self.volumes.clone(), record.volume_path.clone(), header.clone());
        let (slot, seq, header) = blocking(move || volumes.update_header(&path, |_| Ok(h))).await.map_err(|e| {
            Error::Volume(format!(
                "the TTP registered a new key of domain {domain_id}, but writing the volume header failed: {e}"
            ))
        })?;
        let id = domain_id.clone();
        self.store(move |s| s.drop_pending_update(&id)).await?;
        tracing::info!(domain = %domain_id, slot, seq, "key rotation registered and written");
        Ok(header)
    }

    /// Asks the host of the domain's read-write attachment to re-encrypt its volume online
    /// (docs/PROTOCOL.md "Online re-encryption") with `grant` for its VM. Says where the
    /// re-encryption runs, or why it waits for the next read-write attach: a rotation is
    /// registered either way, so a host that cannot do it online is not an error.
    async fn re_encrypt_online(
        &self,
        record: &DomainRecord,
        header: &HeaderRecord,
        grant: Option<SignedEnvelope>,
    ) -> String {
        let later = |why: String| format!("at the next read-write attach: {why}");
        if Descriptor::decode(&header.descriptor.message).is_ok_and(|d| d.volume_format == VolumeFormat::V2) {
            return later(
                "the domain is format 2, whose tags and tree move to the new key offline (detach it and attach it read-write again)"
                    .into(),
            );
        }
        let id = record.id.clone();
        let open = match self.store(move |s| s.open_attachments_of_domain(&id)).await {
            Ok(open) => open,
            Err(e) => return later(format!("the attachments could not be read ({e})")),
        };
        let Some(attachment) =
            open.into_iter().find(|a| a.mode == AccessMode::Rw && a.status == AttachmentStatus::Attached)
        else {
            return later("the domain has no read-write attachment now".into());
        };
        let Some(grant) = grant else {
            return later(format!(
                "{} holds it read-write, but no mount grant for re-encrypting online came with the request (--offline)",
                attachment.instance_id
            ));
        };
        match MountGrant::decode(&grant.message) {
            Ok(g) if g.vm_id == attachment.instance_id && g.mode == AccessMode::Rw && g.domain_id == record.id => {}
            Ok(g) => {
                return later(format!(
                    "the grant is for {} ({}) of domain {}, but the read-write attachment is {}'s",
                    g.vm_id, g.mode, g.domain_id, attachment.instance_id
                ))
            }
            Err(e) => return later(format!("the grant does not decode ({e})")),
        }
        let host = match self.host_of(&attachment.host).await {
            Ok(host) => host,
            Err(e) => return later(e.to_string()),
        };
        let placement = Placement {
            vm_id: attachment.instance_id.clone(),
            host_id: host.id.clone(),
            grant_digest: grant_digest(&grant),
            placed_at: now_unix(),
        };
        let request = AgentRotateRequest {
            header: header.clone(),
            grant,
            placement: self.placer.sign_envelope(SignatureContext::Placement, placement.encode()),
        };
        let started: std::result::Result<AgentRotation, Error> = match self.agent_client(&host).await {
            Ok(client) => client
                .post_json(&format!("/v1/attachments/{}/rotation", attachment.id), &request)
                .await
                .map_err(|e| Error::from_peer(e, Refusal::HostUnreachable, Self::agent_error(&host))),
            Err(e) => Err(e),
        };
        match started {
            Ok(rotation) => format!(
                "online on host {} for VM {} (attachment {}, {} sectors), which keeps reading and writing",
                host.id, rotation.vm_id, rotation.attachment_id, rotation.data_sectors
            ),
            Err(e) => {
                tracing::warn!(domain = %record.id, host = %host.id, error = %e, "online re-encryption not started");
                later(format!("host {} did not start it online ({e})", host.id))
            }
        }
    }

    /// Detaches every open attachment of the domain that `descriptor` no longer allows
    /// (VM gone from the access list, or a narrower mode than it mounted with).
    pub(super) async fn detach_lost(&self, domain_id: &str, descriptor: &Descriptor, why: &str) -> Result<()> {
        let id = domain_id.to_string();
        let open = self.store(move |s| s.open_attachments_of_domain(&id)).await?;
        let lost: Vec<Attachment> = open.into_iter().filter(|a| !allows(descriptor, a)).collect();
        self.detach_all(lost, why).await
    }

    /// The descriptor of the header in force on the domain's volume.
    pub(super) async fn descriptor_in_force(&self, record: &DomainRecord) -> Result<Descriptor> {
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
        let outcome =
            self.post_to_ttp::<_, serde_json::Value>(&path, &DeleteDomainRequest { deletion: body.deletion }).await;
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
}
