//! Host attestation at the TTP, all in software (the TTP has no TPM): EK certificate
//! chains, TPM2_MakeCredential, TPM2_Certify and TPM2_Quote verification, PolicyPCR digests,
//! and sealing domain keys to a host's binding key. docs/TPM.md has the byte formats.
//!
//! TPM structures are (un)marshalled with tss-esapi; all cryptography is openssl.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::encrypt::Encrypter;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public as PublicKeyKind};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use openssl::stack::Stack;
use openssl::symm::{encrypt, Cipher};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{CrlStatus, X509Crl, X509StoreContext, X509};
use protocol::attest::{
    CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection, QuoteEvidence, BINDING_OAEP_LABEL,
    RESETTABLE_PCRS,
};
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, RsaSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{Attest, AttestInfo, EccScheme, Public, RsaScheme, Signature, SymmetricDefinitionObject};
use tss_esapi::traits::UnMarshall;

use crate::error::{Error, Result};

/// TPM_GENERATED_VALUE: every TPMS_ATTEST starts with it, so a restricted AK never signs
/// anything that looks like an attestation but was not made by the TPM.
const TPM_GENERATED: [u8; 4] = [0xff, 0x54, 0x43, 0x47];
const TPM_ST_ATTEST_CERTIFY: [u8; 2] = [0x80, 0x17];
const TPM_ST_ATTEST_QUOTE: [u8; 2] = [0x80, 0x18];
const TPM_CC_POLICY_PCR: [u8; 4] = [0x00, 0x00, 0x01, 0x7f];
const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0b];
/// The TCG default EK policy (PolicySecret(TPM_RH_ENDORSEMENT)), SHA-256.
const EK_POLICY_A_SHA256: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52, 0xd7,
    0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// X.509 OIDs of TCG EK certificates (TCG EK Credential Profile 2.x).
const OID_TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
const OID_TCG_TPM_MANUFACTURER: &str = "2.23.133.2.1";
const OID_TCG_TPM_MODEL: &str = "2.23.133.2.2";
const OID_TCG_TPM_VERSION: &str = "2.23.133.2.3";

// ---- policy and records ----------------------------------------------------------------

/// What the operator trusts: TPM vendor CAs and the measured states a host may be in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttestationPolicy {
    /// Trust anchors for EK certificates (DER in memory; in TOML each entry is PEM text or
    /// base64 DER). Intermediate CAs may be listed here too.
    #[serde(with = "der_list")]
    pub trusted_ek_roots: Vec<Vec<u8>>,
    /// Untrusted intermediates used only to build chains (same encoding).
    #[serde(default, with = "der_list")]
    pub ek_intermediates: Vec<Vec<u8>>,
    /// Revocation lists of the EK CAs (DER in memory; in TOML PEM text or base64 DER). A
    /// CA with a list here is checked: a revoked certificate in the chain, a list whose
    /// signature fails or a list past its nextUpdate refuses the enrollment (`ek_untrusted`);
    /// a CA without a list is not checked (docs/TPM.md "EK certificate checks").
    #[serde(default, with = "der_list")]
    pub ek_crls: Vec<Vec<u8>>,
    /// The measured states a host may enroll in and must still be in at every key release; an
    /// empty list refuses every enrollment (`binding_policy_untrusted`).
    #[serde(default)]
    pub reference_states: Vec<ReferenceState>,
}

impl AttestationPolicy {
    /// Checks the policy as the TTP loads it: every reference state has a name, a sha256
    /// selection without resettable PCRs (`pcr_resettable`) and a 32-byte value for each
    /// selected PCR; names are unique; every configured certificate and CRL parses.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for state in &self.reference_states {
            if state.name.is_empty() {
                return Err(Error::Config("a reference state has an empty name".into()));
            }
            if !names.insert(state.name.as_str()) {
                return Err(Error::Config(format!("reference state '{}' is defined twice", state.name)));
            }
            check_not_resettable(&state.selection, &format!("reference state '{}'", state.name))?;
            if let Some((index, _)) = state.pcr_values.iter().find(|(i, _)| RESETTABLE_PCRS.contains(i)) {
                return Err(Error::PcrResettable(format!(
                    "reference state '{}' pins a value for PCR {index}, which locality 0 can reset",
                    state.name
                )));
            }
            reference_state_from_values(&state.name, &state.selection, &state.pcr_values)?;
        }
        for (i, der) in self.trusted_ek_roots.iter().chain(&self.ek_intermediates).enumerate() {
            X509::from_der(der).map_err(|e| Error::Config(format!("EK CA certificate {i} is not DER X.509: {e}")))?;
        }
        for (i, der) in self.ek_crls.iter().enumerate() {
            X509Crl::from_der(der).map_err(|e| Error::Config(format!("ek_crls[{i}] is not a DER X.509 CRL: {e}")))?;
        }
        Ok(())
    }
}

/// Refuses a selection that names a PCR locality 0 can reset ([`RESETTABLE_PCRS`]): a value
/// in it proves nothing, since any process can reset it and replay the expected events.
pub fn check_not_resettable(selection: &PcrSelection, what: &str) -> Result<()> {
    let resettable = selection.resettable_indices();
    if resettable.is_empty() {
        return Ok(());
    }
    Err(Error::PcrResettable(format!(
        "{what} selects PCR {}, which any process can reset (TPM2_PCR_Reset at locality 0) and so proves nothing; use PCRs 0-15",
        resettable.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")
    )))
}

