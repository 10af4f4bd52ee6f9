//! ECDSA P-256 signatures over canonical encodings (docs/PROTOCOL.md, "Signatures").
//!
//! A signature covers `"skydd/v1/sig/" || context || 0x00 || message`, so a signature made
//! for one kind of object can never be replayed as another. Signed objects carry the
//! signer's X.509 certificate (DER); the verifier checks that certificate against its CA
//! roots (see `pki`) and then the signature with the certificate's key.

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePrivateKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// What a signature is for; part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureContext {
    /// An owner's domain descriptor (docs/PROTOCOL.md "Domain descriptor").
    Descriptor,
    /// The TTP's registration of a descriptor version.
    Registration,
    /// A domain manager's mount grant for one VM.
    MountGrant,
    /// An owner's deletion of a domain.
    Deletion,
    /// The cloud platform's placement of a VM on a compute host, for one grant.
    Placement,
    /// The TTP's anchor of a format-2 volume's integrity root (docs/PROTOCOL.md "Integrity
    /// anchor").
    IntegrityAnchor,
    /// The TTP's checkpoint of its audit chain's head (docs/PROTOCOL.md "Audit checkpoints").
    AuditCheckpoint,
    /// An owner's request for a new key generation of a domain (docs/PROTOCOL.md "Key
    /// rotation").
    KeyRotation,
    /// Reserved for key-release messages; no Skydd message is signed with it yet (the fuzz
    /// target covers it).
    KeyRelease,
}

impl SignatureContext {
    /// The context string inside the signed bytes, e.g. `mount-grant`; also names the object
    /// in `Error::BadSignature`.
    pub fn label(self) -> &'static str {
        match self {
            SignatureContext::Descriptor => "descriptor",
            SignatureContext::Registration => "registration",
            SignatureContext::MountGrant => "mount-grant",
            SignatureContext::Deletion => "deletion",
            SignatureContext::Placement => "placement",
            SignatureContext::IntegrityAnchor => "integrity-anchor",
            SignatureContext::AuditCheckpoint => "audit-checkpoint",
            SignatureContext::KeyRelease => "key-release",
            SignatureContext::KeyRotation => "key-rotation",
        }
    }
}

fn signed_bytes(context: SignatureContext, message: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(message.len() + 32);
    bytes.extend_from_slice(b"skydd/v1/sig/");
    bytes.extend_from_slice(context.label().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(message);
    bytes
}

/// A party's signing key: the ECDSA P-256 key of its certificate.
pub struct SignatureKey {
    key: SigningKey,
    certificate_der: Vec<u8>,
}

impl SignatureKey {
    /// From the PKCS#8 PEM private key and the DER certificate issued for it.
    pub fn from_pem(private_key_pem: &str, certificate_der: Vec<u8>) -> Result<Self> {
        let pem = Zeroizing::new(private_key_pem.to_string());
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| Error::InvalidKey(format!("private key is not a PKCS#8 ECDSA P-256 key: {e}")))?;
        let cert_key = certificate_public_key(&certificate_der)?;
        if cert_key != *key.verifying_key() {
            return Err(Error::InvalidKey("private key does not belong to the certificate".into()));
        }
        Ok(Self { key, certificate_der })
    }

    /// The DER certificate of this key, embedded in every envelope it signs.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    /// A DER-encoded ECDSA signature, normalised to low-S (s ≤ n/2): verifiers refuse the
    /// high-S twin, so every signature has one encoding.
    pub fn sign(&self, context: SignatureContext, message: &[u8]) -> Vec<u8> {
        let signature: Signature = self.key.sign(&signed_bytes(context, message));
        let signature = signature.normalize_s().unwrap_or(signature);
        signature.to_der().as_bytes().to_vec()
    }

    /// Signs `message` and wraps it with the certificate.
    pub fn sign_envelope(&self, context: SignatureContext, message: Vec<u8>) -> SignedEnvelope {
        let signature = self.sign(context, &message);
        SignedEnvelope { message, signature, signer_certificate: self.certificate_der.clone() }
    }

    /// A DSSE envelope of `payload_type` over `payload` (image provenance and allowlists,
    /// [`crate::dsse`]): the signature is over PAE(type, payload), not Skydd's context prefix.
    pub fn sign_dsse(&self, payload_type: &str, payload: &[u8]) -> crate::dsse::Envelope {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let signature: Signature = self.key.sign(&crate::dsse::pae(payload_type, payload));
        let signature = signature.normalize_s().unwrap_or(signature);
        crate::dsse::Envelope {
            payload_type: payload_type.into(),
            payload: STANDARD.encode(payload),
            signatures: vec![crate::dsse::EnvelopeSignature {
                keyid: hex::encode(Sha256::digest(&self.certificate_der)),
                sig: STANDARD.encode(signature.to_der().as_bytes()),
                cert: STANDARD.encode(&self.certificate_der),
            }],
        }
    }
}

impl std::fmt::Debug for SignatureKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignatureKey(redacted)")
    }
}

/// Verifies a DER ECDSA signature with a public key. A high-S signature (s > n/2, the
/// malleable twin of a valid one) is refused with [`Error::NonCanonicalSignature`].
pub fn verify(
    public_key: &VerifyingKey,
    context: SignatureContext,
    message: &[u8],
    signature_der: &[u8],
) -> Result<()> {
    let what = context.label();
    let signature = Signature::from_der(signature_der).map_err(|_| Error::BadSignature { what })?;
    // normalize_s() returns Some only when s was high.
    if signature.normalize_s().is_some() {
        return Err(Error::NonCanonicalSignature { what });
    }
    public_key.verify(&signed_bytes(context, message), &signature).map_err(|_| Error::BadSignature { what })
}

