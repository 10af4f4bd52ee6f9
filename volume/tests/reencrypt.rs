//! Re-encryption after a key rotation against a real file (docs/FORMAT.md "Key rotation"):
//!
//! - `kill_9_at_random_points_loses_nothing`: a child process (this test binary again)
//!   re-encrypts a volume and is killed with SIGKILL at random moments, restarted each time,
//!   until it finishes; every written sector then decrypts under the new key only.
//! - `kill_9_during_an_online_rotation_loses_no_flushed_write`: the same, with a writer
//!   thread writing and flushing through the live device while it re-encrypts
//!   (`skydd_volume::reencrypt::online`); every write the child saw flushed is found
//!   afterwards, under the new key.
//! - `reencryption_throughput_against_plain_read_write` (`#[ignore]`, release builds:
//!   `cargo test --release -p skydd-volume --test reencrypt -- --ignored --nocapture`):
//!   re-encryption against the engine's plain read + write of the same volume, same run
//!   (docs/PERFORMANCE.md "Key rotation").

use std::fs::{File, OpenOptions};
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format::{self, DATA_OFFSET, SECTOR_SIZE};
use protocol::messages::{HeaderRecord, RotationState};
use protocol::secret::SecretBytes;
use protocol::signing::SignedEnvelope;
use rand::{Rng, RngExt, SeedableRng};
use skydd_volume::device::{PlainDevice, SectorDevice};
use skydd_volume::reencrypt::online::reencrypt_online;
use skydd_volume::reencrypt::{finish_rotation, rotation_pending, RotationOptions};
use skydd_volume::xts::XtsEngine;

const CHILD_ENV: &str = "SKYDD_REENCRYPT_CHILD_VOLUME";
const CHILD_HOTZONE: usize = 32;
/// What the child prints after each hotzone it committed.
const HOTZONE_DONE: &str = "hotzone done";

/// A 64-byte XTS key from a seed (distinct halves, as XTS requires).
fn key(seed: u8) -> SecretBytes {
    let mut bytes = [seed; 64];
    bytes[32..].fill(seed ^ 0x5a);
    SecretBytes::from_slice_wiping(&mut bytes)
}

/// An envelope nobody verifies here: re-encryption reads only the descriptor's format.
fn envelope(message: Vec<u8>) -> SignedEnvelope {
    let filler = |byte: u8, len: usize| vec![byte; len];
    SignedEnvelope { message, signature: filler(7, 64), signer_certificate: filler(9, 128) }
}

/// A format-1 volume of `sectors` data sectors under key(3), every 7th never written, whose
/// header starts a rotation; returns the plaintext.
fn rotating_volume(path: &Path, sectors: u64, seed: u64) -> Vec<u8> {
    let descriptor =
        Descriptor::new("dm-alice", Default::default(), vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }])
            .unwrap();
    let rotation = RotationState { previous_registration: envelope(b"old".to_vec()), boundary: 0, hotzone: None };
    let header = HeaderRecord {
        descriptor: envelope(descriptor.encode().unwrap()),
        registration: envelope(b"new".to_vec()),
        rotation: Some(rotation),
    };
    let file = File::create(path).unwrap();
    file.write_all_at(&format::new_header_area(&header.encode()).unwrap(), 0).unwrap();
    file.set_len(DATA_OFFSET + sectors * SECTOR_SIZE as u64).unwrap();
    let old = XtsEngine::new(&key(3)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut plain = vec![0u8; sectors as usize * SECTOR_SIZE];
    for (n, sector) in plain.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        if n % 7 != 3 {
            rng.fill_bytes(sector);
        }
    }
    let mut cipher = plain.clone();
    old.encrypt_sectors(0, &mut cipher).unwrap();
    for (n, sector) in cipher.chunks_exact(SECTOR_SIZE).enumerate() {
        if n % 7 != 3 {
            file.write_all_at(sector, DATA_OFFSET + (n * SECTOR_SIZE) as u64).unwrap();
        }
    }
    file.sync_all().unwrap();
    plain
}

/// The child: re-encrypts the volume its environment names (nothing without it).
#[test]
fn child_reencrypts() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let options = RotationOptions { hotzone_sectors: CHILD_HOTZONE, ..RotationOptions::default() };
    // One line per hotzone committed: the parent kills by this count.
    let mut report = |done: u64, total: u64| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{HOTZONE_DONE} {done}/{total}").and_then(|()| out.flush()).unwrap();
    };
    finish_rotation(&file, &key(3), &key(5), options, &mut report).unwrap();
}

