//! Key rotation end to end (docs/PROTOCOL.md "Key rotation", docs/FORMAT.md "Key rotation"):
//! the owner revokes a VM and rotates the domain's key in one go (`domain revoke --rotate`);
//! the next read-write attach re-encrypts the volume on its host before the VM sees it. The
//! data written before is read back, and the volume's data area, checked with an independent
//! AES-XTS (RustCrypto xts-mode) under keys computed independently (OpenSSL's HKDF from the
//! custodians' K_TTP and each registration's r), no longer decrypts with the old key — a copy
//! of which a revoked party would hold — and decrypts with the new one, including what was
//! written after. Needs root, swtpm, /dev/fuse and /dev/loop-control (the all-in-one cloud).

use aes::cipher::KeyInit;
use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager};
use protocol::domain::{AccessMode, Descriptor, VolumeFormat};
use protocol::format::{self, DATA_OFFSET, SECTOR_SIZE};
use protocol::messages::{HeaderRecord, Registration};
use skydd::cloud::{AllInOne, DEMO_LAYOUT};
use skydd_testkit::independent_key;

const BEFORE: &[u8] = b"SKYDD-WRITTEN-BEFORE-THE-ROTATION-41c9";
const AFTER: &[u8] = b"SKYDD-WRITTEN-AFTER-THE-ROTATION-9d07";