/// A named set of PCR values a host may be in (e.g. "compute-v1").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceState {
    /// The operator's name for the state (e.g. "compute-v1"), recorded in [`HostRecord`] and
    /// named in `pcr_mismatch` refusals.
    pub name: String,
    /// The PCRs the state covers; a host's binding key policy and its quotes must use exactly
    /// this selection.
    pub selection: PcrSelection,
    /// (PCR index, SHA-256 value); in TOML `pcr_values = [[0, "hex"], [11, "hex"]]`.
    #[serde(with = "pcr_values_hex")]
    pub pcr_values: Vec<(u8, Vec<u8>)>,
}

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
}

// ---- enrollment ----------------------------------------------------------------------------

/// Enrollment step 2: checks the EK certificate and the request, then makes a credential
/// for (EK, AK name).
pub fn begin_enrollment(
    policy: &AttestationPolicy,
    request: &EnrollmentRequest,
) -> Result<(PendingEnrollment, CredentialChallenge)> {
    let description = verify_ek_certificate(policy, &request.ek_certificate)?;
    let ek_key = check_ek_public(&request.ek_certificate, &request.ek_public)?;
    check_ak_public(&request.ak_public)?;
    check_not_resettable(&request.pcr_selection, "the enrollment's PCR selection")?;
    check_selection(&request.pcr_selection).map_err(Error::BadRequest)?;
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
    };
    tracing::debug!(host = %request.host_id, tpm = %description, "EK certificate trusted, credential issued");
    let challenge = CredentialChallenge { enrollment_id, credential_blob, encrypted_secret, certify_nonce };
    Ok((pending, challenge))
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
            return Ok(HostRecord {
                host_id: pending.host_id,
                ek_fingerprint: pending.ek_fingerprint,
                ak_public: pending.ak_public,
                binding_public: pending.binding_public,
                reference_state: state.name.clone(),
                pcr_selection: state.selection.clone(),
                tpm_description: ek_description(&pending.ek_certificate).unwrap_or_default(),
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

// ---- quotes and key release ----------------------------------------------------------------

/// Verifies a quote of `host` over `expected_nonce` against the host's reference state.
pub fn verify_quote(
    host: &HostRecord,
    policy: &AttestationPolicy,
    evidence: &QuoteEvidence,
    expected_nonce: &[u8],
) -> Result<()> {
    let ak = ak_verifying_key(&host.ak_public)
        .map_err(|e| Error::QuoteInvalid(format!("host {}: stored AK unusable: {e}", host.host_id)))?;
    verify_attest_signature(&ak, &evidence.attest, &evidence.signature)
        .map_err(|e| Error::QuoteInvalid(format!("host {}: {e}", host.host_id)))?;
    let attest = parse_attest(&evidence.attest, TPM_ST_ATTEST_QUOTE, "TPM2_Quote").map_err(Error::QuoteInvalid)?;
    let extra = attest.extra_data().value();
    if extra.len() != expected_nonce.len() || !bool::from(extra.ct_eq(expected_nonce)) {
        return Err(Error::ChallengeInvalid(format!(
            "host {}: the quote is over another nonce than the challenge issued",
            host.host_id
        )));
    }
    let info = match attest.attested() {
        AttestInfo::Quote { info } => info,
        _ => return Err(Error::QuoteInvalid("the quote attest holds no quote info".into())),
    };
    let state = policy.reference_states.iter().find(|s| s.name == host.reference_state).ok_or_else(|| {
        Error::PcrMismatch(format!(
            "host {} was enrolled in reference state '{}', which the attestation policy no longer allows",
            host.host_id, host.reference_state
        ))
    })?;

    let mut quoted = Vec::new();
    for selection in info.pcr_selection().get_selections() {
        if selection.hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(Error::PcrMismatch(format!(
                "the quote covers the {:?} bank; reference state '{}' is sha256",
                selection.hashing_algorithm(),
                state.name
            )));
        }
        quoted.extend(selection.selected().into_iter().map(|slot| u32::from(slot).trailing_zeros() as u8));
    }
    quoted.sort_unstable();
    if let Some(index) = quoted.iter().find(|i| RESETTABLE_PCRS.contains(i)) {
        return Err(Error::PcrResettable(format!(
            "host {}: the quote covers PCR {index}, which locality 0 can reset",
            host.host_id
        )));
    }
    let expected = state.selection.normalized_indices();
    if quoted != expected {
        return Err(Error::PcrMismatch(format!(
            "the quote covers PCRs {quoted:?}, reference state '{}' covers PCRs {expected:?}",
            state.name
        )));
    }

    let reference_digest = pcr_composite_digest(&state.selection, &state.pcr_values)
        .map_err(|e| Error::Config(format!("reference state '{}': {e}", state.name)))?;
    let quoted_digest = info.pcr_digest().value();
    if bool::from(quoted_digest.ct_eq(&reference_digest)) {
        return Ok(());
    }
    Err(Error::PcrMismatch(describe_pcr_difference(state, evidence, quoted_digest)))
}

/// Names the PCRs that differ, using the SC's PCR values if they hash to the signed digest.
fn describe_pcr_difference(state: &ReferenceState, evidence: &QuoteEvidence, quoted_digest: &[u8]) -> String {
    let reported: Vec<(u8, Vec<u8>)> = evidence.pcr_values.iter().map(|v| (v.index, v.digest.clone())).collect();
    if let Ok(digest) = pcr_composite_digest(&state.selection, &reported) {
        if digest == quoted_digest {
            let differing: Vec<String> = state
                .pcr_values
                .iter()
                .filter(|(index, value)| reported.iter().any(|(i, v)| i == index && v != value))
                .map(|(index, _)| index.to_string())
                .collect();
            if !differing.is_empty() {
                let noun = if differing.len() == 1 { "PCR" } else { "PCRs" };
                return format!("{noun} {} differs from reference state '{}'", differing.join(", "), state.name);
            }
        }
    }
    format!("the quoted PCR digest differs from reference state '{}'", state.name)
}

/// Encrypts `key` to the host's binding key: RSA-OAEP, SHA-256 and MGF1-SHA-256, label
/// [`BINDING_OAEP_LABEL`]. Only that TPM, with the host's PCRs in the enrolled state, can
/// decrypt it.
pub fn seal_key_to_host(host: &HostRecord, key: &SecretBytes) -> Result<Vec<u8>> {
    let public = Public::unmarshall(&host.binding_public)
        .map_err(|e| Error::BindingKeyInvalid(format!("host {}: stored binding key unparsable: {e}", host.host_id)))?;
    let rsa = rsa_public(&public).map_err(Error::BindingKeyInvalid)?;
    oaep_encrypt(&rsa, key.expose(), BINDING_OAEP_LABEL)
        .map_err(|e| Error::BindingKeyInvalid(format!("host {}: sealing to the binding key failed: {e}", host.host_id)))
}

/// A reference state from PCR values an operator read on a known-good host
/// (`HostTpm::read_pcrs`). Every selected PCR needs a 32-byte value.
pub fn reference_state_from_values(
    name: &str,
    selection: &PcrSelection,
    values: &[(u8, Vec<u8>)],
) -> Result<ReferenceState> {
    check_selection(selection).map_err(Error::Config)?;
    check_not_resettable(selection, &format!("reference state '{name}'"))?;
    let indices = selection.normalized_indices();
    let mut pcr_values = Vec::with_capacity(indices.len());
    for index in indices {
        let value = values
            .iter()
            .find(|(i, _)| *i == index)
            .ok_or_else(|| Error::Config(format!("reference state '{name}': no value for PCR {index}")))?;
        if value.1.len() != 32 {
            return Err(Error::Config(format!(
                "reference state '{name}': PCR {index} value is {} bytes, sha256 needs 32",
                value.1.len()
            )));
        }
        pcr_values.push(value.clone());
    }
    Ok(ReferenceState {
        name: name.to_string(),
        selection: PcrSelection { bank: "sha256".into(), indices: selection.normalized_indices() },
        pcr_values,
    })
}

/// The PolicyPCR policy digest (from an empty policy) for `values` of `selection`:
/// SHA-256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || SHA-256(PCR values in order)).
pub fn policy_pcr_digest(selection: &PcrSelection, values: &[(u8, Vec<u8>)]) -> std::result::Result<Vec<u8>, String> {
    let composite = pcr_composite_digest(selection, values)?;
    let mut hasher = Sha256::new();
    hasher.update([0u8; 32]);
    hasher.update(TPM_CC_POLICY_PCR);
    hasher.update(marshal_pcr_selection(selection)?);
    hasher.update(&composite);
    Ok(hasher.finalize().to_vec())
}

// ---- EK certificate --------------------------------------------------------------------------

/// Verifies the EK certificate chains to a trusted root, and handles the TCG-specific
/// extensions deliberately: the critical subjectAltName must be a directoryName naming the
/// TPM (manufacturer, model, version), keyUsage must allow keyEncipherment, an
/// extendedKeyUsage (if present) must be tcg-kp-EKCertificate, and any other critical
/// extension is refused. Returns a description of the TPM.
pub fn verify_ek_certificate(policy: &AttestationPolicy, certificate_der: &[u8]) -> Result<String> {
    let certificate = X509::from_der(certificate_der)
        .map_err(|e| Error::EkUntrusted(format!("the EK certificate is not DER X.509: {e}")))?;
    if policy.trusted_ek_roots.is_empty() {
        return Err(Error::EkUntrusted("the attestation policy trusts no EK CA (trusted_ek_roots is empty)".into()));
    }
    let mut store = X509StoreBuilder::new().map_err(|e| Error::Config(format!("X509 store: {e}")))?;
    for (i, root) in policy.trusted_ek_roots.iter().enumerate() {
        let root =
            X509::from_der(root).map_err(|e| Error::Config(format!("trusted_ek_roots[{i}] is not DER X.509: {e}")))?;
        store.add_cert(root).map_err(|e| Error::Config(format!("trusted_ek_roots[{i}]: {e}")))?;
    }
    let store = store.build();
    let mut chain = Stack::new().map_err(|e| Error::Config(format!("X509 stack: {e}")))?;
    for (i, der) in policy.ek_intermediates.iter().enumerate() {
        let cert =
            X509::from_der(der).map_err(|e| Error::Config(format!("ek_intermediates[{i}] is not DER X.509: {e}")))?;
        chain.push(cert).map_err(|e| Error::Config(format!("ek_intermediates[{i}]: {e}")))?;
    }
    let mut context = X509StoreContext::new().map_err(|e| Error::Config(format!("X509 store context: {e}")))?;
    let outcome = context
        .init(&store, &certificate, &chain, |c| {
            let ok = c.verify_cert()?;
            let verified: Vec<X509> =
                c.chain().map(|chain| chain.iter().map(|cert| cert.to_owned()).collect()).unwrap_or_default();
            Ok((ok, c.error(), verified))
        })
        .map_err(|e| Error::EkUntrusted(format!("verifying the EK certificate chain: {e}")))?;
    let issuer = name_text(certificate.issuer_name());
    if !outcome.0 {
        return Err(Error::EkUntrusted(format!(
            "the EK certificate issued by '{issuer}' does not chain to a trusted EK CA: {}",
            outcome.1.error_string()
        )));
    }
    check_ek_revocation(policy, &outcome.2)?;
    check_ek_extensions(certificate_der)
}

/// Checks each certificate of the verified chain (EK first, root last) against the
/// configured CRL of its issuer, if there is one. A list that does not verify with the
/// issuer's key or is past its nextUpdate fails closed.
fn check_ek_revocation(policy: &AttestationPolicy, chain: &[X509]) -> Result<()> {
    if policy.ek_crls.is_empty() {
        return Ok(());
    }
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|e| Error::Config(format!("clock: {e}")))?;
    for pair in chain.windows(2) {
        let (cert, issuer) = (&pair[0], &pair[1]);
        let issuer_der = issuer.subject_name().to_der().map_err(|e| Error::Config(format!("EK CA name: {e}")))?;
        for (i, der) in policy.ek_crls.iter().enumerate() {
            let crl = X509Crl::from_der(der)
                .map_err(|e| Error::Config(format!("ek_crls[{i}] is not a DER X.509 CRL: {e}")))?;
            if crl.issuer_name().to_der().ok().as_deref() != Some(issuer_der.as_slice()) {
                continue;
            }
            let issuer_name = name_text(issuer.subject_name());
            let key = issuer.public_key().map_err(|e| Error::Config(format!("EK CA '{issuer_name}' key: {e}")))?;
            if !crl.verify(&key).unwrap_or(false) {
                return Err(Error::EkUntrusted(format!(
                    "ek_crls[{i}] names issuer '{issuer_name}' but is not signed by its key; refusing rather than skipping the revocation check"
                )));
            }
            if crl.next_update().is_none_or(|next| *next < now) {
                return Err(Error::EkUntrusted(format!(
                    "the revocation list of EK CA '{issuer_name}' (ek_crls[{i}]) is past its nextUpdate; refusing until a current list is configured"
                )));
            }
            if !matches!(crl.get_by_cert(cert), CrlStatus::NotRevoked) {
                return Err(Error::EkUntrusted(format!(
                    "the certificate '{}' issued by '{issuer_name}' is revoked (ek_crls[{i}])",
                    name_text(cert.subject_name())
                )));
            }
        }
    }
    Ok(())
}

