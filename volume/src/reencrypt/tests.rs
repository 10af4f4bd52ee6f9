//! Re-encryption after a key rotation, with crashes modelled by an I/O channel that stops
//! after a budget of 4096-byte pieces (so a multi-sector write and a header slot can land
//! in part), restarted again and again until the run ends.

use std::borrow::Borrow;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format;
use protocol::messages::{HeaderRecord, RotationState};
use protocol::secret::SecretBytes;
use protocol::signing::SignedEnvelope;
use rand::{Rng, RngExt, SeedableRng};

use super::*;
use crate::io::MemoryIo;

const SECTORS: u64 = 100;

fn key(seed: u8) -> SecretBytes {
    let mut bytes: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(seed).wrapping_add(seed ^ i)).collect();
    SecretBytes::from_slice_wiping(&mut bytes)
}

fn envelope(message: Vec<u8>) -> SignedEnvelope {
    SignedEnvelope { message, signature: vec![1; 70], signer_certificate: vec![2; 300] }
}

fn header(rotation: Option<RotationState>) -> HeaderRecord {
    let descriptor =
        Descriptor::new("dm-alice", Default::default(), vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }])
            .unwrap();
    HeaderRecord {
        descriptor: envelope(descriptor.encode().unwrap()),
        registration: envelope(b"new generation".to_vec()),
        rotation,
    }
}

/// A volume of [`SECTORS`] sectors under the old key, every 7th sector never written, with
/// a header that starts a rotation. Returns the plaintext (zeros for unwritten sectors).
fn rotating_volume(io: &MemoryIo, old: &XtsEngine, rng: &mut impl Rng) -> Vec<u8> {
    let rotation = RotationState { previous_registration: envelope(b"old".to_vec()), boundary: 0, hotzone: None };
    io.write_all_at(&format::new_header_area(&header(Some(rotation)).encode()).unwrap(), 0).unwrap();
    let mut plain = vec![0u8; SECTORS as usize * SECTOR_SIZE];
    for (n, sector) in plain.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        if n % 7 == 3 {
            continue;
        }
        rng.fill_bytes(sector);
        let mut cipher = sector.to_vec();
        old.encrypt_sectors(n as u64, &mut cipher).unwrap();
        io.write_all_at(&cipher, data_sector_offset(n as u64)).unwrap();
    }
    plain
}

/// Stops after `budget` 4096-byte pieces written; the piece that exhausts it and every later
/// one never lands (the process died). `M` is `&MemoryIo`, or `Arc<MemoryIo>` for a device
/// that holds its I/O channel.
struct CrashIo<M: Borrow<MemoryIo>> {
    inner: M,
    budget: AtomicU64,
}

impl<M: Borrow<MemoryIo>> CrashIo<M> {
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, piece) in buf.chunks(SECTOR_SIZE).enumerate() {
            if self.budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1)).is_err() {
                return Err(io::Error::other("crashed"));
            }
            self.inner.borrow().write_all_at(piece, offset + (i * SECTOR_SIZE) as u64)?;
        }
        Ok(())
    }
}

impl<M: Borrow<MemoryIo> + Send + Sync> BlockIo for CrashIo<M> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.borrow().read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write(buf, offset)
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.borrow().len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.borrow().set_len(len)
    }
}

fn volume_len() -> u64 {
    data_sector_offset(SECTORS)
}

/// Every written sector decrypts to its plaintext under the new key and to something else
/// under the old; unwritten sectors stay zero; the header holds no rotation any more.
fn check_rotated(io: &MemoryIo, plain: &[u8], old: &XtsEngine, new: &XtsEngine) {
    let (_, record) = read_header(io).unwrap();
    assert_eq!(record.rotation, None, "the finished header records no rotation");
    assert_eq!(record.registration.message, b"new generation", "and keeps only the new registration");
    for (n, expected) in plain.chunks_exact(SECTOR_SIZE).enumerate() {
        let mut cipher = vec![0u8; SECTOR_SIZE];
        io.read_exact_at(&mut cipher, data_sector_offset(n as u64)).unwrap();
        if n % 7 == 3 {
            assert!(is_zero(&cipher), "unwritten sector {n} stays a hole");
            continue;
        }
        let mut with_new = cipher.clone();
        new.decrypt_sectors(n as u64, &mut with_new).unwrap();
        assert_eq!(with_new, expected, "sector {n} under the new key");
        let mut with_old = cipher;
        old.decrypt_sectors(n as u64, &mut with_old).unwrap();
        assert_ne!(with_old, expected, "sector {n} must not decrypt under the old key");
    }
}

