//! Domain registration, update and deletion (docs/PROTOCOL.md "Domain creation and update"
//! and "Deletion"): the TTP draws `r` for version 1, carries it over to every newer version
//! the owner signs, and tombstones a domain on its owner's signed deletion.

use protocol::domain::{descriptor_hash, Descriptor, VolumeFormat};
use protocol::kdf::NONCE_BYTES;
use protocol::messages::{
    Deletion, KeyRotation, RegisterDomainRequest, RegisterDomainResponse, Registration, RotateKeyRequest,
};
use protocol::pki::{Identity, Role};
use protocol::signing::{SignatureContext, SignedEnvelope};

use super::{Subject, Ttp};
use crate::error::{Error, Result};
use crate::store::{now_unix, DomainRecord};

impl Ttp {
    /// Registers version 1 of a domain (drawing `r`) or a newer version (carrying `r` over from
    /// `previous_registration`), for the cloud platform (docs/PROTOCOL.md "Domain creation and
    /// update"). Checks the owner's signature, that owner and metadata are unchanged and that
    /// the version is newer (`version_rollback`). A repeat of the newest update (same
    /// descriptor, on the registration before it) is registered again with the same `r`, so a
    /// cloud platform that crashed before writing the header can finish. Audited as `register`.
    pub fn register_domain(&self, actor: &Identity, request: &RegisterDomainRequest) -> Result<RegisterDomainResponse> {
        // The audit record names the domain even when the descriptor's signature fails.
        let claimed_domain = Descriptor::decode(&request.descriptor.message).ok().map(|d| d.domain_id);
        let subject = Subject { domain_id: claimed_domain, ..Default::default() };
        let (response, _) = self.audited("register", actor, subject, |subject| {
            Self::require_role(actor, Role::CloudPlatform, "register a domain")?;
            let descriptor = self.verified_descriptor(&request.descriptor)?;
            subject.domain_id = Some(descriptor.domain_id.clone());
            // A policy the TTP could not evaluate is refused now, not at every release.
            self.access_policies.check_descriptor(&descriptor)?;
            let encoded_hash = descriptor_hash(&request.descriptor.message);
            let existing = self.store.domain(&descriptor.domain_id)?;
            let (nonce_r, key_generation) = match (&existing, &request.previous_registration) {
                (None, None) => {
                    if descriptor.version != 1 {
                        return Err(Error::VersionRollback(format!(
                            "domain {} is new, so its first version must be 1, not {}",
                            descriptor.domain_id, descriptor.version
                        )));
                    }
                    let nonce: [u8; NONCE_BYTES] = rand::random();
                    self.store.insert_domain(&DomainRecord {
                        domain_id: descriptor.domain_id.clone(),
                        owner: descriptor.owner.clone(),
                        latest_version: 1,
                        descriptor: request.descriptor.message.clone(),
                        descriptor_hash: encoded_hash,
                        metadata_hash: descriptor.metadata_hash(),
                        deleted_at: None,
                        master_key_version: self.master_keys.current_version(),
                        key_generation: 1,
                        previous_master_key_version: None,
                    })?;
                    (nonce, 1)
                }
                (Some(current), Some(previous)) if self.is_repeat_of_newest(current, &descriptor, encoded_hash, previous)? => {
                    // The CP crashed after we registered this version but before its header
                    // reached the disk: answer the same registration again (same r), so the
                    // domain is not stuck on a header we would now call a rollback.
                    let previous = self.verified_registration(previous)?;
                    (previous.nonce_r, previous.key_generation)
                }
                (Some(current), Some(previous)) => {
                    self.check_update(current, &descriptor, previous)?;
                    let previous = self.verified_registration(previous)?;
                    self.store.update_domain(
                        &DomainRecord {
                            latest_version: descriptor.version,
                            descriptor: request.descriptor.message.clone(),
                            descriptor_hash: encoded_hash,
                            ..current.clone()
                        },
                        current.latest_version,
                    )?;
                    (previous.nonce_r, previous.key_generation)
                }
                (Some(current), None) => {
                    return Err(if current.deleted_at.is_some() {
                        Error::DomainDeleted(descriptor.domain_id.clone())
                    } else {
                        Error::VersionRollback(format!(
                            "domain {} is already registered (newest version {}); an update must carry the current registration",
                            descriptor.domain_id, current.latest_version
                        ))
                    })
                }
                (None, Some(_)) => return Err(Error::DomainUnknown(descriptor.domain_id.clone())),
            };
            let registration = Registration {
                domain_id: descriptor.domain_id.clone(),
                version: descriptor.version,
                descriptor_hash: encoded_hash,
                metadata_hash: descriptor.metadata_hash(),
                nonce_r,
                registered_at: now_unix(),
                key_generation,
            };
            let envelope = self.signing_key.sign_envelope(SignatureContext::Registration, registration.encode());
            let message = format!("registered version {} of domain {}", descriptor.version, descriptor.domain_id);
            Ok((RegisterDomainResponse { registration: envelope }, message))
        })?;
        Ok(response)
    }

