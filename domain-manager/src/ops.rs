//! The domain manager's operations against the cloud platform and the TTP.

use std::collections::BTreeMap;

use protocol::cloud::{
    Attachment, AttachmentList, AttachmentStatus, CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody,
    DomainList, DomainView, RotateDomainRequest, UpdateDomainRequest,
};
use protocol::domain::{AccessMode, AclEntry, Descriptor, VolumeFormat};
use protocol::messages::{AuditCheckpoint, Deletion, HistoryResponse, KeyRotation, MountGrant, Registration};
use protocol::pki::Role;
use protocol::signing::{verify_signer_certificate, SignatureContext, SignatureKey, SignedEnvelope};

use crate::config::DmConfig;
use crate::error::{Error, Result};

/// How long a mount grant is valid by default: long enough for the attach, short enough
/// that a leaked grant is soon useless.
pub const DEFAULT_GRANT_SECS: u64 = 300;

/// A connected domain manager: its signing key and mTLS clients to the cloud platform and
/// the TTP. Every change it makes is a new descriptor version signed here.
pub struct DomainManager {
    /// This manager's name: the subject CN of its certificate, recorded as owner of the
    /// domains it creates and as issuer of its mount grants.
    pub name: String,
    key: SignatureKey,
    trusted_cas: Vec<protocol::pki::TrustedRoot>,
    revocation_lists: Vec<String>,
    cp: net::Client,
    ttp: net::Client,
    /// Where the last audit checkpoint the TTP showed this manager is kept (beside its
    /// certificate): the next history read must extend it.
    checkpoint_file: std::path::PathBuf,
}

/// The file beside the manager's certificate that keeps the last audit checkpoint seen.
pub const CHECKPOINT_FILE: &str = "ttp-audit-checkpoint";

