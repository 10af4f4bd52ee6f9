//! TPMS_ATTEST (quote and certify) as the TTP parses it from a host: `ttp::attestation::fuzzing::parse_attest`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ttp::attestation::fuzzing::parse_attest(data);
});