    /// Whether an update request repeats the newest registration exactly: same descriptor
    /// bytes as the newest version, based on the version just before it.
    fn is_repeat_of_newest(
        &self,
        current: &DomainRecord,
        descriptor: &Descriptor,
        encoded_hash: [u8; 32],
        previous: &SignedEnvelope,
    ) -> Result<bool> {
        use subtle::ConstantTimeEq;
        if current.deleted_at.is_some()
            || descriptor.version != current.latest_version
            || !bool::from(encoded_hash.ct_eq(&current.descriptor_hash))
        {
            return Ok(false);
        }
        let previous = self.verified_registration(previous)?;
        Ok(previous.domain_id == current.domain_id
            && previous.version + 1 == current.latest_version
            && previous.key_generation == current.key_generation)
    }

    /// Rules for a new version: owner unchanged, signed by the owner, metadata unchanged
    /// (it is bound into the key), strictly newer, and built on the current registration.
    fn check_update(&self, current: &DomainRecord, descriptor: &Descriptor, previous: &SignedEnvelope) -> Result<()> {
        if current.deleted_at.is_some() {
            return Err(Error::DomainDeleted(current.domain_id.clone()));
        }
        if descriptor.owner != current.owner {
            return Err(Error::OwnerMismatch(format!(
                "domain {} is owned by {}, a descriptor from {} cannot change it",
                current.domain_id, current.owner, descriptor.owner
            )));
        }
        if descriptor.metadata_hash() != current.metadata_hash {
            return Err(Error::BadRequest(format!(
                "the metadata of domain {} is bound into its key and cannot change",
                current.domain_id
            )));
        }
        let current_format = Descriptor::decode(&current.descriptor)?.volume_format;
        if current_format == VolumeFormat::V2 && descriptor.volume_format == VolumeFormat::V1 {
            // Its integrity anchor would stop being checked while the provider keeps the
            // old tree: there is no way back to format 1 (docs/FORMAT.md "Version 2").
            return Err(Error::BadRequest(format!(
                "domain {} is format 2 (tamper- and rollback-evident); a new version cannot make it format 1",
                current.domain_id
            )));
        }
        if descriptor.version <= current.latest_version {
            return Err(Error::VersionRollback(format!(
                "domain {} is at version {}; version {} is not newer",
                current.domain_id, current.latest_version, descriptor.version
            )));
        }
        let previous = self.verified_registration(previous)?;
        if previous.domain_id != current.domain_id || previous.version != current.latest_version {
            return Err(Error::VersionRollback(format!(
                "the update of domain {} is based on version {} of {}, but the newest is version {}",
                current.domain_id, previous.version, previous.domain_id, current.latest_version
            )));
        }
        if previous.key_generation != current.key_generation {
            return Err(Error::VersionRollback(format!(
                "the update of domain {} is based on key generation {}, but the newest is generation {}",
                current.domain_id, previous.key_generation, current.key_generation
            )));
        }
        Ok(())
    }

