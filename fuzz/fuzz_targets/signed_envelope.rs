//! `SignedEnvelope::decode`, then what a verifier does with an envelope: the signature
//! under every context (parses the embedded X.509 certificate and the DER signature) and
//! the signer certificate against a CA.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::signing::{verify_signer_certificate, SignatureContext, SignedEnvelope};
use skydd_ca::CertificateAuthority;

fn ca() -> &'static Vec<String> {
    static CA: OnceLock<Vec<String>> = OnceLock::new();
    CA.get_or_init(|| vec![CertificateAuthority::generate("fuzz-ca").expect("CA").0])
}

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = SignedEnvelope::decode(data) else {
        return;
    };
    assert_eq!(envelope.encode(), data, "two encodings of one envelope");
    for context in [
        SignatureContext::Descriptor,
        SignatureContext::Registration,
        SignatureContext::MountGrant,
        SignatureContext::Deletion,
        SignatureContext::AuditCheckpoint,
        SignatureContext::KeyRelease,
        SignatureContext::KeyRotation,
    ] {
        let _ = envelope.verify_signature(context);
    }
    let _ = verify_signer_certificate(&envelope.signer_certificate, ca(), &[], 1_700_000_000);
    let _ = protocol::pki::identity_from_certificate(&envelope.signer_certificate);
});
