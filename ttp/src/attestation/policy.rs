//! What the operator trusts (`attestation.toml`, README.md "Operator's guide", 3): the TPM
//! vendor CAs whose EK certificates count (each for every host, or only for named hosts: a
//! partner cloud's vendor root, docs/PKI.md "A partner cloud's host") and the named
//! reference states (PCR values) a host may enroll in and must still be in at every key
//! release.

use openssl::x509::{X509Crl, X509};
use protocol::attest::{PcrSelection, RESETTABLE_PCRS};
use serde::{Deserialize, Serialize};

use super::pcr::{check_not_resettable, check_selection};
use crate::error::{Error, Result};

/// What the operator trusts: TPM vendor CAs and the measured states a host may be in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttestationPolicy {
    /// Trust anchors for EK certificates. In TOML each entry is PEM text or base64 DER (a
    /// root for every host), or `{ certificate = "PEM or base64", hosts = ["b-compute-07"] }`
    /// (a root only for those host ids: another host whose EK chains only to it is refused
    /// with `ek_root_not_for_host`). Intermediate CAs may be listed here too.
    pub trusted_ek_roots: Vec<EkRoot>,
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
        for (i, root) in self.trusted_ek_roots.iter().enumerate() {
            if let Some(hosts) = &root.hosts {
                if hosts.is_empty() {
                    return Err(Error::Config(format!(
                        "trusted_ek_roots[{i}] has an empty `hosts` list: it would vouch for no host; list the host ids or remove the entry"
                    )));
                }
                for host in hosts {
                    protocol::domain::validate_name("host id", host)
                        .map_err(|e| Error::Config(format!("trusted_ek_roots[{i}].hosts: {e}")))?;
                }
            }
            X509::from_der(&root.certificate)
                .map_err(|e| Error::Config(format!("trusted_ek_roots[{i}] is not DER X.509: {e}")))?;
        }
        for (i, der) in self.ek_intermediates.iter().enumerate() {
            X509::from_der(der).map_err(|e| Error::Config(format!("ek_intermediates[{i}] is not DER X.509: {e}")))?;
        }
        for (i, der) in self.ek_crls.iter().enumerate() {
            X509Crl::from_der(der).map_err(|e| Error::Config(format!("ek_crls[{i}] is not a DER X.509 CRL: {e}")))?;
        }
        Ok(())
    }
}

/// One trusted EK CA: its certificate, and the only host ids whose EK it may vouch for
/// (`None`: every host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EkRoot {
    /// The CA certificate (DER).
    pub certificate: Vec<u8>,
    /// `Some(ids)`: an EK chaining only to this CA enrolls only these host ids.
    pub hosts: Option<Vec<String>>,
}

impl EkRoot {
    /// A CA trusted for every host.
    pub fn every_host(certificate: Vec<u8>) -> Self {
        EkRoot { certificate, hosts: None }
    }

    /// Each of `certificates` trusted for every host (what a plain list in TOML means).
    pub fn every_host_each(certificates: Vec<Vec<u8>>) -> Vec<Self> {
        certificates.into_iter().map(Self::every_host).collect()
    }

    /// Each of `certificates` trusted only for `hosts` (a partner cloud's TPM vendor CA).
    pub fn only_for_each(certificates: Vec<Vec<u8>>, hosts: &[&str]) -> Vec<Self> {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        certificates.into_iter().map(|certificate| EkRoot { certificate, hosts: Some(hosts.clone()) }).collect()
    }

    /// Whether this CA may vouch for the EK of `host_id`.
    pub fn vouches_for(&self, host_id: &str) -> bool {
        self.hosts.as_ref().is_none_or(|hosts| hosts.iter().any(|h| h == host_id))
    }
}

impl Serialize for EkRoot {
    /// A root for every host as base64 DER text; a limited one as `{ certificate, hosts }`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use base64::Engine;
        use serde::ser::SerializeStruct;
        let text = base64::engine::general_purpose::STANDARD.encode(&self.certificate);
        match &self.hosts {
            None => serializer.serialize_str(&text),
            Some(hosts) => {
                let mut table = serializer.serialize_struct("EkRoot", 2)?;
                table.serialize_field("certificate", &text)?;
                table.serialize_field("hosts", hosts)?;
                table.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for EkRoot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = EkRoot;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a certificate (PEM text or base64 DER) or a table { certificate = \"...\", hosts = [\"host-id\", ...] }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> std::result::Result<EkRoot, E> {
                Ok(EkRoot::every_host(der_list::decode(text).map_err(E::custom)?))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<EkRoot, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Limited {
                    certificate: String,
                    hosts: Vec<String>,
                }
                let limited = Limited::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let certificate = der_list::decode(&limited.certificate).map_err(serde::de::Error::custom)?;
                Ok(EkRoot { certificate, hosts: Some(limited.hosts) })
            }
        }
        deserializer.deserialize_any(Entry)
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
        texts.iter().map(|text| decode(text).map_err(serde::de::Error::custom)).collect()
    }

    /// PEM text or base64 DER to DER.
    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        let body: String = if text.contains("-----BEGIN") {
            text.lines().filter(|l| !l.starts_with("-----")).collect()
        } else {
            text.chars().filter(|c| !c.is_whitespace()).collect()
        };
        STANDARD.decode(body.trim()).map_err(|e| format!("certificate is neither PEM nor base64 DER: {e}"))
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
            trusted_ek_roots: vec![EkRoot::every_host(vec![1, 2, 3])],
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

    /// An EK root may be limited to named hosts (a partner cloud's TPM vendor): both forms
    /// read from TOML, written back and checked.
    #[test]
    fn ek_roots_for_every_host_or_named_hosts() {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        let text =
            format!("trusted_ek_roots = [\"{der}\", {{ certificate = \"{der}\", hosts = [\"b-compute-07\"] }}]\n");
        let policy: AttestationPolicy = toml::from_str(&text).unwrap();
        assert_eq!(policy.trusted_ek_roots[0], EkRoot::every_host(vec![1, 2, 3]));
        assert_eq!(policy.trusted_ek_roots[1].hosts.as_deref(), Some(&["b-compute-07".to_string()][..]));
        assert!(policy.trusted_ek_roots[1].vouches_for("b-compute-07"));
        assert!(!policy.trusted_ek_roots[1].vouches_for("b-compute-08"));
        assert!(policy.trusted_ek_roots[0].vouches_for("b-compute-08"));
        let back: AttestationPolicy = toml::from_str(&toml::to_string(&policy).unwrap()).unwrap();
        assert_eq!(back.trusted_ek_roots, policy.trusted_ek_roots);

        let unknown = text.replace("hosts =", "host =");
        let e = toml::from_str::<AttestationPolicy>(&unknown).unwrap_err().to_string();
        assert!(e.contains("host"), "{e}");
        let empty =
            AttestationPolicy { trusted_ek_roots: EkRoot::only_for_each(vec![vec![1]], &[]), ..Default::default() };
        assert!(empty.validate().unwrap_err().to_string().contains("vouch for no host"));
    }
}