fn check_ek_extensions(certificate_der: &[u8]) -> Result<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(certificate_der)
        .map_err(|e| Error::EkUntrusted(format!("the EK certificate cannot be parsed: {e}")))?;
    let mut description = None;
    let mut key_encipherment = None;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let mut fields = Vec::new();
                for name in &san.general_names {
                    if let GeneralName::DirectoryName(dn) = name {
                        for attr in dn.iter_attributes() {
                            let what = match attr.attr_type().to_id_string().as_str() {
                                OID_TCG_TPM_MANUFACTURER => "manufacturer",
                                OID_TCG_TPM_MODEL => "model",
                                OID_TCG_TPM_VERSION => "version",
                                _ => continue,
                            };
                            let value = attr
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|_| hex::encode(attr.attr_value().data));
                            fields.push(format!("{what} {value}"));
                        }
                    }
                }
                if fields.is_empty() {
                    return Err(Error::EkUntrusted(
                        "the EK certificate's subjectAltName names no TPM (no TCG manufacturer/model/version attributes)".into(),
                    ));
                }
                description = Some(fields.join(", "));
            }
            ParsedExtension::KeyUsage(usage) => key_encipherment = Some(usage.key_encipherment()),
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let tcg = eku.other.iter().any(|o| o.to_id_string() == OID_TCG_KP_EK_CERTIFICATE);
                if !tcg {
                    return Err(Error::EkUntrusted(format!(
                        "the EK certificate's extendedKeyUsage lacks tcg-kp-EKCertificate ({OID_TCG_KP_EK_CERTIFICATE})"
                    )));
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(Error::EkUntrusted("the EK certificate is a CA certificate".into()));
            }
            ParsedExtension::BasicConstraints(_)
            | ParsedExtension::AuthorityKeyIdentifier(_)
            | ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::CertificatePolicies(_)
            | ParsedExtension::AuthorityInfoAccess(_)
            | ParsedExtension::CRLDistributionPoints(_) => {}
            _ if ext.critical => {
                return Err(Error::EkUntrusted(format!("the EK certificate has an unknown critical extension {oid}")));
            }
            // Non-critical extras (e.g. subjectDirectoryAttributes with the TPM spec) are informational.
            _ => {}
        }
    }
    // TCG EK Credential Profile 2.x, 3.2.16: keyUsage must be present; an RSA EK decrypts
    // (MakeCredential seeds), so keyEncipherment must be set.
    match key_encipherment {
        None => {
            return Err(Error::EkUntrusted(
                "the EK certificate has no keyUsage extension (the TCG EK profile requires one)".into(),
            ))
        }
        Some(false) => {
            return Err(Error::EkUntrusted("the EK certificate's keyUsage does not allow keyEncipherment".into()))
        }
        Some(true) => {}
    }
    description.ok_or_else(|| Error::EkUntrusted("the EK certificate has no subjectAltName naming the TPM".into()))
}

