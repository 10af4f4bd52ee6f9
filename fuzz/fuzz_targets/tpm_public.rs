//! TPMT_PUBLIC (EK, AK, binding key) as the TTP parses it from a host: `ttp::attestation::fuzzing::parse_public`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ttp::attestation::fuzzing::parse_public(data);
});
