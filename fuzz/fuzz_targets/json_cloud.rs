//! The JSON wire messages of `protocol::cloud` (the cloud platform's REST API and the
//! secure component's agent API). Input: one selector byte (which type) || the JSON body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::cloud::*;

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
    match selector % 14 {
        0 => drop(json!(CreateDomainRequest, body)),
        1 => drop(json!(UpdateDomainRequest, body)),
        2 => drop(json!(DeleteDomainBody, body)),
        3 => {
            if let Some(view) = json!(DomainView, body) {
                let _ = view.header.unverified_contents();
            }
        }
        4 => drop(json!(DomainList, body)),
        5 => drop(json!(Instance, body)),
        6 => drop(json!(InstanceList, body)),
        7 => drop(json!(ComputeHost, body)),
        8 => drop(json!(CreateAttachmentRequest, body)),
        9 => drop(json!(Attachment, body)),
        10 => drop(json!(AttachmentList, body)),
        11 => {
            if let Some(request) = json!(AgentAttachRequest, body) {
                let _ = request.header.unverified_contents();
            }
        }
        12 => drop(json!(AgentAttachment, body)),
        _ => drop(json!(AgentAttachmentList, body)),
    }
});