#[test]
fn a_rotation_re_encrypts_every_written_sector_and_drops_the_old_key() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (old_key, new_key) = (key(3), key(5));
    let (old, new) = (XtsEngine::new(&old_key).unwrap(), XtsEngine::new(&new_key).unwrap());
    let io = MemoryIo::new(volume_len());
    let plain = rotating_volume(&io, &old, &mut rng);
    assert!(rotation_pending(&io).unwrap());
    let mut seen = Vec::new();
    let options = RotationOptions { hotzone_sectors: 16, ..RotationOptions::default() };
    let report =
        finish_rotation(&io, &old_key, &new_key, options, &mut |done, total| seen.push((done, total))).unwrap();
    assert_eq!(report.rewritten, SECTORS - (SECTORS + 3) / 7);
    assert_eq!(report.hotzones, 7);
    assert_eq!(seen.last(), Some(&(SECTORS, SECTORS)));
    check_rotated(&io, &plain, &old, &new);
    assert!(!rotation_pending(&io).unwrap());
    let again = finish_rotation(&io, &old_key, &new_key, options, &mut |_, _| {}).unwrap_err();
    assert!(again.to_string().contains("records no key rotation"), "{again}");
}

/// Crashes at random points (inside hotzone writes, inside header slots), 40 rounds: every
/// restart settles the hotzone by its checksums and goes on; nothing is lost.
#[test]
fn crashes_anywhere_lose_nothing() {
    let (old_key, new_key) = (key(3), key(5));
    let (old, new) = (XtsEngine::new(&old_key).unwrap(), XtsEngine::new(&new_key).unwrap());
    for round in 0..40u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(round);
        let io = MemoryIo::new(volume_len());
        let plain = rotating_volume(&io, &old, &mut rng);
        let options = RotationOptions { hotzone_sectors: rng.random_range(1..=24), ..RotationOptions::default() };
        let mut crashes = 0;
        // A crash inside the last header write may land it all the same: then it is done.
        while rotation_pending(&io).unwrap() {
            let crashing = CrashIo { inner: &io, budget: AtomicU64::new(rng.random_range(0..300)) };
            match finish_rotation(&crashing, &old_key, &new_key, options, &mut |_, _| {}) {
                Ok(_) => {}
                Err(e) => {
                    assert!(e.to_string().contains("crashed"), "round {round}: {e}");
                    crashes += 1;
                    assert!(crashes < 500, "round {round} makes no progress");
                }
            }
        }
        check_rotated(&io, &plain, &old, &new);
    }
}

/// A hotzone sector that matches neither checksum (torn, or altered) stops the run and
/// names the sector, instead of re-encrypting garbage.
#[test]
fn a_sector_matching_neither_checksum_is_refused() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (old_key, new_key) = (key(3), key(5));
    let old = XtsEngine::new(&old_key).unwrap();
    let io = MemoryIo::new(volume_len());
    rotating_volume(&io, &old, &mut rng);
    // Crash right after the first hotzone's header record (one 512 KiB slot = 128 pieces).
    let crashing = CrashIo { inner: &io, budget: AtomicU64::new(128) };
    let options = RotationOptions { hotzone_sectors: 8, ..RotationOptions::default() };
    finish_rotation(&crashing, &old_key, &new_key, options, &mut |_, _| {}).unwrap_err();
    let (_, record) = read_header(&io).unwrap();
    assert_eq!(record.rotation.as_ref().unwrap().hotzone.as_ref().unwrap().first, 0);
    io.write_all_at(&[0xee; 16], data_sector_offset(1) + 100).unwrap();
    let err = finish_rotation(&io, &old_key, &new_key, options, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("data sector 1 of the hotzone matches neither"), "{err}");
}

