//! The JSON wire messages of `protocol::attest` (host enrollment and quotes), as the TTP
//! parses them from a host. Input: one selector byte (which type) || the JSON body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::attest::*;

macro_rules! json {
    ($t:ty, $bytes:expr) => {
        serde_json::from_slice::<$t>($bytes).ok().map(|value| {
            let text = serde_json::to_vec(&value).expect("a parsed message serializes");
            let _: $t = serde_json::from_slice(&text).expect("a serialized message parses");
            value
        })
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            if let Some(selection) = json!(PcrSelection, body) {
                let _ = selection.normalized_indices();
            }
        }
        1 => drop(json!(PcrValue, body)),
        2 => {
            if let Some(request) = json!(EnrollmentRequest, body) {
                let _ = request.pcr_selection.normalized_indices();
                ttp::attestation::fuzzing::parse_public(&request.ak_public);
                ttp::attestation::fuzzing::check_ek_certificate_extensions(&request.ek_certificate);
            }
        }
        3 => drop(json!(CredentialChallenge, body)),
        4 => {
            if let Some(proof) = json!(EnrollmentProof, body) {
                ttp::attestation::fuzzing::parse_attest(&proof.certify_attest);
                ttp::attestation::fuzzing::parse_signature(&proof.certify_signature);
            }
        }
        _ => {
            if let Some(quote) = json!(QuoteEvidence, body) {
                ttp::attestation::fuzzing::parse_attest(&quote.attest);
                ttp::attestation::fuzzing::parse_signature(&quote.signature);
            }
        }
    }
});
