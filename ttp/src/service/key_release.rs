//! Key release (docs/PROTOCOL.md "Key release"): the quote challenge, then the six steps
//! every request goes through before K is derived and sealed to the host. Each step is one
//! private method returning what the next steps need; [`Ttp::release_key`] runs them in
//! order, so it reads as the protocol's numbered list. The first refusal ends the request,
//! and every outcome is one `key_release` audit record.

use protocol::domain::{descriptor_hash, Descriptor};
use protocol::kdf::{derive_sector_mac_key, derive_volume_key, RELEASED_KEYS_BYTES, VOLUME_KEY_BYTES};
use protocol::messages::{
    ChallengeResponse, KeyReleaseRequest, KeyReleaseResponse, MountGrant, Placement, Registration, PURPOSE_EMERGENCY,
};
use protocol::pki::{affiliation_from_certificate, Identity, Role};
use protocol::secret::SecretBytes;
use protocol::signing::SignatureContext;

use super::policy::{Permitted, ReleaseFacts};
use super::{invalid_name, Subject, Ttp};
use crate::attestation::{self, HostRecord};
use crate::error::{Error, Result};
use crate::store::{now_unix, DomainRecord, SpentTokens};

/// The audit event of a release (granted or refused) whose grant states purpose `emergency`:
/// a break-glass release stands out in the viewing history (docs/PROTOCOL.md "Access policy").
pub const BREAK_GLASS_EVENT: &str = "break_glass_release";

/// How long a quote challenge stays valid.
pub const CHALLENGE_TTL_SECS: u64 = 60;

/// Step 2's result: the header's descriptor and registration, both verified, and the
/// domain as the store holds it.
struct VerifiedHeader {
    descriptor: Descriptor,
    registration: Registration,
    domain: DomainRecord,
    /// During a key rotation: the previous generation's registration, verified.
    previous: Option<Registration>,
}

/// What a granted release answers with, before its audit record is written.
struct Released {
    wrapped_key: Vec<u8>,
    previous_wrapped_key: Option<Vec<u8>>,
    domain_id: String,
    version: u64,
    /// The header shows a finished rotation of this generation whose previous K_TTP version
    /// the store still keeps.
    finished_rotation: Option<u64>,
}

/// Step 4's result: a grant signed by a manager of the domain, for this request, unexpired.
struct VerifiedGrant {
    grant: MountGrant,
    /// The grant's signer (the owner or a manager the descriptor shares with).
    signer: String,
    /// SHA-256 of the grant message: what the placement names and the used-grant mark keys on.
    digest: [u8; 32],
    /// The TTP's clock when the grant's validity was checked; the placement is checked
    /// against the same instant.
    checked_at: u64,
}

impl Ttp {
    /// A single-use quote nonce (32 bytes, valid 60 s) for an enrolled secure component
    /// (`host_unknown` otherwise). Not audited: the key release that uses it is.
    pub fn challenge(&self, actor: &Identity) -> Result<ChallengeResponse> {
        Self::require_role(actor, Role::SecureComponent, "request a quote challenge")?;
        self.host_record(&actor.name)?;
        let nonce: [u8; 32] = rand::random();
        let challenge_id = hex::encode(rand::random::<[u8; 16]>());
        let expires_at = now_unix() + CHALLENGE_TTL_SECS;
        self.store.put_challenge(&challenge_id, &actor.name, &nonce, expires_at)?;
        Ok(ChallengeResponse { challenge_id, nonce: nonce.to_vec(), expires_at })
    }