#[test]
fn kill_9_at_random_points_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let sectors = 2048; // 8 MiB, 64 hotzones
    let plain = rotating_volume(&path, sectors, 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut kills, mut runs) = (0, 0);
    while rotation_pending(&File::open(&path).unwrap()).unwrap() {
        runs += 1;
        assert!(runs < 100, "no progress after {runs} runs");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_reencrypts", "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed after 1 to 3 hotzones, at a random moment inside the next one (its header
        // write, data write or sync): counted in hotzones, not in time, so that a fast
        // release build on an idle disk is killed as often as a debug build on a busy one.
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let hotzones = rng.random_range(1..=3);
        let mut done = lines.by_ref().map_while(|line| line.ok()).filter(|line| line.starts_with(HOTZONE_DONE));
        let reached = (0..hotzones).all(|_| done.next().is_some());
        if reached {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..1500)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
        }
        drop(lines);
        let status = child.wait().unwrap();
        assert!(status.success() || status.code().is_none(), "the child failed: {status}");
    }
    println!("re-encryption finished after {runs} runs, {kills} of them killed with SIGKILL");
    assert!(kills >= 3, "the test must kill the re-encryption a few times, killed {kills}");
    let file = File::open(&path).unwrap();
    let (old, new) = (XtsEngine::new(&key(3)).unwrap(), XtsEngine::new(&key(5)).unwrap());
    let mut cipher = vec![0u8; plain.len()];
    file.read_exact_at(&mut cipher, DATA_OFFSET).unwrap();
    for (n, expected) in plain.chunks_exact(SECTOR_SIZE).enumerate() {
        let sector = &cipher[n * SECTOR_SIZE..][..SECTOR_SIZE];
        if n % 7 == 3 {
            assert!(sector.iter().all(|&b| b == 0), "unwritten sector {n} stays a hole");
            continue;
        }
        let (mut with_new, mut with_old) = (sector.to_vec(), sector.to_vec());
        new.decrypt_sectors(n as u64, &mut with_new).unwrap();
        old.decrypt_sectors(n as u64, &mut with_old).unwrap();
        assert_eq!(with_new, expected, "sector {n} under the new key");
        assert_ne!(with_old, expected, "sector {n} under the old key");
    }
}

const ONLINE_CHILD_ENV: &str = "SKYDD_REENCRYPT_ONLINE_CHILD_VOLUME";
/// What the online child prints after each write it flushed: `flushed <sector> <version>`.
const FLUSHED: &str = "flushed";

/// The content the online writer puts in `sector` at `version`: both numbers, then bytes
/// only they produce, so a sector read back names what it holds and proves it whole.
fn versioned_sector(sector: u64, version: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; SECTOR_SIZE];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..16].copy_from_slice(&version.to_le_bytes());
    rand::rngs::StdRng::seed_from_u64(sector ^ version.rotate_left(32)).fill_bytes(&mut bytes[16..]);
    bytes
}

/// The online child: a live device under the old key, re-encrypted online while a writer
/// thread writes versioned sectors through it, flushing and reporting each.
#[test]
fn child_rotates_online() {
    let Ok(path) = std::env::var(ONLINE_CHILD_ENV) else { return };
    let base: u64 = std::env::var("SKYDD_REENCRYPT_VERSION_BASE").unwrap().parse().unwrap();
    let file: Arc<dyn skydd_volume::io::BlockIo> =
        Arc::new(OpenOptions::new().read(true).write(true).open(path).unwrap());
    let sectors = format::data_sectors(file.len().unwrap());
    let device = PlainDevice::new(file, XtsEngine::new(&key(3)).unwrap(), sectors);
    let started = std::sync::atomic::AtomicBool::new(false);
    let finished = std::sync::atomic::AtomicBool::new(false);
    let print = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).unwrap();
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            use std::sync::atomic::Ordering::SeqCst;
            // The device serves under both keys once the first hotzone has crossed.
            while !started.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(base);
            let mut version = base;
            while !finished.load(SeqCst) {
                version += 1;
                let sector = rng.random_range(0..sectors);
                let mut data = versioned_sector(sector, version);
                device.write_sectors(sector, &mut data).unwrap();
                device.flush().unwrap();
                print(format!("{FLUSHED} {sector} {version}"));
            }
        });
        let options = RotationOptions { hotzone_sectors: CHILD_HOTZONE, ..RotationOptions::default() };
        let mut report = |done: u64, total: u64| {
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            print(format!("{HOTZONE_DONE} {done}/{total}"));
        };
        let rotated = reencrypt_online(
            &device,
            &key(3),
            &key(5),
            options,
            &mut report,
            &std::sync::atomic::AtomicBool::new(false),
        );
        started.store(true, std::sync::atomic::Ordering::SeqCst);
        finished.store(true, std::sync::atomic::Ordering::SeqCst);
        rotated.unwrap();
    });
}