#[test]
fn a_format_2_volume_is_refused() {
    let (old_key, new_key) = (key(3), key(5));
    let descriptor = Descriptor::new("dm-alice", Default::default(), vec![])
        .unwrap()
        .next_version(|d| d.volume_format = protocol::domain::VolumeFormat::V2)
        .unwrap();
    let rotation = RotationState { previous_registration: envelope(b"old".to_vec()), boundary: 0, hotzone: None };
    let record = HeaderRecord { descriptor: envelope(descriptor.encode().unwrap()), ..header(Some(rotation)) };
    let io = MemoryIo::new(volume_len());
    io.write_all_at(&format::new_header_area(&record.encode()).unwrap(), 0).unwrap();
    let err = finish_rotation(&io, &old_key, &new_key, RotationOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("but the volume is format 2"), "{err}");
}

// ---- format 2: the tags and tree follow the new key (format2.rs, integrity/rekey.rs) ----

mod format_2 {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use protocol::domain::VolumeFormat;

    use super::*;
    use crate::device::SectorDevice;
    use crate::integrity::tag::Tagger;
    use crate::integrity::{Anchor, Authority, IntegrityVolume, Opened};
    use crate::reencrypt::format2::{self, Generation, GenerationAnchor};
    use crate::ViolationKind;

    const DOMAIN: &str = "00112233445566778899aabbccddeeff";
    const SECTORS: u64 = 600; // 5 tag blocks

    /// The TTP's commit rule with key generations (docs/PROTOCOL.md "Integrity anchor"):
    /// epoch e + 1 after e, under a generation no older than the anchor's and at most the
    /// domain's (2: the rotation is registered). It can lose the answer of an accepted commit.
    #[derive(Default)]
    struct Ttp {
        anchor: Mutex<Option<GenerationAnchor>>,
        reports: Mutex<Vec<(ViolationKind, Option<u64>)>>,
        lose_next_answer: AtomicBool,
    }

    struct Under(Arc<Ttp>, u64);

    impl Authority for Under {
        fn commit(&self, epoch: u64, root: &[u8; 32]) -> std::result::Result<(), String> {
            let Under(ttp, generation) = self;
            let mut newest = ttp.anchor.lock().unwrap();
            let retry =
                newest.is_some_and(|n| n.anchor == Anchor { epoch, root: *root } && n.generation == *generation);
            if !retry {
                let (at, anchored) = newest.map_or((0, 1), |n| (n.anchor.epoch, n.generation));
                if *generation < anchored || *generation > 2 || epoch != at + 1 {
                    return Err(format!(
                        "integrity_epoch_stale: epoch {epoch} gen {generation} after {at} gen {anchored}"
                    ));
                }
                *newest = Some(GenerationAnchor { anchor: Anchor { epoch, root: *root }, generation: *generation });
            }
            if ttp.lose_next_answer.swap(false, Ordering::SeqCst) {
                return Err("the answer was lost".into());
            }
            Ok(())
        }
        fn report(&self, kind: ViolationKind, sector: Option<u64>) {
            self.0.reports.lock().unwrap().push((kind, sector));
        }
    }

    fn mac_key(seed: u8) -> SecretBytes {
        SecretBytes::from_slice_wiping(&mut [seed; 32])
    }

    fn open(io: &Arc<MemoryIo>, ttp: &Arc<Ttp>, generation: u64) -> crate::Result<(IntegrityVolume, Opened)> {
        let (xts, mac) = if generation == 1 { (key(3), mac_key(7)) } else { (key(5), mac_key(8)) };
        // Not inside the call: a commit in the open takes the same lock.
        let anchor = ttp.anchor.lock().unwrap().map(|n| n.anchor);
        IntegrityVolume::open(
            io.clone(),
            XtsEngine::new(&xts).unwrap(),
            Tagger::new(&mac, DOMAIN).unwrap(),
            anchor,
            false,
            Arc::new(Under(ttp.clone(), generation)),
        )
    }

    fn pattern(sector: u64, version: u8) -> Vec<u8> {
        (0..SECTOR_SIZE).map(|i| (i as u8) ^ (sector as u8).wrapping_mul(3) ^ version.wrapping_mul(31)).collect()
    }