    /// Registers a new key generation of a domain on its owner's signed [`KeyRotation`], for
    /// the cloud platform, which writes it into the volume header beside the current
    /// registration (docs/PROTOCOL.md "Key rotation"): a fresh `r`, the newest K_TTP version,
    /// the same descriptor version. `current_registration` must be the newest version's, of
    /// the generation the owner names. A repeat from that same generation (the cloud
    /// platform stopped before the header was written) registers the new generation again
    /// with another `r`: nothing was encrypted under the unwritten one. Audited as `rotate`.
    pub fn rotate_key(
        &self,
        actor: &Identity,
        domain_id: &str,
        request: &RotateKeyRequest,
    ) -> Result<RegisterDomainResponse> {
        let subject = Subject { domain_id: Some(domain_id.to_string()), ..Default::default() };
        let (response, _) = self.audited("rotate", actor, subject, |_| {
            Self::require_role(actor, Role::CloudPlatform, "rotate a domain's key")?;
            let signer = self
                .verify_signer(&request.rotation, SignatureContext::KeyRotation, Role::DomainManager)
                .map_err(|e| Error::DescriptorSignatureInvalid(format!("key rotation request: {e}")))?;
            let rotation = KeyRotation::decode(&request.rotation.message)?;
            let current = self.verified_registration(&request.current_registration)?;
            if rotation.domain_id != domain_id || current.domain_id != domain_id {
                return Err(Error::BadRequest(format!(
                    "the rotation is signed for domain {} with a registration of domain {}, but the request is for domain {domain_id}",
                    rotation.domain_id, current.domain_id
                )));
            }
            let domain = self.store.domain(domain_id)?.ok_or_else(|| Error::DomainUnknown(domain_id.to_string()))?;
            if domain.deleted_at.is_some() {
                return Err(Error::DomainDeleted(domain_id.to_string()));
            }
            if signer != domain.owner {
                return Err(Error::OwnerMismatch(format!(
                    "only the owner {} may rotate the key of domain {domain_id}; {signer} asked",
                    domain.owner
                )));
            }
            if current.version != domain.latest_version || current.key_generation != rotation.from_generation {
                return Err(Error::VersionRollback(format!(
                    "the rotation of domain {domain_id} is based on version {} key generation {} (owner asked from generation {}), but the newest is version {}",
                    current.version, current.key_generation, rotation.from_generation, domain.latest_version
                )));
            }
            let new_generation = rotation.from_generation + 1;
            let master_key_version = self.master_keys.current_version();
            if domain.key_generation == rotation.from_generation {
                self.store.rotate_domain_key(domain_id, rotation.from_generation, master_key_version)?;
            } else if domain.key_generation != new_generation {
                return Err(Error::VersionRollback(format!(
                    "domain {domain_id} is at key generation {}; a rotation from generation {} is stale",
                    domain.key_generation, rotation.from_generation
                )));
            }
            let registration = Registration {
                nonce_r: rand::random(),
                registered_at: now_unix(),
                key_generation: new_generation,
                ..current
            };
            let envelope = self.signing_key.sign_envelope(SignatureContext::Registration, registration.encode());
            let message = format!(
                "key of domain {domain_id} rotated by {signer}: generation {new_generation} registered under K_TTP version {master_key_version}; the volume is re-encrypted at its next read-write attach"
            );
            Ok((RegisterDomainResponse { registration: envelope }, message))
        })?;
        Ok(response)
    }

