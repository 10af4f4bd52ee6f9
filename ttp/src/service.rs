//! The TTP's decisions, independent of HTTP: host enrollment, domain registration,
//! challenges, key release, deletion and history (docs/PROTOCOL.md, "Message sequences").
//! Every decision about a key release or registration — granted or refused — is one audit
//! record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest};
use protocol::domain::{descriptor_hash, Descriptor};
use protocol::kdf::{derive_volume_key, NONCE_BYTES};
use protocol::messages::{
    verify_audit_chain, AuditRecord, ChallengeResponse, Deletion, HistoryResponse, KeyReleaseRequest,
    KeyReleaseResponse, MountGrant, Placement, RegisterDomainRequest, RegisterDomainResponse, Registration,
    AUDIT_GENESIS_HASH,
};
use protocol::pki::{Identity, Role};
use protocol::secret::SecretBytes;
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};

use crate::attestation::{self, AttestationPolicy, HostRecord, PendingEnrollment};
use crate::error::{Error, Result};
use crate::store::{now_unix, AuditEntry, DomainRecord, TtpStore};

/// How long a quote challenge stays valid.
pub const CHALLENGE_TTL_SECS: u64 = 60;
/// How long an enrollment may take between its two steps.
pub const ENROLLMENT_TTL_SECS: u64 = 120;

/// The trusted third party's state and decisions: K_TTP (in locked memory), its signing key,
/// the trusted CAs and revocation lists, the attestation policy and the store. HTTP-free;
/// `http.rs` wraps it, tests call it directly.
pub struct Ttp {
    master_key: SecretBytes,
    signing_key: SignatureKey,
    /// PEM CA roots whose certificates the TTP accepts on signed objects (its own cloud's
    /// and federated partners').
    trusted_cas: Vec<String>,
    /// Revocation lists (PEM files) read at every signature check, so that a revocation the
    /// CA publishes counts from the next signed request on. Empty: not checked.
    revocation_lists: Vec<PathBuf>,
    policy: AttestationPolicy,
    store: Arc<dyn TtpStore>,
    pending_enrollments: Mutex<HashMap<String, (u64, PendingEnrollment)>>,
    /// The trusted CAs (PEM) that issued this TTP's own certificate: a registration's signer
    /// must chain to one of them, not merely to any trusted CA (a partner's).
    registration_cas: Vec<String>,
    /// Certificate names whose registrations count: this TTP's own and its replicas'.
    registration_signers: Vec<String>,
}

/// The parts of a request the audit record names.
#[derive(Default)]
struct Subject {
    domain_id: Option<String>,
    host_id: Option<String>,
    vm_id: Option<String>,
}

impl Ttp {
    /// Builds the TTP from its master key (must be 32 bytes, else `Error::Config`), the key that
    /// signs registrations, the trusted CA roots (PEM) for signed objects, the attestation
    /// policy and the store. No revocation list is checked until
    /// [`Ttp::with_revocation_lists`].
    pub fn new(
        master_key: SecretBytes,
        signing_key: SignatureKey,
        trusted_cas: Vec<String>,
        policy: AttestationPolicy,
        store: Arc<dyn TtpStore>,
    ) -> Result<Self> {
        if master_key.len() != protocol::kdf::MASTER_KEY_BYTES {
            return Err(Error::Config(format!("K_TTP must be {} bytes", protocol::kdf::MASTER_KEY_BYTES)));
        }
        policy.validate()?;
        let own = protocol::pki::identity_from_certificate(signing_key.certificate_der())
            .map_err(|e| Error::Config(format!("the TTP's own certificate: {e}")))?;
        let registration_cas: Vec<String> = trusted_cas
            .iter()
            .filter(|ca| {
                protocol::signing::verify_signer_certificate(
                    signing_key.certificate_der(),
                    std::slice::from_ref(*ca),
                    &[],
                    now_unix(),
                )
                .is_ok()
            })
            .cloned()
            .collect();
        if registration_cas.is_empty() {
            return Err(Error::Config(format!(
                "the TTP's own certificate ({}) is not valid under any of its trusted CAs, so no registration could be verified",
                own.name
            )));
        }
        Ok(Self {
            master_key,
            signing_key,
            trusted_cas,
            revocation_lists: Vec::new(),
            policy,
            store,
            pending_enrollments: Mutex::new(HashMap::new()),
            registration_cas,
            registration_signers: vec![own.name],
        })
    }