/// The time now, unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl DomainManager {
    /// Loads the TLS files and key of `config` and builds the two clients. Refuses a
    /// certificate whose role is not domain-manager.
    pub fn connect(config: &DmConfig) -> Result<Self> {
        let files = config.tls_files();
        let material = files.load().map_err(|e| Error::Config(e.to_string()))?;
        let identity = material.identity().map_err(|e| Error::Config(e.to_string()))?;
        if identity.role != Role::DomainManager {
            return Err(Error::Config(format!(
                "{} is a {} certificate; the domain manager needs a domain-manager certificate (`cloud-platform ca issue --role domain-manager`)",
                config.cert.display(),
                identity.role
            )));
        }
        let cert_der = protocol::pki::certs_from_pem(&material.cert_pem, "certificate")?
            .first()
            .map(|c| c.to_vec())
            .ok_or_else(|| Error::Config("empty certificate file".into()))?;
        let key = SignatureKey::from_pem(&material.key_pem, cert_der)?;
        let cp_tls = material.client_config(Role::CloudPlatform).map_err(|e| Error::Config(e.to_string()))?;
        let ttp_tls = material.client_config(Role::Ttp).map_err(|e| Error::Config(e.to_string()))?;
        let cp = net::Client::new(&config.cloud_platform_url, cp_tls).map_err(|e| Error::Config(e.to_string()))?;
        let ttp = net::Client::new(&config.ttp_url, ttp_tls).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self {
            name: identity.name,
            key,
            trusted_cas: material.trusted_roots.clone(),
            revocation_lists: material.crl_pems.clone(),
            cp,
            ttp,
            checkpoint_file: config.cert.with_file_name(CHECKPOINT_FILE),
        })
    }

    /// Follows `next_marker` through every page of a list endpoint.
    async fn fetch_all<Page: serde::de::DeserializeOwned, Item>(
        &self,
        path: &str,
        split: impl Fn(Page) -> (Vec<Item>, Option<String>),
    ) -> Result<Vec<Item>> {
        let mut all = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let url = match &marker {
                Some(m) => format!("{path}?marker={m}"),
                None => path.to_string(),
            };
            let page: Page = self.cp.get_json(&url).await.map_err(|e| Error::from_net("cloud platform", e))?;
            let (items, next) = split(page);
            all.extend(items);
            match next {
                Some(next) => marker = Some(next),
                None => return Ok(all),
            }
        }
    }

    // ---- domains -----------------------------------------------------------------------------

    /// Creates a domain owned by this manager: signs its first descriptor (metadata, access
    /// list, managers it is shared with) and asks the cloud platform for a `size_bytes` volume.
    pub async fn create(
        &self,
        metadata: BTreeMap<String, String>,
        acl: Vec<AclEntry>,
        shared_with: Vec<String>,
        size_bytes: u64,
    ) -> Result<DomainView> {
        self.create_with_format(metadata, acl, shared_with, size_bytes, VolumeFormat::V1).await
    }

    /// [`create`](Self::create) with the on-disk format chosen: with
    /// [`VolumeFormat::V2`] every secure component serves the volume only with its sector
    /// tags and hash tree checked against the root the TTP anchors (docs/FORMAT.md "Version 2").
    pub async fn create_with_format(
        &self,
        metadata: BTreeMap<String, String>,
        acl: Vec<AclEntry>,
        shared_with: Vec<String>,
        size_bytes: u64,
        volume_format: VolumeFormat,
    ) -> Result<DomainView> {
        let mut descriptor = Descriptor::new(&self.name, metadata, acl)?;
        descriptor.shared_with = shared_with;
        descriptor.volume_format = volume_format;
        descriptor.validate()?;
        let request = CreateDomainRequest {
            descriptor: self.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode()?),
            size_bytes,
        };
        self.cp.post_json("/v1/domains", &request).await.map_err(|e| Error::from_net("cloud platform", e))
    }

    /// Every domain this manager may see, following the cloud platform's pages.
    pub async fn list(&self) -> Result<Vec<DomainView>> {
        self.fetch_all("/v1/domains", |page: DomainList| (page.domains, page.next_marker)).await
    }

    /// One domain as the cloud platform reports it (version, status, access list).
    pub async fn show(&self, domain_id: &str) -> Result<DomainView> {
        check_domain_id(domain_id)?;
        self.cp.get_json(&format!("/v1/domains/{domain_id}")).await.map_err(|e| Error::from_net("cloud platform", e))
    }

    /// The registered descriptor of a domain, verified here too: a cloud platform that
    /// altered it is caught before we build the next version on it.
    pub async fn current_descriptor(&self, domain_id: &str) -> Result<Descriptor> {
        let view = self.show(domain_id).await?;
        let envelope = &view.header.descriptor;
        let signer = self.signed_by(envelope, SignatureContext::Descriptor)?;
        let descriptor = Descriptor::decode(&envelope.message)?;
        if signer.name != descriptor.owner || descriptor.domain_id != domain_id {
            return Err(Error::Refused {
                party: "cloud platform",
                code: "descriptor_signature_invalid".into(),
                message: format!(
                    "the stored descriptor of {domain_id} is not signed by its owner {}",
                    descriptor.owner
                ),
                hint: "\n  what to do: report this: the cloud platform served an altered header".into(),
            });
        }
        Ok(descriptor)
    }

    async fn update(&self, domain_id: &str, change: impl FnOnce(&mut Descriptor) -> Result<()>) -> Result<DomainView> {
        let current = self.current_descriptor(domain_id).await?;
        if current.owner != self.name {
            return Err(Error::Usage(format!(
                "only the owner {} can change domain {domain_id}; you are {}",
                current.owner, self.name
            )));
        }
        let mut change_result = Ok(());
        let next = current.next_version(|d| change_result = change(d))?;
        change_result?;
        let request =
            UpdateDomainRequest { descriptor: self.key.sign_envelope(SignatureContext::Descriptor, next.encode()?) };
        self.cp
            .put_json(&format!("/v1/domains/{domain_id}/descriptor"), &request)
            .await
            .map_err(|e| Error::from_net("cloud platform", e))
    }

    /// Sets the domain's access policy (Cedar text; `None` removes it): a new signed version,
    /// which the TTP refuses with `policy_invalid` if the policy does not parse or validate
    /// against the schema (docs/PROTOCOL.md "Access policy").
    pub async fn set_policy(&self, domain_id: &str, policy: Option<String>) -> Result<DomainView> {
        if let Some(text) = &policy {
            protocol::domain::validate_policy_text(text)?;
        }
        self.update(domain_id, |d| {
            if d.policy == policy {
                return Err(Error::Usage(format!("the access policy of {domain_id} is that already")));
            }
            d.policy = policy;
            Ok(())
        })
        .await
    }

    /// The access policy in force (from the owner-signed descriptor, verified here), if any.
    pub async fn policy(&self, domain_id: &str) -> Result<Option<String>> {
        Ok(self.current_descriptor(domain_id).await?.policy)
    }

    /// Makes a format-1 domain format 2 (a new signed version): from now on no secure
    /// component serves it without integrity. The secure component of its next read-write
    /// attach builds the tree over the data as it is and commits the first root; until then a
    /// read-only attach is refused. Safe to interrupt: nothing is committed before the tree
    /// is complete.
    pub async fn upgrade(&self, domain_id: &str) -> Result<DomainView> {
        self.update(domain_id, |d| {
            if d.volume_format == VolumeFormat::V2 {
                return Err(Error::Usage(format!("domain {domain_id} is format 2 already")));
            }
            d.volume_format = VolumeFormat::V2;
            Ok(())
        })
        .await
    }

    /// Adds `vm_id` to the access list, or changes its mode.
    pub async fn grant(&self, domain_id: &str, vm_id: &str, mode: AccessMode) -> Result<DomainView> {
        self.update(domain_id, |d| {
            match d.acl.iter_mut().find(|e| e.vm_id == vm_id) {
                Some(entry) if entry.mode == mode => {
                    return Err(Error::Usage(format!("{vm_id} already has {mode} access to {domain_id}")))
                }
                Some(entry) => entry.mode = mode,
                None => d.acl.push(AclEntry { vm_id: vm_id.to_string(), mode }),
            }
            Ok(())
        })
        .await
    }

    /// Removes `vm_id` from the access list; the cloud platform detaches it.
    pub async fn revoke(&self, domain_id: &str, vm_id: &str) -> Result<DomainView> {
        self.update(domain_id, |d| {
            let before = d.acl.len();
            d.acl.retain(|e| e.vm_id != vm_id);
            if d.acl.len() == before {
                return Err(Error::Usage(format!("{vm_id} is not in the access list of {domain_id}")));
            }
            Ok(())
        })
        .await
    }

    /// Asks for a new key of the domain (docs/PROTOCOL.md "Key rotation"): the TTP registers
    /// a fresh key generation and the cloud platform writes it beside the old one. With
    /// `online`, if a VM holds the domain read-write now, a mount grant for it goes along and
    /// its host re-encrypts the volume while the VM runs; otherwise the next read-write
    /// attach re-encrypts. After that the old key reads nothing. The answer's
    /// `re_encryption` says which.
    pub async fn rotate(&self, domain_id: &str, online: bool) -> Result<DomainView> {
        let view = self.show(domain_id).await?;
        let descriptor = Descriptor::decode(&view.header.descriptor.message)?;
        if descriptor.owner != self.name {
            return Err(Error::Usage(format!(
                "only the owner {} can rotate the key of domain {domain_id}; you are {}",
                descriptor.owner, self.name
            )));
        }
        if view.header.rotation.is_some() {
            return Err(Error::Usage(format!(
                "the key of domain {domain_id} is being rotated already: attach it read-write once to finish the re-encryption, then rotate again"
            )));
        }
        let registration = Registration::decode(&view.header.registration.message)?;
        let rotation = KeyRotation {
            domain_id: domain_id.to_string(),
            from_generation: registration.key_generation,
            requested_at: now_unix(),
        };
        let online_grant = if online { self.online_rotation_grant(domain_id).await? } else { None };
        let request = RotateDomainRequest {
            rotation: self.key.sign_envelope(SignatureContext::KeyRotation, rotation.encode()),
            online_grant,
        };
        self.cp
            .post_json(&format!("/v1/domains/{domain_id}/rotations"), &request)
            .await
            .map_err(|e| Error::from_net("cloud platform", e))
    }

    /// A read-write mount grant (purpose `key-rotation`) for the VM that holds `domain_id`
    /// read-write now, so its host can re-encrypt online; `None` when no VM does.
    async fn online_rotation_grant(&self, domain_id: &str) -> Result<Option<SignedEnvelope>> {
        let holder =
            self.attachments().await?.into_iter().find(|a| {
                a.domain_id == domain_id && a.mode == AccessMode::Rw && a.status == AttachmentStatus::Attached
            });
        Ok(holder.map(|attachment| {
            let grant = MountGrant {
                domain_id: domain_id.to_string(),
                vm_id: attachment.instance_id,
                mode: AccessMode::Rw,
                expires_at: now_unix().saturating_add(300),
                nonce: rand::random(),
                issuer: self.name.clone(),
                purpose: "key-rotation".into(),
                reason: "online re-encryption of the volume after a key rotation".into(),
            };
            self.key.sign_envelope(SignatureContext::MountGrant, grant.encode())
        }))
    }

    /// Replaces the access list with `acl` (a new signed version); the cloud platform detaches
    /// the VMs that lost access or now have less. Refused (`Usage`) when nothing changes.
    pub async fn set_acl(&self, domain_id: &str, acl: Vec<AclEntry>) -> Result<DomainView> {
        self.update(domain_id, |d| {
            if d.acl == acl {
                return Err(Error::Usage(format!("the access list of {domain_id} is that already")));
            }
            d.acl = acl;
            Ok(())
        })
        .await
    }

    /// Shares the domain with another domain manager (it may then attach and read history).
    pub async fn share(&self, domain_id: &str, manager: &str) -> Result<DomainView> {
        self.update(domain_id, |d| {
            if d.shared_with.iter().any(|m| m == manager) || d.owner == manager {
                return Err(Error::Usage(format!("{domain_id} is already shared with {manager}")));
            }
            d.shared_with.push(manager.to_string());
            Ok(())
        })
        .await
    }

    /// Stops sharing the domain with `manager`; refused (`Usage`) if it was not shared with it.
    pub async fn unshare(&self, domain_id: &str, manager: &str) -> Result<DomainView> {
        self.update(domain_id, |d| {
            let before = d.shared_with.len();
            d.shared_with.retain(|m| m != manager);
            if d.shared_with.len() == before {
                return Err(Error::Usage(format!("{domain_id} is not shared with {manager}")));
            }
            Ok(())
        })
        .await
    }

    /// Deletes (crypto-shreds) the domain: the TTP will never derive its key again.
    pub async fn delete(&self, domain_id: &str) -> Result<DomainView> {
        check_domain_id(domain_id)?;
        let deletion = Deletion { domain_id: domain_id.to_string(), requested_at: now_unix() };
        let body = DeleteDomainBody { deletion: self.key.sign_envelope(SignatureContext::Deletion, deletion.encode()) };
        self.cp
            .request_json(reqwest::Method::DELETE, &format!("/v1/domains/{domain_id}"), Some(&body))
            .await
            .map_err(|e| Error::from_net("cloud platform", e))
    }

    /// The viewing history, read from the TTP (which checks each record's hash), with the
    /// TTP's signed checkpoint of its audit chain: checked against the last checkpoint this
    /// manager saw (docs/PROTOCOL.md "Audit checkpoints"), so a log cut short or forked
    /// since then is refused here, then kept as the new last one.
    pub async fn history(&self, domain_id: &str) -> Result<HistoryResponse> {
        check_domain_id(domain_id)?;
        let last = self.last_checkpoint()?;
        let path = match &last {
            Some(last) => format!("/v1/domains/{domain_id}/history?since={}", last.seq),
            None => format!("/v1/domains/{domain_id}/history"),
        };
        let history: HistoryResponse = self.ttp.get_json(&path).await.map_err(|e| Error::from_net("TTP", e))?;
        let tampered = |message: String| Error::Refused {
            party: "TTP",
            code: "audit_chain_broken".into(),
            message,
            hint: format!(
                "\n  what to do: report this to the TTP's operator; the last checkpoint seen is kept in {}",
                self.checkpoint_file.display()
            ),
        };
        let Some(envelope) = &history.checkpoint else {
            return match last {
                Some(last) => Err(tampered(format!(
                    "the TTP answered without an audit checkpoint; the last one seen named record {}",
                    last.seq
                ))),
                None => Ok(history),
            };
        };
        let signer = self.signed_by(envelope, SignatureContext::AuditCheckpoint)?;
        if signer.role != Role::Ttp {
            return Err(tampered(format!("the audit checkpoint is signed by {}, not by a TTP", signer.name)));
        }
        let newer = AuditCheckpoint::decode(&envelope.message)?;
        if let Some(last) = &last {
            last.check_successor(&newer, history.since.as_ref()).map_err(|e| tampered(e.to_string()))?;
        }
        if last.as_ref().is_none_or(|last| newer.seq > last.seq) {
            self.keep_checkpoint(&envelope.encode()).map_err(|e| {
                Error::Config(format!("keep the audit checkpoint in {}: {e}", self.checkpoint_file.display()))
            })?;
        }
        Ok(history)
    }

    /// Replaces the kept checkpoint atomically (a file beside it, synced, then renamed over
    /// it): a crash or a second manager reading at the same moment never sees half a file,
    /// which would refuse every later history read.
    fn keep_checkpoint(&self, encoded: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let fresh = self.checkpoint_file.with_extension(format!("new-{}", std::process::id()));
        let mut file = std::fs::File::create(&fresh)?;
        file.write_all(encoded)?;
        file.sync_all()?;
        std::fs::rename(&fresh, &self.checkpoint_file)
    }

    /// The signer of `envelope` (its certificate checked against our CAs and revocation
    /// lists), once its signature in `context` verifies.
    fn signed_by(
        &self,
        envelope: &protocol::signing::SignedEnvelope,
        context: SignatureContext,
    ) -> Result<protocol::pki::Identity> {
        let signer = verify_signer_certificate(
            &envelope.signer_certificate,
            &self.trusted_cas,
            &self.revocation_lists,
            now_unix(),
        )?;
        envelope.verify_signature(context)?;
        Ok(signer)
    }

    /// The last audit checkpoint kept, if any (its signature was checked when it was kept).
    fn last_checkpoint(&self) -> Result<Option<AuditCheckpoint>> {
        match std::fs::read(&self.checkpoint_file) {
            Ok(bytes) => {
                Ok(Some(AuditCheckpoint::decode(&protocol::signing::SignedEnvelope::decode(&bytes)?.message)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Config(format!("read {}: {e}", self.checkpoint_file.display()))),
        }
    }

    // ---- attachments and VMs -----------------------------------------------------------------

    /// Attaches the domain to VM `instance_id`: signs a single-use mount grant for `mode`,
    /// valid for `valid_for_secs`, and hands it to the cloud platform, which forwards it to
    /// the VM's host.
    pub async fn attach(
        &self,
        domain_id: &str,
        instance_id: &str,
        mode: AccessMode,
        valid_for_secs: u64,
    ) -> Result<Attachment> {
        self.attach_for_purpose(domain_id, instance_id, mode, valid_for_secs, "", "").await
    }

    /// [`attach`](Self::attach) with a grant stating a purpose of use and a reason (both
    /// signed; the domain's access policy decides on them, docs/PROTOCOL.md "Access
    /// policy"). Purpose `emergency` is a break-glass attach: the TTP refuses it without a
    /// reason, and the owner's history shows it.
    pub async fn attach_for_purpose(
        &self,
        domain_id: &str,
        instance_id: &str,
        mode: AccessMode,
        valid_for_secs: u64,
        purpose: &str,
        reason: &str,
    ) -> Result<Attachment> {
        check_domain_id(domain_id)?;
        protocol::messages::validate_purpose(purpose)?;
        protocol::messages::validate_reason(reason)?;
        if purpose.is_empty() && !reason.is_empty() {
            return Err(Error::Usage("a reason goes with a purpose: give --purpose too".into()));
        }
        if purpose == protocol::messages::PURPOSE_EMERGENCY && reason.trim().is_empty() {
            return Err(Error::Usage(
                "an emergency (break-glass) attach needs --reason: the TTP refuses one without it".into(),
            ));
        }
        protocol::domain::validate_name("vm id", instance_id)?;
        let max = protocol::messages::MAX_GRANT_VALIDITY_SECS;
        if valid_for_secs == 0 || valid_for_secs > max {
            return Err(Error::Usage(format!(
                "a mount grant is valid for 1 to {max} s (the TTP refuses longer ones); {valid_for_secs} s asked"
            )));
        }
        let grant = MountGrant {
            domain_id: domain_id.to_string(),
            vm_id: instance_id.to_string(),
            mode,
            expires_at: now_unix().saturating_add(valid_for_secs),
            nonce: rand::random(),
            issuer: self.name.clone(),
            purpose: purpose.to_string(),
            reason: reason.to_string(),
        };
        let request = CreateAttachmentRequest {
            domain_id: domain_id.to_string(),
            instance_id: instance_id.to_string(),
            mode,
            grant: self.key.sign_envelope(SignatureContext::MountGrant, grant.encode()),
        };
        self.cp.post_json("/v1/attachments", &request).await.map_err(|e| Error::from_net("cloud platform", e))
    }

    /// Every attachment this manager may see, following the cloud platform's pages.
    pub async fn attachments(&self) -> Result<Vec<Attachment>> {
        self.fetch_all("/v1/attachments", |page: AttachmentList| (page.attachments, page.next_marker)).await
    }

    /// Detaches the attachment of `instance_id` to `domain_id`.
    pub async fn detach(&self, domain_id: &str, instance_id: &str) -> Result<Attachment> {
        let attachment = self
            .attachments()
            .await?
            .into_iter()
            .find(|a| {
                a.domain_id == domain_id && a.instance_id == instance_id && a.status == AttachmentStatus::Attached
            })
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{instance_id} has no attachment of domain {domain_id}; see `domain-manager vm list`"
                ))
            })?;
        self.detach_attachment(&attachment.id).await
    }

    /// Detaches the cloud platform's attachment `attachment_id` (also retries a `detaching` one).
    pub async fn detach_attachment(&self, attachment_id: &str) -> Result<Attachment> {
        self.cp
            .delete_json(&format!("/v1/attachments/{attachment_id}"))
            .await
            .map_err(|e| Error::from_net("cloud platform", e))
    }
}