    /// A format-2 volume under generation 1: every sector but each 7th written and
    /// committed, then sectors 100..110 written again and not flushed (the process died: the
    /// dirty map announces them), and a header that starts the rotation to generation 2.
    /// Returns what each sector must read afterwards (`None`: never written).
    fn rotating_volume(ttp: &Arc<Ttp>) -> (Arc<MemoryIo>, Vec<Option<Vec<u8>>>) {
        let io = Arc::new(MemoryIo::new(data_sector_offset(SECTORS)));
        let (volume, _) = open(&io, ttp, 1).unwrap();
        let mut expected = vec![None; SECTORS as usize];
        for sector in (0..SECTORS).filter(|n| n % 7 != 3) {
            volume.write_sectors(sector, &mut pattern(sector, 1)).unwrap();
            expected[sector as usize] = Some(pattern(sector, 1));
        }
        volume.flush().unwrap();
        for sector in 100..110 {
            volume.write_sectors(sector, &mut pattern(sector, 2)).unwrap();
            expected[sector as usize] = Some(pattern(sector, 2));
        }
        drop(volume);
        let descriptor = Descriptor::new("dm-alice", Default::default(), vec![])
            .unwrap()
            .next_version(|d| d.volume_format = VolumeFormat::V2)
            .unwrap();
        let rotation = RotationState { previous_registration: envelope(b"old".to_vec()), boundary: 0, hotzone: None };
        let record = HeaderRecord { descriptor: envelope(descriptor.encode().unwrap()), ..header(Some(rotation)) };
        io.write_all_at(&format::new_header_area(&record.encode()).unwrap(), 0).unwrap();
        (io, expected)
    }

    fn rotate(io: Arc<dyn BlockIo>, ttp: &Arc<Ttp>, hotzone: usize) -> crate::Result<Option<Anchor>> {
        let (old_xts, old_mac, new_xts, new_mac) = (key(3), mac_key(7), key(5), mac_key(8));
        let previous =
            Generation { number: 1, xts_key: &old_xts, mac_key: &old_mac, authority: Arc::new(Under(ttp.clone(), 1)) };
        let new =
            Generation { number: 2, xts_key: &new_xts, mac_key: &new_mac, authority: Arc::new(Under(ttp.clone(), 2)) };
        let anchor = *ttp.anchor.lock().unwrap();
        let options = RotationOptions { hotzone_sectors: hotzone, ..RotationOptions::default() };
        format2::finish_rotation(io, DOMAIN, &previous, &new, anchor, options, &mut |_, _| {}).map(|(_, a)| a)
    }

    /// After the rotation: the header names generation 2 only, the TTP anchors generation 2,
    /// the volume opens clean with the new keys and reads what was written; with the old
    /// keys every written sector is refused.
    fn check_rotated(io: &Arc<MemoryIo>, ttp: &Arc<Ttp>, expected: &[Option<Vec<u8>>]) {
        assert!(!rotation_pending(io.as_ref()).unwrap());
        assert_eq!(ttp.anchor.lock().unwrap().unwrap().generation, 2, "the anchor moved to generation 2");
        let (volume, opened) = open(io, ttp, 2).unwrap();
        assert!(matches!(opened, Opened::Clean { .. }), "{opened:?}");
        for (sector, content) in expected.iter().enumerate() {
            let mut buf = vec![0u8; SECTOR_SIZE];
            volume.read_sectors(sector as u64, &mut buf).unwrap();
            assert_eq!(&buf, content.as_ref().unwrap_or(&vec![0u8; SECTOR_SIZE]), "sector {sector}");
        }
        drop(volume);
        let (stale, _) = open(io, ttp, 1).unwrap();
        let mut buf = vec![0u8; SECTOR_SIZE];
        let err = stale.read_sectors(0, &mut buf).unwrap_err();
        assert!(matches!(err, Error::Integrity { kind: ViolationKind::SectorTag, .. }), "{err}");
        let stale_commit = stale.write_sectors(1, &mut pattern(1, 9)).and_then(|()| stale.flush());
        assert!(
            stale_commit.unwrap_err().to_string().contains("integrity_epoch_stale"),
            "a generation-1 root is refused"
        );
    }