    /// Also accept registrations signed by these TTP replicas (certificate names; their
    /// certificates must come from this TTP's own CA and carry the TTP role).
    pub fn with_registration_replicas(mut self, names: Vec<String>) -> Self {
        for name in names {
            if !self.registration_signers.contains(&name) {
                self.registration_signers.push(name);
            }
        }
        self
    }

    /// Check signers' certificates against these revocation lists (PEM files, one per
    /// trusted CA, as `cloud-platform ca revoke` writes them).
    pub fn with_revocation_lists(mut self, files: Vec<PathBuf>) -> Self {
        self.revocation_lists = files;
        self
    }

    /// The revocation lists as they are now. An unreadable list refuses every signature
    /// (fail closed): a revocation must not be skipped because a file went missing.
    fn current_revocation_lists(&self) -> protocol::Result<Vec<String>> {
        self.revocation_lists
            .iter()
            .map(|path| {
                net::read_pem_file(path).map_err(|e| {
                    protocol::Error::Certificate(format!(
                        "{e}; signed requests are refused until the revocation list can be read"
                    ))
                })
            })
            .collect()
    }

    /// The store, for tools and tests that read it (e.g. the audit chain).
    pub fn store(&self) -> &Arc<dyn TtpStore> {
        &self.store
    }

    fn audit(
        &self,
        event: &str,
        actor: &Identity,
        subject: &Subject,
        outcome: std::result::Result<String, &Error>,
    ) -> Result<AuditRecord> {
        let (outcome, message) = match outcome {
            Ok(message) => ("ok".to_string(), message),
            Err(error) => (error.code().to_string(), error.to_string()),
        };
        self.store.append_audit(AuditEntry {
            at: now_unix(),
            event: event.to_string(),
            outcome,
            message,
            domain_id: subject.domain_id.clone(),
            host_id: subject.host_id.clone(),
            vm_id: subject.vm_id.clone(),
            actor: actor.name.clone(),
        })
    }

    /// Runs `decide`, audits its outcome, and returns it. A refusal is audited with its
    /// code and message; if the audit write itself fails, that failure is returned.
    fn audited<T>(
        &self,
        event: &str,
        actor: &Identity,
        subject: Subject,
        decide: impl FnOnce(&mut Subject) -> Result<(T, String)>,
    ) -> Result<(T, AuditRecord)> {
        let mut subject = subject;
        match decide(&mut subject) {
            Ok((value, message)) => {
                let record = self.audit(event, actor, &subject, Ok(message))?;
                Ok((value, record))
            }
            Err(error) => {
                self.audit(event, actor, &subject, Err(&error))?;
                Err(error)
            }
        }
    }

    fn require_role(actor: &Identity, role: Role, action: &'static str) -> Result<()> {
        if actor.role != role {
            return Err(Error::Forbidden {
                caller: actor.name.clone(),
                action,
                detail: format!("this needs a {} certificate, the caller's is {}", role.as_str(), actor.role.as_str()),
            });
        }
        Ok(())
    }

    /// Checks an envelope's certificate (chain to a trusted CA, validity, role) and
    /// signature; returns the signer's certificate name.
    fn verify_signer(
        &self,
        envelope: &SignedEnvelope,
        context: SignatureContext,
        role: Role,
    ) -> protocol::Result<String> {
        let crls = self.current_revocation_lists()?;
        let identity = protocol::signing::verify_signer_certificate(
            &envelope.signer_certificate,
            &self.trusted_cas,
            &crls,
            now_unix(),
        )?;
        if identity.role != role {
            return Err(protocol::Error::Certificate(format!(
                "{} signed with a {} certificate, a {} certificate is needed",
                identity.name,
                identity.role.as_str(),
                role.as_str()
            )));
        }
        envelope.verify_signature(context)?;
        Ok(identity.name)
    }