/// The P-256 public key of a DER certificate (no chain check: see `pki`).
pub fn certificate_public_key(certificate_der: &[u8]) -> Result<VerifyingKey> {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate_der)
        .map_err(|e| Error::Certificate(format!("cannot parse certificate: {e}")))?;
    let spki = cert.public_key();
    VerifyingKey::from_sec1_bytes(&spki.subject_public_key.data)
        .map_err(|_| Error::Certificate("certificate key is not an ECDSA P-256 key".into()))
}

/// A canonical message, its signature, and the signer's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// The canonical encoding that was signed (e.g. a `Descriptor::encode` output).
    #[serde(with = "crate::b64")]
    pub message: Vec<u8>,
    /// DER ECDSA P-256 signature over `"skydd/v1/sig/" || context || 0x00 || message`.
    #[serde(with = "crate::b64")]
    pub signature: Vec<u8>,
    /// The signer's X.509 certificate (DER); the verifier checks its chain, validity, role and
    /// name before trusting the signature.
    #[serde(with = "crate::b64")]
    pub signer_certificate: Vec<u8>,
}

impl SignedEnvelope {
    /// Checks the signature with the embedded certificate's key. The caller must still
    /// check the certificate itself (chain, validity, role, name) with `pki`.
    pub fn verify_signature(&self, context: SignatureContext) -> Result<()> {
        let key = certificate_public_key(&self.signer_certificate)?;
        verify(&key, context, &self.message, &self.signature)
    }

    /// The binary form stored in volume headers:
    /// `"SKYDD-SIGNED\x01" lp(message) lp(signature) lp(certificate)`.
    pub fn encode(&self) -> Vec<u8> {
        crate::encoding::Writer::new(b"SKYDD-SIGNED\x01")
            .bytes(&self.message)
            .bytes(&self.signature)
            .bytes(&self.signer_certificate)
            .finish()
    }

    /// Strict decoding of [`SignedEnvelope::encode`]'s output (message ≤ 256 KiB, signature ≤
    /// 128 bytes, certificate ≤ 16 KiB). Does not verify anything.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = crate::encoding::Reader::new("signed envelope", encoded, b"SKYDD-SIGNED\x01")?;
        let message = reader.bytes("signed message", 256 * 1024)?.to_vec();
        let signature = reader.bytes("signature", 128)?.to_vec();
        let signer_certificate = reader.bytes("signer certificate", 16 * 1024)?.to_vec();
        reader.finish()?;
        Ok(Self { message, signature, signer_certificate })
    }
}

/// Checks a signer's certificate the way a TLS peer's is checked: it chains to one of the
/// trusted CA roots (PEM, or [`TrustedRoot`](crate::pki::TrustedRoot)s with their limits;
/// several for federated clouds) and its root may issue it, is valid at `now_unix`, is not on
/// a revocation list in `crl_pems` (when any is given), and carries a Skydd role. Returns the
/// signer's identity (name and role).
pub fn verify_signer_certificate<R: Clone + Into<crate::pki::TrustedRoot>>(
    certificate_der: &[u8],
    trusted_roots: &[R],
    crl_pems: &[String],
    now_unix: u64,
) -> Result<crate::pki::Identity> {
    // A revoked signer's signatures stop counting from the moment its CA's list says so.
    let verifier = crate::pki::client_cert_verifier(trusted_roots, crl_pems)?;
    verify_signer_certificate_with(verifier.as_ref(), certificate_der, now_unix)
}

/// [`verify_signer_certificate`] with a verifier built once by
/// [`client_cert_verifier`](crate::pki::client_cert_verifier) (for a party that checks many
/// signatures under the same CAs and revocation lists).
pub fn verify_signer_certificate_with(
    verifier: &dyn rustls::server::danger::ClientCertVerifier,
    certificate_der: &[u8],
    now_unix: u64,
) -> Result<crate::pki::Identity> {
    use rustls::pki_types::{CertificateDer, UnixTime};

    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_unix));
    verifier.verify_client_cert(&CertificateDer::from(certificate_der), &[], now).map_err(|e| {
        Error::Certificate(format!("signer certificate refused: {}", crate::pki::describe_tls_error(&e)))
    })?;
    crate::pki::identity_from_certificate(certificate_der)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21: signatures are made low-S, and the high-S twin of a valid signature (which
    /// verifies mathematically) is refused.
    #[test]
    fn high_s_signatures_are_refused_and_never_made() {
        // A random scalar (below the group order with overwhelming probability).
        let key = SigningKey::from_slice(&rand::random::<[u8; 32]>()).expect("a random P-256 scalar");
        let verifying = *key.verifying_key();
        let mut seen_high = false;
        for i in 0..32u8 {
            let message = [i; 8];
            let raw: Signature = key.sign(&signed_bytes(SignatureContext::MountGrant, &message));
            seen_high |= raw.normalize_s().is_some();
            let signer = SignatureKey { key: key.clone(), certificate_der: Vec::new() };
            let der = signer.sign(SignatureContext::MountGrant, &message);
            let low = Signature::from_der(&der).unwrap();
            assert!(low.normalize_s().is_none(), "sign() made a high-S signature");
            verify(&verifying, SignatureContext::MountGrant, &message, &der).unwrap();
            // The twin: (r, n - s).
            let (r, s) = low.split_scalars();
            let high = Signature::from_scalars(r, -*s).unwrap();
            let err = verify(&verifying, SignatureContext::MountGrant, &message, high.to_der().as_bytes()).unwrap_err();
            assert_eq!(err, Error::NonCanonicalSignature { what: "mount-grant" });
        }
        assert!(seen_high, "in 32 raw signatures at least one is high-S (else the normalisation is untested)");
    }
}
