//! `HeaderRecord::decode`: the payload of a volume header slot (written by the untrusted
//! cloud platform), then the descriptor and registration inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::messages::HeaderRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = HeaderRecord::decode(data) {
        assert_eq!(record.encode(), data, "two encodings of one header record");
        let _ = record.unverified_contents();
    }
});