    #[test]
    fn a_format_2_rotation_moves_the_tags_and_tree_to_the_new_key() {
        let ttp = Arc::new(Ttp::default());
        let (io, expected) = rotating_volume(&ttp);
        let before = ttp.anchor.lock().unwrap().unwrap();
        let anchor = rotate(io.clone(), &ttp, 16).unwrap().unwrap();
        let after = ttp.anchor.lock().unwrap().unwrap();
        assert_eq!(after, GenerationAnchor { anchor, generation: 2 });
        // The unflushed writes were settled and committed under generation 1, then the
        // rebuilt tree is the next epoch: epochs never go back.
        assert_eq!(after.anchor.epoch, before.anchor.epoch + 2);
        check_rotated(&io, &ttp, &expected);
        assert!(
            ttp.reports.lock().unwrap().iter().all(|(k, _)| *k == ViolationKind::SectorTag),
            "only the stale reads"
        );
    }

    /// `kill -9` at random points (inside hotzones, header slots, tag and leaf writes,
    /// superblocks) and lost commit answers, 16 rounds: every restart goes on from where the
    /// header and the anchor say it stands, and nothing is lost.
    #[test]
    fn crashes_and_lost_commit_answers_anywhere_lose_nothing() {
        for round in 0..16u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(round);
            let ttp = Arc::new(Ttp::default());
            let (io, expected) = rotating_volume(&ttp);
            let hotzone = rng.random_range(1..=64);
            let mut crashes = 0;
            while rotation_pending(io.as_ref()).unwrap() {
                ttp.lose_next_answer.store(rng.random_bool(0.3), Ordering::SeqCst);
                let crashing =
                    Arc::new(CrashIo { inner: io.clone(), budget: AtomicU64::new(rng.random_range(0..400)) });
                if let Err(e) = rotate(crashing, &ttp, hotzone) {
                    let e = e.to_string();
                    assert!(e.contains("crashed") || e.contains("the answer was lost"), "round {round}: {e}");
                    crashes += 1;
                    assert!(crashes < 500, "round {round} makes no progress");
                }
            }
            ttp.lose_next_answer.store(false, Ordering::SeqCst);
            check_rotated(&io, &ttp, &expected);
        }
    }

    /// A sector the provider altered before the rotation finished is found when the tags
    /// move (checked through the previous key's tree), reported, and the anchor stays.
    #[test]
    fn a_sector_altered_before_or_during_the_rotation_is_refused() {
        let ttp = Arc::new(Ttp::default());
        let (io, _) = rotating_volume(&ttp);
        // Settle the unflushed writes first: inside a zone the dirty map announces, a torn
        // sector reads as zeros instead of raising an alarm (docs/FORMAT.md "Crash recovery").
        drop(open(&io, &ttp, 1).unwrap());
        io.write_all_at(&[0x5a; 8], data_sector_offset(200) + 17).unwrap();
        let err = rotate(io.clone(), &ttp, 32).unwrap_err();
        assert!(matches!(err, Error::Integrity { kind: ViolationKind::SectorTag, sector: Some(200), .. }), "{err}");
        assert!(ttp.reports.lock().unwrap().contains(&(ViolationKind::SectorTag, Some(200))));
        assert_eq!(ttp.anchor.lock().unwrap().unwrap().generation, 1, "nothing was committed under the new key");
        assert!(rotation_pending(io.as_ref()).unwrap(), "and the header still records the rotation");
    }
}

// ---- online: the device keeps serving while the volume moves (online.rs) ----

/// A rotating volume in memory ([`rotating_volume`]) and a live device serving it under the
/// old key, as the secure component holds it when an online rotation starts.
struct Live {
    old_key: SecretBytes,
    new_key: SecretBytes,
    old: XtsEngine,
    new: XtsEngine,
    io: std::sync::Arc<MemoryIo>,
    plain: Vec<u8>,
    device: crate::device::PlainDevice,
}

fn live_volume(seed: u64) -> Live {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (old_key, new_key) = (key(3), key(5));
    let (old, new) = (XtsEngine::new(&old_key).unwrap(), XtsEngine::new(&new_key).unwrap());
    let io = std::sync::Arc::new(MemoryIo::new(volume_len()));
    let plain = rotating_volume(&io, &old, &mut rng);
    let device = crate::device::PlainDevice::new(io.clone(), XtsEngine::new(&old_key).unwrap(), SECTORS);
    Live { old_key, new_key, old, new, io, plain, device }
}

