//! Wire types of host attestation (enrollment of a compute host's TPM and PCR quotes).
//!
//! TPM structures travel as the TPM marshals them (big-endian TPM 2.0 Part 2 encoding), so
//! the TTP can hash and verify exactly the bytes the TPM signed. See docs/TPM.md for every
//! byte format.

use serde::{Deserialize, Serialize};

/// OAEP label (SHA-256, MGF1-SHA-256) of a domain key sealed to a host's binding key. The TPM
/// requires a label to end with a zero byte; TTP and SC both use exactly these bytes.
pub const BINDING_OAEP_LABEL: &[u8] = b"skydd/v1/domain-key\0";

/// Which PCRs of which bank a policy or quote covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrSelection {
    /// The PCR bank: only "sha256" is supported.
    pub bank: String,
    /// PCR indices (0..=23), in ascending order without duplicates.
    pub indices: Vec<u8>,
}

/// PCRs that software at locality 0 can reset (TPM2_PCR_Reset without authorisation): 16
/// (debug) and 23 (application support). A state in them proves nothing, so no selection,
/// policy or reference state may contain them (docs/TPM.md "PCR selection").
pub const RESETTABLE_PCRS: [u8; 2] = [16, 23];

/// The PCR a host's start-up extends with the secure component's binary and configuration
/// before the secure component runs (docs/TPM.md "Measured state"). Not resettable at
/// locality 0; only a TPM reset (a reboot) clears it.
pub const MEASURED_STATE_PCR: u8 = 11;

/// The PCR a host's start-up extends with its location ([`location_measurement`]) before the
/// secure component runs, when the operator gives the host a region (docs/TPM.md "Location").
/// A reference state that selects it pins the region: the TTP trusts a host's claimed region
/// only if the host's reference state holds exactly that measurement here.
pub const LOCATION_PCR: u8 = 12;

/// What a host's start-up extends into [`LOCATION_PCR`] for `region`:
/// `SHA-256("skydd/v1/location\0" || region)`.
pub fn location_measurement(region: &str) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"skydd/v1/location\0");
    hasher.update(region.as_bytes());
    hasher.finalize().into()
}

/// TPM2_PCR_Extend in the sha256 bank: `SHA-256(old || measurement)`.
pub fn pcr_extend(old: &[u8; 32], measurement: &[u8; 32]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(old);
    hasher.update(measurement);
    hasher.finalize().into()
}

/// The value of a PCR that starts at zero (after a TPM reset) and is extended with
/// `measurements` in order.
pub fn pcr_after(measurements: &[[u8; 32]]) -> [u8; 32] {
    measurements.iter().fold([0u8; 32], |pcr, m| pcr_extend(&pcr, m))
}

impl PcrSelection {
    /// sha256 PCRs 0-7 (firmware, option ROMs, boot loader, secure boot state) and
    /// [`MEASURED_STATE_PCR`] (the secure component's binary and configuration). No
    /// resettable PCR ([`RESETTABLE_PCRS`]).
    pub fn default_host() -> Self {
        PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, MEASURED_STATE_PCR] }
    }

    /// The selected PCRs that locality 0 can reset ([`RESETTABLE_PCRS`]); empty for a
    /// selection that may be used.
    pub fn resettable_indices(&self) -> Vec<u8> {
        self.normalized_indices().into_iter().filter(|i| RESETTABLE_PCRS.contains(i)).collect()
    }

    /// The indices sorted and deduplicated (the order the TPM digests PCRs in).
    pub fn normalized_indices(&self) -> Vec<u8> {
        let mut indices = self.indices.clone();
        indices.sort_unstable();
        indices.dedup();
        indices
    }
}

impl Default for PcrSelection {
    fn default() -> Self {
        Self::default_host()
    }
}

/// One PCR value as read from the TPM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrValue {
    /// PCR index (0..=23) within the selection's bank.
    pub index: u8,
    /// The PCR's SHA-256 value (32 bytes), base64 in JSON.
    #[serde(with = "crate::b64")]
    pub digest: Vec<u8>,
}

/// Step 1 of enrollment, SC -> TTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRequest {
    /// The compute host's id: must equal the CN of the secure component's TLS certificate, or the
    /// TTP refuses with `forbidden` (a host may enroll only itself).
    pub host_id: String,
    /// The RSA-2048 EK certificate (DER) read from NV index 0x01c00002.
    #[serde(with = "crate::b64")]
    pub ek_certificate: Vec<u8>,
    /// The EK public area: marshalled TPMT_PUBLIC (no TPM2B size prefix).
    #[serde(with = "crate::b64")]
    pub ek_public: Vec<u8>,
    /// The attestation key: marshalled TPMT_PUBLIC (ECC P-256, ECDSA-SHA256, restricted sign).
    #[serde(with = "crate::b64")]
    pub ak_public: Vec<u8>,
    /// The binding key: marshalled TPMT_PUBLIC (RSA-2048 decrypt, PolicyPCR authPolicy).
    #[serde(with = "crate::b64")]
    pub binding_public: Vec<u8>,
    /// The PCRs the binding key's policy covers.
    pub pcr_selection: PcrSelection,
    /// The region (jurisdiction) the operator configured for this host, e.g. "eu-north". The
    /// TTP records it only if the host's reference state pins [`LOCATION_PCR`] to its
    /// [`location_measurement`] (`host_region_unattested` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Step 2 of enrollment, TTP -> SC: a TPM2_MakeCredential result for (EK, AK name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialChallenge {
    /// Random id (32 hex characters) of this pending enrollment; the SC echoes it in its
    /// [`EnrollmentProof`]. The TTP forgets it after 120 s or its first use.
    pub enrollment_id: String,
    /// TPM2B_ID_OBJECT contents: integrityHMAC (TPM2B_DIGEST) || encIdentity (no outer size).
    #[serde(with = "crate::b64")]
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the seed RSA-OAEP-encrypted to the EK (no outer size).
    #[serde(with = "crate::b64")]
    pub encrypted_secret: Vec<u8>,
    /// Fresh random bytes (32) the SC must use as the qualifying data of its TPM2_Certify
    /// of the binding key, so an old certification cannot be replayed.
    #[serde(with = "crate::b64")]
    pub certify_nonce: Vec<u8>,
}

/// Step 3 of enrollment, SC -> TTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentProof {
    /// The `enrollment_id` of the [`CredentialChallenge`] this proof answers; unknown, expired or
    /// reused ids are refused with `challenge_invalid`.
    pub enrollment_id: String,
    /// The secret TPM2_ActivateCredential recovered (proves the AK sits beside the EK).
    #[serde(with = "crate::b64")]
    pub activated_secret: Vec<u8>,
    /// TPM2_Certify of the binding key by the AK: marshalled TPMS_ATTEST, exactly as signed.
    #[serde(with = "crate::b64")]
    pub certify_attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (ECDSA-SHA256 by the AK) over `certify_attest`.
    #[serde(with = "crate::b64")]
    pub certify_signature: Vec<u8>,
}

/// A PCR quote by the AK over a TTP challenge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteEvidence {
    /// Marshalled TPMS_ATTEST (type TPM_ST_ATTEST_QUOTE), exactly as signed.
    #[serde(with = "crate::b64")]
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (ECDSA-SHA256 by the AK) over `attest`.
    #[serde(with = "crate::b64")]
    pub signature: Vec<u8>,
    /// The quoted PCR values as read just before quoting. Not trusted by themselves: the TTP
    /// accepts them only if they hash to the signed pcrDigest, and then uses them to name
    /// the PCRs that differ from the reference state.
    #[serde(default)]
    pub pcr_values: Vec<PcrValue>,
}
