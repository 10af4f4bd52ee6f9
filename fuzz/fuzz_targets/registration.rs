//! `Registration::decode`: a signed wire message's canonical encoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::messages::Registration;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Registration::decode(data) {
        assert_eq!(message.encode(), data, "two encodings of one message");
    }
});