    /// The key release of docs/PROTOCOL.md "Key release": host attestation against a fresh
    /// challenge, descriptor and registration signatures, newest version, ACL, then the
    /// single-use grant and the operator's placement; only then is K derived and sealed to
    /// the host's binding key ([`attestation::seal_key_to_host`]), with the domain's newest
    /// integrity anchor. Every outcome, granted or refused, is one `key_release` audit record
    /// (`break_glass_release` when the grant states purpose `emergency`).
    pub fn release_key(&self, actor: &Identity, request: &KeyReleaseRequest) -> Result<KeyReleaseResponse> {
        // Ids are validated before they reach the audit record: a malformed one is refused
        // (audited without it), never written to the log as sent.
        let host_id_ok = protocol::domain::validate_name("host id", &request.host_id).is_ok();
        let vm_id_ok = protocol::domain::validate_name("vm id", &request.vm_id).is_ok();
        let subject = Subject {
            host_id: host_id_ok.then(|| request.host_id.clone()),
            vm_id: vm_id_ok.then(|| request.vm_id.clone()),
            domain_id: request.header.unverified_contents().ok().map(|(d, _)| d.domain_id),
        };
        // Only the host a challenge was issued to can use it up.
        let own_request =
            host_id_ok && vm_id_ok && actor.role == Role::SecureComponent && actor.name == request.host_id;
        let decide = |_: &mut Subject| {
            let decided = self.decide_release(actor, request);
            if decided.is_err() && own_request {
                // A refused release uses its challenge up all the same: a host cannot retry
                // a quote over the same nonce (best effort: the refusal is what is returned).
                let _ = self.store.take_challenge(&request.challenge_id);
            }
            decided
        };
        // The challenge, the grant's used mark, the release record and the domain's newest
        // release (who may commit integrity roots) are written in one transaction, and the
        // anchor returned is the newest as of that instant.
        let ((released, anchor), record) =
            self.audited_with(release_event(request), actor, subject, decide, |(released, spent), entry| {
                let (record, anchor) = self.store.commit_key_release(&spent, entry, request.mode)?;
                Ok(((released, anchor), record))
            })?;
        if let Some(generation) = released.finished_rotation {
            // The previous K_TTP version is no longer needed for this domain (best effort:
            // `ttp master-key status` counts it until then).
            if let Err(e) = self.store.finish_key_rotation(&released.domain_id, generation) {
                tracing::warn!(domain = %released.domain_id, error = %e, "could not record the end of a key rotation");
            }
        }
        Ok(KeyReleaseResponse {
            domain_id: released.domain_id,
            version: released.version,
            wrapped_key: released.wrapped_key,
            audit_seq: record.seq,
            integrity_anchor: anchor.map(|stored| stored.envelope),
            previous_wrapped_key: released.previous_wrapped_key,
        })
    }

    /// Steps 1 to 6 of [`Ttp::release_key`] without their writes: the wrapped keys, the
    /// domain and version, the single-use tokens to spend, and the audit message.
    #[allow(clippy::type_complexity)]
    fn decide_release(
        &self,
        actor: &Identity,
        request: &KeyReleaseRequest,
    ) -> Result<((Released, SpentTokens), String)> {
        // The caller: well-formed ids, a secure component asking for its own host.
        protocol::domain::validate_name("host id", &request.host_id)
            .map_err(|_| Error::BadRequest(invalid_name("host_id", &request.host_id)))?;
        protocol::domain::validate_name("vm id", &request.vm_id)
            .map_err(|_| Error::BadRequest(invalid_name("vm_id", &request.vm_id)))?;
        Self::require_role(actor, Role::SecureComponent, "request a key release")?;
        if actor.name != request.host_id {
            return Err(Error::Forbidden {
                caller: actor.name.clone(),
                action: "request a key release",
                detail: format!("the request claims host {}", request.host_id),
            });
        }
        // 1. The host: enrolled, and its TPM quotes the trusted state over our fresh nonce.
        let host = self.attested_host(request)?;
        // 2. The header: owner-signed descriptor, registered by a TTP, newest version.
        let VerifiedHeader { descriptor, registration, domain, previous } = self.verified_header(request)?;
        // 3. Access: the VM is in the ACL with a mode that covers the request, and, with an
        //    image allowlist, was launched from an image on it.
        check_access(&descriptor, request)?;
        let image = self.admitted_image(request)?;
        // 4. The grant: signed by the owner or a manager the descriptor shares with.
        let grant = self.verified_grant(request, &descriptor)?;
        // 5. The placement: the operator put this VM on this very host, for this grant.
        let placer = self.verified_placement(request, &grant.digest, grant.checked_at)?;
        // 3, continued: the owner's access policy, over what steps 1 to 5 verified.
        let permitted = self.check_policy(
            request,
            &descriptor,
            &registration.descriptor_hash,
            &grant,
            host.region.as_deref(),
            request.launched_image.as_ref(),
        )?;
        // The challenge and the grant are spent when the release is written: a grant
        // authorizes one release, so whoever saw it on its way (the cloud platform forwards
        // it) cannot attach the VM again with it after a detach.
        let spent = SpentTokens {
            challenge_id: request.challenge_id.clone(),
            grant_hash: grant.digest,
            grant_expires_at: grant.grant.expires_at,
        };

        // 6. Derive K || K_mac and seal them to the host's PCR-bound binding key.
        let keys = self.released_keys(&registration, &descriptor, &domain)?;
        let wrapped = attestation::seal_key_to_host(&host, &keys)?;
        drop(keys);
        let mut message = format!(
            "key of domain {} version {} released to {} on {} ({}), grant by {}, placement by {placer}{image}",
            descriptor.domain_id, descriptor.version, request.vm_id, request.host_id, request.mode, grant.signer
        );
        // During a rotation the read-write host also gets the previous generation's keys,
        // derived under the K_TTP version that generation used, to re-encrypt with.
        let previous_wrapped_key = match &previous {
            Some(previous) => {
                let master_key_version = domain.previous_master_key_version.unwrap_or(domain.master_key_version);
                let keys = self.released_keys_under(previous, &descriptor, &domain, master_key_version)?;
                message.push_str(&format!(
                    ", key generations {} and {} (rotation in progress)",
                    previous.key_generation, registration.key_generation
                ));
                Some(attestation::seal_key_to_host(&host, &keys)?)
            }
            None => None,
        };
        let finished_rotation =
            (previous.is_none() && domain.previous_master_key_version.is_some()).then_some(registration.key_generation);
        if let Some(Permitted { policy_ids }) = &permitted {
            message.push_str(&format!(", permitted by policy {}", policy_ids.join(", ")));
        }
        if !grant.grant.purpose.is_empty() {
            // The reason last: it is the signer's free text.
            message.push_str(&format!(", purpose {}, reason: {}", grant.grant.purpose, grant.grant.reason));
        }
        let released = Released {
            wrapped_key: wrapped,
            previous_wrapped_key,
            domain_id: descriptor.domain_id.clone(),
            version: descriptor.version,
            finished_rotation,
        };
        Ok(((released, spent), message))
    }

