//! The TTP's decisions, independent of HTTP (docs/PROTOCOL.md, "Message sequences"). Every
//! decision about an enrollment, a registration, a deletion or a key release — granted or
//! refused — is one audit record.
//!
//! This module holds the [`Ttp`] itself and what every flow shares: the audit helpers and the
//! checks of signed objects' signers. Each flow is one module:
//!
//! - `enrollment`: a host enrolls its TPM (and the operator approves a TPM replacement);
//! - `domains`: registration, update and deletion of a domain;
//! - `key_release`: the quote challenge and the six steps of a key release;
//! - `history`: a domain's viewing history and the audit chain;
//! - `integrity`: format-2 integrity root commits and violation reports;
//! - `launch`: hosts' reports of trusted launches, granted or refused;
//! - `policy`: the owner's Cedar access policy, checked at registration and key release.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::domain::Descriptor;
use protocol::messages::{AuditRecord, Registration};
use protocol::pki::{Identity, Role};
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};

use crate::attestation::{AttestationPolicy, PendingEnrollment};
use crate::error::{Error, Result};
use crate::master_key::MasterKeys;
use crate::store::{now_unix, AuditEntry, TtpStore};
use signers::Anchors;

mod domains;
mod enrollment;
mod history;
mod integrity;
mod key_release;
mod launch;
pub mod policy;
mod signers;
#[cfg(test)]
pub(crate) mod test_support;

pub use enrollment::{allow_host_replacement, ENROLLMENT_TTL_SECS};
pub use history::{verify_whole_audit_chain, CHECKPOINT_INTERVAL_SECS};
pub use integrity::{MAX_VIOLATION_REPORTS_PER_MINUTE, VIOLATION_WINDOW_SECS};
pub use key_release::CHALLENGE_TTL_SECS;
pub use launch::{LAUNCH_EVENT, LAUNCH_REPORT_REFUSED_EVENT};

/// The trusted third party's state and decisions: K_TTP (in locked memory), its signing key,
/// the trusted CAs and revocation lists, the attestation policy and the store. HTTP-free;
/// `http.rs` wraps it, tests call it directly.
pub struct Ttp {
    master_keys: MasterKeys,
    signing_key: SignatureKey,
    /// Checks of signed objects under the trusted CAs (its own cloud's and federated
    /// partners') and the revocation lists, remembering what they proved.
    signers: signers::SignerChecks,
    policy: AttestationPolicy,
    store: Arc<dyn TtpStore>,
    pending_enrollments: Mutex<HashMap<String, (u64, PendingEnrollment)>>,
    /// Certificate names whose registrations count: this TTP's own and its replicas'.
    registration_signers: Vec<String>,
    /// Violation reports per (domain, host) in the current window, so that one host cannot
    /// flood a domain's viewing history ([`MAX_VIOLATION_REPORTS_PER_MINUTE`]).
    violation_reports: Mutex<integrity::ReportWindow>,
    /// The signed image allowlist (docs/PROTOCOL.md "Trusted launch"): when set, a key is
    /// released only to a VM launched from an image on it.
    image_allowlist: Option<protocol::image::AllowList>,
    /// The access policy schema and each domain's newest compiled policy.
    access_policies: policy::AccessPolicies,
}

/// The parts of a request the audit record names.
#[derive(Default)]
struct Subject {
    domain_id: Option<String>,
    host_id: Option<String>,
    vm_id: Option<String>,
}

