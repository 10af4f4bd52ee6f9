//! `Placement::decode`: the cloud platform's signed placement of a VM on a host.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::messages::Placement;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Placement::decode(data) {
        assert_eq!(message.encode(), data, "two encodings of one message");
    }
});