#[test]
fn kill_9_during_an_online_rotation_loses_no_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let sectors = 2048; // 8 MiB, 64 hotzones
    let plain = rotating_volume(&path, sectors, 8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut flushed = std::collections::BTreeMap::<u64, u64>::new();
    let (mut kills, mut runs) = (0u64, 0u64);
    while rotation_pending(&File::open(&path).unwrap()).unwrap() {
        runs += 1;
        assert!(runs < 100, "no progress after {runs} runs");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_rotates_online", "--test-threads=1", "--nocapture"])
            .env(ONLINE_CHILD_ENV, &path)
            .env("SKYDD_REENCRYPT_VERSION_BASE", (runs * 1_000_000).to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed after 1 to 3 hotzones (counted, not timed), a random moment later.
        let hotzones = rng.random_range(1..=3);
        let delay = Duration::from_micros(rng.random_range(0..3000));
        let mut seen = 0;
        let mut kill_at: Option<Instant> = None;
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix(FLUSHED) {
                let mut numbers = rest.split_whitespace().map(|n| n.parse::<u64>().unwrap());
                let (sector, version) = (numbers.next().unwrap(), numbers.next().unwrap());
                flushed.insert(sector, version);
            } else if line.starts_with(HOTZONE_DONE) {
                seen += 1;
                if seen == hotzones {
                    kill_at = Some(Instant::now() + delay);
                }
            }
            if kill_at.is_some_and(|at| Instant::now() >= at) && child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
                kill_at = None;
            }
        }
        let status = child.wait().unwrap();
        assert!(status.success() || status.code().is_none(), "the child failed: {status}");
    }
    println!(
        "online re-encryption finished after {runs} runs, {kills} killed with SIGKILL, {} sectors written by the VM",
        flushed.len()
    );
    assert!(kills >= 3, "the test must kill the re-encryption a few times, killed {kills}");
    assert!(flushed.len() > 20, "the writer must have written during the rotation");
    let file = File::open(&path).unwrap();
    let new = XtsEngine::new(&key(5)).unwrap();
    let mut cipher = vec![0u8; plain.len()];
    file.read_exact_at(&mut cipher, DATA_OFFSET).unwrap();
    for (n, expected) in plain.chunks_exact(SECTOR_SIZE).enumerate() {
        let n64 = n as u64;
        let sector = &cipher[n * SECTOR_SIZE..][..SECTOR_SIZE];
        let mut with_new = sector.to_vec();
        new.decrypt_sectors(n64, &mut with_new).unwrap();
        let version = u64::from_le_bytes(with_new[8..16].try_into().unwrap());
        let written_by_vm = u64::from_le_bytes(with_new[..8].try_into().unwrap()) == n64
            && version > 0
            && with_new == versioned_sector(n64, version);
        match flushed.get(&n64) {
            // Flushed by the VM: that version or a later one it wrote after it.
            Some(&acked) => assert!(
                written_by_vm && version >= acked,
                "sector {n}: the VM flushed version {acked}, the volume holds {}",
                if written_by_vm { format!("version {version}") } else { "something else".into() }
            ),
            // Never flushed by the VM: what was there before, or a write that landed unflushed.
            None if n % 7 == 3 => assert!(
                sector.iter().all(|&b| b == 0) || written_by_vm,
                "unwritten sector {n} stays a hole or holds a whole VM write"
            ),
            None => assert!(written_by_vm || with_new == expected, "sector {n} under the new key"),
        }
    }
}

/// Counts the durable writes (header records) through a file.
struct CountingFile(File, std::sync::atomic::AtomicU64);

impl skydd_volume::io::BlockIo for CountingFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        skydd_volume::io::BlockIo::write_durable_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        skydd_volume::io::BlockIo::len(&self.0)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn lock_header(&self) -> std::io::Result<()> {
        self.0.lock_header()
    }
    fn unlock_header(&self) -> std::io::Result<()> {
        self.0.unlock_header()
    }
}

