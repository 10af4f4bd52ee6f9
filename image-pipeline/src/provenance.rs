//! The provenance record: an in-toto Statement v1 whose predicate follows SLSA Provenance v1
//! (buildDefinition / runDetails) with Skydd's own fields beside them (steps, hardening, test
//! results, package list), wrapped in a DSSE envelope signed with ECDSA P-256 by a key whose
//! certificate the cloud CA issued.
//!
//! DSSE signs `PAE(payloadType, payload)` =
//! `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`, so the signature covers the
//! exact payload bytes and their type; the signature is DER-encoded ECDSA over SHA-256.
//!
//! The signer: the PKI has four roles (docs/PKI.md) and none is "image builder". The pipeline
//! signs with a `cloud-platform` certificate named `image-pipeline` (the image pipeline is
//! operated by the cloud platform's operators) and `verify` insists on exactly that role and
//! name, so a TTP, host or domain-manager key cannot sign images.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use protocol::pki::{Identity, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::checks::TestReport;
use crate::debian::{InstalledPackage, ReleaseRecord};
use crate::error::{fsx, Error, Result};
use crate::harden::HardeningRecord;

pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const BUILD_TYPE: &str = "https://skydd.example/image-pipeline/debian-image/v1";
pub const BUILDER_ID: &str = "https://skydd.example/image-pipeline";
/// Name the signer certificate must carry (role cloud-platform).
pub const DEFAULT_SIGNER_NAME: &str = "image-pipeline";

