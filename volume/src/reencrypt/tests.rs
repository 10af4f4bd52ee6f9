//! Re-encryption after a key rotation, with crashes modelled by an I/O channel that stops
//! after a budget of 4096-byte pieces (so a multi-sector write and a header slot can land
//! in part), restarted again and again until the run ends.

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
/// one never lands (the process died).
struct CrashIo<'a> {
    inner: &'a MemoryIo,
    budget: AtomicU64,
}

impl CrashIo<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (i, piece) in buf.chunks(SECTOR_SIZE).enumerate() {
            if self.budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1)).is_err() {
                return Err(io::Error::other("crashed"));
            }
            self.inner.write_all_at(piece, offset + (i * SECTOR_SIZE) as u64)?;
        }
        Ok(())
    }
}

impl BlockIo for CrashIo<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
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
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
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
    let options = RotationOptions { hotzone_sectors: 16 };
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
        let options = RotationOptions { hotzone_sectors: rng.random_range(1..=24) };
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
    let options = RotationOptions { hotzone_sectors: 8 };
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
    assert!(err.to_string().contains("only format-1 volumes can be rotated"), "{err}");
}
