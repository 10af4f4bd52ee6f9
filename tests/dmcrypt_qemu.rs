//! dm-crypt for real: the project's `secure_component::volume::dmcrypt` backend running in a
//! qemu (TCG) VM on Debian's kernel, against volumes written and read on the host. See
//! tests/qemu/mod.rs and docs/DMCRYPT.md. These tests never skip: a missing prerequisite is a
//! failure that says what to install.

mod qemu;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use openssl::symm::{Cipher, Crypter, Mode};
use protocol::secret::SecretBytes;
use qemu::{BootImage, Vm};
use secure_component::volume::userspace::UserspaceBackend;
use secure_component::volume::{filesystem, OpenMode, VolumeBackend};
use serde_json::json;
use sha2::{Digest, Sha256};
use skydd_volume::xts::XtsEngine;

const MIB: usize = 1024 * 1024;
const SECTOR: usize = 4096;

fn image() -> &'static BootImage {
    static IMAGE: OnceLock<BootImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let img = qemu::boot_image();
        eprintln!(
            "qemu boot image: kernel {} ({} modules), initramfs {} ({}), prepared in {:.1?} of which cargo build of the agent {:.1?}",
            img.kernel.version,
            img.modules.len(),
            img.initramfs.display(),
            if img.reused { "cached" } else { "built" },
            img.prepare_time,
            img.agent_build_time
        );
        img
    })
}

fn boot(disks: &[&Path]) -> Vm {
    let vm = Vm::boot(image(), disks);
    eprintln!("guest agent answered {:.1?} after qemu started", vm.boot_time);
    vm
}

fn random_key() -> [u8; 64] {
    let mut k = [0u8; 64];
    openssl::rand::rand_bytes(&mut k).expect("rand");
    k
}

/// The data area through the project's XTS engine (AES-256-XTS, 4096-byte sectors, tweak =
/// sector index little-endian): DESIGN §4, computed on the host.
fn xts(key: &[u8; 64], data: &[u8], encrypt: bool) -> Vec<u8> {
    let mut k = *key;
    let engine = XtsEngine::new(&SecretBytes::from_slice_wiping(&mut k)).expect("XtsEngine");
    let mut out = data.to_vec();
    if encrypt {
        engine.encrypt_sectors(0, &mut out).expect("encrypt");
    } else {
        engine.decrypt_sectors(0, &mut out).expect("decrypt");
    }
    out
}

/// An independent check of the engine with OpenSSL's EVP aes-256-xts, one sector at a time.
fn openssl_xts_decrypt(key: &[u8; 64], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for (i, (src, dst)) in data.chunks(SECTOR).zip(out.chunks_mut(SECTOR)).enumerate() {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut c = Crypter::new(Cipher::aes_256_xts(), Mode::Decrypt, key, Some(&iv)).expect("xts crypter");
        let mut buf = vec![0u8; SECTOR + 16];
        let n = c.update(src, &mut buf).expect("xts update");
        let m = c.finalize(&mut buf[n..]).expect("xts finalize");
        dst.copy_from_slice(&buf[..n + m]);
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut ctr = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(ctr.to_le_bytes()));
        ctr += 1;
    }
    out.truncate(len);
    out
}

fn key_hex(key: &[u8; 64]) -> String {
    hex::encode(key)
}

fn guest_sha(vm: &mut Vm, path: &str) -> String {
    let out = vm.sh(&format!("sha256sum {path}"));
    out.split_whitespace().next().unwrap_or_default().to_string()
}

/// The mapping must reference the keyring key, never contain the key, and the key must be
/// gone from the keyrings once the table is live.
fn assert_key_hygiene(vm: &mut Vm, name: &str, key: &[u8; 64]) {
    let table = vm.call(json!({"op": "table", "name": name}))["table"].as_str().unwrap_or_default().to_string();
    eprintln!("live table of {name}: {table}");
    assert!(table.contains(&format!(":64:logon:skydd:{name}")), "table: {table}");
    assert!(table.contains("sector_size:4096") && table.contains("iv_large_sectors"), "table: {table}");
    assert!(table.contains(" 2048 "), "data area must start at sector 2048: {table}");
    assert!(!table.contains(&key_hex(key)[..16]), "the table must never show the key: {table}");
    let keys = vm.sh("cat /proc/keys");
    assert!(!keys.contains("skydd:"), "the logon key must be invalidated after the resume:\n{keys}");
}

