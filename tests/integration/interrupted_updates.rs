//! A grant, revoke or share the cloud platform accepted is not lost when it is interrupted
//! between the TTP and the volume header (docs/CLOUD-API.md, "Interrupted updates"): here the
//! TTP is down when a domain manager revokes a VM. The CP keeps the signed update, says so,
//! and finishes it by itself once the TTP is back — the domain is neither stuck behind a
//! registration nor silently left with the old access list, and nobody repeats the command.
//! (tests/integration/crash_consistency.rs covers the same with kill -9 of the TTP and the CP.)
//! Needs root, swtpm, /dev/fuse and /dev/loop-control (the all-in-one cloud).

use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager};
use protocol::cloud::{AttachmentStatus, MappingStatus};
use protocol::domain::AccessMode;
use skydd::cloud::{AllInOne, DEMO_LAYOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_interrupted_by_a_ttp_outage_is_finished_by_the_cloud_platform() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = AllInOne::start(dir.path(), &DEMO_LAYOUT, &mut |line| println!(".. {line}")).await.unwrap();
    let alice = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let acl = vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-b:ro").unwrap()];
    let domain = alice.create(Default::default(), acl, Vec::new(), 16 << 20).await.unwrap();
    let id = domain.id.clone();
    let attached = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    assert_eq!(attached.status, AttachmentStatus::Attached);

    let (revoke, show) = cloud
        .ttp_outage(async {
            let revoke = alice.revoke(&id, "vm-a").await;
            let show = alice.show(&id).await;
            (revoke, show)
        })
        .await
        .unwrap();

    // While the TTP is down: the revocation is refused for now, in words that say it is kept.
    let error = revoke.expect_err("the TTP is down: the revocation cannot be in force yet");
    let text = error.to_string();
    println!("revoke during the outage:\nerror: {text}");
    assert_eq!(error.code(), Some("ttp_unreachable"), "{text}");
    assert!(text.contains("keeps version 2") && text.contains("domain show"), "{text}");
    // Reading the domain tries to finish the update first, and says why it cannot.
    let error = show.expect_err("the update is still pending while the TTP is down");
    assert_eq!(error.code(), Some("ttp_unreachable"), "{error}");
    // Nothing was half-done meanwhile: the TTP's newest version is still 1.
    let registered = cloud.ttp.service.store().domain(&id).unwrap().unwrap();
    assert_eq!(registered.latest_version, 1, "the TTP registered nothing while it was down");

    // The TTP is back: the next read finishes the revocation; nobody repeats it.
    let view = alice.show(&id).await.unwrap();
    assert_eq!(view.version, 2, "the CP finished the pending update");
    assert!(view.acl.iter().all(|entry| entry.vm_id != "vm-a"), "vm-a is revoked: {:?}", view.acl);
    assert_eq!(cloud.ttp.service.store().domain(&id).unwrap().unwrap().latest_version, 2);
    // ... and enforced it: vm-a's attachment was detached on its host.
    let attachments = alice.attachments().await.unwrap();
    let vm_a = attachments.iter().find(|a| a.id == attached.id).expect("the attachment is still known");
    assert_eq!(vm_a.status, AttachmentStatus::Detached, "the revocation was enforced when it was finished");
    let compute_1 = cloud.hosts.iter().find(|h| h.id == "compute-1").unwrap();
    let on_host = compute_1.service.list().unwrap().attachments;
    assert!(
        on_host.iter().all(|a| a.attachment_id != attached.id || a.status != MappingStatus::Attached),
        "compute-1 still maps vm-a: {on_host:?}"
    );
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.expect_err("vm-a was revoked");
    assert_eq!(refused.code(), Some("vm_not_in_acl"), "{refused}");

    // The domain is not stuck: the TTP releases its key for the header now in force, and the
    // next update builds on it.
    let b = alice.attach(&id, "vm-b", AccessMode::Ro, 300).await.unwrap();
    assert_eq!((b.status, b.version), (AttachmentStatus::Attached, 2));
    alice.detach(&id, "vm-b").await.unwrap();
    let view = alice.grant(&id, "vm-c", AccessMode::Ro).await.unwrap();
    assert_eq!(view.version, 3);

    a_rotation_interrupted_by_a_ttp_outage_is_finished_too(&mut cloud, &alice, &id).await;
    cloud.stop().await;
}

/// The same for a key rotation (docs/PROTOCOL.md "Key rotation"): the CP writes the owner's
/// signed rotation ahead, says it keeps it, and registers and writes it once the TTP is back;
/// the domain is never left with a header the TTP calls an old generation.
async fn a_rotation_interrupted_by_a_ttp_outage_is_finished_too(cloud: &mut AllInOne, alice: &DomainManager, id: &str) {
    let generation = |cloud: &AllInOne| cloud.ttp.service.store().domain(id).unwrap().unwrap().key_generation;
    assert_eq!(generation(cloud), 1);
    let rotate = cloud.ttp_outage(async { alice.rotate(id, true).await }).await.unwrap();
    let error = rotate.expect_err("the TTP is down: the rotation cannot be registered now");
    let text = error.to_string();
    println!("rotate during the outage:\nerror: {text}");
    assert_eq!(error.code(), Some("ttp_unreachable"), "{text}");
    assert!(text.contains("keeps the signed rotation"), "{text}");
    assert_eq!(generation(cloud), 1, "the TTP registered nothing while it was down");

    // Back: the next request for the domain finishes the rotation; nobody repeats it.
    let view = alice.show(id).await.unwrap();
    let rotation = view.header.rotation.as_ref().expect("the header records the finished-later rotation");
    assert_eq!(rotation.boundary, 0);
    let registration = protocol::messages::Registration::decode(&view.header.registration.message).unwrap();
    assert_eq!((registration.key_generation, generation(cloud)), (2, 2));
    // And it is usable: the read-write attach re-encrypts, then a read-only one is served.
    alice.attach(id, "vm-b", AccessMode::Ro, 300).await.expect_err("read-only waits for the re-encryption");
    alice.grant(id, "vm-a", AccessMode::Rw).await.unwrap();
    alice.attach(id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    alice.detach(id, "vm-a").await.unwrap();
    assert!(alice.show(id).await.unwrap().header.rotation.is_none(), "the rotation ended");
    alice.attach(id, "vm-b", AccessMode::Ro, 300).await.unwrap();
    alice.detach(id, "vm-b").await.unwrap();
}