/// The data area of `raw` decrypted with `key` by RustCrypto's XTS (docs/FORMAT.md "Data area").
fn independent_decrypt(key: &[u8], raw: &[u8]) -> Vec<u8> {
    let xts = xts_mode::Xts128::new(
        aes::Aes256::new_from_slice(&key[..32]).unwrap(),
        aes::Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    let mut data = raw[DATA_OFFSET as usize..].to_vec();
    for (i, sector) in data.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        xts.decrypt_sector(sector, (i as u128).to_le_bytes());
    }
    data
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn header_of(raw: &[u8]) -> HeaderRecord {
    let active = format::decode_header_area(&raw[..format::HEADER_AREA_SIZE]).unwrap();
    HeaderRecord::decode(&active.payload).unwrap()
}

/// A new domain of `format` (vm-a rw, vm-b ro) in which vm-a wrote `before.txt`, detached:
/// its id, its volume file and vm-a's mount point.
async fn domain_with_a_record(
    cloud: &AllInOne,
    alice: &DomainManager,
    format: VolumeFormat,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let acl = vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-b:ro").unwrap()];
    let domain = alice.create_with_format(Default::default(), acl, vec![], 24 << 20, format).await.unwrap();
    let id = domain.id.clone();
    let volume = cloud.dir.join("cloud-platform").join("volumes").join(format!("{id}.vol"));
    let mount = cloud.vm_mount("vm-a", &id, &DEMO_LAYOUT).unwrap();
    alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    std::fs::write(mount.join("before.txt"), BEFORE.repeat(50)).unwrap();
    alice.detach(&id, "vm-a").await.unwrap();
    (id, volume, mount)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_rotate_then_the_old_key_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = AllInOne::start(dir.path(), &DEMO_LAYOUT, &mut |line| println!(".. {line}")).await.unwrap();
    let alice = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let (id, volume, mount) = domain_with_a_record(&cloud, &alice, VolumeFormat::V1).await;

    // The key a party holding vm-b's release would keep: K of generation 1.
    let master = cloud.ttp.master_key_from_custodians(1).unwrap().expose().to_vec();
    let raw = std::fs::read(&volume).unwrap();
    let header = header_of(&raw);
    let descriptor = Descriptor::decode(&header.descriptor.message).unwrap();
    let old_registration = Registration::decode(&header.registration.message).unwrap();
    assert_eq!(old_registration.key_generation, 1);
    let old_key = independent_key(&master, &old_registration, &id, &descriptor.metadata_hash());
    assert!(contains(&independent_decrypt(&old_key, &raw), BEFORE), "the old key reads the volume before");

    // `domain revoke --rotate`: the revocation, then a new key generation.
    alice.revoke(&id, "vm-b").await.unwrap();
    let rotated = alice.rotate(&id, true).await.unwrap();
    let said = rotated.re_encryption.as_deref().unwrap_or_default();
    assert!(said.contains("next read-write attach") && said.contains("no read-write attachment"), "{said}");
    let rotation = rotated.header.rotation.as_ref().expect("the header records the rotation");
    assert_eq!(rotation.boundary, 0);
    let new_registration = Registration::decode(&rotated.header.registration.message).unwrap();
    assert_eq!(new_registration.key_generation, 2);
    assert_ne!(new_registration.nonce_r, old_registration.nonce_r, "a fresh r");
    let second = alice.rotate(&id, true).await.expect_err("one rotation at a time");
    assert!(second.to_string().contains("being rotated already"), "{second}");
    assert_eq!(cloud.ttp.service.store().domain(&id).unwrap().unwrap().key_generation, 2);

    // While it is rotating only a read-write attach is served: a grant goes on (the rotation
    // is carried over to the new version) and a read-only attach is refused with its own code.
    alice.grant(&id, "vm-c", AccessMode::Ro).await.unwrap();
    let refused = alice.attach(&id, "vm-c", AccessMode::Ro, 300).await.unwrap_err();
    assert_eq!(refused.code(), Some("key_rotation_in_progress"), "{refused}");
    assert!(refused.to_string().contains("what to do:"), "{refused}");

    // The read-write attach re-encrypts before vm-a sees the volume; the data is intact.
    alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    assert_eq!(std::fs::read(mount.join("before.txt")).unwrap(), BEFORE.repeat(50));
    std::fs::write(mount.join("after.txt"), AFTER.repeat(50)).unwrap();
    alice.detach(&id, "vm-a").await.unwrap();

    let raw = std::fs::read(&volume).unwrap();
    let header = header_of(&raw);
    assert!(header.rotation.is_none(), "the finished header holds only the new registration");
    let registration = Registration::decode(&header.registration.message).unwrap();
    assert_eq!((registration.key_generation, registration.nonce_r), (2, new_registration.nonce_r));
    let new_key = independent_key(&master, &registration, &id, &descriptor.metadata_hash());
    let with_new = independent_decrypt(&new_key, &raw);
    assert_eq!(&with_new[1080..1082], &[0x53, 0xEF], "ext4 under the new key");
    assert!(contains(&with_new, BEFORE) && contains(&with_new, AFTER), "the new key reads old and new data");
    let with_old = independent_decrypt(&old_key, &raw);
    assert_ne!(&with_old[1080..1082], &[0x53, 0xEF], "no ext4 superblock under the old key");
    assert!(!contains(&with_old, BEFORE) && !contains(&with_old, AFTER), "the old key reads nothing");
    // The rotation is audited, and after it a read-only attach is served again.
    let history = alice.history(&id).await.unwrap().records;
    assert!(history.iter().any(|r| r.event == "rotate" && r.outcome == "ok"), "{history:?}");
    alice.attach(&id, "vm-c", AccessMode::Ro, 300).await.unwrap();
    alice.detach(&id, "vm-c").await.unwrap();
    let store = cloud.ttp.service.store().domain(&id).unwrap().unwrap();
    assert_eq!(store.previous_master_key_version, None, "the TTP saw the rotation finish");

    online_rotation_under_a_writing_vm(&alice, &id, &volume, &mount, &master, &new_key).await;
    format_2_rotation_moves_tags_and_tree(&cloud, &alice, &master).await;
    cloud.stop().await;
}

/// Format 2 (docs/FORMAT.md "Key rotation of a format-2 volume"): the data area, its tags and
/// its tree move to the new key at the next read-write attach, and the TTP's anchor to the
/// new key generation. The data reads back read-write and read-only (every tag now under the
/// new `K_mac`); the old key reads nothing; the copy from before the rotation is refused.
async fn format_2_rotation_moves_tags_and_tree(cloud: &AllInOne, alice: &DomainManager, master: &[u8]) {
    let (id, volume, mount) = domain_with_a_record(cloud, alice, VolumeFormat::V2).await;
    let anchor = |id: &str| cloud.ttp.service.store().newest_anchor(id).unwrap().expect("an anchor").anchor;
    let before = anchor(&id);
    assert_eq!(before.key_generation, 1);
    let copy_before = std::fs::read(&volume).unwrap();
    let header = header_of(&copy_before);
    let descriptor = Descriptor::decode(&header.descriptor.message).unwrap();
    let old_key = independent_key(
        master,
        &Registration::decode(&header.registration.message).unwrap(),
        &id,
        &descriptor.metadata_hash(),
    );

    let rotated = alice.rotate(&id, true).await.unwrap();
    let said = rotated.re_encryption.as_deref().unwrap_or_default();
    assert!(said.contains("next read-write attach") && said.contains("format 2"), "{said}");
    alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    assert_eq!(std::fs::read(mount.join("before.txt")).unwrap(), BEFORE.repeat(50));
    std::fs::write(mount.join("after.txt"), AFTER.repeat(50)).unwrap();
    alice.detach(&id, "vm-a").await.unwrap();

    let after = anchor(&id);
    assert_eq!(after.key_generation, 2, "the TTP anchors a root tagged under generation 2");
    assert!(after.epoch > before.epoch, "epochs go on across the rotation: {} then {}", before.epoch, after.epoch);
    let raw = std::fs::read(&volume).unwrap();
    let header = header_of(&raw);
    assert!(header.rotation.is_none());
    let registration = Registration::decode(&header.registration.message).unwrap();
    assert_eq!(registration.key_generation, 2);
    let new_key = independent_key(master, &registration, &id, &descriptor.metadata_hash());
    let with_new = independent_decrypt(&new_key, &raw);
    assert!(contains(&with_new, BEFORE) && contains(&with_new, AFTER), "the new key reads old and new data");
    let with_old = independent_decrypt(&old_key, &raw);
    assert!(!contains(&with_old, BEFORE) && !contains(&with_old, AFTER), "the old key reads nothing");
    let history = alice.history(&id).await.unwrap().records;
    assert!(
        history.iter().any(|r| r.event == "integrity_commit" && r.message.contains("under key generation 2")),
        "{history:?}"
    );

    // vm-b reads through the tree rebuilt under the new key.
    alice.attach(&id, "vm-b", AccessMode::Ro, 300).await.unwrap();
    let vm_b = cloud.vm_mount("vm-b", &id, &DEMO_LAYOUT).unwrap();
    assert_eq!(std::fs::read(vm_b.join("after.txt")).unwrap(), AFTER.repeat(50));
    alice.detach(&id, "vm-b").await.unwrap();

    // The provider puts back the copy from before the rotation: refused.
    std::fs::write(&volume, &copy_before).unwrap();
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.unwrap_err();
    assert!(
        matches!(refused.code(), Some("version_rollback") | Some("bad_request")),
        "the old copy's header is of generation 1: {refused}"
    );
    std::fs::write(&volume, &raw).unwrap();
}

/// Online (docs/PROTOCOL.md "Online re-encryption"): vm-a holds the domain read-write and
/// keeps appending and fsyncing records while its owner rotates the key; its host
/// re-encrypts under the live mapping. Every record reads back in the VM, the finished
/// volume decrypts under generation 3 only, and generation 2's key reads nothing of it.
async fn online_rotation_under_a_writing_vm(
    alice: &DomainManager,
    id: &str,
    volume: &std::path::Path,
    mount: &std::path::Path,
    master: &[u8],
    generation_2_key: &[u8],
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    alice.attach(id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (log, stop_writer) = (mount.join("online.log"), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut written = 0u64;
        while !stop_writer.load(Ordering::SeqCst) || written < 50 {
            writeln!(file, "ONLINE-RECORD-{written:08}-{}", "x".repeat(200)).unwrap();
            file.sync_data().unwrap();
            written += 1;
        }
        written
    });
    let rotated = alice.rotate(id, true).await.unwrap();
    let said = rotated.re_encryption.clone().unwrap_or_default();
    assert!(said.starts_with("online on host") && said.contains("vm-a"), "{said}");
    assert_eq!(Registration::decode(&rotated.header.registration.message).unwrap().key_generation, 3);
    // The host finishes in the background: the header loses its rotation.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while header_of(&std::fs::read(volume).unwrap()).rotation.is_some() {
        assert!(std::time::Instant::now() < deadline, "the online re-encryption did not finish in 120 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let written = tokio::task::spawn_blocking(move || writer.join().unwrap()).await.unwrap();
    let log = std::fs::read_to_string(mount.join("online.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len() as u64, written, "every record the VM wrote reads back");
    for (n, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("ONLINE-RECORD-{n:08}-")), "record {n}: {line:.40}");
    }
    alice.detach(id, "vm-a").await.unwrap();

    let raw = std::fs::read(volume).unwrap();
    let header = header_of(&raw);
    assert!(header.rotation.is_none());
    let descriptor = Descriptor::decode(&header.descriptor.message).unwrap();
    let registration = Registration::decode(&header.registration.message).unwrap();
    assert_eq!(registration.key_generation, 3);
    let key = independent_key(master, &registration, id, &descriptor.metadata_hash());
    let with_new = independent_decrypt(&key, &raw);
    assert_eq!(&with_new[1080..1082], &[0x53, 0xEF], "ext4 under generation 3");
    assert!(contains(&with_new, b"ONLINE-RECORD-00000000-"), "the records are under generation 3");
    assert!(contains(&with_new, BEFORE) && contains(&with_new, AFTER), "and so is everything before");
    let with_old = independent_decrypt(generation_2_key, &raw);
    assert!(
        !contains(&with_old, b"ONLINE-RECORD-") && !contains(&with_old, BEFORE),
        "generation 2's key reads nothing of the volume any more"
    );
    let history = alice.history(id).await.unwrap().records;
    assert!(history.iter().any(|r| r.event == "rotate" && r.outcome == "ok"), "{history:?}");
    println!("online rotation: vm-a wrote {written} records (fsync each) while its volume was re-encrypted");
}
