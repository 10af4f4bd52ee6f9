//! Writes the committed seed corpus of every fuzz target (fuzz/corpus/<target>/<name>) from
//! real encodings: descriptors and signed envelopes made with a real CA and real ECDSA
//! keys, registrations, grants, deletions, header slots, every JSON wire message, and the
//! TPM structures of a real swtpm (EK, AK and binding key publics, an EK certificate, a
//! TPM2_Quote and a TPM2_Certify with their signatures).
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//!
//! Needs swtpm for the TPM seeds (prints a notice and keeps the committed ones without it).
//! Re-running replaces the seeds (certificates, nonces and signatures differ each run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::attest::{
    CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection, PcrValue, QuoteEvidence,
};
use protocol::cloud::*;
use protocol::domain::{acl_to_xml, AccessMode, AclEntry, Descriptor};
use protocol::format;
use protocol::messages::*;
use protocol::pki::Role;
use protocol::signing::{SignatureContext, SignatureKey};
use serde::Serialize;
use skydd_ca::{CertificateAuthority, Validity};

struct Corpus {
    root: PathBuf,
    count: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
        self.count += 1;
    }

    /// A JSON seed for a selector-dispatched target.
    fn json<T: Serialize>(&mut self, target: &str, selector: u8, name: &str, value: &T) {
        let mut bytes = vec![selector];
        bytes.extend(serde_json::to_vec(value).unwrap());
        self.put(target, name, &bytes);
    }
}

fn signer(ca_cert: &str, ca_key: &str, role: Role, name: &str) -> SignatureKey {
    let issued = CertificateAuthority::issue(ca_cert, ca_key, role, name, Validity::Days(365)).unwrap();
    let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
    SignatureKey::from_pem(&issued.key_pem, der).unwrap()
}

