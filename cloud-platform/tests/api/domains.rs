//! Domains over the API: create, list, update, share, torn writes, delete.

use std::os::unix::fs::{FileExt, MetadataExt};

use net::Role;
use protocol::cloud::{CreateDomainRequest, DomainList, DomainView};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format::{self, SlotError, DATA_OFFSET, HEADER_AREA_SIZE, SLOT_SIZE};
use protocol::messages::{HeaderRecord, RegisterDomainRequest, RegisterDomainResponse};
use protocol::signing::SignatureContext;

use crate::lab::{header_area, refusal, registration_of, Lab, Manager, MIB};

/// dm-alice's 64 MiB domain (vm-a rw, vm-b ro), version 1.
async fn alices_domain(alice: &Manager) -> (Descriptor, DomainView) {
    let d1 = alice.descriptor(&[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]);
    let v1 = alice.create_domain(&d1, 64 * MIB).await.expect("alice creates her domain");
    (d1, v1)
}

/// Version 2 of `d1`: grants vm-c ro and shares with dm-bob.
async fn grant_and_share(alice: &Manager, d1: &Descriptor) -> (Descriptor, DomainView) {
    let d2 = d1
        .next_version(|d| {
            d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Ro });
            d.shared_with.push("dm-bob".into());
        })
        .unwrap();
    let v2 = alice.update(&d2).await.expect("the owner updates");
    (d2, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_registers_version_1_and_writes_a_sparse_volume() {
    let lab = Lab::start().await;
    let alice = lab.manager("dm-alice");
    let (d1, v1) = alices_domain(&alice).await;
    let id = d1.domain_id.clone();
    assert_eq!(
        (v1.id.as_str(), v1.owner.as_str(), v1.version, v1.status.as_str()),
        (id.as_str(), "dm-alice", 1, "available")
    );
    assert_eq!((v1.size_bytes, v1.acl.clone(), v1.metadata.clone()), (64 * MIB, d1.acl.clone(), d1.metadata.clone()));
    assert_eq!(v1.header.descriptor.message, d1.encode().unwrap(), "the header holds the descriptor alice signed");
    let reg1 = registration_of(&v1.header);
    assert_eq!((reg1.domain_id.as_str(), reg1.version), (id.as_str(), 1));
    v1.header.registration.verify_signature(SignatureContext::Registration).expect("the TTP signed the registration");

    println!("  the volume file: sized, sparse, header in slot 0 with sequence 1");
    let path = lab.volume(&id);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), DATA_OFFSET + 64 * MIB);
    println!("  {} bytes long, {} bytes allocated", meta.len(), meta.blocks() * 512);
    assert!(meta.blocks() * 512 <= DATA_OFFSET, "only the header is allocated: {} bytes", meta.blocks() * 512);
    let active = format::decode_header_area(&header_area(&path)).unwrap();
    assert_eq!((active.slot, active.seq, active.skipped.clone()), (0, 1, Some((1, SlotError::Empty))));
    assert_eq!(HeaderRecord::decode(&active.payload).unwrap(), v1.header, "the header on disk is the one answered");
    assert_eq!(alice.get(&id).await.unwrap(), v1);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_sizes_not_a_positive_multiple_of_4096_or_beyond_the_limit() {
    let lab = Lab::start().await;
    let alice = lab.manager("dm-alice");
    for size in [0, 10_000, 2 << 40] {
        let (status, code, message) = refusal(alice.create_domain(&alice.descriptor(&[]), size).await);
        assert_eq!((status, code.as_str()), (400, "invalid_size"), "{message}");
    }
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refuses_a_descriptor_another_owner_signed() {
    let lab = Lab::start().await;
    let (alice, mallory) = (lab.manager("dm-alice"), lab.manager("dm-mallory"));
    println!("dm-mallory submits a descriptor dm-alice signed (a replay): only the owner creates");
    let stolen = alice.descriptor(&[("vm-m", AccessMode::Rw)]);
    let (status, code, message) = refusal(
        mallory
            .cp
            .post_json::<_, DomainView>(
                "/v1/domains",
                &CreateDomainRequest { descriptor: alice.sign(&stolen), size_bytes: MIB },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    assert!(message.contains("dm-alice") && message.contains("dm-mallory"), "{message}");
    assert!(lab.ttp_service.store().domain(&stolen.domain_id).unwrap().is_none(), "the TTP never saw it");
    assert!(!lab.volume(&stolen.domain_id).exists());
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_paginated_and_shows_only_the_callers_domains() {
    let lab = Lab::start().await;
    let (alice, bob, mallory) = (lab.manager("dm-alice"), lab.manager("dm-bob"), lab.manager("dm-mallory"));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = alice.descriptor(&[("vm-a", AccessMode::Rw)]);
        ids.push(alice.create_domain(&d, 4096).await.unwrap().id);
    }
    ids.sort();
    println!("pages of 2 over dm-alice's 3 domains; dm-bob sees none");
    let page1: DomainList = alice.cp.get_json("/v1/domains?limit=2").await.unwrap();
    assert_eq!(page1.domains.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(page1.next_marker.as_deref(), Some(ids[1].as_str()));
    let page2: DomainList = alice.cp.get_json(&format!("/v1/domains?limit=2&marker={}", ids[1])).await.unwrap();
    assert_eq!(page2.domains.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids[2..]);
    assert_eq!(page2.next_marker, None);
    let bobs: DomainList = bob.cp.get_json("/v1/domains").await.unwrap();
    assert!(bobs.domains.is_empty());
    let (status, code, _) = refusal(mallory.get(&ids[0]).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.get_json::<DomainList>("/v1/domains?limit=0").await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_lands_in_the_other_slot_and_shares_the_domain() {
    let lab = Lab::start().await;
    let (alice, bob) = (lab.manager("dm-alice"), lab.manager("dm-bob"));
    let (d1, v1) = alices_domain(&alice).await;
    let id = d1.domain_id.clone();
    println!("version 2 grants vm-c ro and shares with dm-bob; the header goes to slot 1");
    let (_, v2) = grant_and_share(&alice, &d1).await;
    assert_eq!((v2.version, v2.shared_with.clone()), (2, vec!["dm-bob".to_string()]));
    assert_eq!(v2.acl.len(), 3);
    let reg2 = registration_of(&v2.header);
    assert_eq!((reg2.version, reg2.nonce_r), (2, registration_of(&v1.header).nonce_r), "the TTP carried r over");
    let area = header_area(&lab.volume(&id));
    let active = format::decode_header_area(&area).unwrap();
    assert_eq!((active.slot, active.seq, active.skipped.clone()), (1, 2, None));
    assert_eq!(HeaderRecord::decode(&active.payload).unwrap(), v2.header);
    let old = format::decode_slot(&area[..SLOT_SIZE]).expect("the old slot is still valid");
    assert_eq!((old.seq, HeaderRecord::decode(&old.payload).unwrap()), (1, v1.header.clone()));
    let bobs: DomainList = bob.cp.get_json("/v1/domains").await.unwrap();
    assert_eq!(bobs.domains.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [id.as_str()], "shared with dm-bob now");
    assert_eq!(bob.get(&id).await.unwrap().version, 2);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_is_refused_to_a_shared_manager_and_for_an_old_version() {
    let lab = Lab::start().await;
    let (alice, bob) = (lab.manager("dm-alice"), lab.manager("dm-bob"));
    let (d1, _) = alices_domain(&alice).await;
    let (d2, _) = grant_and_share(&alice, &d1).await;
    println!("dm-bob (shared, not the owner) tries version 3");
    let d3_by_bob = d2.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-a")).unwrap();
    let (status, code, message) = refusal(bob.update(&d3_by_bob).await);
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    assert!(message.contains("only the owner dm-alice"), "{message}");

    println!("refusal by the TTP, passed through: dm-alice sends version 2 again");
    let (status, code, message) = refusal(alice.update(&d2).await);
    assert_eq!((status, code.as_str()), (409, "version_rollback"), "{message}");
    assert_eq!(alice.get(&d1.domain_id).await.unwrap().version, 2, "nothing changed");
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_of_the_newer_slot_leaves_the_older_header_in_force() {
    let lab = Lab::start().await;
    let alice = lab.manager("dm-alice");
    let (d1, v1) = alices_domain(&alice).await;
    let id = d1.domain_id.clone();
    grant_and_share(&alice, &d1).await;
    let path = lab.volume(&id);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut saved = vec![0u8; 4096];
    file.read_exact_at(&mut saved, SLOT_SIZE as u64).unwrap();
    file.write_all_at(&[0xa5; 100], SLOT_SIZE as u64 + 200).unwrap();
    let active = format::decode_header_area(&header_area(&path)).unwrap();
    assert_eq!((active.slot, active.seq), (0, 1));
    assert!(matches!(active.skipped, Some((1, SlotError::ChecksumMismatch { .. }))), "{:?}", active.skipped);
    let seen = alice.get(&id).await.unwrap();
    assert_eq!((seen.version, seen.header.clone()), (1, v1.header.clone()), "the CP reads the header in force");
    file.write_all_at(&saved, SLOT_SIZE as u64).unwrap();
    assert_eq!(alice.get(&id).await.unwrap().version, 2);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_zeroes_the_header_and_the_ttp_refuses_the_domain_after() {
    let lab = Lab::start().await;
    let (alice, bob) = (lab.manager("dm-alice"), lab.manager("dm-bob"));
    let (d1, _) = alices_domain(&alice).await;
    let id = d1.domain_id.clone();
    let (d2, v2) = grant_and_share(&alice, &d1).await;
    let other = alice.create_domain(&alice.descriptor(&[("vm-a", AccessMode::Rw)]), 4096).await.unwrap().id;

    println!("dm-bob may not delete; a deletion for another domain is refused; dm-alice deletes");
    let (status, code, _) = refusal(bob.delete(&id, &bob.deletion(&id)).await);
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    let (status, code, _) = refusal(alice.delete(&id, &alice.deletion(&other)).await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    let path = lab.volume(&id);
    let held = std::fs::File::open(&path).unwrap();
    let deleted = alice.delete(&id, &alice.deletion(&id)).await.expect("the owner deletes");
    assert_eq!((deleted.status.as_str(), deleted.version), ("deleted", 2));
    assert!(!path.exists(), "the volume file is removed");
    let mut area = vec![0xffu8; HEADER_AREA_SIZE];
    held.read_exact_at(&mut area, 0).unwrap();
    assert!(area.iter().all(|&b| b == 0), "both header slots were overwritten with zeros before the file was removed");
    let (status, code, message) = refusal(alice.get(&id).await);
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    assert!(message.contains(&id), "{message}");
    let (status, code, _) = refusal(alice.delete(&id, &alice.deletion(&id)).await);
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    let left: DomainList = alice.cp.get_json("/v1/domains").await.unwrap();
    assert_eq!(left.domains.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [other.as_str()]);

    println!("the TTP refuses the deleted domain: a newer version with the last registration");
    let cp_at_ttp = lab.pki.client("cp-1", Role::Ttp, &lab.ttp.url);
    let d3 = d2.next_version(|_| {}).unwrap();
    let (status, code, _) = refusal(
        cp_at_ttp
            .post_json::<_, RegisterDomainResponse>(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: alice.sign(&d3),
                    previous_registration: Some(v2.header.registration.clone()),
                },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    lab.stop().await;
}
