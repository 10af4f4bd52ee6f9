//! The userspace volume backend for real: a sparse volume file, FUSE + loop + ext4, rw then
//! ro, and the on-disk bytes checked against an independent AES-XTS implementation
//! (RustCrypto xts-mode), so the format really is aes-xts-plain64 with 4 KiB sectors and
//! the sector index as tweak, as dm-crypt reads it. Needs root, /dev/fuse and loop
//! devices, and fails saying which is missing without them (secure_component::prerequisites).

use skydd_testkit::prerequisites;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use aes::cipher::KeyInit;
use protocol::format::{self, DATA_OFFSET, SECTOR_SIZE};
use protocol::secret::SecretBytes;
use secure_component::volume::filesystem;
use secure_component::volume::userspace::{MappingRecord, UserspaceBackend};
use secure_component::volume::{OpenMode, VolumeBackend};

const DATA_LEN: u64 = 48 << 20;
const MARKER: &[u8] = b"SKYDD-PLAINTEXT-MARKER-7f3a";

fn independent_decrypt(key: &[u8], first_sector: u64, buf: &mut [u8]) {
    let xts = xts_mode::Xts128::new(
        aes::Aes256::new_from_slice(&key[..32]).unwrap(),
        aes::Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        xts.decrypt_sector(s, (first_sector as u128 + i as u128).to_le_bytes());
    }
}

#[test]
fn userspace_volume_end_to_end() {
    prerequisites::require(prerequisites::USERSPACE_VOLUME);
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path().join("vol.img");
    {
        let f = File::create(&volume).unwrap();
        f.write_all_at(&format::new_header_area(b"test descriptor").unwrap(), 0).unwrap();
        f.set_len(DATA_OFFSET + DATA_LEN).unwrap(); // sparse data area
    }
    let mut raw_key = [0u8; 64];
    openssl::rand::rand_bytes(&mut raw_key).unwrap();
    let key_copy = raw_key; // for the independent check only
    let key = SecretBytes::from_slice_wiping(&mut raw_key);

    let backend = UserspaceBackend::new(tmp.path().join("state")).unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    // ---- read-write: mkfs, mount, write files ----
    let opened = backend.open("skydd-test", &volume, &key, OpenMode::ReadWrite).unwrap();
    assert!(opened.device.to_string_lossy().starts_with("/dev/loop"), "{:?}", opened.device);
    assert_eq!(backend.list().unwrap().len(), 1);
    assert!(backend.open("skydd-test", &volume, &key, OpenMode::ReadWrite).is_err(), "double open must fail");
    assert!(filesystem::ensure_ext4(&opened.device).unwrap(), "fresh volume must be formatted");
    assert!(!filesystem::ensure_ext4(&opened.device).unwrap(), "second call must see the superblock");
    secure_component::hypervisor::local::mount_ext4(&opened.device, &mnt, OpenMode::ReadWrite).unwrap();
    let small: Vec<u8> = MARKER.repeat(100);
    std::fs::write(mnt.join("hello.txt"), &small).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    {
        let mut f = File::create(mnt.join("big.bin")).unwrap();
        f.write_all(&big).unwrap();
        f.sync_all().unwrap();
    }
    filesystem::unmount(&mnt).unwrap();
    backend.close("skydd-test").unwrap();
    assert!(backend.list().unwrap().is_empty());

    // ---- the raw file holds no plaintext ----
    let mut raw = Vec::new();
    File::open(&volume).unwrap().read_to_end(&mut raw).unwrap();
    assert!(!raw.windows(MARKER.len()).any(|w| w == MARKER), "plaintext marker found in the raw volume");
    assert!(format::decode_header_area(&raw[..format::HEADER_AREA_SIZE]).is_ok(), "header area untouched");

    // ---- an independent XTS implementation reads the data area ----
    let mut data = raw[DATA_OFFSET as usize..].to_vec();
    independent_decrypt(&key_copy, 0, &mut data);
    assert_eq!(&data[1080..1082], &[0x53, 0xEF], "ext4 superblock magic at data offset 1080");
    assert!(data.windows(MARKER.len()).any(|w| w == MARKER), "file content not found after independent decryption");

    // ---- read-only: files intact, writes refused ----
    let ro = backend.open("skydd-test", &volume, &key, OpenMode::ReadOnly).unwrap();
    assert_eq!(backend.list().unwrap()[0].mode, OpenMode::ReadOnly);
    // Our engine's plaintext view equals the independent decryption, byte for byte.
    let mut via_engine = Vec::new();
    File::open(&ro.device).unwrap().read_to_end(&mut via_engine).unwrap();
    assert_eq!(via_engine.len(), data.len());
    assert!(via_engine == data, "engine and independent decryption differ");
    // The kernel lets a read-only block device be opened for writing; the write fails.
    if let Ok(f) = OpenOptions::new().write(true).open(&ro.device) {
        let err = f.write_all_at(&[0u8; 4096], 0).unwrap_err();
        assert!(matches!(err.raw_os_error(), Some(1) | Some(30)), "expected EPERM/EROFS, got {err}");
    }
    assert!(!filesystem::ensure_ext4(&ro.device).unwrap());
    secure_component::hypervisor::local::mount_ext4(&ro.device, &mnt, OpenMode::ReadOnly).unwrap();
    assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), small);
    assert!(std::fs::read(mnt.join("big.bin")).unwrap() == big);
    let err = std::fs::write(mnt.join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "expected EROFS, got {err}");
    let err = OpenOptions::new().append(true).open(mnt.join("hello.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "expected EROFS, got {err}");
    filesystem::unmount(&mnt).unwrap();
    backend.close("skydd-test").unwrap();

    // ---- a record left by a dead process is reported stale and cleaned ----
    let rec = MappingRecord {
        name: "skydd-gone".into(),
        volume: volume.clone(),
        device: "/dev/loop-does-not-exist".into(),
        mountpoint: tmp.path().join("state/skydd-gone.mnt"),
        read_only: true,
        pid: 999_999_999,
    };
    std::fs::write(backend.state_dir().join("skydd-gone.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
    let status = backend.list_detailed().unwrap();
    assert_eq!(status.len(), 1);
    let reason = status[0].stale.clone().expect("must be stale");
    assert!(reason.contains("pid 999999999") && reason.contains("gone"), "{reason}");
    assert!(backend.list().unwrap().is_empty(), "stale mappings are not listed as open");
    assert!(backend.open("skydd-gone", &volume, &key, OpenMode::ReadOnly).unwrap_err().to_string().contains("stale"));
    assert_eq!(backend.cleanup_stale().unwrap(), vec!["skydd-gone".to_string()]);
    assert!(backend.list_detailed().unwrap().is_empty());
}