/// The cloud platform rewrites the header (a descriptor update: here a new registration
/// each time, through its own descriptor of the file) while an online re-encryption records
/// its progress in it. Both read-modify-write under the header lock, so no record overwrites
/// another: the header's sequence number grew by exactly the number of records both wrote,
/// the rotation ends with no progress left (none resurrected) and with the last registration
/// the cloud platform wrote (none lost). Without the lock this fails within a few runs.
#[test]
fn header_rewrites_by_the_cloud_platform_and_the_reencryption_lose_nothing() {
    use skydd_volume::io::BlockIo;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let sectors = 2048;
    rotating_volume(&path, sectors, 9);
    let open = || OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let seq_before = skydd_volume::reencrypt::read_header(&open()).unwrap().0.seq;
    let host = Arc::new(CountingFile(open(), AtomicU64::new(0)));
    let device = PlainDevice::new(host.clone(), XtsEngine::new(&key(3)).unwrap(), sectors);
    let done = AtomicBool::new(false);
    let cp = CountingFile(open(), AtomicU64::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) || n < 5 {
                n += 1;
                let registration = envelope(format!("version {n}").into_bytes());
                skydd_volume::reencrypt::update_header(&cp, |on_volume| Ok(HeaderRecord { registration, ..on_volume }))
                    .unwrap();
            }
        });
        let options = RotationOptions { hotzone_sectors: 16, ..RotationOptions::default() };
        reencrypt_online(
            &device,
            &key(3),
            &key(5),
            options,
            &mut |_, _| {},
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
        done.store(true, Ordering::SeqCst);
    });
    let (cp_writes, host_writes) = (cp.1.load(Ordering::SeqCst), host.1.load(Ordering::SeqCst));
    let (active, header) = skydd_volume::reencrypt::read_header(&open()).unwrap();
    println!("{cp_writes} header records by the cloud platform, {host_writes} by the re-encryption");
    assert_eq!(active.seq - seq_before, cp_writes + host_writes, "every record got its own sequence number");
    assert_eq!(header.rotation, None, "no stale rotation progress came back");
    assert_eq!(header.registration.message, format!("version {cp_writes}").into_bytes(), "no update was lost");
    assert!(host.len().unwrap() > 0);
}

/// Writes, durably, a header that starts a rotation of a volume of `format`.
fn start_rotation(file: &dyn skydd_volume::io::BlockIo, volume_format: protocol::domain::VolumeFormat) {
    let rotation = RotationState { previous_registration: envelope(b"old".to_vec()), boundary: 0, hotzone: None };
    let mut descriptor = Descriptor::new("dm-alice", Default::default(), vec![]).unwrap();
    if volume_format != descriptor.volume_format {
        descriptor = descriptor.next_version(|d| d.volume_format = volume_format).unwrap();
    }
    let header = HeaderRecord {
        descriptor: envelope(descriptor.encode().unwrap()),
        registration: envelope(b"new".to_vec()),
        rotation: Some(rotation),
    };
    file.write_all_at(&format::new_header_area(&header.encode()).unwrap(), 0).unwrap();
    file.sync_data().unwrap();
}

/// Writes every sector of `device` (random data, flushed), then reads and writes every sector
/// again through it, 8 MiB at a time as a hotzone, and flushes: that pass's MB/s, the peer
/// of a re-encryption.
fn fill_then_read_write(device: &dyn SectorDevice, sectors: u64) -> f64 {
    let chunk = 2048usize;
    let mut buf = vec![0u8; chunk * SECTOR_SIZE];
    rand::rng().fill_bytes(&mut buf);
    for first in (0..sectors).step_by(chunk) {
        device.write_sectors(first, &mut buf.clone()).unwrap();
    }
    device.flush().unwrap();
    let started = Instant::now();
    for first in (0..sectors).step_by(chunk) {
        device.read_sectors(first, &mut buf).unwrap();
        device.write_sectors(first, &mut buf).unwrap();
    }
    device.flush().unwrap();
    (sectors * SECTOR_SIZE as u64) as f64 / 1e6 / started.elapsed().as_secs_f64()
}

