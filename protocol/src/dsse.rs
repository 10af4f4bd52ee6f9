//! DSSE envelopes (Dead Simple Signing Envelope, as in-toto and SLSA use them): the signed
//! form of the image pipeline's provenance records and image allowlists
//! (docs/IMAGE-PIPELINE.md "Signer"). They live here, not in the pipeline, because the secure
//! component (at VM launch) and the TTP (at key release) check allowlists too.
//!
//! The signature is ECDSA P-256 over `PAE(payloadType, payload)`; each signature carries its
//! signer's certificate, which must chain to a trusted CA and be a `cloud-platform`
//! certificate with the expected name ([`SignerTrust`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::Signature;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pki::{Identity, Role};

/// A DSSE envelope, as stored in `provenance.dsse.json` and in allowlist files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// What the payload is; signed together with the payload (see [`pae`]).
    pub payload_type: String,
    /// base64 of the payload bytes.
    pub payload: String,
    /// One signature per signer; the pipeline writes exactly one.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One DSSE signature with the signer's certificate, so a verifier needs only the CA
/// certificates (in [`SignerTrust`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvelopeSignature {
    /// sha256 of the signer certificate (DER), hex.
    pub keyid: String,
    /// base64 DER ECDSA P-256 signature over PAE(payloadType, payload).
    pub sig: String,
    /// base64 DER X.509 certificate of the signer, issued by the cloud CA.
    pub cert: String,
}

/// DSSE pre-authentication encoding: `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Whose envelopes a verifier accepts.
#[derive(Debug, Clone)]
pub struct SignerTrust {
    /// The trusted CA roots with the roles each may issue (a partner root limited to other
    /// roles cannot vouch for an image signer; docs/PKI.md "Federation").
    pub roots: Vec<crate::pki::TrustedRoot>,
    /// PEM revocation lists of those CAs (empty: nothing is revoked).
    pub crl_pems: Vec<String>,
    /// Name the signer's `cloud-platform` certificate must carry (normally `image-pipeline`);
    /// any other name is refused.
    pub signer_name: String,
    /// Current time in seconds since 1970, for certificate validity and CRL checks.
    pub now_unix: u64,
}

fn refused(subject: &str, reason: String) -> Error {
    Error::Envelope { subject: subject.to_string(), reason }
}

/// Checks that `envelope_bytes` is a DSSE envelope of `payload_type` with a signature by the
/// trusted signer, and returns that signer and the payload. `subject` names the file in
/// errors. The error says which check failed, for every signature tried.
pub fn open_envelope(
    envelope_bytes: &[u8],
    payload_type: &str,
    subject: &str,
    trust: &SignerTrust,
) -> Result<(Identity, Vec<u8>)> {
    let envelope: Envelope =
        serde_json::from_slice(envelope_bytes).map_err(|e| refused(subject, format!("not a DSSE envelope: {e}")))?;
    if envelope.payload_type != payload_type {
        return Err(refused(subject, format!("payload type is {:?}, expected {payload_type}", envelope.payload_type)));
    }
    let payload =
        STANDARD.decode(&envelope.payload).map_err(|e| refused(subject, format!("payload is not base64: {e}")))?;
    if envelope.signatures.is_empty() {
        return Err(refused(subject, "the envelope is unsigned".into()));
    }
    let mut reasons = Vec::new();
    for (i, signature) in envelope.signatures.iter().enumerate() {
        match check_signature(signature, payload_type, &payload, trust) {
            Ok(identity) => return Ok((identity, payload)),
            Err(reason) => reasons.push(format!("signature #{}: {reason}", i + 1)),
        }
    }
    Err(refused(subject, reasons.join("; ")))
}

fn check_signature(
    signature: &EnvelopeSignature,
    payload_type: &str,
    payload: &[u8],
    trust: &SignerTrust,
) -> std::result::Result<Identity, String> {
    let cert = STANDARD.decode(&signature.cert).map_err(|e| format!("certificate is not base64: {e}"))?;
    let identity = crate::signing::verify_signer_certificate(&cert, &trust.roots, &trust.crl_pems, trust.now_unix)
        .map_err(|e| e.to_string())?;
    if identity.role != Role::CloudPlatform || identity.name != trust.signer_name {
        return Err(format!("signed by {identity}, but it must be signed by {} (cloud-platform)", trust.signer_name));
    }
    let key = crate::signing::certificate_public_key(&cert).map_err(|e| e.to_string())?;
    let der = STANDARD.decode(&signature.sig).map_err(|e| format!("signature is not base64: {e}"))?;
    let parsed = Signature::from_der(&der).map_err(|_| "signature is not a DER ECDSA signature".to_string())?;
    key.verify(&pae(payload_type, payload), &parsed)
        .map_err(|_| "the signature does not match the payload (altered, or signed by another key)".to_string())?;
    Ok(identity)
}

/// Decodes an envelope's payload WITHOUT verifying it (for display only).
pub fn payload_unverified(envelope_bytes: &[u8]) -> Result<Vec<u8>> {
    let envelope: Envelope = serde_json::from_slice(envelope_bytes)
        .map_err(|e| Error::Malformed { what: "DSSE envelope", detail: e.to_string() })?;
    STANDARD.decode(&envelope.payload).map_err(|e| Error::Malformed { what: "DSSE payload", detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn an_unsigned_or_mistyped_envelope_is_refused() {
        let trust = SignerTrust { roots: vec![], crl_pems: vec![], signer_name: "image-pipeline".into(), now_unix: 0 };
        let unsigned = br#"{"payloadType":"t","payload":"","signatures":[]}"#;
        let err = open_envelope(unsigned, "t", "list", &trust).unwrap_err().to_string();
        assert!(err.contains("unsigned"), "{err}");
        let err = open_envelope(unsigned, "other", "list", &trust).unwrap_err().to_string();
        assert!(err.contains("payload type is \"t\", expected other"), "{err}");
        let err = open_envelope(b"{", "t", "list", &trust).unwrap_err().to_string();
        assert!(err.contains("not a DSSE envelope"), "{err}");
    }
}