/// A live device over `io` with the old key, re-encrypted online while two threads write
/// and read through it; afterwards every sector holds the last thing written to it, under
/// the new key alone, and the device serves under the new key.
#[test]
fn an_online_rotation_keeps_serving_reads_and_writes_and_loses_none() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use crate::device::SectorDevice;

    let Live { old_key, new_key, old, new, io, plain, device } = live_volume(11);
    let plain = Mutex::new(plain);
    let done = AtomicBool::new(false);
    let (writes, reads) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut hotzones = 0;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(12);
            while !done.load(Ordering::SeqCst) {
                let first = rng.random_range(0..SECTORS - 3);
                let count = rng.random_range(1..=3usize);
                let mut data = vec![0u8; count * SECTOR_SIZE];
                rng.fill_bytes(&mut data);
                // Held across the write so the reader compares against what is on the device.
                let mut plain = plain.lock().unwrap();
                plain[first as usize * SECTOR_SIZE..][..data.len()].copy_from_slice(&data);
                device.write_sectors(first, &mut data).unwrap();
                writes.fetch_add(1, Ordering::SeqCst);
            }
        });
        scope.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(13);
            while !done.load(Ordering::SeqCst) {
                let first = rng.random_range(0..SECTORS - 4);
                let mut data = vec![0u8; 4 * SECTOR_SIZE];
                let plain = plain.lock().unwrap();
                device.read_sectors(first, &mut data).unwrap();
                let expected = &plain[first as usize * SECTOR_SIZE..][..data.len()];
                for (i, (got, want)) in data.chunks(SECTOR_SIZE).zip(expected.chunks(SECTOR_SIZE)).enumerate() {
                    // A hole (never written) reads as whatever its zeros decrypt to.
                    assert!(
                        is_zero(want) || got == want,
                        "sector {} reads back what was last written, mid-rotation",
                        first + i as u64
                    );
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
        });
        let options = RotationOptions { hotzone_sectors: 8, ..RotationOptions::default() };
        let report = online::reencrypt_online(
            &device,
            &old_key,
            &new_key,
            options,
            &mut |_, _| {
                hotzones += 1;
                // Let the VM's threads in between hotzones.
                std::thread::sleep(std::time::Duration::from_millis(2));
            },
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
        done.store(true, Ordering::SeqCst);
        assert_eq!(report.data_sectors, SECTORS);
    });
    assert_eq!(hotzones, (SECTORS as usize).div_ceil(8));
    assert!(writes.load(Ordering::SeqCst) > 0 && reads.load(Ordering::SeqCst) > 0, "the VM's threads ran");
    let plain = plain.into_inner().unwrap();
    let (_, record) = read_header(io.as_ref()).unwrap();
    assert_eq!(record.rotation, None, "the finished header records no rotation");
    for n in 0..SECTORS {
        let expected = &plain[n as usize * SECTOR_SIZE..][..SECTOR_SIZE];
        let mut cipher = vec![0u8; SECTOR_SIZE];
        io.read_exact_at(&mut cipher, data_sector_offset(n)).unwrap();
        if is_zero(expected) && is_zero(&cipher) {
            continue; // never written by anyone: still a hole
        }
        let mut with_new = cipher.clone();
        new.decrypt_sectors(n, &mut with_new).unwrap();
        assert_eq!(with_new, expected, "sector {n} under the new key");
        old.decrypt_sectors(n, &mut cipher).unwrap();
        assert_ne!(cipher, expected, "sector {n} must not decrypt under the old key");
    }
    // The device now serves under the new key alone.
    let mut data = vec![0x5a; SECTOR_SIZE];
    device.write_sectors(1, &mut data).unwrap();
    let mut cipher = vec![0u8; SECTOR_SIZE];
    io.read_exact_at(&mut cipher, data_sector_offset(1)).unwrap();
    new.decrypt_sectors(1, &mut cipher).unwrap();
    assert_eq!(cipher, vec![0x5a; SECTOR_SIZE]);
}