    /// Tombstones a domain on its owner's signed [`Deletion`]: from then on no key is released
    /// for it (`domain_deleted`). Any caller may deliver the deletion; only the owner's signature
    /// counts. Audited as `delete`.
    pub fn delete_domain(&self, actor: &Identity, deletion: &SignedEnvelope) -> Result<()> {
        let claimed_domain = Deletion::decode(&deletion.message).ok().map(|d| d.domain_id);
        let subject = Subject { domain_id: claimed_domain, ..Default::default() };
        self.audited("delete", actor, subject, |subject| {
            let signer = self
                .verify_signer(deletion, SignatureContext::Deletion, Role::DomainManager)
                .map_err(|e| Error::DescriptorSignatureInvalid(format!("deletion request: {e}")))?;
            let request = Deletion::decode(&deletion.message)?;
            subject.domain_id = Some(request.domain_id.clone());
            let domain = self
                .store
                .domain(&request.domain_id)?
                .ok_or_else(|| Error::DomainUnknown(request.domain_id.clone()))?;
            if domain.deleted_at.is_some() {
                return Err(Error::DomainDeleted(request.domain_id.clone()));
            }
            if signer != domain.owner {
                return Err(Error::OwnerMismatch(format!(
                    "only the owner {} may delete domain {}; {signer} asked",
                    domain.owner, request.domain_id
                )));
            }
            self.store.tombstone_domain(&request.domain_id, now_unix())?;
            Ok(((), format!("domain {} deleted by {signer}; its key can never be released again", request.domain_id)))
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use protocol::domain::{AccessMode, AclEntry, Descriptor};
    use protocol::messages::{RegisterDomainRequest, Registration};
    use protocol::pki::{Identity, Role};
    use protocol::secret::SecretBytes;
    use protocol::signing::{SignatureContext, SignedEnvelope};
    use skydd_ca::CertificateAuthority;

    use crate::attestation::AttestationPolicy;
    use crate::service::test_support::key_of;
    use crate::service::Ttp;
    use crate::store::TtpStore;

    /// A registration carries r (docs/PROTOCOL.md "Registration"), so only this TTP (or a configured replica) from
    /// its own CA may sign one. Another TTP-role name from the same CA, and the TTP's own
    /// name from a trusted partner CA, are refused; a configured replica is accepted.
    #[test]
    fn registrations_only_from_this_ttp_or_a_configured_replica() {
        let own_ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let partner_ca = CertificateAuthority::generate("partner-ca").unwrap();
        let store: Arc<dyn TtpStore> = Arc::new(crate::store::SqlStore::in_memory().unwrap());
        let ttp = Ttp::new(
            SecretBytes::from_slice_wiping(&mut [7u8; 32]),
            key_of(&own_ca, Role::Ttp, "ttp-1"),
            vec![own_ca.0.clone(), partner_ca.0.clone()],
            AttestationPolicy::default(),
            store,
        )
        .unwrap()
        .with_registration_replicas(vec!["ttp-replica".into()]);
        let cp = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
        let alice = key_of(&own_ca, Role::DomainManager, "dm-alice");
        let v1 = Descriptor::new(
            "dm-alice",
            Default::default(),
            vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }],
        )
        .unwrap();
        let request = RegisterDomainRequest {
            descriptor: alice.sign_envelope(SignatureContext::Descriptor, v1.encode().unwrap()),
            previous_registration: None,
        };
        let registered = ttp.register_domain(&cp, &request).unwrap().registration;
        let mut forged = Registration::decode(&registered.message).unwrap();
        forged.nonce_r = [0x42; 32];

        let v2 = v1.next_version(|d| d.acl.clear()).unwrap();
        let update = |previous: SignedEnvelope| RegisterDomainRequest {
            descriptor: alice.sign_envelope(SignatureContext::Descriptor, v2.encode().unwrap()),
            previous_registration: Some(previous),
        };
        for (ca, name, expected) in [
            (&own_ca, "ttp-2", "neither this TTP nor a configured replica"),
            (&partner_ca, "ttp-1", "this TTP's own CA"),
        ] {
            let signer = key_of(ca, Role::Ttp, name);
            let envelope = signer.sign_envelope(SignatureContext::Registration, forged.encode());
            let err = ttp.register_domain(&cp, &update(envelope)).unwrap_err();
            assert_eq!(err.code(), "registration_mismatch", "{err}");
            assert!(err.to_string().contains(expected), "{name}: {err}");
        }
        // A configured replica's registration counts (here: r unchanged, so the update goes on).
        let replica = key_of(&own_ca, Role::Ttp, "ttp-replica");
        let envelope = replica
            .sign_envelope(SignatureContext::Registration, Registration::decode(&registered.message).unwrap().encode());
        ttp.register_domain(&cp, &update(envelope)).expect("a replica's registration is accepted");
    }

    /// A new domain records the newest K_TTP version; each domain's key comes from the version
    /// it recorded, and a version this TTP has not loaded is refused naming it.
    #[test]
    fn each_domain_derives_from_the_master_key_version_it_was_registered_under() {
        let ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let store: Arc<dyn TtpStore> = Arc::new(crate::store::SqlStore::in_memory().unwrap());
        let keys = crate::master_key::MasterKeys::new(
            [(1, SecretBytes::from_slice_wiping(&mut [7u8; 32])), (2, SecretBytes::from_slice_wiping(&mut [8u8; 32]))]
                .into(),
        )
        .unwrap();
        let ttp =
            Ttp::new(keys, key_of(&ca, Role::Ttp, "ttp-1"), vec![ca.0.clone()], AttestationPolicy::default(), store)
                .unwrap();
        let alice = key_of(&ca, Role::DomainManager, "dm-alice");
        let descriptor = Descriptor::new(
            "dm-alice",
            Default::default(),
            vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }],
        )
        .unwrap();
        let request = RegisterDomainRequest {
            descriptor: alice.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap()),
            previous_registration: None,
        };
        let cp = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
        let registration =
            Registration::decode(&ttp.register_domain(&cp, &request).unwrap().registration.message).unwrap();
        let mut domain = ttp.store().domain(&descriptor.domain_id).unwrap().unwrap();
        assert_eq!(domain.master_key_version, 2, "a new domain uses the newest version");
        let expected = |master: u8| {
            protocol::kdf::derive_volume_key(
                &SecretBytes::from_slice_wiping(&mut [master; 32]),
                &registration.nonce_r,
                &descriptor.domain_id,
                &domain.metadata_hash,
                &descriptor.cipher_spec,
            )
            .unwrap()
            .expose()
            .to_vec()
        };
        let released = ttp.released_keys(&registration, &descriptor, &domain).unwrap();
        assert_eq!(&released.expose()[..64], expected(8).as_slice());
        domain.master_key_version = 1;
        let released = ttp.released_keys(&registration, &descriptor, &domain).unwrap();
        assert_eq!(&released.expose()[..64], expected(7).as_slice());
        domain.master_key_version = 3;
        let refusal = ttp.released_keys(&registration, &descriptor, &domain).unwrap_err().to_string();
        assert!(refusal.contains("K_TTP version 3 is not loaded on this TTP"), "{refusal}");
        let uses = ttp.store().master_key_use().unwrap();
        assert_eq!(uses, vec![crate::store::MasterKeyUse { version: 2, live_domains: 1, deleted_domains: 0 }]);
    }

    /// A rotation registers the next key generation with a fresh r and the same version, on
    /// the owner's signature only; a repeat from the same generation is answered (the cloud
    /// platform stopped before the header), one from an older generation is stale, and an
    /// update must then build on the new generation's registration.
    #[test]
    fn a_rotation_registers_the_next_key_generation_for_the_owner_only() {
        use protocol::messages::{KeyRotation, RotateKeyRequest};
        let ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let store: Arc<dyn TtpStore> = Arc::new(crate::store::SqlStore::in_memory().unwrap());
        let ttp = Ttp::new(
            SecretBytes::from_slice_wiping(&mut [7u8; 32]),
            key_of(&ca, Role::Ttp, "ttp-1"),
            vec![ca.0.clone()],
            AttestationPolicy::default(),
            store,
        )
        .unwrap();
        let cp = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
        let (alice, mallory) =
            (key_of(&ca, Role::DomainManager, "dm-alice"), key_of(&ca, Role::DomainManager, "dm-mallory"));
        let v1 = Descriptor::new(
            "dm-alice",
            Default::default(),
            vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }],
        )
        .unwrap();
        let id = v1.domain_id.clone();
        let request = RegisterDomainRequest {
            descriptor: alice.sign_envelope(SignatureContext::Descriptor, v1.encode().unwrap()),
            previous_registration: None,
        };
        let first = ttp.register_domain(&cp, &request).unwrap().registration;
        let rotate = |signer: &protocol::signing::SignatureKey, from: u64, current: &SignedEnvelope| {
            let rotation = KeyRotation { domain_id: id.clone(), from_generation: from, requested_at: 1 };
            let request = RotateKeyRequest {
                rotation: signer.sign_envelope(SignatureContext::KeyRotation, rotation.encode()),
                current_registration: current.clone(),
            };
            ttp.rotate_key(&cp, &id, &request)
        };
        let err = rotate(&mallory, 1, &first).unwrap_err();
        assert_eq!(err.code(), "owner_mismatch", "{err}");
        let second = rotate(&alice, 1, &first).unwrap().registration;
        let (old, new) =
            (Registration::decode(&first.message).unwrap(), Registration::decode(&second.message).unwrap());
        assert_eq!((new.key_generation, new.version, new.descriptor_hash), (2, old.version, old.descriptor_hash));
        assert_ne!(new.nonce_r, old.nonce_r);
        let repeat = Registration::decode(&rotate(&alice, 1, &first).unwrap().registration.message).unwrap();
        assert_eq!(repeat.key_generation, 2, "a repeat registers generation 2 again");
        let third = rotate(&alice, 2, &second).unwrap().registration;
        let err = rotate(&alice, 1, &first).unwrap_err();
        assert_eq!(err.code(), "version_rollback", "{err}");
        assert!(err.to_string().contains("is stale"), "{err}");
        assert_eq!(ttp.store().domain(&id).unwrap().unwrap().key_generation, 3);
        // An update on the generation-1 registration is refused; on generation 3's it carries it.
        let v2 = v1.next_version(|d| d.acl.clear()).unwrap();
        let update = |previous: &SignedEnvelope| RegisterDomainRequest {
            descriptor: alice.sign_envelope(SignatureContext::Descriptor, v2.encode().unwrap()),
            previous_registration: Some(previous.clone()),
        };
        let err = ttp.register_domain(&cp, &update(&first)).unwrap_err();
        assert!(err.to_string().contains("key generation 1"), "{err}");
        let updated =
            Registration::decode(&ttp.register_domain(&cp, &update(&third)).unwrap().registration.message).unwrap();
        assert_eq!((updated.version, updated.key_generation), (2, 3));
        assert_eq!(updated.nonce_r, Registration::decode(&third.message).unwrap().nonce_r);
    }
}
