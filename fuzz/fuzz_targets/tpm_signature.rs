//! TPMT_SIGNATURE as the TTP parses and checks it: `ttp::attestation::fuzzing::parse_signature`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ttp::attestation::fuzzing::parse_signature(data);
});