    /// Verifies an owner-signed descriptor; returns it decoded.
    fn verified_descriptor(&self, envelope: &SignedEnvelope) -> Result<Descriptor> {
        let signer = self
            .verify_signer(envelope, SignatureContext::Descriptor, Role::DomainManager)
            .map_err(|e| Error::DescriptorSignatureInvalid(e.to_string()))?;
        let descriptor = Descriptor::decode(&envelope.message)?;
        if signer != descriptor.owner {
            return Err(Error::DescriptorSignatureInvalid(format!(
                "descriptor of domain {} names owner {} but is signed by {signer}",
                descriptor.domain_id, descriptor.owner
            )));
        }
        Ok(descriptor)
    }

    /// Verifies a registration: signed by this TTP or a configured replica, with a
    /// certificate from this TTP's own CA. A registration carries `r`, so whoever may sign
    /// one may re-key or shred a domain: a certificate that merely has the TTP role (another
    /// name, or a federated partner's CA) is refused.
    fn verified_registration(&self, envelope: &SignedEnvelope) -> Result<Registration> {
        let refuse = |detail: String| Error::RegistrationMismatch(format!("registration signature: {detail}"));
        let crls = self.current_revocation_lists().map_err(|e| refuse(e.to_string()))?;
        let identity = protocol::signing::verify_signer_certificate(
            &envelope.signer_certificate,
            &self.registration_cas,
            &crls,
            now_unix(),
        )
        .map_err(|e| refuse(format!("{e} (a registration must come from this TTP's own CA)")))?;
        if identity.role != Role::Ttp {
            return Err(refuse(format!(
                "{} signed with a {} certificate, a ttp certificate is needed",
                identity.name,
                identity.role.as_str()
            )));
        }
        if !self.registration_signers.contains(&identity.name) {
            return Err(refuse(format!(
                "signed by {}, a TTP-role certificate that is neither this TTP nor a configured replica ({})",
                identity.name,
                self.registration_signers.join(", ")
            )));
        }
        envelope.verify_signature(SignatureContext::Registration).map_err(|e| refuse(e.to_string()))?;
        Ok(Registration::decode(&envelope.message)?)
    }

    // ---- host enrollment ---------------------------------------------------------------

    /// Enrollment step 2 (docs/PROTOCOL.md "Host enrollment"): a secure component enrolling
    /// itself (its certificate name is `host_id`, else `forbidden`) gets a MakeCredential
    /// challenge once its EK certificate is trusted. The pending enrollment is kept in memory
    /// for 120 s. Audited as `enroll_begin`.
    pub fn begin_enrollment(&self, actor: &Identity, request: &EnrollmentRequest) -> Result<CredentialChallenge> {
        // Only a well-formed id goes into the audit record.
        let host_id_ok = protocol::domain::validate_name("host id", &request.host_id).is_ok();
        let subject = Subject { host_id: host_id_ok.then(|| request.host_id.clone()), ..Default::default() };
        let (challenge, _) = self.audited("enroll_begin", actor, subject, |_| {
            Self::require_role(actor, Role::SecureComponent, "enroll a host")?;
            if !host_id_ok {
                return Err(Error::BadRequest(invalid_name("host_id", &request.host_id)));
            }
            if actor.name != request.host_id {
                return Err(Error::Forbidden {
                    caller: actor.name.clone(),
                    action: "enroll a host",
                    detail: format!("a host may enroll only itself, not {}", request.host_id),
                });
            }
            let (pending, challenge) = attestation::begin_enrollment(&self.policy, request)?;
            let ek = pending.ek_fingerprint.clone();
            let mut pending_map =
                self.pending_enrollments.lock().map_err(|_| Error::Store("enrollment table poisoned".into()))?;
            let now = now_unix();
            pending_map.retain(|_, (started, _)| now.saturating_sub(*started) < ENROLLMENT_TTL_SECS);
            pending_map.insert(challenge.enrollment_id.clone(), (now, pending));
            Ok((challenge, format!("EK {ek} certificate trusted; credential challenge issued")))
        })?;
        Ok(challenge)
    }