/// The steps every build must have run, in this order, each with status "ok".
pub const REQUIRED_STEPS: &[&str] = &["bootstrap", "unpack", "archive-chain", "harden", "security-checks", "filesystem", "disk", "qcow2"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ResourceDescriptor {
    pub fn sha256(&self) -> Option<&str> {
        self.digest.get("sha256").map(String::as_str)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Predicate {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
    /// Skydd extension: what was run, changed and tested.
    pub skydd: SkyddRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: ExternalParameters,
    pub internal_parameters: InternalParameters,
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalParameters {
    pub profile: String,
    pub profile_sha256: String,
    pub role: String,
    pub suite: String,
    pub variant: String,
    /// Whether SUITE-updates and SUITE-security were used.
    pub updates: bool,
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InternalParameters {
    pub source_date_epoch: u64,
    pub keyring: String,
    pub keyring_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    pub metadata: RunMetadata,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Builder {
    pub id: String,
    pub version: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunMetadata {
    pub invocation_id: String,
    pub started_on: String,
    pub finished_on: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub name: String,
    pub command: String,
    pub status: String,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageIdentity {
    pub role: String,
    /// Version in the store (None when built outside a store).
    pub version: Option<u64>,
    /// The version this one was patched from.
    pub parent: Option<String>,
    /// What changed against the parent (patch), human-readable.
    #[serde(default)]
    pub changes: Vec<String>,
    pub raw_size: u64,
    pub qcow2_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkyddRecord {
    pub image: ImageIdentity,
    pub steps: Vec<StepRecord>,
    pub hardening: Vec<HardeningRecord>,
    pub tests: TestReport,
    pub releases: Vec<ReleaseRecord>,
    pub packages: Vec<InstalledPackage>,
}

// ---- DSSE ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// base64 of the statement's JSON bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvelopeSignature {
    /// sha256 of the signer certificate (DER), hex.
    pub keyid: String,
    /// base64 DER ECDSA P-256 signature over PAE(payloadType, payload).
    pub sig: String,
    /// base64 DER X.509 certificate of the signer, issued by the cloud CA.
    pub cert: String,
}

/// DSSE pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The pipeline's signing key and its certificate.
pub struct Signer {
    key: SigningKey,
    cert_der: Vec<u8>,
    pub identity: Identity,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}, key redacted)", self.identity)
    }
}

impl Signer {
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self> {
        let cert_der = protocol::pki::certs_from_pem(cert_pem, "signing certificate")?
            .first()
            .map(|c| c.to_vec())
            .ok_or_else(|| Error::SigningKey("the certificate file holds no certificate".into()))?;
        // Checks the key is P-256 PKCS#8 and belongs to the certificate.
        protocol::signing::SignatureKey::from_pem(key_pem, cert_der.clone())?;
        let pem = Zeroizing::new(key_pem.to_string());
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::SigningKey(format!("not a PKCS#8 P-256 key: {e}")))?;
        let identity = protocol::pki::identity_from_certificate(&cert_der)?;
        if identity.role != Role::CloudPlatform {
            return Err(Error::SigningKey(format!(
                "the certificate is for {identity}; image provenance is signed with a cloud-platform certificate (e.g. named {DEFAULT_SIGNER_NAME})"
            )));
        }
        Ok(Self { key, cert_der, identity })
    }

    pub fn from_files(key: &Path, cert: &Path) -> Result<Self> {
        let key_pem = Zeroizing::new(fsx::read_string(key, "signing key")?);
        let cert_pem = fsx::read_string(cert, "signing certificate")?;
        Self::from_pem(&key_pem, &cert_pem)
    }

    pub fn sign(&self, statement: &Statement) -> Result<Envelope> {
        let payload = serde_json::to_vec(statement).map_err(|e| Error::json("encode the statement", e))?;
        Ok(self.sign_payload(PAYLOAD_TYPE, &payload))
    }

    /// A DSSE envelope over any payload (the allowlist uses its own payload type).
    pub fn sign_payload(&self, payload_type: &str, payload: &[u8]) -> Envelope {
        let signature: Signature = self.key.sign(&pae(payload_type, payload));
        Envelope {
            payload_type: payload_type.into(),
            payload: b64().encode(payload),
            signatures: vec![EnvelopeSignature {
                keyid: hex::encode(Sha256::digest(&self.cert_der)),
                sig: b64().encode(signature.to_der().as_bytes()),
                cert: b64().encode(&self.cert_der),
            }],
        }
    }
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct Verified {
    pub signer: Identity,
    pub statement: Statement,
}

/// What `verify` trusts.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    /// PEM of the cloud CA (and partners' CAs).
    pub ca_pems: Vec<String>,
    /// PEM revocation lists of those CAs (empty: nothing is revoked).
    pub crl_pems: Vec<String>,
    pub signer_name: String,
    pub now_unix: u64,
}

/// Checks the envelope's signature and signer, then the statement: the required steps all
/// ran and succeeded, every security test passed, and each subject file in `dir` has the
/// recorded digest. The error names the first deviation.
pub fn verify(envelope_bytes: &[u8], dir: &Path, policy: &TrustPolicy) -> Result<Verified> {
    verify_with(envelope_bytes, &dir.display().to_string(), &|name: &str| Some(dir.join(name)), policy)
}

/// As `verify`, with `locate` mapping each subject name to the file that holds it (the
/// store keeps files under their digests).
pub fn verify_with(envelope_bytes: &[u8], subject: &str, locate: &dyn Fn(&str) -> Option<std::path::PathBuf>, policy: &TrustPolicy) -> Result<Verified> {
    let subject = subject.to_string();
    let refuse = |reason: String| Error::refused(subject.clone(), reason);
    let (signer, payload) = open_envelope(envelope_bytes, PAYLOAD_TYPE, &subject, policy)?;
    let statement: Statement = serde_json::from_slice(&payload).map_err(|e| refuse(format!("the signed payload is not an in-toto statement: {e}")))?;
    if statement.statement_type != STATEMENT_TYPE || statement.predicate_type != PREDICATE_TYPE {
        return Err(refuse(format!("statement type {} / predicate {} is not {STATEMENT_TYPE} / {PREDICATE_TYPE}", statement.statement_type, statement.predicate_type)));
    }
    let steps = &statement.predicate.skydd.steps;
    for required in REQUIRED_STEPS {
        match steps.iter().find(|s| s.name == *required) {
            None => return Err(refuse(format!("step {required} is not in the signed record"))),
            Some(s) if s.status != "ok" => return Err(refuse(format!("step {required} did not succeed: {}", s.status))),
            Some(_) => {}
        }
    }
    if let Some(bad) = steps.iter().find(|s| s.status != "ok") {
        return Err(refuse(format!("step {} did not succeed: {}", bad.name, bad.status)));
    }
    let tests = &statement.predicate.skydd.tests;
    if !tests.passed() {
        return Err(refuse(format!("security tests failed: {}", tests.violations().join("; "))));
    }
    if statement.subject.is_empty() {
        return Err(refuse("the statement names no subject".into()));
    }
    for s in &statement.subject {
        let expected = s.sha256().ok_or_else(|| refuse(format!("subject {} has no sha256", s.name)))?;
        if s.name.contains('/') || s.name.starts_with('.') {
            return Err(refuse(format!("subject name {:?} is not a plain file name", s.name)));
        }
        let path = locate(&s.name).ok_or_else(|| refuse(format!("{} is not present (archived or destroyed?)", s.name)))?;
        let actual = crate::debian::sha256_of_file(&path).map_err(|e| refuse(format!("subject {}: {e}", s.name)))?;
        if actual != expected {
            return Err(refuse(format!("{} has sha256 {actual}, the signed record says {expected}: the image was changed after it was built", s.name)));
        }
    }
    Ok(Verified { signer, statement })
}

/// Checks a DSSE envelope of `payload_type`: at least one signature by the trusted signer.
/// Returns the signer and the payload bytes.
pub fn open_envelope(envelope_bytes: &[u8], payload_type: &str, subject: &str, policy: &TrustPolicy) -> Result<(Identity, Vec<u8>)> {
    let refuse = |reason: String| Error::refused(subject.to_string(), reason);
    let envelope: Envelope = serde_json::from_slice(envelope_bytes).map_err(|e| refuse(format!("not a DSSE envelope: {e}")))?;
    if envelope.payload_type != payload_type {
        return Err(refuse(format!("payload type is {:?}, expected {payload_type}", envelope.payload_type)));
    }
    let payload = b64().decode(&envelope.payload).map_err(|e| refuse(format!("payload is not base64: {e}")))?;
    let mut reasons = Vec::new();
    for (i, sig) in envelope.signatures.iter().enumerate() {
        match check_signature(sig, payload_type, &payload, policy) {
            Ok(identity) => return Ok((identity, payload)),
            Err(reason) => reasons.push(format!("signature #{}: {reason}", i + 1)),
        }
    }
    if envelope.signatures.is_empty() {
        return Err(refuse("the envelope is unsigned".into()));
    }
    Err(refuse(reasons.join("; ")))
}

fn check_signature(sig: &EnvelopeSignature, payload_type: &str, payload: &[u8], policy: &TrustPolicy) -> std::result::Result<Identity, String> {
    let cert = b64().decode(&sig.cert).map_err(|e| format!("certificate is not base64: {e}"))?;
    let identity = protocol::signing::verify_signer_certificate(&cert, &policy.ca_pems, &policy.crl_pems, policy.now_unix).map_err(|e| e.to_string())?;
    if identity.role != Role::CloudPlatform || identity.name != policy.signer_name {
        return Err(format!("signed by {identity}, but image provenance must be signed by {} (cloud-platform)", policy.signer_name));
    }
    let key = protocol::signing::certificate_public_key(&cert).map_err(|e| e.to_string())?;
    let der = b64().decode(&sig.sig).map_err(|e| format!("signature is not base64: {e}"))?;
    let signature = Signature::from_der(&der).map_err(|_| "signature is not a DER ECDSA signature".to_string())?;
    key.verify(&pae(payload_type, payload), &signature).map_err(|_| "the signature does not match the payload (the record was altered or signed by another key)".to_string())?;
    Ok(identity)
}

/// Decodes a statement from an envelope without verifying it (for display only).
pub fn statement_unverified(envelope_bytes: &[u8]) -> Result<Statement> {
    let envelope: Envelope = serde_json::from_slice(envelope_bytes).map_err(|e| Error::json("DSSE envelope", e))?;
    let payload = b64().decode(&envelope.payload).map_err(|e| Error::parse("DSSE payload", e.to_string()))?;
    serde_json::from_slice(&payload).map_err(|e| Error::json("in-toto statement", e))
}

pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(pae("http://example.com/HelloWorld", b"hello world"), b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec());
    }
}
