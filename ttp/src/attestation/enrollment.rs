//! Host enrollment at the TTP (docs/TPM.md "Enrollment"): step 2 checks the EK certificate
//! and makes a credential only the TPM holding both EK and AK can recover; step 4 checks the
//! activated credential and the AK's TPM2_Certify of the PCR-bound binding key, and yields the
//! [`HostRecord`] the TTP stores.

use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection};
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tss_esapi::structures::AttestInfo;

use super::credential::make_credential;
use super::ek::{check_ek_public, ek_description, verify_ek_certificate};
use super::objects::{
    ak_verifying_key, check_ak_public, check_binding_public, object_name, parse_attest, verify_attest_signature,
    TPM_ST_ATTEST_CERTIFY,
};
use super::pcr::{check_not_resettable, check_selection, policy_pcr_digest};
use super::{random, AttestationPolicy};
use crate::error::{Error, Result};

/// An enrollment between the challenge and the proof (kept in memory by the TTP).
pub struct PendingEnrollment {
    /// Random id (32 hex characters) the SC echoes in its `EnrollmentProof`.
    pub enrollment_id: String,
    /// The host being enrolled: the CN of the secure component's certificate that asked.
    pub host_id: String,
    /// The credential only the TPM holding both the EK and the AK can recover.
    secret: SecretBytes,
    certify_nonce: Vec<u8>,
    /// Hex SHA-256 of the EK certificate (DER), for logs and the host record.
    pub ek_fingerprint: String,
    /// The EK certificate (DER) as presented; its chain was checked in step 2.
    pub ek_certificate: Vec<u8>,
    /// Marshalled TPMT_PUBLIC of the AK the credential was made for.
    pub ak_public: Vec<u8>,
    /// Marshalled TPMT_PUBLIC of the binding key the proof's Certify must name.
    pub binding_public: Vec<u8>,
    /// The PCRs the binding key's policy must cover.
    pub pcr_selection: PcrSelection,
    /// The region the host claims; checked against the reference state in step 4.
    pub region: Option<String>,
}

impl std::fmt::Debug for PendingEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEnrollment")
            .field("enrollment_id", &self.enrollment_id)
            .field("host_id", &self.host_id)
            .field("ek_fingerprint", &self.ek_fingerprint)
            .finish_non_exhaustive()
    }
}

/// An enrolled host, as the TTP stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's id: the CN of its secure component's certificate.
    pub host_id: String,
    /// Hex SHA-256 of the EK certificate (DER).
    pub ek_fingerprint: String,
    /// Marshalled TPMT_PUBLIC of the AK.
    #[serde(with = "protocol::b64")]
    pub ak_public: Vec<u8>,
    /// Marshalled TPMT_PUBLIC of the binding key.
    #[serde(with = "protocol::b64")]
    pub binding_public: Vec<u8>,
    /// The name of the reference state whose PolicyPCR digest is the binding key's policy.
    pub reference_state: String,
    /// The PCRs every quote of this host must cover (those of its reference state).
    pub pcr_selection: PcrSelection,
    /// The TPM's manufacturer/model/version from the EK certificate, for the operator.
    #[serde(default)]
    pub tpm_description: String,
    /// The host's region, attested: its reference state pins the location PCR to this
    /// region's measurement ([`protocol::attest::location_measurement`]), and every quote of
    /// the host matches that state. `None`: the host claimed none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Enrollment step 2: checks the EK certificate and the request, then makes a credential
/// for (EK, AK name).
pub fn begin_enrollment(
    policy: &AttestationPolicy,
    request: &EnrollmentRequest,
) -> Result<(PendingEnrollment, CredentialChallenge)> {
    let description = verify_ek_certificate(policy, &request.ek_certificate, &request.host_id)?;
    let ek_key = check_ek_public(&request.ek_certificate, &request.ek_public)?;
    check_ak_public(&request.ak_public)?;
    check_not_resettable(&request.pcr_selection, "the enrollment's PCR selection")?;
    check_selection(&request.pcr_selection).map_err(Error::BadRequest)?;
    if let Some(region) = &request.region {
        protocol::domain::validate_name("region", region).map_err(|e| Error::BadRequest(e.to_string()))?;
    }
    let ak_name = object_name(&request.ak_public);

    let mut secret = SecretBytes::zeroed(32);
    random(secret.expose_mut())?;
    let (credential_blob, encrypted_secret) = make_credential(&ek_key, secret.expose(), &ak_name)?;
    let mut certify_nonce = vec![0u8; 32];
    random(&mut certify_nonce)?;
    let mut id = [0u8; 16];
    random(&mut id)?;
    let enrollment_id = hex::encode(id);

    let pending = PendingEnrollment {
        enrollment_id: enrollment_id.clone(),
        host_id: request.host_id.clone(),
        secret,
        certify_nonce: certify_nonce.clone(),
        ek_fingerprint: hex::encode(Sha256::digest(&request.ek_certificate)),
        ek_certificate: request.ek_certificate.clone(),
        ak_public: request.ak_public.clone(),
        binding_public: request.binding_public.clone(),
        pcr_selection: request.pcr_selection.clone(),
        region: request.region.clone(),
    };
    tracing::debug!(host = %request.host_id, tpm = %description, "EK certificate trusted, credential issued");
    let challenge = CredentialChallenge { enrollment_id, credential_blob, encrypted_secret, certify_nonce };
    Ok((pending, challenge))
}