    /// Enrollment step 4: checks the activated credential and the Certify of the binding key
    /// (docs/TPM.md "Enrollment"), then stores the [`HostRecord`]. The enrollment id is used up
    /// whether or not the proof passes. Audited as `enroll`.
    pub fn finish_enrollment(&self, actor: &Identity, proof: &EnrollmentProof) -> Result<HostRecord> {
        let subject = Subject { host_id: Some(actor.name.clone()), ..Default::default() };
        let (host, _) = self.audited("enroll", actor, subject, |_| {
            Self::require_role(actor, Role::SecureComponent, "enroll a host")?;
            let pending = {
                let mut pending_map =
                    self.pending_enrollments.lock().map_err(|_| Error::Store("enrollment table poisoned".into()))?;
                match pending_map.remove(&proof.enrollment_id) {
                    Some((started, pending)) if now_unix().saturating_sub(started) < ENROLLMENT_TTL_SECS => pending,
                    Some(_) => {
                        return Err(Error::ChallengeInvalid(format!("enrollment {} expired", proof.enrollment_id)))
                    }
                    None => {
                        return Err(Error::ChallengeInvalid(format!(
                            "enrollment {} is unknown or was already used",
                            proof.enrollment_id
                        )))
                    }
                }
            };
            if pending.host_id != actor.name {
                return Err(Error::Forbidden {
                    caller: actor.name.clone(),
                    action: "enroll a host",
                    detail: format!("enrollment belongs to {} (EK {})", pending.host_id, pending.ek_fingerprint),
                });
            }
            let ek = pending.ek_fingerprint.clone();
            let host = attestation::finish_enrollment(&self.policy, pending, proof).map_err(|e| with_ek(e, &ek))?;
            let json = serde_json::to_string(&host).map_err(|e| Error::Store(format!("encode host record: {e}")))?;
            // The EK is pinned to the host here, atomically with storing the record
            // (docs/TPM.md "EK pinning").
            let message = match self.store.enroll_host(&host.host_id, &host.ek_fingerprint, &json)? {
                Some(old) => format!(
                    "host enrolled with EK {} replacing EK {old} (operator-approved replacement), reference state {}",
                    host.ek_fingerprint, host.reference_state
                ),
                None => {
                    format!("host enrolled with EK {}, reference state {}", host.ek_fingerprint, host.reference_state)
                }
            };
            Ok((host, message))
        })?;
        Ok(host)
    }

    /// The operator's replacement of a host's TPM (`ttp host replace`): the next enrollment of
    /// `host_id` may pin another EK, once. Audited as `host_replace` with the operator as the
    /// actor and the EK pinned now; the enrollment that uses the mark names old and new EK.
    pub fn allow_host_replacement(&self, operator: &str, host_id: &str) -> Result<AuditRecord> {
        allow_host_replacement(self.store.as_ref(), operator, host_id)
    }

    fn host_record(&self, host_id: &str) -> Result<HostRecord> {
        let json = self.store.host(host_id)?.ok_or_else(|| Error::HostUnknown(host_id.to_string()))?;
        serde_json::from_str(&json).map_err(|e| Error::Store(format!("host record of {host_id} is unreadable: {e}")))
    }

    // ---- challenges ------------------------------------------------------------------------

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

