//! Records the TPM evidence the key-release unit tests (`ttp/src/service/key_release/tests.rs`)
//! replay, so that they run without a TPM: one host enrolled from a swtpm through the TTP's own
//! enrollment checks, its reference state, and its quote over a fixed nonce.
//!
//! Re-record (needs `swtpm` and `swtpm_setup` on PATH) after a change to the enrollment or quote
//! formats (docs/TPM.md "Wire formats"):
//!
//! ```sh
//! cargo test -p ttp --test record_vectors -- --ignored
//! ```
//!
//! It overwrites `ttp/tests/vectors/attested_host.json`; commit the new file.

use protocol::attest::{PcrSelection, MEASURED_STATE_PCR};
use secure_component::swtpm::Swtpm;
use secure_component::tpm::HostTpm;
use ttp::attestation::{self, AttestationPolicy};

/// The host the vectors enroll (the CN its secure component's certificate would carry).
const HOST_ID: &str = "compute-1";
/// The reference state the host enrolls in.
const REFERENCE_STATE: &str = "compute-v1";
/// The nonce of the recorded quote: the unit tests plant a challenge with it.
const QUOTE_NONCE: [u8; 32] = [0x5a; 32];

#[test]
#[ignore = "needs swtpm; re-records ttp/tests/vectors/attested_host.json"]
fn record_attested_host() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let swtpm = Swtpm::start(&dir.path().join("swtpm")).expect("swtpm starts");
    let mut tpm = HostTpm::open(&swtpm.tcti(), &dir.path().join("sc-state")).expect("TPM opens");

    // A measured start-up, so that the reference state is not all zeros.
    tpm.extend_pcr(MEASURED_STATE_PCR, b"skydd ttp test vector: secure component").expect("PCR extend");
    let selection = PcrSelection::default_host();
    let values = tpm.read_pcrs(&selection).expect("PCR read");
    let state = attestation::reference_state_from_values(REFERENCE_STATE, &selection, &values).expect("state");
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(swtpm.ek_ca_certificates().expect("EK CA")),
        reference_states: vec![state.clone()],
        ..Default::default()
    };

    // Enrollment through the TTP's own checks, as Ttp::begin_enrollment/finish_enrollment run them.
    let request = tpm.enrollment_request(HOST_ID, &selection).expect("enrollment request");
    let (pending, challenge) = attestation::begin_enrollment(&policy, &request).expect("EK trusted");
    let proof = tpm.enrollment_proof(&challenge).expect("enrollment proof");
    let host = attestation::finish_enrollment(&policy, pending, &proof).expect("enrolled");

    let quote = tpm.quote(&QUOTE_NONCE).expect("quote");
    attestation::verify_quote(&host, &policy, &quote, &QUOTE_NONCE).expect("the recorded quote verifies");

    let vectors = serde_json::json!({
        "comment": "Recorded from swtpm by ttp/tests/record_vectors.rs; re-record with `cargo test -p ttp --test record_vectors -- --ignored`.",
        "host": host,
        "reference_state": state,
        "quote_nonce": hex::encode(QUOTE_NONCE),
        "quote": quote,
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/attested_host.json");
    let text = serde_json::to_string_pretty(&vectors).expect("JSON") + "\n";
    std::fs::write(&path, text).expect("write the vectors");
    println!("wrote {}", path.display());
}