fn ek_description(certificate_der: &[u8]) -> Option<String> {
    check_ek_extensions(certificate_der).ok()
}

fn name_text(name: &openssl::x509::X509NameRef) -> String {
    name.entries().map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned()).collect::<Vec<_>>().join(", ")
}

/// The EK public must be the TCG default RSA-2048 EK (its KDF parameters are what
/// MakeCredential relies on) and carry the certificate's key.
fn check_ek_public(certificate_der: &[u8], ek_public: &[u8]) -> Result<Rsa<PublicKeyKind>> {
    let public = Public::unmarshall(ek_public)
        .map_err(|e| Error::EkMismatch(format!("the EK public is not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Rsa { object_attributes: attrs, name_hashing_algorithm, auth_policy, parameters, .. } = &public else {
        return Err(Error::EkMismatch("the EK public is not an RSA key (only the RSA-2048 EK is supported)".into()));
    };
    if *name_hashing_algorithm != HashingAlgorithm::Sha256
        || !attrs.fixed_tpm()
        || !attrs.fixed_parent()
        || !attrs.restricted()
        || !attrs.decrypt()
        || attrs.sign_encrypt()
        || parameters.key_bits() != RsaKeyBits::Rsa2048
        || parameters.symmetric_definition_object() != SymmetricDefinitionObject::AES_128_CFB
        || auth_policy.value() != EK_POLICY_A_SHA256
    {
        return Err(Error::EkMismatch(
            "the EK public is not the TCG default RSA-2048 EK template (sha256, fixedTPM, restricted decrypt, AES-128-CFB, PolicySecret(endorsement))".into(),
        ));
    }
    let ek_rsa = rsa_public(&public).map_err(Error::EkMismatch)?;
    let cert = X509::from_der(certificate_der).map_err(|e| Error::EkMismatch(format!("EK certificate: {e}")))?;
    let cert_rsa = cert
        .public_key()
        .and_then(|k| k.rsa())
        .map_err(|_| Error::EkMismatch("the EK certificate does not hold an RSA key".into()))?;
    if cert_rsa.n() != ek_rsa.n() || cert_rsa.e() != ek_rsa.e() {
        return Err(Error::EkMismatch("the EK public's modulus differs from the key in the EK certificate".into()));
    }
    Ok(ek_rsa)
}

// ---- AK and binding key ----------------------------------------------------------------------

fn check_ak_public(ak_public: &[u8]) -> Result<()> {
    let public = Public::unmarshall(ak_public)
        .map_err(|e| Error::BadRequest(format!("the AK public is not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Ecc { object_attributes: attrs, name_hashing_algorithm, parameters, .. } = &public else {
        return Err(Error::BadRequest("the AK is not an ECC key (expected ECC P-256 ECDSA-SHA256)".into()));
    };
    if *name_hashing_algorithm != HashingAlgorithm::Sha256
        || !attrs.fixed_tpm()
        || !attrs.fixed_parent()
        || !attrs.sensitive_data_origin()
        || !attrs.restricted()
        || !attrs.sign_encrypt()
        || attrs.decrypt()
        || parameters.ecc_curve() != EccCurve::NistP256
        || !matches!(parameters.ecc_scheme(), EccScheme::EcDsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256)
    {
        return Err(Error::BadRequest(
            "the AK is not a TPM-generated, fixedTPM, restricted ECC P-256 ECDSA-SHA256 signing key".into(),
        ));
    }
    Ok(())
}

/// Checks the binding key's attributes and returns its authPolicy.
fn check_binding_public(binding_public: &[u8]) -> Result<Vec<u8>> {
    let public = Public::unmarshall(binding_public)
        .map_err(|e| Error::BindingKeyInvalid(format!("not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Rsa { object_attributes: a, name_hashing_algorithm, auth_policy, parameters, .. } = &public else {
        return Err(Error::BindingKeyInvalid("it is not an RSA key".into()));
    };
    let mut problems = Vec::new();
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        problems.push("nameAlg is not sha256");
    }
    if !a.fixed_tpm() {
        problems.push("fixedTPM is clear");
    }
    if !a.fixed_parent() {
        problems.push("fixedParent is clear");
    }
    if !a.sensitive_data_origin() {
        problems.push("sensitiveDataOrigin is clear (the key was imported)");
    }
    if a.user_with_auth() {
        problems.push("userWithAuth is set (its authValue could bypass the PCR policy)");
    }
    if !a.decrypt() {
        problems.push("decrypt is clear");
    }
    if a.sign_encrypt() {
        problems.push("sign is set");
    }
    if a.restricted() {
        problems.push("restricted is set");
    }
    if parameters.key_bits() != RsaKeyBits::Rsa2048 {
        problems.push("it is not RSA-2048");
    }
    match parameters.rsa_scheme() {
        RsaScheme::Null => {}
        RsaScheme::Oaep(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        other if other.algorithm() == RsaSchemeAlgorithm::Oaep => problems.push("its OAEP hash is not sha256"),
        _ => problems.push("its scheme is not OAEP"),
    }
    if auth_policy.value().len() != 32 {
        problems.push("its authPolicy is not a sha256 policy digest");
    }
    if !problems.is_empty() {
        return Err(Error::BindingKeyInvalid(problems.join("; ")));
    }
    Ok(auth_policy.value().to_vec())
}

/// Name of an object: nameAlg || H_nameAlg(TPMT_PUBLIC). Only sha256 names are accepted
/// (checked where the publics are parsed).
fn object_name(public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_vec();
    name.extend_from_slice(&Sha256::digest(public));
    name
}

fn ak_verifying_key(ak_public: &[u8]) -> std::result::Result<EcKey<PublicKeyKind>, String> {
    let public = Public::unmarshall(ak_public).map_err(|e| format!("the AK public is unparsable: {e}"))?;
    let Public::Ecc { unique, .. } = &public else {
        return Err("the AK is not an ECC key".into());
    };
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(|e| e.to_string())?;
    let x = BigNum::from_slice(unique.x().value()).map_err(|e| e.to_string())?;
    let y = BigNum::from_slice(unique.y().value()).map_err(|e| e.to_string())?;
    EcKey::from_public_key_affine_coordinates(&group, &x, &y)
        .map_err(|e| format!("the AK's point is not on P-256: {e}"))
}

fn verify_attest_signature(
    ak: &EcKey<PublicKeyKind>,
    attest: &[u8],
    signature: &[u8],
) -> std::result::Result<(), String> {
    let signature =
        Signature::unmarshall(signature).map_err(|e| format!("the signature is not a TPMT_SIGNATURE: {e}"))?;
    let Signature::EcDsa(sig) = signature else {
        return Err("the signature is not ECDSA".into());
    };
    if sig.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err("the signature is not ECDSA-SHA256".into());
    }
    let r = BigNum::from_slice(sig.signature_r().value()).map_err(|e| e.to_string())?;
    let s = BigNum::from_slice(sig.signature_s().value()).map_err(|e| e.to_string())?;
    let sig = EcdsaSig::from_private_components(r, s).map_err(|e| e.to_string())?;
    let digest = Sha256::digest(attest);
    match sig.verify(&digest, ak) {
        Ok(true) => Ok(()),
        _ => Err("the signature does not verify with the AK".into()),
    }
}

/// Checks magic and type on the signed bytes, then parses them.
fn parse_attest(bytes: &[u8], kind: [u8; 2], what: &str) -> std::result::Result<Attest, String> {
    if bytes.len() < 6 || bytes[0..4] != TPM_GENERATED {
        return Err(format!("the {what} attest does not start with TPM_GENERATED_VALUE: not made by a TPM"));
    }
    if bytes[4..6] != kind {
        return Err(format!("the attest is of type 0x{}, not a {what}", hex::encode(&bytes[4..6])));
    }
    Attest::unmarshall(bytes).map_err(|e| format!("the {what} attest is malformed: {e}"))
}

fn rsa_public(public: &Public) -> std::result::Result<Rsa<PublicKeyKind>, String> {
    let Public::Rsa { parameters, unique, .. } = public else {
        return Err("not an RSA key".into());
    };
    let n = BigNum::from_slice(unique.value()).map_err(|e| e.to_string())?;
    // An exponent of 0 in a TPMT_PUBLIC means the default, 65537.
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let e = BigNum::from_u32(exponent).map_err(|e| e.to_string())?;
    Rsa::from_public_components(n, e).map_err(|e| e.to_string())
}

fn oaep_encrypt(rsa: &Rsa<PublicKeyKind>, plaintext: &[u8], label: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let pkey = PKey::from_rsa(rsa.clone()).map_err(|e| e.to_string())?;
    let mut encrypter = Encrypter::new(&pkey).map_err(|e| e.to_string())?;
    encrypter.set_rsa_padding(Padding::PKCS1_OAEP).map_err(|e| e.to_string())?;
    encrypter.set_rsa_oaep_md(MessageDigest::sha256()).map_err(|e| e.to_string())?;
    encrypter.set_rsa_mgf1_md(MessageDigest::sha256()).map_err(|e| e.to_string())?;
    encrypter.set_rsa_oaep_label(label).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; encrypter.encrypt_len(plaintext).map_err(|e| e.to_string())?];
    let n = encrypter.encrypt(plaintext, &mut out).map_err(|e| e.to_string())?;
    out.truncate(n);
    Ok(out)
}

// ---- MakeCredential (TPM 2.0 Part 1, 24 "Credential Protection") ---------------------------

/// Returns (TPM2B_ID_OBJECT contents, TPM2B_ENCRYPTED_SECRET contents) for `credential`
/// and the AK name, decryptable only by TPM2_ActivateCredential with this EK.
fn make_credential(ek: &Rsa<PublicKeyKind>, credential: &[u8], ak_name: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let fail = |e: String| Error::EkMismatch(format!("MakeCredential to the EK failed: {e}"));
    // The seed is as long as the EK's nameAlg digest; it goes to the EK with OAEP and the
    // label "IDENTITY" (with its terminating zero).
    let mut seed = SecretBytes::zeroed(32);
    random(seed.expose_mut())?;
    let encrypted_secret = oaep_encrypt(ek, seed.expose(), b"IDENTITY\0").map_err(fail)?;

    let sym_key = kdfa_sha256(seed.expose(), b"STORAGE", ak_name, &[], 128);
    let hmac_key = kdfa_sha256(seed.expose(), b"INTEGRITY", &[], &[], 256);

    // encIdentity = AES-128-CFB(symKey, IV = 0, TPM2B_DIGEST(credential)).
    let mut plain = SecretBytes::zeroed(2 + credential.len());
    plain.expose_mut()[..2].copy_from_slice(&(credential.len() as u16).to_be_bytes());
    plain.expose_mut()[2..].copy_from_slice(credential);
    let enc_identity = encrypt(Cipher::aes_128_cfb128(), sym_key.expose(), Some(&[0u8; 16]), plain.expose())
        .map_err(|e| fail(e.to_string()))?;

    // outerHMAC = HMAC(HMACkey, encIdentity || AK name).
    let hkey = PKey::hmac(hmac_key.expose()).map_err(|e| fail(e.to_string()))?;
    let mut signer = Signer::new(MessageDigest::sha256(), &hkey).map_err(|e| fail(e.to_string()))?;
    signer.update(&enc_identity).map_err(|e| fail(e.to_string()))?;
    signer.update(ak_name).map_err(|e| fail(e.to_string()))?;
    let integrity = signer.sign_to_vec().map_err(|e| fail(e.to_string()))?;

    let mut blob = Vec::with_capacity(2 + integrity.len() + enc_identity.len());
    blob.extend_from_slice(&(integrity.len() as u16).to_be_bytes());
    blob.extend_from_slice(&integrity);
    blob.extend_from_slice(&enc_identity);
    Ok((blob, encrypted_secret))
}

/// KDFa (TPM 2.0 Part 1, 11.4.10.2) with HMAC-SHA256: counter || label || 0 || contextU ||
/// contextV || bits, iterated until `bits` are produced.
fn kdfa_sha256(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> SecretBytes {
    use hmac::{Hmac, Mac};
    let bytes = bits.div_ceil(8) as usize;
    let mut out = SecretBytes::zeroed(bytes);
    let mut counter = 1u32;
    let mut filled = 0;
    while filled < bytes {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { unreachable!("HMAC accepts keys of any length") };
        for part in [&counter.to_be_bytes()[..], label, &[0], context_u, context_v, &bits.to_be_bytes()] {
            mac.update(part);
        }
        let block = mac.finalize().into_bytes();
        let take = (bytes - filled).min(block.len());
        out.expose_mut()[filled..filled + take].copy_from_slice(&block[..take]);
        filled += take;
        counter += 1;
    }
    out
}

// ---- PCR helpers -------------------------------------------------------------------------------

fn check_selection(selection: &PcrSelection) -> std::result::Result<(), String> {
    if selection.bank != "sha256" {
        return Err(format!("PCR bank '{}' is not supported (only sha256)", selection.bank));
    }
    if selection.indices.is_empty() {
        return Err("the PCR selection is empty".into());
    }
    if let Some(bad) = selection.indices.iter().find(|i| **i > 23) {
        return Err(format!("PCR {bad} does not exist (0-23)"));
    }
    Ok(())
}

/// TPML_PCR_SELECTION with one sha256 selection of 3 octets, as tss-esapi sends it.
fn marshal_pcr_selection(selection: &PcrSelection) -> std::result::Result<Vec<u8>, String> {
    check_selection(selection)?;
    let mut bitmap = [0u8; 3];
    for index in selection.normalized_indices() {
        bitmap[index as usize / 8] |= 1 << (index % 8);
    }
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256);
    out.push(3);
    out.extend_from_slice(&bitmap);
    Ok(out)
}

/// SHA-256 of the selected PCR values concatenated in ascending PCR order (the quote's
/// pcrDigest and PolicyPCR's pcrDigest).
fn pcr_composite_digest(selection: &PcrSelection, values: &[(u8, Vec<u8>)]) -> std::result::Result<Vec<u8>, String> {
    check_selection(selection)?;
    let mut hasher = Sha256::new();
    for index in selection.normalized_indices() {
        let (_, value) = values.iter().find(|(i, _)| *i == index).ok_or_else(|| format!("no value for PCR {index}"))?;
        hasher.update(value);
    }
    Ok(hasher.finalize().to_vec())
}

fn random(buf: &mut [u8]) -> Result<()> {
    openssl::rand::rand_bytes(buf).map_err(|e| Error::Config(format!("the random number generator failed: {e}")))
}

// ---- fuzzing entry points ------------------------------------------------------------------------

/// Entry points for the fuzz targets in `fuzz/` (docs/SECURITY-TESTING.md): each runs, on
/// untrusted bytes, the parsers the TTP applies to a host's enrollment and quote evidence,
/// which otherwise sit behind a signature check the fuzzer cannot pass. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// TPMS_ATTEST as a quote and as a certify, then the fields the TTP reads from it.
    pub fn parse_attest(bytes: &[u8]) {
        for (kind, what) in [(TPM_ST_ATTEST_QUOTE, "TPM2_Quote"), (TPM_ST_ATTEST_CERTIFY, "TPM2_Certify")] {
            let Ok(attest) = super::parse_attest(bytes, kind, what) else { continue };
            let _ = attest.extra_data().value().len();
            match attest.attested() {
                AttestInfo::Quote { info } => {
                    for selection in info.pcr_selection().get_selections() {
                        let _ = selection.hashing_algorithm();
                        let _: Vec<u8> = selection
                            .selected()
                            .into_iter()
                            .map(|slot| u32::from(slot).trailing_zeros() as u8)
                            .collect();
                    }
                    let _ = info.pcr_digest().value().len();
                }
                AttestInfo::Certify { info } => {
                    let _ = info.name().value().len();
                }
                _ => {}
            }
        }
    }

    /// TPMT_PUBLIC as an EK, an AK and a binding key.
    pub fn parse_public(bytes: &[u8]) {
        let _ = check_ak_public(bytes);
        let _ = check_binding_public(bytes);
        let _ = ak_verifying_key(bytes);
        if let Ok(public) = Public::unmarshall(bytes) {
            let _ = rsa_public(&public);
        }
    }

    /// TPMT_SIGNATURE, checked against a fixed P-256 key.
    pub fn parse_signature(bytes: &[u8]) {
        static AK: std::sync::OnceLock<Option<EcKey<PublicKeyKind>>> = std::sync::OnceLock::new();
        let ak = AK.get_or_init(|| {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok()?;
            let private = EcKey::generate(&group).ok()?;
            EcKey::from_public_key(&group, private.public_key()).ok()
        });
        if let Some(ak) = ak {
            let _ = verify_attest_signature(ak, b"attest", bytes);
        }
    }

    /// The TCG extensions of an EK certificate (DER), as checked after its chain.
    pub fn check_ek_certificate_extensions(certificate_der: &[u8]) {
        let _ = check_ek_extensions(certificate_der);
    }
}

// ---- serde helpers -----------------------------------------------------------------------------

/// A list of certificates: serialized as base64 DER; deserialized from PEM text or base64 DER.
mod der_list {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(certs: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(certs.iter().map(|c| STANDARD.encode(c)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        texts
            .iter()
            .map(|text| {
                let body: String = if text.contains("-----BEGIN") {
                    text.lines().filter(|l| !l.starts_with("-----")).collect()
                } else {
                    text.chars().filter(|c| !c.is_whitespace()).collect()
                };
                STANDARD
                    .decode(body.trim())
                    .map_err(|e| serde::de::Error::custom(format!("certificate is neither PEM nor base64 DER: {e}")))
            })
            .collect()
    }
}

/// PCR values as `[[index, "hex"], ...]`.
mod pcr_values_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[(u8, Vec<u8>)], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(|(i, v)| (*i, hex::encode(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<(u8, Vec<u8>)>, D::Error> {
        let pairs = Vec::<(u8, String)>::deserialize(deserializer)?;
        pairs
            .into_iter()
            .map(|(i, h)| {
                hex::decode(&h)
                    .map(|v| (i, v))
                    .map_err(|e| serde::de::Error::custom(format!("PCR {i} value is not hex: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_pcr_of_zero_pcrs_is_stable() {
        let selection = PcrSelection { bank: "sha256".into(), indices: vec![11] };
        let values = vec![(11u8, vec![0u8; 32])];
        let digest = policy_pcr_digest(&selection, &values).unwrap();
        assert_eq!(digest.len(), 32);
        assert!(policy_pcr_digest(&selection, &[]).is_err());
    }

    #[test]
    fn policy_round_trips_through_toml_shapes() {
        let state = ReferenceState {
            name: "compute-v1".into(),
            selection: PcrSelection { bank: "sha256".into(), indices: vec![0, 11] },
            pcr_values: vec![(0, vec![1; 32]), (11, vec![0; 32])],
        };
        let policy = AttestationPolicy {
            trusted_ek_roots: vec![vec![1, 2, 3]],
            ek_intermediates: vec![],
            ek_crls: vec![],
            reference_states: vec![state],
        };
        let json = serde_json::to_string(&policy).unwrap();
        let back: AttestationPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back.reference_states, policy.reference_states);
        assert_eq!(back.trusted_ek_roots, policy.trusted_ek_roots);
    }

    /// Issue 21: a resettable PCR (16 debug, 23 application) is refused in a reference state,
    /// in its pinned values and in a state built from read values, with `pcr_resettable`.
    #[test]
    fn resettable_pcrs_are_refused_in_policies() {
        for pcr in RESETTABLE_PCRS {
            let selection = PcrSelection { bank: "sha256".into(), indices: vec![0, pcr] };
            let values = vec![(0u8, vec![0u8; 32]), (pcr, vec![0u8; 32])];
            let err = reference_state_from_values("debug", &selection, &values).unwrap_err();
            assert_eq!(err.code(), "pcr_resettable", "{err}");
            let state = ReferenceState { name: "debug".into(), selection, pcr_values: values };
            let policy = AttestationPolicy { reference_states: vec![state], ..Default::default() };
            let err = policy.validate().unwrap_err();
            assert_eq!(err.code(), "pcr_resettable", "{err}");
            assert!(err.to_string().contains(&format!("PCR {pcr}")), "{err}");
        }
        assert!(PcrSelection::default_host().resettable_indices().is_empty());
        let good = reference_state_from_values(
            "ok",
            &PcrSelection::default_host(),
            &(0..24).map(|i| (i, vec![0u8; 32])).collect::<Vec<_>>(),
        )
        .unwrap();
        AttestationPolicy { reference_states: vec![good], ..Default::default() }.validate().unwrap();
    }

    /// Issue 21: the TCG EK profile requires keyUsage; a certificate without it is refused
    /// (as is one whose keyUsage lacks keyEncipherment).
    #[test]
    fn ek_certificate_without_key_usage_is_refused() {
        use openssl::x509::extension::KeyUsage;
        let make = |key_usage: Option<KeyUsage>| {
            let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
            let mut b = openssl::x509::X509Builder::new().unwrap();
            b.set_version(2).unwrap();
            b.set_pubkey(&key).unwrap();
            b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
            b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
            // keyUsage is checked before the subjectAltName, so none is needed here.
            if let Some(mut ku) = key_usage {
                b.append_extension(ku.critical().build().unwrap()).unwrap();
            }
            b.sign(&key, MessageDigest::sha256()).unwrap();
            b.build().to_der().unwrap()
        };
        let err = check_ek_extensions(&make(None)).unwrap_err();
        assert!(err.to_string().contains("no keyUsage"), "{err}");
        let mut signing_only = KeyUsage::new();
        signing_only.digital_signature();
        let err = check_ek_extensions(&make(Some(signing_only))).unwrap_err();
        assert!(err.to_string().contains("keyEncipherment"), "{err}");
    }
}