    /// What a key release wraps: K followed by `K_mac`
    /// ([`RELEASED_KEYS_BYTES`](protocol::kdf::RELEASED_KEYS_BYTES), docs/PROTOCOL.md "Key
    /// derivation"), both from the same inputs, in locked memory. Every domain gets both, so
    /// the secure component decides from the owner-signed descriptor whether it needs `K_mac`.
    pub(super) fn released_keys(
        &self,
        registration: &Registration,
        descriptor: &Descriptor,
        domain: &DomainRecord,
    ) -> Result<SecretBytes> {
        self.released_keys_under(registration, descriptor, domain, domain.master_key_version)
    }

    /// [`Ttp::released_keys`] under K_TTP version `master_key_version` (during a rotation the
    /// previous generation's keys use the version recorded before it).
    fn released_keys_under(
        &self,
        registration: &Registration,
        descriptor: &Descriptor,
        domain: &DomainRecord,
        master_key_version: u32,
    ) -> Result<SecretBytes> {
        let inputs = (&registration.nonce_r, descriptor.domain_id.as_str(), &domain.metadata_hash);
        // The K_TTP version recorded at registration derives this domain's key.
        let master_key = self.master_keys.key(master_key_version)?;
        let key = derive_volume_key(master_key, inputs.0, inputs.1, inputs.2, &descriptor.cipher_spec)?;
        let mac_key = derive_sector_mac_key(master_key, inputs.0, inputs.1, inputs.2, &descriptor.cipher_spec)?;
        let mut keys = SecretBytes::zeroed(RELEASED_KEYS_BYTES);
        keys.expose_mut()[..VOLUME_KEY_BYTES].copy_from_slice(key.expose());
        keys.expose_mut()[VOLUME_KEY_BYTES..].copy_from_slice(mac_key.expose());
        Ok(keys)
    }