fn check_domain_id(domain_id: &str) -> Result<()> {
    if domain_id.len() == 32 && domain_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{domain_id:?} is not a domain id (32 lowercase hex characters; see `domain-manager domain list`)"
        )))
    }
}

/// Parses `vm-a:rw` / `vm-b:ro` (mode defaults to ro: least privilege).
pub fn parse_acl_entry(text: &str) -> Result<AclEntry> {
    let (vm, mode) = match text.split_once(':') {
        Some((vm, mode)) => (vm, mode.parse::<AccessMode>()?),
        None => (text, AccessMode::Ro),
    };
    protocol::domain::validate_name("vm id", vm)?;
    Ok(AclEntry { vm_id: vm.to_string(), mode })
}

/// Parses `key=value` metadata.
pub fn parse_metadata(text: &str) -> Result<(String, String)> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| Error::Usage(format!("metadata {text:?} must be KEY=VALUE, e.g. department=cardiology")))?;
    protocol::domain::validate_name("metadata key", key)?;
    Ok((key.to_string(), value.to_string()))
}

/// Parses sizes like `64M`, `1G`, `4096`.
pub fn parse_size(text: &str) -> Result<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| Error::Usage(format!("size {text:?} is not a number with an optional K, M, G or T")))?;
    let factor: u64 = match unit {
        "" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => return Err(Error::Usage(format!("size unit {other:?} unknown; use K, M, G or T"))),
    };
    number.checked_mul(factor).ok_or_else(|| Error::Usage(format!("size {text:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments() {
        assert_eq!(parse_acl_entry("vm-a:rw").unwrap(), AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw });
        assert_eq!(parse_acl_entry("vm-b").unwrap().mode, AccessMode::Ro);
        assert!(parse_acl_entry("vm-b:rx").is_err());
        assert!(parse_acl_entry("vm b:ro").is_err());
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_metadata("department=cardiology").unwrap(), ("department".into(), "cardiology".into()));
        assert!(parse_metadata("nokey").is_err());
        assert!(check_domain_id("00112233445566778899aabbccddeeff").is_ok());
        assert!(check_domain_id("../etc").is_err());
    }
}