fn descriptor(owner: &str, acl: &[(&str, AccessMode)], metadata: &[(&str, &str)], shared: &[&str]) -> Descriptor {
    let metadata: BTreeMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let acl = acl.iter().map(|(vm, mode)| AclEntry { vm_id: vm.to_string(), mode: *mode }).collect();
    let mut d = Descriptor::new(owner, metadata, acl).unwrap();
    d.shared_with = shared.iter().map(|s| s.to_string()).collect();
    d.validate().unwrap();
    d
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut c = Corpus { root, count: 0 };

    let (ca_cert, ca_key) = CertificateAuthority::generate("skydd-fuzz-ca").unwrap();
    let alice = signer(&ca_cert, &ca_key, Role::DomainManager, "dm-alice");
    let ttp = signer(&ca_cert, &ca_key, Role::Ttp, "ttp-1");
    let operator = signer(&ca_cert, &ca_key, Role::CloudPlatform, "cloud-platform");

    // ---- descriptors and access lists ----
    let descriptors = [
        ("one-vm-rw", descriptor("dm-alice", &[("vm-a", AccessMode::Rw)], &[("department", "cardiology")], &[])),
        (
            "two-vms-shared",
            descriptor(
                "dm-alice",
                &[("vm-b", AccessMode::Ro), ("vm-a", AccessMode::Rw)],
                &[("department", "cardiology"), ("retention", "10y")],
                &["dm-bob", "dm-carol"],
            ),
        ),
        ("empty-acl", descriptor("dm-alice", &[], &[], &[])),
        (
            "many-vms",
            descriptor(
                "dm-alice",
                &(0..20)
                    .map(|i| {
                        (
                            Box::leak(format!("vm-{i:02}").into_boxed_str()) as &str,
                            if i % 2 == 0 { AccessMode::Rw } else { AccessMode::Ro },
                        )
                    })
                    .collect::<Vec<_>>(),
                &[("k", "v")],
                &[],
            ),
        ),
    ];
    for (name, d) in &descriptors {
        c.put("descriptor", name, &d.encode().unwrap());
        c.put("acl_xml", name, acl_to_xml(&d.acl).as_bytes());
    }
    let v2 =
        descriptors[0].1.next_version(|d| d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Ro })).unwrap();
    c.put("descriptor", "version-2", &v2.encode().unwrap());
    c.put("acl_xml", "self-closing-root", b"<acl/>");
    c.put("acl_xml", "one-vm", b"<acl><vm id=\"vm-a\" mode=\"ro\"/></acl>");

    // ---- signed messages and header records ----
    let mut headers = Vec::new();
    for (i, (name, d)) in descriptors.iter().enumerate() {
        let signed_descriptor = alice.sign_envelope(SignatureContext::Descriptor, d.encode().unwrap());
        let registration = Registration {
            domain_id: d.domain_id.clone(),
            version: d.version,
            descriptor_hash: protocol::domain::descriptor_hash(&d.encode().unwrap()),
            metadata_hash: d.metadata_hash(),
            nonce_r: [i as u8 + 1; 32],
            registered_at: 1_760_000_000 + i as u64,
            key_generation: 1,
        };
        c.put("registration", name, &registration.encode());
        let signed_registration = ttp.sign_envelope(SignatureContext::Registration, registration.encode());
        c.put("signed_envelope", &format!("descriptor-{name}"), &signed_descriptor.encode());
        c.put("signed_envelope", &format!("registration-{name}"), &signed_registration.encode());
        let header = HeaderRecord { descriptor: signed_descriptor, registration: signed_registration, rotation: None };
        c.put("header_record", name, &header.encode());
        headers.push(header);
    }
    let domain_id = descriptors[0].1.domain_id.clone();
    let grants = [
        (
            "vm-a-rw",
            MountGrant {
                domain_id: domain_id.clone(),
                vm_id: "vm-a".into(),
                mode: AccessMode::Rw,
                expires_at: 1_760_000_300,
                nonce: [7; 16],
                issuer: "dm-alice".into(),
                purpose: String::new(),
                reason: String::new(),
            },
        ),
        (
            "vm-b-ro",
            MountGrant {
                domain_id: domain_id.clone(),
                vm_id: "vm-b".into(),
                mode: AccessMode::Ro,
                expires_at: u64::MAX,
                nonce: [0; 16],
                issuer: "dm-bob".into(),
                purpose: String::new(),
                reason: String::new(),
            },
        ),
    ];
    let mut signed_grants = Vec::new();
    for (name, grant) in &grants {
        c.put("mount_grant", name, &grant.encode());
        let signed = alice.sign_envelope(SignatureContext::MountGrant, grant.encode());
        c.put("signed_envelope", &format!("grant-{name}"), &signed.encode());
        signed_grants.push(signed);
    }
    let placements = [
        (
            "vm-a-host-1",
            Placement {
                vm_id: "vm-a".into(),
                host_id: "host-1".into(),
                grant_digest: grant_digest(&signed_grants[0]),
                placed_at: 1_760_000_000,
            },
        ),
        (
            "far-future",
            Placement {
                vm_id: "vm-b".into(),
                host_id: "compute-2".into(),
                grant_digest: [0xff; 32],
                placed_at: u64::MAX,
            },
        ),
    ];
    let mut signed_placements = Vec::new();
    for (name, placement) in &placements {
        c.put("placement", name, &placement.encode());
        let signed = operator.sign_envelope(SignatureContext::Placement, placement.encode());
        c.put("signed_envelope", &format!("placement-{name}"), &signed.encode());
        signed_placements.push(signed);
    }
    let deletion = Deletion { domain_id: domain_id.clone(), requested_at: 1_760_000_400 };
    c.put("deletion", "one", &deletion.encode());
    let signed_deletion = alice.sign_envelope(SignatureContext::Deletion, deletion.encode());
    c.put("signed_envelope", "deletion", &signed_deletion.encode());

    // ---- volume header slots: 2-byte split || slot 0 || slot 1 (zero tails trimmed) ----
    let slot = |seq: u64, payload: &[u8]| {
        let encoded = format::encode_slot(seq, payload).unwrap();
        encoded[..format::SLOT_HEADER_LEN + payload.len()].to_vec()
    };
    let volume_seed = |slot0: &[u8], slot1: &[u8]| {
        let mut seed = (slot0.len() as u16).to_le_bytes().to_vec();
        seed.extend_from_slice(slot0);
        seed.extend_from_slice(slot1);
        seed
    };
    let h0 = headers[0].encode();
    let h1 = headers[1].encode();
    c.put("volume_header", "fresh-volume", &volume_seed(&slot(1, &h0), &[]));
    c.put("volume_header", "both-slots", &volume_seed(&slot(1, &h0), &slot(2, &h1)));
    c.put("volume_header", "slot1-wins", &volume_seed(&slot(8, &h1), &slot(9, &h0)));
    let mut torn = slot(3, &h1);
    let half = torn.len() / 2;
    torn[half..].fill(0);
    c.put("volume_header", "torn-slot1", &volume_seed(&slot(2, &h0), &torn));

    // ---- JSON: protocol::messages (selectors as in fuzz_targets/json_messages.rs) ----
    let header = headers[0].clone();
    let quote_stub = QuoteEvidence {
        attest: vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x18],
        signature: vec![0, 0x18],
        pcr_values: vec![PcrValue { index: 0, digest: vec![0; 32] }],
    };
    c.json("json_messages", 0, "header-record", &header);
    c.json(
        "json_messages",
        1,
        "register-v1",
        &RegisterDomainRequest { descriptor: header.descriptor.clone(), previous_registration: None },
    );
    c.json(
        "json_messages",
        1,
        "register-v2",
        &RegisterDomainRequest {
            descriptor: header.descriptor.clone(),
            previous_registration: Some(header.registration.clone()),
        },
    );
    c.json(
        "json_messages",
        2,
        "register-response",
        &RegisterDomainResponse { registration: header.registration.clone() },
    );
    c.json(
        "json_messages",
        3,
        "challenge",
        &ChallengeResponse { challenge_id: "0123456789abcdef".into(), nonce: vec![9; 32], expires_at: 1_760_000_060 },
    );
    let release = KeyReleaseRequest {
        host_id: "host-1".into(),
        vm_id: "vm-a".into(),
        mode: AccessMode::Rw,
        header: header.clone(),
        grant: signed_grants[0].clone(),
        placement: signed_placements[0].clone(),
        challenge_id: "0123456789abcdef".into(),
        quote: quote_stub.clone(),
        launched_image: None,
    };
    c.json("json_messages", 4, "key-release", &release);
    c.json(
        "json_messages",
        5,
        "key-release-response",
        &KeyReleaseResponse {
            domain_id: domain_id.clone(),
            version: 1,
            wrapped_key: vec![0x5a; 256],
            audit_seq: 4,
            integrity_anchor: None,
            previous_wrapped_key: None,
        },
    );
    c.json("json_messages", 6, "delete", &DeleteDomainRequest { deletion: signed_deletion.clone() });
    let mut records = Vec::new();
    let mut prev = AUDIT_GENESIS_HASH.to_string();
    for (seq, (event, outcome)) in
        [("register", "ok"), ("enroll", "ok"), ("key_release", "vm_not_in_acl")].iter().enumerate()
    {
        let mut r = AuditRecord {
            seq: seq as u64 + 1,
            at: 1_760_000_000 + seq as u64,
            event: event.to_string(),
            outcome: outcome.to_string(),
            message: format!("{event}: {outcome}"),
            domain_id: Some(domain_id.clone()),
            host_id: (seq > 0).then(|| "host-1".to_string()),
            vm_id: (seq == 2).then(|| "vm-z".to_string()),
            actor: "cp-1".into(),
            prev_hash: prev.clone(),
            hash: String::new(),
            format: protocol::messages::AUDIT_FORMAT_TAGGED,
        };
        r.hash = r.compute_hash();
        prev = r.hash.clone();
        records.push(r);
    }
    verify_audit_chain(&records, Some(AUDIT_GENESIS_HASH)).unwrap();
    c.json("json_messages", 7, "audit-record", &records[2]);
    let history =
        HistoryResponse { domain_id: domain_id.clone(), records: records.clone(), checkpoint: None, since: None };
    c.json("json_messages", 8, "history", &history);
    c.json("json_messages", 9, "descriptor", &descriptors[1].1);
    c.json("json_messages", 10, "acl-entry", &AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Ro });
    c.json("json_messages", 11, "signed-envelope", &signed_grants[1]);

    // ---- JSON: protocol::cloud (selectors as in fuzz_targets/json_cloud.rs) ----
    let view = DomainView {
        id: domain_id.clone(),
        owner: "dm-alice".into(),
        version: 1,
        metadata: descriptors[0].1.metadata.clone(),
        acl: descriptors[0].1.acl.clone(),
        shared_with: vec!["dm-bob".into()],
        size_bytes: 64 << 20,
        status: "available".into(),
        created_at: 1_760_000_000,
        header: header.clone(),
        re_encryption: None,
    };
    let attachment = Attachment {
        id: "att-1".into(),
        domain_id: domain_id.clone(),
        instance_id: "vm-a".into(),
        host: "host-1".into(),
        mode: AccessMode::Rw,
        device: "/dev/mapper/skydd-x".into(),
        mount_path: "/var/lib/skydd/vms/vm-a/x".into(),
        version: 1,
        status: protocol::cloud::AttachmentStatus::Attached,
    };
    let agent_attachment = AgentAttachment {
        attachment_id: "att-1".into(),
        domain_id: domain_id.clone(),
        vm_id: "vm-a".into(),
        mode: AccessMode::Rw,
        version: 1,
        device: "/dev/loop0".into(),
        mount_path: "/var/lib/skydd/vms/vm-a/x".into(),
        backend: "userspace".into(),
        status: protocol::cloud::MappingStatus::Stale,
        stale_reason: Some("the agent stopped".into()),
    };
    c.json(
        "json_cloud",
        0,
        "create-domain",
        &CreateDomainRequest { descriptor: header.descriptor.clone(), size_bytes: 64 << 20 },
    );
    c.json("json_cloud", 1, "update-domain", &UpdateDomainRequest { descriptor: header.descriptor.clone() });
    c.json("json_cloud", 2, "delete-domain", &DeleteDomainBody { deletion: signed_deletion.clone() });
    c.json("json_cloud", 3, "domain-view", &view);
    c.json(
        "json_cloud",
        4,
        "domain-list",
        &DomainList { domains: vec![view.clone()], next_marker: Some(domain_id.clone()) },
    );
    c.json("json_cloud", 5, "instance", &Instance { id: "vm-a".into(), host: "host-1".into() });
    c.json(
        "json_cloud",
        6,
        "instance-list",
        &InstanceList { instances: vec![Instance { id: "vm-a".into(), host: "host-1".into() }], next_marker: None },
    );
    c.json(
        "json_cloud",
        7,
        "compute-host",
        &ComputeHost { id: "host-1".into(), agent_url: "https://127.0.0.1:7443".into() },
    );
    c.json(
        "json_cloud",
        8,
        "create-attachment",
        &CreateAttachmentRequest {
            domain_id: domain_id.clone(),
            instance_id: "vm-a".into(),
            mode: AccessMode::Rw,
            grant: signed_grants[0].clone(),
        },
    );
    c.json("json_cloud", 9, "attachment", &attachment);
    c.json(
        "json_cloud",
        10,
        "attachment-list",
        &AttachmentList { attachments: vec![attachment.clone()], next_marker: None },
    );
    c.json(
        "json_cloud",
        11,
        "agent-attach",
        &AgentAttachRequest {
            attachment_id: "att-1".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            header: header.clone(),
            grant: signed_grants[0].clone(),
            placement: signed_placements[0].clone(),
            volume_path: "/srv/volumes/x.img".into(),
        },
    );
    c.json("json_cloud", 12, "agent-attachment", &agent_attachment);
    c.json(
        "json_cloud",
        13,
        "agent-attachment-list",
        &AgentAttachmentList { attachments: vec![agent_attachment.clone()] },
    );

    // ---- TPM structures from a real swtpm ----
    let tpm = real_tpm_structures();
    let (request, certify, quote) = match tpm {
        Some(t) => t,
        None => {
            eprintln!("NOTICE: swtpm is not usable: TPM seeds not regenerated (the committed ones stay)");
            println!("wrote {} seeds under {}", c.count, c.root.display());
            return;
        }
    };
    c.put("tpm_public", "ek-rsa2048", &request.ek_public);
    c.put("tpm_public", "ak-ecc-p256", &request.ak_public);
    c.put("tpm_public", "binding-rsa2048-policypcr", &request.binding_public);
    c.put("ek_certificate", "swtpm-ek", &request.ek_certificate);
    c.put("tpm_attest", "quote", &quote.attest);
    c.put("tpm_attest", "certify", &certify.0);
    c.put("tpm_signature", "quote-ecdsa-sha256", &quote.signature);
    c.put("tpm_signature", "certify-ecdsa-sha256", &certify.1);
    // JSON: protocol::attest (selectors as in fuzz_targets/json_attest.rs)
    c.json("json_attest", 0, "pcr-selection", &PcrSelection::default_host());
    c.json("json_attest", 1, "pcr-value", &quote.pcr_values[0]);
    c.json("json_attest", 2, "enrollment-request", &request);
    c.json(
        "json_attest",
        3,
        "credential-challenge",
        &CredentialChallenge {
            enrollment_id: "00112233445566778899aabbccddeeff".into(),
            credential_blob: vec![1; 68],
            encrypted_secret: vec![2; 256],
            certify_nonce: vec![3; 32],
        },
    );
    c.json(
        "json_attest",
        4,
        "enrollment-proof",
        &EnrollmentProof {
            enrollment_id: "00112233445566778899aabbccddeeff".into(),
            activated_secret: vec![4; 32],
            certify_attest: certify.0.clone(),
            certify_signature: certify.1.clone(),
        },
    );
    c.json("json_attest", 5, "quote", &quote);
    c.json("json_messages", 4, "key-release-real-quote", &KeyReleaseRequest { quote: quote.clone(), ..release });
    println!("wrote {} seeds under {}", c.count, c.root.display());
}

type TpmSeeds = (EnrollmentRequest, (Vec<u8>, Vec<u8>), QuoteEvidence);

/// An enrollment request, a TPM2_Certify of the binding key and a TPM2_Quote from a swtpm.
fn real_tpm_structures() -> Option<TpmSeeds> {
    use secure_component::swtpm::Swtpm;
    use secure_component::tpm::HostTpm;
    let dir = std::env::temp_dir().join(format!("skydd-fuzz-corpus-{}", std::process::id()));
    let swtpm = match Swtpm::start(&dir.join("swtpm")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("swtpm: {e}");
            return None;
        }
    };
    let mut tpm = HostTpm::open(&swtpm.tcti(), &dir.join("sc")).ok()?;
    let request = tpm.enrollment_request("host-1", &PcrSelection::default_host()).unwrap();
    let certify = tpm.certify_binding_key(&[0x11; 32]).unwrap();
    let quote = tpm.quote(&[0x22; 32]).unwrap();
    drop(tpm);
    drop(swtpm);
    let _ = std::fs::remove_dir_all(&dir);
    Some((request, certify, quote))
}