    /// Step 1 of the key release: the host is enrolled, the challenge is known, unused (it is
    /// used up here whatever follows), issued to this host and unexpired, and the quote over
    /// its nonce shows the host's reference state ([`attestation::verify_quote`]).
    fn attested_host(&self, request: &KeyReleaseRequest) -> Result<HostRecord> {
        let host = self.host_record(&request.host_id)?;
        let (challenge_host, nonce, expires_at) =
            self.store.peek_challenge(&request.challenge_id)?.ok_or_else(|| {
                Error::ChallengeInvalid(format!("challenge {} is unknown or was already used", request.challenge_id))
            })?;
        if challenge_host != request.host_id {
            return Err(Error::ChallengeInvalid(format!(
                "challenge {} was issued to {challenge_host}",
                request.challenge_id
            )));
        }
        if now_unix() > expires_at {
            return Err(Error::ChallengeInvalid(format!("challenge {} expired", request.challenge_id)));
        }
        // With a launched image, the quote is over SHA-256(label || nonce || image digest):
        // the attested host vouches for the image (docs/PROTOCOL.md "Trusted launch").
        let qualifying_data = protocol::image::quote_qualifying_data(&nonce, request.launched_image.as_ref())
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        attestation::verify_quote(&host, &self.policy, &request.quote, &qualifying_data)?;
        Ok(host)
    }

    /// Step 3, second half: with an image allowlist configured, the VM must have been launched
    /// from an image on it (the report itself is bound to the quote in step 1). Returns the
    /// text the audit message gets about the image ("" when none was reported).
    fn admitted_image(&self, request: &KeyReleaseRequest) -> Result<String> {
        let reported = request.launched_image.as_ref();
        let described = reported.map(|i| format!(", image {}@{} (sha256 {})", i.role, i.version, i.sha256));
        let Some(allowlist) = &self.image_allowlist else { return Ok(described.unwrap_or_default()) };
        let Some(image) = reported else {
            return Err(Error::ImageNotAllowed(format!(
                "{} on {} reports no launched image, and this TTP releases keys only to VMs launched from an allowlisted image",
                request.vm_id, request.host_id
            )));
        };
        allowlist.admit(image).map_err(|why| {
            Error::ImageNotAllowed(format!(
                "{} on {} was launched from an image not allowed: {why}",
                request.vm_id, request.host_id
            ))
        })?;
        Ok(described.unwrap_or_default())
    }

    /// Step 2 of the key release: the descriptor is signed by its owner, the registration by
    /// this TTP (or a replica) and is that descriptor's, and the domain exists, is not
    /// deleted and is at this version (an older header is a rollback).
    fn verified_header(&self, request: &KeyReleaseRequest) -> Result<VerifiedHeader> {
        let descriptor = self.verified_descriptor(&request.header.descriptor)?;
        let registration = self.verified_registration(&request.header.registration)?;
        if registration.domain_id != descriptor.domain_id
            || registration.version != descriptor.version
            || registration.descriptor_hash != descriptor_hash(&request.header.descriptor.message)
        {
            return Err(Error::RegistrationMismatch(format!(
                "the registration (domain {}, version {}) is not the registration of this descriptor (domain {}, version {})",
                registration.domain_id, registration.version, descriptor.domain_id, descriptor.version
            )));
        }
        let domain = self
            .store
            .domain(&descriptor.domain_id)?
            .ok_or_else(|| Error::DomainUnknown(descriptor.domain_id.clone()))?;
        if domain.deleted_at.is_some() {
            return Err(Error::DomainDeleted(descriptor.domain_id.clone()));
        }
        if descriptor.version != domain.latest_version {
            return Err(Error::VersionRollback(format!(
                "the header holds version {} of domain {}, but version {} is the newest",
                descriptor.version, descriptor.domain_id, domain.latest_version
            )));
        }
        if registration.key_generation != domain.key_generation {
            return Err(Error::VersionRollback(format!(
                "the header holds key generation {} of domain {}, but generation {} is the newest",
                registration.key_generation, descriptor.domain_id, domain.key_generation
            )));
        }
        let previous = match &request.header.rotation {
            None => None,
            Some(rotation) => Some(self.verified_rotation(request, &descriptor, &registration, rotation)?),
        };
        Ok(VerifiedHeader { descriptor, registration, domain, previous })
    }

