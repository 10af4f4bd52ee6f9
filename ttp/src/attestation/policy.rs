//! What the operator trusts (`attestation.toml`, README.md "Operator's guide", 3): the TPM
//! vendor CAs whose EK certificates count and the named reference states (PCR values) a host
//! may enroll in and must still be in at every key release.

use openssl::x509::{X509Crl, X509};
use protocol::attest::{PcrSelection, RESETTABLE_PCRS};
use serde::{Deserialize, Serialize};

use super::pcr::{check_not_resettable, check_selection};
use crate::error::{Error, Result};

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

/// A named set of PCR values a host may be in (e.g. "compute-v1").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceState {
    /// The operator's name for the state (e.g. "compute-v1"), recorded in [`HostRecord`](super::HostRecord) and
    /// named in `pcr_mismatch` refusals.
    pub name: String,
    /// The PCRs the state covers; a host's binding key policy and its quotes must use exactly
    /// this selection.
    pub selection: PcrSelection,
    /// (PCR index, SHA-256 value); in TOML `pcr_values = [[0, "hex"], [11, "hex"]]`.
    #[serde(with = "pcr_values_hex")]
    pub pcr_values: Vec<(u8, Vec<u8>)>,
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
    use crate::attestation::AttestationPolicy;
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

    /// docs/TPM.md "PCR selection": a resettable PCR (16 debug, 23 application) is refused in a reference state,
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
}
