//! The quote check of every key release (docs/TPM.md "Quotes and key release"): signed by
//! the host's AK, over the TTP's nonce, covering exactly the PCRs of the host's reference
//! state with the reference values.

use protocol::attest::{QuoteEvidence, RESETTABLE_PCRS};
use subtle::ConstantTimeEq;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::AttestInfo;

use super::objects::{ak_verifying_key, parse_attest, verify_attest_signature, TPM_ST_ATTEST_QUOTE};
use super::pcr::pcr_composite_digest;
use super::{AttestationPolicy, HostRecord, ReferenceState};
use crate::error::{Error, Result};

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
            "host {}: the quote is over another nonce than the challenge issued (or does not cover the launched image the request reports)",
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
