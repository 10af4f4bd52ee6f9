//! The TCG extensions of a host-supplied EK certificate (DER): `ttp::attestation::fuzzing::check_ek_certificate_extensions`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ttp::attestation::fuzzing::check_ek_certificate_extensions(data);
});