    /// Step 2, during a key rotation (docs/PROTOCOL.md "Key rotation"): the previous
    /// registration is this TTP's, of the same domain and the generation just before; only a
    /// read-write release (the host that re-encrypts) is served.
    fn verified_rotation(
        &self,
        request: &KeyReleaseRequest,
        descriptor: &Descriptor,
        registration: &Registration,
        rotation: &protocol::messages::RotationState,
    ) -> Result<Registration> {
        let previous = self.verified_registration(&rotation.previous_registration)?;
        if previous.domain_id != descriptor.domain_id || previous.key_generation + 1 != registration.key_generation {
            return Err(Error::RegistrationMismatch(format!(
                "the header's previous registration (domain {}, key generation {}) is not generation {} of domain {}",
                previous.domain_id,
                previous.key_generation,
                registration.key_generation.saturating_sub(1),
                descriptor.domain_id
            )));
        }
        if request.mode != protocol::domain::AccessMode::Rw {
            return Err(Error::KeyRotationInProgress(format!(
                "the key of domain {} is being rotated (generation {} to {}): only a read-write attach, which finishes the re-encryption, is served until it ends; attach read-only after that",
                descriptor.domain_id, previous.key_generation, registration.key_generation
            )));
        }
        Ok(previous)
    }

    /// Step 3, continued, once the grant and placement are verified: a break-glass grant
    /// (purpose `emergency`) must give a reason whatever the policy says
    /// (`break_glass_reason_missing`), and the descriptor's access policy, if any, must permit
    /// the release (`policy_denied`). `host_region` and `image` are the attested
    /// host's region and the launched image's digest where the request carries them.
    fn check_policy(
        &self,
        request: &KeyReleaseRequest,
        descriptor: &Descriptor,
        descriptor_hash: &[u8; 32],
        grant: &VerifiedGrant,
        host_region: Option<&str>,
        image: Option<&protocol::image::LaunchedImage>,
    ) -> Result<Option<Permitted>> {
        if grant.grant.purpose == PURPOSE_EMERGENCY && grant.grant.reason.trim().is_empty() {
            return Err(Error::BreakGlassReasonMissing(format!(
                "the emergency grant by {} for {} on domain {} gives no reason; a break-glass release needs one",
                grant.signer, request.vm_id, descriptor.domain_id
            )));
        }
        // Read only when a policy will use it: the certificate was verified at step 4.
        let affiliation = match descriptor.policy {
            Some(_) => affiliation_from_certificate(&request.grant.signer_certificate)
                .map_err(|e| Error::GrantSignatureInvalid(e.to_string()))?,
            None => None,
        };
        let facts = ReleaseFacts {
            vm_id: &request.vm_id,
            mode: request.mode,
            now: grant.checked_at,
            purpose: &grant.grant.purpose,
            reason: &grant.grant.reason,
            grant_signer: &grant.signer,
            grant_signer_affiliation: affiliation.as_ref(),
            grant_lifetime_seconds: grant.grant.expires_at.saturating_sub(grant.checked_at),
            host_id: &request.host_id,
        };
        self.access_policies.decide(descriptor, descriptor_hash, &facts, host_region, image)
    }

    /// Step 4 of the key release: the grant is signed by the issuer it names, who is the
    /// domain's owner or a manager it is shared with; it is for this VM, domain and a mode
    /// covering the request; and it is unexpired and valid for at most
    /// [`MAX_GRANT_VALIDITY_SECS`](protocol::messages::MAX_GRANT_VALIDITY_SECS).
    fn verified_grant(&self, request: &KeyReleaseRequest, descriptor: &Descriptor) -> Result<VerifiedGrant> {
        let signer = self
            .verify_signer(&request.grant, SignatureContext::MountGrant, Role::DomainManager)
            .map_err(|e| Error::GrantSignatureInvalid(e.to_string()))?;
        let grant = MountGrant::decode(&request.grant.message)?;
        if grant.issuer != signer {
            return Err(Error::GrantSignatureInvalid(format!(
                "the grant names issuer {} but is signed by {signer}",
                grant.issuer
            )));
        }
        if !descriptor.is_manager(&signer) {
            return Err(Error::GrantSignerNotAuthorized(format!(
                "{signer} is neither the owner of domain {} nor a manager it is shared with (version {})",
                descriptor.domain_id, descriptor.version
            )));
        }
        if grant.domain_id != descriptor.domain_id || grant.vm_id != request.vm_id {
            return Err(Error::GrantMismatch(format!(
                "the grant is for {} on domain {}, the request is for {} on domain {}",
                grant.vm_id, grant.domain_id, request.vm_id, descriptor.domain_id
            )));
        }
        if !grant.mode.covers(request.mode) {
            return Err(Error::GrantMismatch(format!(
                "the grant allows {} only, the request is {}",
                grant.mode, request.mode
            )));
        }
        let now = now_unix();
        if now > grant.expires_at {
            return Err(Error::GrantExpired(format!(
                "the grant for {} on domain {} expired {} s ago",
                grant.vm_id,
                grant.domain_id,
                now - grant.expires_at
            )));
        }
        // Bounded, so that the used-grant mark can be kept until the grant expires.
        let latest = now.saturating_add(protocol::messages::MAX_GRANT_VALIDITY_SECS);
        if grant.expires_at > latest {
            return Err(Error::GrantTooLong(format!(
                "the grant for {} on domain {} is valid for {} s; at most {} s are accepted",
                grant.vm_id,
                grant.domain_id,
                grant.expires_at - now,
                protocol::messages::MAX_GRANT_VALIDITY_SECS
            )));
        }
        let digest = protocol::messages::grant_digest(&request.grant);
        Ok(VerifiedGrant { grant, signer, digest, checked_at: now })
    }