    // ---- domains -----------------------------------------------------------------------------

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
            let encoded_hash = descriptor_hash(&request.descriptor.message);
            let existing = self.store.domain(&descriptor.domain_id)?;
            let nonce_r = match (&existing, &request.previous_registration) {
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
                    })?;
                    nonce
                }
                (Some(current), Some(previous)) if self.is_repeat_of_newest(current, &descriptor, encoded_hash, previous)? => {
                    // The CP crashed after we registered this version but before its header
                    // reached the disk: answer the same registration again (same r), so the
                    // domain is not stuck on a header we would now call a rollback.
                    self.verified_registration(previous)?.nonce_r
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
                    previous.nonce_r
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
        Ok(previous.domain_id == current.domain_id && previous.version + 1 == current.latest_version)
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
        Ok(())
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

    // ---- key release ---------------------------------------------------------------------

    /// The key release of docs/PROTOCOL.md "Key release": host attestation against a fresh
    /// challenge, descriptor and registration signatures, newest version, ACL, then the
    /// single-use grant; only then is K derived and sealed to the host's binding key
    /// ([`attestation::seal_key_to_host`]). Every outcome, granted or refused, is one
    /// `key_release` audit record.
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
        let ((wrapped_key, domain_id, version), record) = self.audited("key_release", actor, subject, |_| {
            if !host_id_ok {
                return Err(Error::BadRequest(invalid_name("host_id", &request.host_id)));
            }
            if !vm_id_ok {
                return Err(Error::BadRequest(invalid_name("vm_id", &request.vm_id)));
            }
            Self::require_role(actor, Role::SecureComponent, "request a key release")?;
            if actor.name != request.host_id {
                return Err(Error::Forbidden {
                    caller: actor.name.clone(),
                    action: "request a key release",
                    detail: format!("the request claims host {}", request.host_id),
                });
            }
            // 1. The host: enrolled, and its TPM quotes the trusted state over our fresh nonce.
            let host = self.host_record(&request.host_id)?;
            let (challenge_host, nonce, expires_at) = self
                .store
                .take_challenge(&request.challenge_id)?
                .ok_or_else(|| Error::ChallengeInvalid(format!("challenge {} is unknown or was already used", request.challenge_id)))?;
            if challenge_host != request.host_id {
                return Err(Error::ChallengeInvalid(format!("challenge {} was issued to {challenge_host}", request.challenge_id)));
            }
            if now_unix() > expires_at {
                return Err(Error::ChallengeInvalid(format!("challenge {} expired", request.challenge_id)));
            }
            attestation::verify_quote(&host, &self.policy, &request.quote, &nonce)?;

            // 2. The header: owner-signed descriptor, registered by a TTP, newest version.
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
            let domain = self.store.domain(&descriptor.domain_id)?.ok_or_else(|| Error::DomainUnknown(descriptor.domain_id.clone()))?;
            if domain.deleted_at.is_some() {
                return Err(Error::DomainDeleted(descriptor.domain_id.clone()));
            }
            if descriptor.version != domain.latest_version {
                return Err(Error::VersionRollback(format!(
                    "the header holds version {} of domain {}, but version {} is the newest",
                    descriptor.version, descriptor.domain_id, domain.latest_version
                )));
            }

            // 3. Access: the VM is in the ACL with a mode that covers the request.
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

            // 4. The grant: signed by the owner or a manager the descriptor shares with.
            let signer = self
                .verify_signer(&request.grant, SignatureContext::MountGrant, Role::DomainManager)
                .map_err(|e| Error::GrantSignatureInvalid(e.to_string()))?;
            let grant = MountGrant::decode(&request.grant.message)?;
            if grant.issuer != signer {
                return Err(Error::GrantSignatureInvalid(format!("the grant names issuer {} but is signed by {signer}", grant.issuer)));
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
            // Bounded, so that the used-grant mark below can be kept until the grant expires.
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
            let grant_digest = protocol::messages::grant_digest(&request.grant);

            // 5. The placement: the operator put this VM on this very host, for this grant.
            let placer = self.verified_placement(request, &grant_digest, now)?;

            // Last, once everything else holds: a grant authorizes one release. Whoever saw
            // it on its way (the cloud platform forwards it) cannot attach the VM again with
            // it after a detach.
            if !self.store.consume_grant(&grant_digest, grant.expires_at)? {
                return Err(Error::GrantReplayed(format!(
                    "the grant of {signer} for {} on domain {} was used for a key release before; every attach needs a new grant",
                    grant.vm_id, grant.domain_id
                )));
            }

            // 6. Derive K and seal it to the host's PCR-bound binding key.
            let key = derive_volume_key(
                &self.master_key,
                &registration.nonce_r,
                &descriptor.domain_id,
                &domain.metadata_hash,
                &descriptor.cipher_spec,
            )?;
            let wrapped = attestation::seal_key_to_host(&host, &key)?;
            let message = format!(
                "key of domain {} version {} released to {} on {} ({}), grant by {signer}, placement by {placer}",
                descriptor.domain_id, descriptor.version, request.vm_id, request.host_id, request.mode
            );
            Ok(((wrapped, descriptor.domain_id.clone(), descriptor.version), message))
        })?;
        Ok(KeyReleaseResponse { domain_id, version, wrapped_key, audit_seq: record.seq })
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

    // ---- history -------------------------------------------------------------------------

    /// The viewing history of a domain, for its owner and the managers it is shared with.
    /// The whole chain is verified first: a removed or edited record is reported.
    pub fn history(&self, actor: &Identity, domain_id: &str) -> Result<HistoryResponse> {
        Self::require_role(actor, Role::DomainManager, "read a viewing history")?;
        let domain = self.store.domain(domain_id)?.ok_or_else(|| Error::DomainUnknown(domain_id.to_string()))?;
        let descriptor = Descriptor::decode(&domain.descriptor)?;
        if !descriptor.is_manager(&actor.name) {
            return Err(Error::Forbidden {
                caller: actor.name.clone(),
                action: "read the viewing history",
                detail: format!("only the owner and the managers domain {domain_id} is shared with may"),
            });
        }
        self.verify_audit_chain()?;
        Ok(HistoryResponse { domain_id: domain_id.to_string(), records: self.store.audit_records(Some(domain_id))? })
    }

    /// Verifies the whole audit chain from its genesis.
    pub fn verify_audit_chain(&self) -> Result<usize> {
        let records = self.store.audit_records(None)?;
        if let Some(first) = records.first() {
            if first.seq != 1 {
                return Err(Error::AuditChainBroken(format!("records 1 to {} are missing", first.seq - 1)));
            }
        }
        verify_audit_chain(&records, Some(AUDIT_GENESIS_HASH)).map_err(|e| Error::AuditChainBroken(e.to_string()))?;
        Ok(records.len())
    }
}

/// A refusal text for a malformed id that does not repeat it (it may be huge or hostile).
fn invalid_name(field: &str, value: &str) -> String {
    format!(
        "{field} ({} bytes) is not 1 to {} characters of A-Z a-z 0-9 . _ - @ :",
        value.len(),
        protocol::domain::MAX_NAME_BYTES
    )
}

/// Adds the EK to an enrollment refusal's text, so its audit record names the EK.
fn with_ek(error: Error, ek: &str) -> Error {
    match error {
        Error::CredentialFailed(m) if !m.contains(ek) => Error::CredentialFailed(format!("{m} (EK {ek})")),
        Error::BindingKeyInvalid(m) => Error::BindingKeyInvalid(format!("{m} (EK {ek})")),
        Error::BindingPolicyUntrusted(m) => Error::BindingPolicyUntrusted(format!("{m} (EK {ek})")),
        Error::ChallengeInvalid(m) => Error::ChallengeInvalid(format!("{m} (EK {ek})")),
        other => other,
    }
}

/// [`Ttp::allow_host_replacement`] on a store alone, for the `ttp host replace` command,
/// which runs beside a serving TTP on the same database.
pub fn allow_host_replacement(store: &dyn TtpStore, operator: &str, host_id: &str) -> Result<AuditRecord> {
    let valid = protocol::domain::validate_name("host id", host_id).is_ok();
    let result = if valid {
        store.mark_host_replaceable(host_id, operator, now_unix())
    } else {
        Err(Error::BadRequest(invalid_name("host", host_id)))
    };
    let (outcome, message) = match &result {
        Ok(pinned) => (
            "ok".to_string(),
            format!(
                "operator {operator} allows host {host_id} to enroll once with another EK than the pinned EK {pinned}"
            ),
        ),
        Err(e) => (e.code().to_string(), e.to_string()),
    };
    let record = store.append_audit(AuditEntry {
        at: now_unix(),
        event: "host_replace".into(),
        outcome,
        message,
        domain_id: None,
        host_id: valid.then(|| host_id.to_string()),
        vm_id: None,
        actor: operator.to_string(),
    })?;
    result.map(|_| record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::domain::{AccessMode, AclEntry};
    use skydd_ca::{CertificateAuthority, Validity};

    fn key_of(ca: &(String, zeroize::Zeroizing<String>), role: Role, name: &str) -> SignatureKey {
        let issued = CertificateAuthority::issue(&ca.0, &ca.1, role, name, Validity::Days(5)).unwrap();
        let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
        SignatureKey::from_pem(&issued.key_pem, der).unwrap()
    }

    /// Issue 21: a registration carries r, so only this TTP (or a configured replica) from
    /// its own CA may sign one. Another TTP-role name from the same CA, and the TTP's own
    /// name from a trusted partner CA, are refused; a configured replica is accepted.
    #[test]
    fn registrations_only_from_this_ttp_or_a_configured_replica() {
        let own_ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let partner_ca = CertificateAuthority::generate("partner-ca").unwrap();
        let store: Arc<dyn TtpStore> = Arc::new(crate::store::SqliteStore::in_memory().unwrap());
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

    /// Issue 21: `release_key` validates the host and VM ids before they reach the audit
    /// record; a malformed one is refused and audited without it (and without repeating it).
    #[test]
    fn release_key_audits_only_validated_ids() {
        let ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let store: Arc<dyn TtpStore> = Arc::new(crate::store::SqliteStore::in_memory().unwrap());
        let ttp = Ttp::new(
            SecretBytes::from_slice_wiping(&mut [7u8; 32]),
            key_of(&ca, Role::Ttp, "ttp-1"),
            vec![ca.0.clone()],
            AttestationPolicy::default(),
            store,
        )
        .unwrap();
        let empty = SignedEnvelope { message: Vec::new(), signature: Vec::new(), signer_certificate: Vec::new() };
        let request = |host_id: &str, vm_id: &str| KeyReleaseRequest {
            host_id: host_id.into(),
            vm_id: vm_id.into(),
            mode: AccessMode::Ro,
            header: protocol::messages::HeaderRecord { descriptor: empty.clone(), registration: empty.clone() },
            grant: empty.clone(),
            placement: empty.clone(),
            challenge_id: "c".into(),
            quote: protocol::attest::QuoteEvidence {
                attest: Vec::new(),
                signature: Vec::new(),
                pcr_values: Vec::new(),
            },
        };
        let host = Identity { name: "compute-1".into(), role: Role::SecureComponent };
        let hostile = format!("compute-1\n{}", "x".repeat(4096));
        for (host_id, vm_id, field) in
            [(hostile.as_str(), "vm-a", "host_id"), ("compute-1", "", "vm_id"), ("compute-1", "vm a", "vm_id")]
        {
            let err = ttp.release_key(&host, &request(host_id, vm_id)).unwrap_err();
            assert_eq!(err.code(), "bad_request", "{err}");
            assert!(err.to_string().contains(field), "{err}");
            let record = ttp.store().audit_records(None).unwrap().pop().unwrap();
            assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", "bad_request"));
            assert!(record.message.len() < 200, "the refusal does not repeat the id: {}", record.message);
            if field == "host_id" {
                assert_eq!((record.host_id, record.vm_id.as_deref()), (None, Some("vm-a")));
            } else {
                assert_eq!((record.host_id.as_deref(), record.vm_id), (Some("compute-1"), None));
            }
        }
        ttp.verify_audit_chain().unwrap();
    }
}