impl Ttp {
    /// Builds the TTP from its master keys (a [`MasterKeys`] set, or one
    /// `protocol::secret::SecretBytes` as version 1; 32 bytes each, else `Error::Config`), the
    /// key that signs registrations, the trusted CA roots (PEM) for signed objects, the attestation
    /// policy and the store. No revocation list is checked until
    /// [`Ttp::with_revocation_lists`].
    pub fn new(
        master_keys: impl Into<MasterKeys>,
        signing_key: SignatureKey,
        trusted_cas: Vec<impl Into<protocol::pki::TrustedRoot>>,
        policy: AttestationPolicy,
        store: Arc<dyn TtpStore>,
    ) -> Result<Self> {
        let master_keys = MasterKeys::new(master_keys.into().into_inner())?;
        policy.validate()?;
        let own = protocol::pki::identity_from_certificate(signing_key.certificate_der())
            .map_err(|e| Error::Config(format!("the TTP's own certificate: {e}")))?;
        let trusted_cas: Vec<protocol::pki::TrustedRoot> = trusted_cas.into_iter().map(Into::into).collect();
        let registration_cas: Vec<protocol::pki::TrustedRoot> = trusted_cas
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
            master_keys,
            signing_key,
            signers: signers::SignerChecks::new(trusted_cas, registration_cas),
            policy,
            store,
            pending_enrollments: Mutex::new(HashMap::new()),
            registration_signers: vec![own.name],
            violation_reports: Mutex::new(integrity::ReportWindow::default()),
            image_allowlist: None,
            access_policies: policy::AccessPolicies::new()?,
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

    /// Release keys only to VMs launched from an image on this (verified) allowlist.
    pub fn with_image_allowlist(mut self, allowlist: protocol::image::AllowList) -> Self {
        self.image_allowlist = Some(allowlist);
        self
    }

    /// The same TTP checking every signed object from scratch (the key-release benchmark's
    /// peer for its memory of verified signers).
    #[cfg(test)]
    pub(crate) fn forgetting_signers(mut self) -> Self {
        self.signers = self.signers.forgetting();
        self
    }

    /// Check signers' certificates against these revocation lists (PEM files, one per
    /// trusted CA, as `cloud-platform ca revoke` writes them).
    pub fn with_revocation_lists(mut self, files: Vec<PathBuf>) -> Self {
        self.signers.set_revocation_lists(files);
        self
    }

    /// The master-key versions loaded; the newest derives the keys of new domains.
    pub fn master_key_versions(&self) -> Vec<u32> {
        self.master_keys.versions()
    }

    /// The access policies: the schema, and each domain's newest compiled policy.
    pub fn access_policies(&self) -> &policy::AccessPolicies {
        &self.access_policies
    }

    /// The store, for tools and tests that read it (e.g. the audit chain).
    pub fn store(&self) -> &Arc<dyn TtpStore> {
        &self.store
    }

    /// The audit entry of `event` with this outcome: `"ok"` and the message, or a refusal's
    /// code and text.
    fn audit_entry(
        event: &str,
        actor: &Identity,
        subject: &Subject,
        outcome: std::result::Result<String, &Error>,
    ) -> AuditEntry {
        let (outcome, message) = match outcome {
            Ok(message) => ("ok".to_string(), message),
            Err(error) => (error.code().to_string(), error.to_string()),
        };
        AuditEntry {
            at: now_unix(),
            event: event.to_string(),
            outcome,
            message,
            domain_id: subject.domain_id.clone(),
            host_id: subject.host_id.clone(),
            vm_id: subject.vm_id.clone(),
            actor: actor.name.clone(),
        }
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
        self.audited_with(event, actor, subject, decide, |value, entry| Ok((value, self.store.append_audit(entry)?)))
    }

    /// As [`Ttp::audited`], but a granted outcome is written by `write`, which gets the
    /// entry to append and can store what the decision produced in the same transaction. A
    /// refusal from `write` (a compare-and-set lost to a concurrent request) is audited like
    /// one from `decide`; a store failure is returned as it is.
    fn audited_with<D, T>(
        &self,
        event: &str,
        actor: &Identity,
        subject: Subject,
        decide: impl FnOnce(&mut Subject) -> Result<(D, String)>,
        write: impl FnOnce(D, AuditEntry) -> Result<(T, AuditRecord)>,
    ) -> Result<(T, AuditRecord)> {
        let mut subject = subject;
        let refused = |error: Error, subject: &Subject| {
            self.store.append_audit(Self::audit_entry(event, actor, subject, Err(&error)))?;
            Err(error)
        };
        match decide(&mut subject) {
            Ok((value, message)) => match write(value, Self::audit_entry(event, actor, &subject, Ok(message))) {
                Err(error @ (Error::Store(_) | Error::AuditChainBroken(_))) => Err(error),
                Err(error) => refused(error, &subject),
                Ok(written) => Ok(written),
            },
            Err(error) => refused(error, &subject),
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
        let identity = self.signers.certificate(Anchors::Trusted, &envelope.signer_certificate, now_unix())?;
        if identity.role != role {
            return Err(protocol::Error::Certificate(format!(
                "{} signed with a {} certificate, a {} certificate is needed",
                identity.name,
                identity.role.as_str(),
                role.as_str()
            )));
        }
        self.signers.signature(envelope, context)?;
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
        let identity = self
            .signers
            .certificate(Anchors::Registration, &envelope.signer_certificate, now_unix())
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
        self.signers.signature(envelope, SignatureContext::Registration).map_err(|e| refuse(e.to_string()))?;
        Ok(Registration::decode(&envelope.message)?)
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