/// A claimed region counts only if the reference state pins the location PCR to exactly that
/// region's measurement (TrustCom 2014's location in a PCR; docs/TPM.md "Location"): the
/// operator's claim in the host's configuration AND the host's measured start-up must agree,
/// and the binding key then works only while the PCR holds it.
fn check_region_pinned(host_id: &str, region: &str, state: &super::ReferenceState) -> Result<()> {
    let pcr = protocol::attest::LOCATION_PCR;
    let expected = protocol::attest::pcr_after(&[protocol::attest::location_measurement(region)]);
    let pinned = state.pcr_values.iter().find(|(index, _)| *index == pcr).map(|(_, value)| value.as_slice());
    match pinned {
        Some(value) if bool::from(value.ct_eq(&expected)) => Ok(()),
        Some(value) => Err(Error::HostRegionUnattested(format!(
            "host {host_id} claims region {region}, but its reference state '{}' pins PCR {pcr} to {}, not to the measurement of {region} ({})",
            state.name,
            hex::encode(value),
            hex::encode(expected)
        ))),
        None => Err(Error::HostRegionUnattested(format!(
            "host {host_id} claims region {region}, but its reference state '{}' does not select PCR {pcr}, where a host's start-up measures its location",
            state.name
        ))),
    }
}

/// Enrollment step 4: the activated credential proves the AK is in the EK's TPM; the AK's
/// certification of the binding key proves its attributes and PCR policy.
pub fn finish_enrollment(
    policy: &AttestationPolicy,
    pending: PendingEnrollment,
    proof: &EnrollmentProof,
) -> Result<HostRecord> {
    if !bool::from(pending.enrollment_id.as_bytes().ct_eq(proof.enrollment_id.as_bytes())) {
        return Err(Error::ChallengeInvalid(format!(
            "proof is for enrollment {}, expected {}",
            proof.enrollment_id, pending.enrollment_id
        )));
    }
    if !pending.secret.ct_eq(&proof.activated_secret) {
        return Err(Error::CredentialFailed(format!(
            "host {}: the activated secret does not match the credential made for EK {}, so the AK is not in the EK's TPM",
            pending.host_id, pending.ek_fingerprint
        )));
    }

    // TPM2_Certify of the binding key by the AK.
    let ak = ak_verifying_key(&pending.ak_public).map_err(Error::BindingKeyInvalid)?;
    verify_attest_signature(&ak, &proof.certify_attest, &proof.certify_signature)
        .map_err(|e| Error::BindingKeyInvalid(format!("the TPM2_Certify of the binding key: {e}")))?;
    let attest =
        parse_attest(&proof.certify_attest, TPM_ST_ATTEST_CERTIFY, "TPM2_Certify").map_err(Error::BindingKeyInvalid)?;
    if !bool::from(attest.extra_data().value().ct_eq(&pending.certify_nonce)) {
        return Err(Error::ChallengeInvalid(
            "the TPM2_Certify of the binding key is not qualified with this enrollment's certify nonce (replayed?)"
                .into(),
        ));
    }
    let certified_name = match attest.attested() {
        AttestInfo::Certify { info } => info.name().value().to_vec(),
        _ => return Err(Error::BindingKeyInvalid("the TPM2_Certify attest holds no certify info".into())),
    };
    let binding_name = object_name(&pending.binding_public);
    if !bool::from(certified_name.ct_eq(&binding_name)) {
        return Err(Error::BindingKeyInvalid(format!(
            "the AK certified object {}, but the binding key in the request has name {}",
            hex::encode(&certified_name),
            hex::encode(&binding_name)
        )));
    }

    let auth_policy = check_binding_public(&pending.binding_public)?;

    // The binding key's policy must be PolicyPCR over an allowed reference state.
    let mut tried = Vec::new();
    for state in &policy.reference_states {
        let digest = policy_pcr_digest(&state.selection, &state.pcr_values)
            .map_err(|e| Error::Config(format!("reference state '{}': {e}", state.name)))?;
        if bool::from(digest.ct_eq(&auth_policy)) {
            if let Some(region) = &pending.region {
                check_region_pinned(&pending.host_id, region, state)?;
            }
            return Ok(HostRecord {
                host_id: pending.host_id,
                ek_fingerprint: pending.ek_fingerprint,
                ak_public: pending.ak_public,
                binding_public: pending.binding_public,
                reference_state: state.name.clone(),
                pcr_selection: state.selection.clone(),
                tpm_description: ek_description(&pending.ek_certificate).unwrap_or_default(),
                region: pending.region,
            });
        }
        tried.push(format!("'{}'", state.name));
    }
    Err(Error::BindingPolicyUntrusted(if tried.is_empty() {
        "the attestation policy allows no reference states".into()
    } else {
        format!(
            "the binding key's authPolicy {} is not the PolicyPCR digest of any allowed reference state (tried {})",
            hex::encode(&auth_policy),
            tried.join(", ")
        )
    }))
}