#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn reencryption_throughput_against_plain_read_write() {
    let dir = tempfile::tempdir_in(std::env::var("SKYDD_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let path = dir.path().join("vol.img");
    let sectors: u64 = 65536; // 256 MiB
    let mb = (sectors * SECTOR_SIZE as u64) as f64 / 1e6;
    // Every sector written (no holes), so both passes touch every byte.
    {
        let file = File::create(&path).unwrap();
        file.set_len(DATA_OFFSET + sectors * SECTOR_SIZE as u64).unwrap();
    }
    let file: Arc<dyn skydd_volume::io::BlockIo> =
        Arc::new(OpenOptions::new().read(true).write(true).open(&path).unwrap());
    let device = PlainDevice::new(file.clone(), XtsEngine::new(&key(3)).unwrap(), sectors);
    let plain = fill_then_read_write(&device, sectors);

    start_rotation(file.as_ref(), protocol::domain::VolumeFormat::V1);
    let started = Instant::now();
    let report = finish_rotation(file.as_ref(), &key(3), &key(5), RotationOptions::default(), &mut |_, _| {}).unwrap();
    let rotate = mb / started.elapsed().as_secs_f64();
    assert_eq!(report.rewritten, sectors);
    println!(
        "{mb:.0} MB, engine {}: plain read+write {plain:.0} MB/s, re-encryption {rotate:.0} MB/s, ratio {:.2}",
        XtsEngine::new(&key(5)).unwrap().implementation(),
        rotate / plain
    );
}

/// The TTP for a measurement: accepts every commit and remembers the newest.
#[derive(Default)]
struct AcceptingTtp(std::sync::Mutex<Option<skydd_volume::integrity::Anchor>>);

impl skydd_volume::integrity::Authority for AcceptingTtp {
    fn commit(&self, epoch: u64, root: &[u8; 32]) -> Result<(), String> {
        *self.0.lock().unwrap() = Some(skydd_volume::integrity::Anchor { epoch, root: *root });
        Ok(())
    }
    fn report(&self, kind: skydd_volume::ViolationKind, sector: Option<u64>) {
        panic!("nothing was altered, yet {kind:?} at {sector:?} was reported");
    }
}

/// Format 2 (docs/FORMAT.md "Key rotation of a format-2 volume"): the whole rotation (data
/// area, then every tag checked through the old tree and rebuilt under the new key, and the
/// commit) against the integrity volume's own read + write of every sector (verify, decrypt,
/// encrypt, tag) and a flush, same run.
#[test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
fn format_2_rotation_throughput_against_plain_read_write() {
    use skydd_volume::integrity::tag::Tagger;
    use skydd_volume::integrity::IntegrityVolume;
    use skydd_volume::reencrypt::format2::{self, Generation, GenerationAnchor};
    const DOMAIN: &str = "00112233445566778899aabbccddeeff";
    let dir = tempfile::tempdir_in(std::env::var("SKYDD_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let path = dir.path().join("vol.img");
    let sectors: u64 = 65536; // 256 MiB
    let mb = (sectors * SECTOR_SIZE as u64) as f64 / 1e6;
    File::create(&path).unwrap().set_len(DATA_OFFSET + sectors * SECTOR_SIZE as u64).unwrap();
    let file: Arc<dyn skydd_volume::io::BlockIo> =
        Arc::new(OpenOptions::new().read(true).write(true).open(&path).unwrap());
    let mac = |seed: u8| SecretBytes::from_slice_wiping(&mut [seed; 32]);
    let ttp = Arc::new(AcceptingTtp::default());
    let (volume, _) = IntegrityVolume::open(
        file.clone(),
        XtsEngine::new(&key(3)).unwrap(),
        Tagger::new(&mac(7), DOMAIN).unwrap(),
        None,
        false,
        ttp.clone(),
    )
    .unwrap();
    let plain = fill_then_read_write(&volume, sectors);
    drop(volume);

    start_rotation(file.as_ref(), protocol::domain::VolumeFormat::V2);
    let anchor = ttp.0.lock().unwrap().map(|anchor| GenerationAnchor { anchor, generation: 1 });
    let (old_xts, old_mac, new_xts, new_mac) = (key(3), mac(7), key(5), mac(8));
    let previous = Generation { number: 1, xts_key: &old_xts, mac_key: &old_mac, authority: ttp.clone() };
    let new = Generation { number: 2, xts_key: &new_xts, mac_key: &new_mac, authority: ttp.clone() };
    let started = Instant::now();
    let (report, rotated) = format2::finish_rotation(
        file.clone(),
        DOMAIN,
        &previous,
        &new,
        anchor,
        RotationOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let rotate = mb / started.elapsed().as_secs_f64();
    assert_eq!(report.rewritten, sectors);
    assert_eq!(rotated.unwrap().epoch, anchor.unwrap().anchor.epoch + 1);
    println!(
        "format 2, {mb:.0} MB, engine {}: integrity volume read+write {plain:.0} MB/s, rotation with tags and tree {rotate:.0} MB/s, ratio {:.2}",
        XtsEngine::new(&key(5)).unwrap().implementation(),
        rotate / plain
    );
}