#[test]
fn an_online_rotation_refuses_a_previous_key_the_device_was_not_opened_with() {
    let Live { io, device, .. } = live_volume(21);
    let err = online::reencrypt_online(
        &device,
        &key(4),
        &key(5),
        RotationOptions::default(),
        &mut |_, _| {},
        &std::sync::atomic::AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not the key this mapping was opened with"), "{err}");
    assert!(rotation_pending(io.as_ref()).unwrap(), "nothing was moved");
}

/// A volume error half-way stops the device (every request refused, none served under a
/// guessed key), and the next open finishes the rotation from the header: nothing lost.
#[test]
fn an_online_rotation_that_fails_half_way_stops_the_device_and_the_next_open_finishes_it() {
    use std::sync::Arc;

    use crate::device::{PlainDevice, SectorDevice};

    for budget in [3u64, 40, 80, 130] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(budget);
        let (old_key, new_key) = (key(3), key(5));
        let (old, new) = (XtsEngine::new(&old_key).unwrap(), XtsEngine::new(&new_key).unwrap());
        let memory = Arc::new(MemoryIo::new(volume_len()));
        let plain = rotating_volume(&memory, &old, &mut rng);
        let failing = Arc::new(CrashIo { inner: memory.clone(), budget: AtomicU64::new(budget) });
        let device = PlainDevice::new(failing, XtsEngine::new(&old_key).unwrap(), SECTORS);
        let options = RotationOptions { hotzone_sectors: 16, ..RotationOptions::default() };
        let failed = online::reencrypt_online(
            &device,
            &old_key,
            &new_key,
            options,
            &mut |_, _| {},
            &std::sync::atomic::AtomicBool::new(false),
        );
        assert!(failed.is_err(), "budget {budget}: the volume failed half-way");
        let mut buf = vec![0u8; SECTOR_SIZE];
        let refused = device.read_sectors(0, &mut buf).unwrap_err().to_string();
        assert!(refused.contains("serves nothing more"), "budget {budget}: {refused}");
        // The next read-write attach: the offline run settles and finishes.
        finish_rotation(memory.as_ref(), &old_key, &new_key, options, &mut |_, _| {}).unwrap();
        check_rotated(&memory, &plain, &old, &new);
    }
}

/// Closing the mapping stops an online run between two hotzones: the header is at a clean
/// boundary (no hotzone), the device still reads what was written, and the next
/// read-write attach (the offline run) finishes.
#[test]
fn an_online_rotation_cancelled_by_a_close_stops_cleanly_and_finishes_later() {
    use std::sync::atomic::AtomicBool;

    use crate::device::SectorDevice;

    let Live { old_key, new_key, old, new, io, plain, device } = live_volume(31);
    let cancel = AtomicBool::new(false);
    let mut hotzones = 0;
    let options = RotationOptions { hotzone_sectors: 16, ..RotationOptions::default() };
    let stopped = online::reencrypt_online(
        &device,
        &old_key,
        &new_key,
        options,
        &mut |_, _| {
            hotzones += 1;
            if hotzones == 2 {
                cancel.store(true, Ordering::SeqCst);
            }
        },
        &cancel,
    )
    .unwrap_err()
    .to_string();
    assert!(stopped.contains("stopped at data sector 32"), "{stopped}");
    let (_, record) = read_header(io.as_ref()).unwrap();
    let rotation = record.rotation.expect("still rotating");
    assert_eq!((rotation.boundary, rotation.hotzone.is_none()), (32, true));
    for n in [0u64, 20, 40, 90] {
        let mut buf = vec![0u8; SECTOR_SIZE];
        device.read_sectors(n, &mut buf).unwrap();
        let expected = &plain[n as usize * SECTOR_SIZE..][..SECTOR_SIZE];
        assert!(is_zero(expected) || buf == expected, "sector {n} still reads back after the stop");
    }
    drop(device);
    finish_rotation(io.as_ref(), &old_key, &new_key, options, &mut |_, _| {}).unwrap();
    check_rotated(&io, &plain, &old, &new);
}

/// A rate limit spaces the hotzones of an online run: 100 sectors (400 KiB) at 1 MB/s take
/// at least the 84 sectors paid before the last hotzone starts, 0.34 s.
#[test]
fn an_online_rotation_keeps_to_its_rate_limit() {
    use std::sync::atomic::AtomicBool;

    let Live { old_key, new_key, old, new, io, plain, device } = live_volume(41);
    let options = RotationOptions { hotzone_sectors: 16, online_bytes_per_second: Some(1_000_000) };
    let started = std::time::Instant::now();
    online::reencrypt_online(&device, &old_key, &new_key, options, &mut |_, _| {}, &AtomicBool::new(false)).unwrap();
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_millis(340), "400 KiB at 1 MB/s took only {took:?}");
    drop(device);
    check_rotated(&io, &plain, &old, &new);
}