#[test]
fn host_encrypted_volume_opens_under_dmcrypt_in_the_guest() {
    let t0 = Instant::now();
    let key = random_key();
    let plain = pattern(8 * MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("a.vol");
    let mut bytes = vec![0u8; MIB]; // header area (contents irrelevant to the data area)
    bytes.extend_from_slice(&xts(&key, &plain, true));
    fs::write(&vol, &bytes).expect("write volume");
    let want = sha256_hex(&plain);

    let mut vm = boot(&[&vol]);
    let v = vm.call(json!({"op": "dm_version"}));
    eprintln!("guest device-mapper ioctl interface {}", v["version"]);

    // 1. The virtio disk as a block device, read-only.
    let opened =
        vm.call(json!({"op": "open", "name": "skydd-a", "path": "/dev/vda", "key_hex": key_hex(&key), "mode": "ro"}));
    let dev = opened["device"].as_str().expect("device").to_string();
    assert!(dev.starts_with("/dev/dm-"), "{opened}");
    assert_eq!(guest_sha(&mut vm, &dev), want, "plaintext through dm-crypt differs from what the host encrypted");
    assert_key_hygiene(&mut vm, "skydd-a", &key);
    let size = vm.sh(&format!("blockdev --getsize64 {dev}"));
    assert_eq!(size.trim(), (8 * MIB).to_string(), "mapping length = file size - 1 MiB");

    // 2. The same volume as a regular file: the backend puts it on a loop device.
    vm.sh("cp /dev/vda /tmp/a.img");
    let opened2 = vm.call(
        json!({"op": "open", "name": "skydd-a-file", "path": "/tmp/a.img", "key_hex": key_hex(&key), "mode": "rw"}),
    );
    let dev2 = opened2["device"].as_str().expect("device").to_string();
    assert_eq!(guest_sha(&mut vm, &dev2), want, "plaintext through loop + dm-crypt differs");
    let table2 =
        vm.call(json!({"op": "table", "name": "skydd-a-file"}))["table"].as_str().unwrap_or_default().to_string();
    assert!(table2.contains(" 7:"), "a regular file must be mapped through a loop device (major 7): {table2}");

    let list = vm.call(json!({"op": "list"}));
    let vols = list["volumes"].as_array().cloned().unwrap_or_default();
    assert_eq!(vols.len(), 2, "{list}");
    assert!(vols.iter().any(|v| v["name"] == "skydd-a" && v["mode"] == "ro" && v["device"] == dev.as_str()), "{list}");
    assert!(vols.iter().any(|v| v["name"] == "skydd-a-file" && v["mode"] == "rw"), "{list}");

    // A wrong name, a duplicate and a short key are refused with a reason.
    let e = vm
        .call_err(json!({"op": "open", "name": "skydd-a", "path": "/dev/vda", "key_hex": key_hex(&key), "mode": "ro"}));
    assert!(e.contains("already exists"), "{e}");
    let e =
        vm.call_err(json!({"op": "open", "name": "nope", "path": "/dev/vda", "key_hex": key_hex(&key), "mode": "ro"}));
    assert!(e.contains("must start with"), "{e}");
    let e = vm.call_err(
        json!({"op": "open", "name": "skydd-short", "path": "/dev/vda", "key_hex": "00".repeat(32), "mode": "ro"}),
    );
    assert!(e.contains("needs 64"), "{e}");

    // Close both: mappings gone, loop device released.
    vm.call(json!({"op": "close", "name": "skydd-a"}));
    vm.call(json!({"op": "close", "name": "skydd-a-file"}));
    let list = vm.call(json!({"op": "list"}));
    assert_eq!(list["volumes"], json!([]), "{list}");
    let (code, out) = vm.sh_status("cat /sys/block/loop*/loop/backing_file 2>/dev/null");
    assert!(code != 0 || out.trim().is_empty(), "loop device still attached: {out}");
    let e = vm.call_err(json!({"op": "close", "name": "skydd-a"}));
    assert!(e.contains("no device-mapper mapping named skydd-a"), "{e}");
    vm.shutdown();
    eprintln!("test a wall time {:.1?}", t0.elapsed());
}

#[test]
fn guest_formatted_volume_reads_back_on_the_host() {
    let t0 = Instant::now();
    let key = random_key();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("b.vol");
    let data_len = 32 * MIB;
    fs::File::create(&vol).and_then(|f| f.set_len((MIB + data_len) as u64)).expect("create volume");

    let mut vm = boot(&[&vol]);
    let opened =
        vm.call(json!({"op": "open", "name": "skydd-b", "path": "/dev/vda", "key_hex": key_hex(&key), "mode": "rw"}));
    let dev = opened["device"].as_str().expect("device").to_string();
    vm.sh(&format!("mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 {dev}"));
    vm.sh(&format!("mount -t ext4 {dev} /mnt"));
    vm.sh("echo 'patient 4711: allergic to penicillin' > /mnt/record.txt && mkdir /mnt/scans && dd if=/dev/urandom of=/mnt/scans/ct.bin bs=4096 count=300 2>/dev/null && sync");
    let files = vm.sh("cd /mnt && sha256sum record.txt scans/ct.bin");
    vm.sh("umount /mnt");
    let dev_sha = guest_sha(&mut vm, &dev);
    vm.call(json!({"op": "close", "name": "skydd-b"}));
    vm.shutdown();

    // Host: decrypt the data area with the XTS format and compare byte for byte.
    let raw = fs::read(&vol).expect("read volume");
    assert_eq!(raw.len(), MIB + data_len);
    assert!(raw[MIB..].chunks(SECTOR).take(8).any(|s| s.iter().any(|&b| b != 0)), "data area must be written");
    let plain = xts(&key, &raw[MIB..], false);
    assert!(plain[..MIB] == openssl_xts_decrypt(&key, &raw[MIB..2 * MIB])[..], "XtsEngine and OpenSSL disagree");
    assert_eq!(sha256_hex(&plain), dev_sha, "host decryption differs from what the guest's dm-crypt device held");
    assert!(!raw[MIB..].windows(11).any(|w| w == b"penicillin\n"), "the ciphertext must not contain the plaintext");
    let img = dir.path().join("b.plain");
    fs::write(&img, &plain).expect("write plaintext image");
    for line in files.lines() {
        let mut it = line.split_whitespace();
        let (Some(sum), Some(name)) = (it.next(), it.next()) else { continue };
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat /{name}")])
            .arg(&img)
            .output()
            .expect("debugfs (apt-get install e2fsprogs)");
        assert!(out.status.success(), "debugfs cat {name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha256_hex(&out.stdout), sum, "{name} differs between guest and host");
    }
    let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&img).output().expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck on the host-decrypted filesystem: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // And through the project's userspace backend (FUSE + loop) on the host: same files.
    let state = dir.path().join("us-state");
    let us = UserspaceBackend::new(&state).expect("userspace backend");
    let mut k = key;
    let secret = SecretBytes::from_slice_wiping(&mut k);
    let opened = us.open("skydd-b-host", &vol, &secret, OpenMode::ReadOnly).expect("userspace open");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mountpoint");
    secure_component::hypervisor::local::mount_ext4(&opened.device, &mnt, OpenMode::ReadOnly)
        .expect("mount through the userspace backend");
    let check = (|| {
        for line in files.lines() {
            let mut it = line.split_whitespace();
            let (Some(sum), Some(name)) = (it.next(), it.next()) else { continue };
            let data = fs::read(mnt.join(name)).map_err(|e| format!("{name}: {e}"))?;
            if sha256_hex(&data) != sum {
                return Err(format!("{name} differs through the userspace backend"));
            }
        }
        Ok::<(), String>(())
    })();
    let _ = filesystem::unmount(&mnt);
    us.close("skydd-b-host").expect("userspace close");
    check.expect("files through the userspace backend");
    eprintln!("test b wall time {:.1?}", t0.elapsed());
}

#[test]
fn read_only_mapping_refuses_writes() {
    let t0 = Instant::now();
    let key = random_key();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("c.vol");
    fs::File::create(&vol).and_then(|f| f.set_len((MIB + 16 * MIB) as u64)).expect("create volume");

    let mut vm = boot(&[&vol]);
    let dev = vm
        .call(json!({"op": "open", "name": "skydd-c", "path": "/dev/vda", "key_hex": key_hex(&key), "mode": "rw"}))
        ["device"]
        .as_str()
        .expect("device")
        .to_string();
    vm.sh(&format!("mkfs.ext4 -q -F {dev} && mount {dev} /mnt && echo original > /mnt/f && umount /mnt"));
    vm.call(json!({"op": "close", "name": "skydd-c"}));
    let before = fs::read(&vol).expect("read volume");

    for (name, path) in [("skydd-c", "/dev/vda"), ("skydd-c-file", "/tmp/c.img")] {
        if path.starts_with("/tmp") {
            vm.sh("cp /dev/vda /tmp/c.img");
        }
        let v = vm.call(json!({"op": "open", "name": name, "path": path, "key_hex": key_hex(&key), "mode": "ro"}));
        let dev = v["device"].as_str().expect("device").to_string();
        assert_eq!(v["mode"], "ro");
        assert_eq!(
            vm.sh(&format!("blockdev --getro {dev}")).trim(),
            "1",
            "{name}: the kernel must mark the mapping read-only"
        );
        let w = vm.call(json!({"op": "try_write", "path": dev, "offset": 0}));
        let errno = w["errno"].as_i64();
        assert!(
            matches!(errno, Some(1) | Some(13) | Some(30)),
            "{name}: writing to a read-only mapping must fail with EPERM/EACCES/EROFS, got {w}"
        );
        eprintln!("{name}: raw write refused at {} with errno {:?} ({})", w["stage"], errno, w["error"]);
        vm.sh(&format!("mount -o ro {dev} /mnt"));
        assert_eq!(vm.sh("cat /mnt/f").trim(), "original");
        let (code, out) = vm.sh_status("echo changed > /mnt/f");
        assert_ne!(code, 0, "{name}: writing a file on the ro mount must fail");
        assert!(out.contains("Read-only file system"), "{name}: {out}");
        // busybox mount falls back to read-only when the kernel refuses rw (EACCES), so
        // check the outcome: still mounted ro and still refusing writes.
        let (_, out) = vm.sh_status(&format!("mount -o remount,rw {dev} /mnt"));
        let mounts = vm.sh("grep ' /mnt ' /proc/mounts");
        assert!(
            mounts.contains(" ro,") || mounts.contains(" ro "),
            "{name}: remount rw must not succeed: {out} / {mounts}"
        );
        let (code, out) = vm.sh_status("echo changed > /mnt/f");
        assert_ne!(code, 0, "{name}: still read-only after a remount attempt: {out}");
        assert_eq!(vm.sh("cat /mnt/f").trim(), "original");
        vm.sh("umount /mnt");
        vm.call(json!({"op": "close", "name": name}));
    }
    vm.shutdown();
    assert!(fs::read(&vol).expect("read volume") == before, "the volume file changed under a read-only mapping");
    eprintln!("test c wall time {:.1?}", t0.elapsed());
}

#[test]
fn guest_sees_the_swtpm_tpm() {
    let t0 = Instant::now();
    let mut vm = boot(&[]);
    vm.sh("test -c /dev/tpmrm0 && test -c /dev/tpm0");
    let r1 = vm.call(json!({"op": "tpm_getrandom", "bytes": 16}));
    let r2 = vm.call(json!({"op": "tpm_getrandom", "bytes": 16}));
    let (a, b) = (r1["random"].as_str().unwrap_or_default(), r2["random"].as_str().unwrap_or_default());
    assert_eq!(a.len(), 32, "{r1}");
    assert_ne!(a, b, "two TPM2_GetRandom answers must differ");
    // The project's HostTpm over device:/dev/tpmrm0 in the guest: enrollment + quote.
    let q = vm.call(json!({"op": "tpm_enroll_quote"}));
    eprintln!("guest HostTpm: {q}");
    assert!(q["ek_certificate_len"].as_u64().unwrap_or(0) > 300, "EK certificate from swtpm_setup: {q}");
    assert!(q["quote_signature_len"].as_u64().unwrap_or(0) > 0, "{q}");
    assert_eq!(q["pcr_count"], json!(9), "{q}");

    // Enrollment and a key release through the TTP on the host. The protocol messages travel
    // over the virtio-serial unix socket (no IP network); the TTP is the project's service
    // (`ttp::server::build`, SQLite, real attestation policy) called with the guest host's
    // identity, as its HTTP handlers would after mutual TLS.
    let work = tempfile::tempdir().unwrap();
    let pki = skydd::lab::LabPki::create(&work.path().join("pki")).unwrap();
    let ttp_tls = pki.issue(net::Role::Ttp, "ttp-1").unwrap();
    pki.issue(net::Role::SecureComponent, "qemu-guest").unwrap();
    let alice = skydd::lab::DomainManager::create(&pki, "dm-alice").unwrap();
    let operator = skydd::lab::Operator::create(&pki, "cp-1").unwrap();
    let guest = protocol::pki::Identity { name: "qemu-guest".into(), role: net::Role::SecureComponent };
    let cp = protocol::pki::Identity { name: "cp-1".into(), role: net::Role::CloudPlatform };

    let pcrs = vm.call(json!({"op": "tpm_read_pcrs"}));
    let pcr_values: Vec<(u8, Vec<u8>)> = pcrs["pcrs"]
        .as_array()
        .expect("pcrs")
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u8, hex::decode(p[1].as_str().unwrap()).unwrap()))
        .collect();
    let policy = ttp::attestation::AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(vm.ek_ca_certificates()),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![ttp::attestation::ReferenceState {
            name: "qemu-guest-v1".into(),
            selection: protocol::attest::PcrSelection::default_host(),
            pcr_values,
        }],
    };
    let data_dir = work.path().join("ttp-data");
    let custodians = ttp::master_key::create_version(
        &data_dir,
        &Default::default(),
        ttp::master_key::Custodians { shares: 3, threshold: 2 },
    )
    .unwrap();
    let policy_path = work.path().join("attestation.toml");
    fs::write(&policy_path, toml::to_string(&policy).unwrap()).unwrap();
    let config = ttp::config::TtpConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.clone(),
        ca: ttp_tls.ca.clone(),
        crl: ttp_tls.crl.clone(),
        cert: ttp_tls.cert.clone(),
        key: ttp_tls.key.clone(),
        attestation: policy_path,
        registration_replicas: Vec::new(),
        limits: Default::default(),
        database_url: None,
        database_pool_size: 16,
        group_commit: true,
        master_key: Default::default(),
        trusted_launch: None,
    };
    let (ttp, _) = ttp::server::build_with_shares(&config, &custodians.shares).unwrap();

    let request: protocol::attest::EnrollmentRequest = serde_json::from_value(
        vm.call(json!({"op": "tpm_enrollment_request", "name": "qemu-guest"}))["request"].clone(),
    )
    .unwrap();
    let challenge = ttp.begin_enrollment(&guest, &request).expect("the guest's EK chains to its swtpm CA");
    let proof: protocol::attest::EnrollmentProof =
        serde_json::from_value(vm.call(json!({"op": "tpm_enrollment_proof", "message": challenge}))["proof"].clone())
            .unwrap();
    let host = ttp.finish_enrollment(&guest, &proof).expect("the guest enrolls");
    eprintln!(
        "guest enrolled with the TTP: EK {}, reference state {}",
        &host.ek_fingerprint[..16],
        host.reference_state
    );

    let descriptor =
        alice.new_domain(&[("department", "cardiology")], &[("vm-q", protocol::domain::AccessMode::Rw)]).unwrap();
    let signed = alice.sign_descriptor(&descriptor).unwrap();
    let registered = ttp
        .register_domain(
            &cp,
            &protocol::messages::RegisterDomainRequest { descriptor: signed.clone(), previous_registration: None },
        )
        .unwrap();
    let header = protocol::messages::HeaderRecord {
        descriptor: signed,
        registration: registered.registration.clone(),
        rotation: None,
    };
    let fresh = ttp.challenge(&guest).unwrap();
    let quote: protocol::attest::QuoteEvidence = serde_json::from_value(
        vm.call(json!({"op": "tpm_quote", "message": {"bytes": protocol::b64::encode(&fresh.nonce)}}))["quote"].clone(),
    )
    .unwrap();
    let grant = alice.grant(&descriptor.domain_id, "vm-q", protocol::domain::AccessMode::Rw, 300);
    let release = ttp
        .release_key(
            &guest,
            &protocol::messages::KeyReleaseRequest {
                host_id: "qemu-guest".into(),
                vm_id: "vm-q".into(),
                mode: protocol::domain::AccessMode::Rw,
                header,
                placement: operator.place("vm-q", "qemu-guest", &grant),
                grant,
                challenge_id: fresh.challenge_id,
                quote,
                launched_image: None,
            },
        )
        .expect("the TTP releases the key to the attested guest");
    let decrypted =
        vm.call(json!({"op": "tpm_decrypt_digest", "message": {"bytes": protocol::b64::encode(&release.wrapped_key)}}));
    let registration = protocol::messages::Registration::decode(&registered.registration.message).unwrap();
    let master = ttp::master_key::shares::combine(&custodians.shares).unwrap();
    let (r, id, meta, spec) =
        (&registration.nonce_r, &descriptor.domain_id, &descriptor.metadata_hash(), &descriptor.cipher_spec);
    // A release wraps K || K_mac (docs/PROTOCOL.md "Key derivation").
    let mut expected = protocol::kdf::derive_volume_key(&master, r, id, meta, spec).unwrap().expose().to_vec();
    expected.extend_from_slice(protocol::kdf::derive_sector_mac_key(&master, r, id, meta, spec).unwrap().expose());
    assert_eq!(decrypted["key_len"], json!(protocol::kdf::RELEASED_KEYS_BYTES), "{decrypted}");
    assert_eq!(
        decrypted["key_sha256"].as_str().unwrap(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&expected)),
        "the guest's TPM must decrypt exactly the domain key the TTP derived"
    );
    eprintln!("key release through the TTP on the host: the guest's TPM decrypted the domain key (sha256 matches)");
    vm.shutdown();
    eprintln!("test d wall time {:.1?}", t0.elapsed());
}

