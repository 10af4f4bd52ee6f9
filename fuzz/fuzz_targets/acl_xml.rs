//! `acl_from_xml`: the strict access-list XML parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::domain::{acl_from_xml, acl_to_xml};

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(acl) = acl_from_xml(xml) {
        // What the parser accepts, the writer writes back in a form the parser accepts.
        let canonical = acl_to_xml(&acl);
        let again = acl_from_xml(&canonical).expect("the canonical XML of a parsed access list parses");
        let mut sorted = acl.clone();
        sorted.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        assert_eq!(again, sorted);
    }
});
