//! PCR selections and digests as the TPM computes them (docs/TPM.md "PCR selection" and
//! "PolicyPCR digest"): the composite digest a quote signs, the PolicyPCR digest a binding
//! key's policy must equal, and the refusal of PCRs locality 0 can reset.

use protocol::attest::PcrSelection;
use sha2::{Digest as _, Sha256};

use super::objects::TPM_ALG_SHA256;
use crate::error::{Error, Result};

/// TPM_CC_PolicyPCR, the command code PolicyPCR extends into a policy digest.
const TPM_CC_POLICY_PCR: [u8; 4] = [0x00, 0x00, 0x01, 0x7f];

/// Refuses a selection that names a PCR locality 0 can reset ([`RESETTABLE_PCRS`](protocol::attest::RESETTABLE_PCRS)): a value
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

pub(super) fn check_selection(selection: &PcrSelection) -> std::result::Result<(), String> {
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
pub(super) fn pcr_composite_digest(
    selection: &PcrSelection,
    values: &[(u8, Vec<u8>)],
) -> std::result::Result<Vec<u8>, String> {
    check_selection(selection)?;
    let mut hasher = Sha256::new();
    for index in selection.normalized_indices() {
        let (_, value) = values.iter().find(|(i, _)| *i == index).ok_or_else(|| format!("no value for PCR {index}"))?;
        hasher.update(value);
    }
    Ok(hasher.finalize().to_vec())
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
}