/// What a format-2 volume commits and reports, on the host side of this test (the TTP's
/// epoch rule, nothing more).
#[derive(Default)]
struct HostAnchor(std::sync::Mutex<Option<(u64, [u8; 32])>>);

impl skydd_volume::integrity::Authority for HostAnchor {
    fn commit(&self, epoch: u64, root: &[u8; 32]) -> Result<(), String> {
        let mut anchor = self.0.lock().unwrap();
        assert_eq!(epoch, anchor.map_or(0, |a| a.0) + 1, "epochs follow each other");
        *anchor = Some((epoch, *root));
        Ok(())
    }
    fn report(&self, kind: skydd_volume::ViolationKind, sector: Option<u64>) {
        panic!("the host wrote this volume itself; unexpected {kind:?} at {sector:?}");
    }
}

/// Format 2 read-only on a device-mapper host (docs/DMCRYPT.md "Format 2, read-only"): the
/// secure component's dm-crypt backend verifies the volume against its anchor, stacks
/// dm-verity under dm-crypt, and the guest kernel refuses a block the provider changes
/// afterwards; a volume changed before the attach is refused and reported; rw is refused.
#[test]
fn format_2_read_only_is_pinned_by_dm_verity_in_the_guest() {
    use skydd_volume::device::SectorDevice;
    use skydd_volume::integrity::tag::Tagger;
    use skydd_volume::integrity::IntegrityVolume;
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("v2.vol");
    fs::File::create(&vol).and_then(|f| f.set_len((MIB + 8 * MIB) as u64)).expect("create volume");
    let (key, mut mac) = (random_key(), [0u8; 32]);
    openssl::rand::rand_bytes(&mut mac).expect("rand");
    let domain = "0123456789abcdef0123456789abcdef";

    // The host writes 256 sectors through the real format-2 engine and commits them.
    let anchor = std::sync::Arc::new(HostAnchor::default());
    let file = fs::OpenOptions::new().read(true).write(true).open(&vol).expect("open volume");
    let mut k = key;
    let (v, _) = IntegrityVolume::open(
        std::sync::Arc::new(file),
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut k)).unwrap(),
        Tagger::new(&SecretBytes::from_slice_wiping(&mut mac.clone()), domain).unwrap(),
        None,
        false,
        anchor.clone(),
    )
    .expect("initialise format 2");
    let plain = pattern(256 * SECTOR);
    v.write_sectors(0, &mut plain.clone()).expect("write");
    v.flush().expect("commit");
    drop(v);
    let (epoch, root) = anchor.0.lock().unwrap().expect("committed");
    let data_offset = |sector: usize| (MIB + sector * SECTOR) as u64;
    let flip = |offset: u64| {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().read(true).write(true).open(&vol).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x04], offset).unwrap();
        f.sync_all().unwrap();
    };
    let keys_hex = format!("{}{}", hex::encode(key), hex::encode(mac));
    let anchor_json = json!({"domain_id": domain, "epoch": epoch, "root": hex::encode(root)});
    let request = |mode: &str| json!({"op": "open_v2_ro", "name": "skydd-v2", "path": "/dev/vda", "key_hex": keys_hex, "mode": mode, "message": anchor_json});

    let mut vm = boot(&[&vol]);
    let refused = vm.call_err(request("rw"));
    assert!(refused.contains("cannot keep a format-2 volume"), "{refused}");

    let opened = vm.call(request("ro"));
    let dev = opened["device"].as_str().unwrap_or_else(|| panic!("ro open failed: {opened}")).to_string();
    let table = vm.call(json!({"op": "table", "name": "skydd-v2"}))["table"].as_str().unwrap_or_default().to_string();
    assert!(
        table.contains("crypt aes-xts-plain64 :64:logon:skydd:skydd-v2") && !table.contains(&hex::encode(key)),
        "{table}"
    );
    let read = |vm: &mut Vm, sector: usize| {
        vm.call(json!({"op": "read_uncached", "path": dev, "offset": sector * SECTOR, "bytes": SECTOR}))
    };
    let ok = read(&mut vm, 3);
    assert_eq!(ok["hex"].as_str(), Some(hex::encode(&plain[3 * SECTOR..4 * SECTOR]).as_str()), "sector 3 reads back");

    // The provider flips one bit of sector 7 while it is mapped: the guest kernel refuses it.
    flip(data_offset(7) + 100);
    let tampered = read(&mut vm, 7);
    assert_eq!(tampered["errno"], json!(5), "dm-verity must answer EIO for a changed block: {tampered}");
    let again = read(&mut vm, 3);
    assert!(again["hex"].is_string(), "other blocks still read: {again}");
    let closed = vm.call(json!({"op": "close", "name": "skydd-v2"}));
    assert_eq!(closed["ok"], json!(true), "{closed}");
    let list = vm.call(json!({"op": "list"}));
    assert_eq!(list["volumes"], json!([]), "no mapping (nor verity helper) is left: {list}");

    // Changed before the attach: the userspace check refuses it and reports the sector.
    let refused = vm.call_err(request("ro"));
    assert!(refused.contains("integrity violation"), "{refused}");
    let reports = vm.call(json!({"op": "integrity_reports"}));
    assert_eq!(reports["reports"], json!([["sector_tag", 7]]), "{reports}");
    let table = vm.sh("ls /dev/mapper");
    assert!(!table.contains("skydd"), "a refused attach leaves no mapping: {table}");
    vm.shutdown();
    eprintln!("format 2 + dm-verity test wall time {:.1?}", t0.elapsed());
}