    /// Step 5 of the key release: the request's placement is signed by a trusted
    /// cloud-platform certificate, recent, and names the request's VM, the attesting host and
    /// this grant. A tenant cannot sign one, and a host cannot use one made for another host:
    /// the key goes only where the operator placed the VM. Returns the placer's name.
    fn verified_placement(&self, request: &KeyReleaseRequest, grant_digest: &[u8; 32], now: u64) -> Result<String> {
        let placer = self
            .verify_signer(&request.placement, SignatureContext::Placement, Role::CloudPlatform)
            .map_err(|e| Error::PlacementInvalid(e.to_string()))?;
        let placement = Placement::decode(&request.placement.message)
            .map_err(|e| Error::PlacementInvalid(format!("the placement does not decode: {e}")))?;
        if placement.placed_at > now.saturating_add(protocol::messages::PLACEMENT_CLOCK_SKEW_SECS) {
            return Err(Error::PlacementInvalid(format!(
                "the placement of {} by {placer} is dated {} s ahead of the TTP's clock",
                placement.vm_id,
                placement.placed_at - now
            )));
        }
        let age = now.saturating_sub(placement.placed_at);
        if age > protocol::messages::MAX_PLACEMENT_AGE_SECS {
            return Err(Error::PlacementInvalid(format!(
                "the placement of {} by {placer} is {age} s old; at most {} s are accepted",
                placement.vm_id,
                protocol::messages::MAX_PLACEMENT_AGE_SECS
            )));
        }
        if placement.vm_id != request.vm_id || placement.host_id != request.host_id {
            return Err(Error::PlacementMismatch(format!(
                "{placer} placed {} on {}, the request is for {} on {}",
                placement.vm_id, placement.host_id, request.vm_id, request.host_id
            )));
        }
        if placement.grant_digest != *grant_digest {
            return Err(Error::PlacementMismatch(format!(
                "the placement of {} on {} by {placer} was made for another grant",
                placement.vm_id, placement.host_id
            )));
        }
        Ok(placer)
    }
}

/// The audit event of this request: [`BREAK_GLASS_EVENT`] if its grant (signature not yet
/// checked) states purpose `emergency`, so that even a refused break-glass attempt stands out.
fn release_event(request: &KeyReleaseRequest) -> &'static str {
    match MountGrant::decode(&request.grant.message) {
        Ok(grant) if grant.purpose == PURPOSE_EMERGENCY => BREAK_GLASS_EVENT,
        _ => "key_release",
    }
}

/// Step 3 of the key release: the VM is in the descriptor's access list with a mode that
/// covers the request.
fn check_access(descriptor: &Descriptor, request: &KeyReleaseRequest) -> Result<()> {
    let acl_mode = descriptor.access_of(&request.vm_id).ok_or_else(|| {
        Error::VmNotInAcl(format!(
            "{} is not in the access list of domain {}, version {}",
            request.vm_id, descriptor.domain_id, descriptor.version
        ))
    })?;
    if !acl_mode.covers(request.mode) {
        return Err(Error::ModeNotPermitted(format!(
            "{} has {} access to domain {}, version {}; {} was requested",
            request.vm_id, acl_mode, descriptor.domain_id, descriptor.version, request.mode
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
