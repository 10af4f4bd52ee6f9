//! The JSON wire messages of `protocol::messages` (and the descriptor types they carry):
//! `serde_json::from_slice` as every server and client does on a body. Input: one selector
//! byte (which type) || the JSON body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::domain::{AclEntry, Descriptor};
use protocol::messages::*;
use protocol::signing::SignedEnvelope;

/// Parses `$bytes` as `$t`; what parses must serialize and parse again.
macro_rules! json {
    ($t:ty, $bytes:expr) => {
        serde_json::from_slice::<$t>($bytes).ok().map(|value| {
            let text = serde_json::to_vec(&value).expect("a parsed message serializes");
            let _: $t = serde_json::from_slice(&text).expect("a serialized message parses");
            value
        })
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 12 {
        0 => {
            if let Some(header) = json!(HeaderRecord, body) {
                let _ = header.unverified_contents();
            }
        }
        1 => drop(json!(RegisterDomainRequest, body)),
        2 => drop(json!(RegisterDomainResponse, body)),
        3 => drop(json!(ChallengeResponse, body)),
        4 => {
            if let Some(request) = json!(KeyReleaseRequest, body) {
                let _ = request.header.unverified_contents();
                let _ = MountGrant::decode(&request.grant.message);
            }
        }
        5 => drop(json!(KeyReleaseResponse, body)),
        6 => {
            if let Some(request) = json!(DeleteDomainRequest, body) {
                let _ = Deletion::decode(&request.deletion.message);
            }
        }
        7 => {
            if let Some(record) = json!(AuditRecord, body) {
                let _ = record.compute_hash();
            }
        }
        8 => {
            if let Some(history) = json!(HistoryResponse, body) {
                // Give every record its correct hash so the chain checks run past it.
                let mut records = history.records;
                for record in &mut records {
                    record.hash = record.compute_hash();
                }
                let _ = verify_audit_chain(&records, Some(AUDIT_GENESIS_HASH));
                let _ = verify_audit_chain(&records, None);
            }
        }
        9 => {
            if let Some(descriptor) = json!(Descriptor, body) {
                let _ = descriptor.encode();
            }
        }
        10 => drop(json!(AclEntry, body)),
        _ => drop(json!(SignedEnvelope, body)),
    }
});
