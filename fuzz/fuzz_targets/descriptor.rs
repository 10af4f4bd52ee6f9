//! `Descriptor::decode`: the domain descriptor (metadata, access-list XML, shared-with list).
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::domain::Descriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(descriptor) = Descriptor::decode(data) {
        assert_eq!(descriptor.encode().expect("a decoded descriptor encodes"), data);
        let _ = descriptor.metadata_hash();
        let _ = descriptor.next_version(|d| d.acl.clear());
    }
});
