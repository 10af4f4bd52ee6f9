//! Host enrollment (docs/PROTOCOL.md "Host enrollment", docs/TPM.md "Enrollment" and "EK
//! pinning"): the two audited steps a secure component takes to enroll its TPM, and the
//! operator's approval of a TPM replacement.

use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest};
use protocol::messages::AuditRecord;
use protocol::pki::{Identity, Role};

use super::{invalid_name, Subject, Ttp};
use crate::attestation::{self, HostRecord};
use crate::error::{Error, Result};
use crate::store::{now_unix, AuditEntry, TtpStore};

/// How long an enrollment may take between its two steps.
pub const ENROLLMENT_TTL_SECS: u64 = 120;

impl Ttp {
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
            let region = host.region.as_ref().map(|r| format!(", attested region {r}")).unwrap_or_default();
            let message = match self.store.enroll_host(&host.host_id, &host.ek_fingerprint, &json)? {
                Some(old) => format!(
                    "host enrolled with EK {} replacing EK {old} (operator-approved replacement), reference state {}{region}",
                    host.ek_fingerprint, host.reference_state
                ),
                None => {
                    format!("host enrolled with EK {}, reference state {}{region}", host.ek_fingerprint, host.reference_state)
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

    pub(super) fn host_record(&self, host_id: &str) -> Result<HostRecord> {
        let json = self.store.host(host_id)?.ok_or_else(|| Error::HostUnknown(host_id.to_string()))?;
        serde_json::from_str(&json).map_err(|e| Error::Store(format!("host record of {host_id} is unreadable: {e}")))
    }
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
