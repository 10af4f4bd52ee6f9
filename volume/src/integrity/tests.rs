//! Format 2 against the attacks of docs/ATTACKS.md's integrity rows and against crashes,
//! on an in-memory volume with a stand-in TTP that enforces the same epoch rule.

use std::io;
use std::sync::{Arc, Mutex};

use protocol::secret::SecretBytes;
use rand::{RngExt, SeedableRng};

use super::geometry::{Geometry, BLOCK};
use super::tag::Tagger;
use super::{Anchor, Authority, IntegrityVolume, Opened};
use crate::device::SectorDevice;
use crate::io::{BlockIo, MemoryIo};
use crate::layout::{data_sector_offset, DATA_OFFSET};
use crate::xts::XtsEngine;
use crate::{Error, ViolationKind};

const DOMAIN: &str = "00112233445566778899aabbccddeeff";
const SECTORS: u64 = 3000; // 24 tag blocks, 2 zones
const S: usize = 4096;

/// The TTP's rule: epoch e + 1 after e, nothing else.
#[derive(Default)]
struct Ttp {
    anchor: Mutex<Option<Anchor>>,
    reports: Mutex<Vec<(ViolationKind, Option<u64>)>>,
}

impl Ttp {
    fn anchor(&self) -> Option<Anchor> {
        *self.anchor.lock().unwrap()
    }
    fn reports(&self) -> Vec<(ViolationKind, Option<u64>)> {
        self.reports.lock().unwrap().clone()
    }
}

impl Authority for Ttp {
    fn commit(&self, epoch: u64, root: &[u8; 32]) -> Result<(), String> {
        let mut anchor = self.anchor.lock().unwrap();
        let newest = anchor.map(|a| a.epoch).unwrap_or(0);
        if anchor.is_some_and(|a| a.epoch == epoch && a.root == *root) {
            return Ok(()); // a retry of the newest commit, as the TTP answers it
        }
        if epoch != newest + 1 {
            return Err(format!("integrity_epoch_stale: {epoch} after {newest}"));
        }
        *anchor = Some(Anchor { epoch, root: *root });
        Ok(())
    }
    fn report(&self, kind: ViolationKind, sector: Option<u64>) {
        self.reports.lock().unwrap().push((kind, sector));
    }
}

fn keys() -> (XtsEngine, Tagger) {
    let mut xts = [0u8; 64];
    for (i, b) in xts.iter_mut().enumerate() {
        *b = i as u8;
    }
    let xts = XtsEngine::new(&SecretBytes::from_slice_wiping(&mut xts)).unwrap();
    let tagger = Tagger::new(&SecretBytes::from_slice_wiping(&mut [9u8; 32]), DOMAIN).unwrap();
    (xts, tagger)
}

fn open(io: Arc<dyn BlockIo>, ttp: &Arc<Ttp>, read_only: bool) -> crate::Result<(IntegrityVolume, Opened)> {
    let (xts, tagger) = keys();
    IntegrityVolume::open(io, xts, tagger, ttp.anchor(), read_only, ttp.clone())
}

fn pattern(sector: u64, version: u8) -> Vec<u8> {
    (0..S).map(|i| (i as u8) ^ (sector as u8) ^ version.wrapping_mul(31)).collect()
}

fn write(v: &IntegrityVolume, sector: u64, version: u8) {
    v.write_sectors(sector, &mut pattern(sector, version)).unwrap();
}

fn read(v: &IntegrityVolume, sector: u64) -> crate::Result<Vec<u8>> {
    let mut buf = vec![0u8; S];
    v.read_sectors(sector, &mut buf).map(|()| buf)
}

fn fresh() -> (Arc<MemoryIo>, Arc<Ttp>, IntegrityVolume) {
    let io = Arc::new(MemoryIo::new(DATA_OFFSET + SECTORS * BLOCK));
    let ttp = Arc::new(Ttp::default());
    let (v, opened) = open(io.clone(), &ttp, false).unwrap();
    assert_eq!(opened, Opened::Initialised { tagged: 0, unwritten: SECTORS });
    assert_eq!(ttp.anchor().unwrap().epoch, 1);
    (io, ttp, v)
}

fn integrity_kind(e: Error) -> ViolationKind {
    match e {
        Error::Integrity { kind, .. } => kind,
        other => panic!("expected an integrity violation, got {other}"),
    }
}

#[test]
fn a_fresh_volume_reads_zeros_and_keeps_what_is_written_across_reopen() {
    let (io, ttp, v) = fresh();
    assert_eq!(read(&v, 17).unwrap(), vec![0; S]);
    write(&v, 17, 1);
    let mut many: Vec<u8> = (0..300).flat_map(|s| pattern(1000 + s, 2)).collect();
    v.write_sectors(1000, &mut many).unwrap();
    assert_eq!(read(&v, 17).unwrap(), pattern(17, 1));
    v.flush().unwrap();
    assert_eq!(ttp.anchor().unwrap().epoch, 2);
    v.flush().unwrap();
    assert_eq!(ttp.anchor().unwrap().epoch, 2, "a flush with nothing written commits nothing");
    drop(v);
    let (v, opened) = open(io, &ttp, true).unwrap();
    assert_eq!(opened, Opened::Clean { epoch: 2 });
    assert_eq!(read(&v, 17).unwrap(), pattern(17, 1));
    let mut back = vec![0u8; 300 * S];
    v.read_sectors(1000, &mut back).unwrap();
    assert_eq!(back, (0..300).flat_map(|s| pattern(1000 + s, 2)).collect::<Vec<_>>());
    assert!(matches!(v.write_sectors(0, &mut vec![0; S]), Err(Error::Unsupported(_))));
    assert!(ttp.reports().is_empty());
}

#[test]
fn a_flipped_bit_in_data_fails_the_read_and_is_reported() {
    let (io, ttp, v) = fresh();
    write(&v, 5, 1);
    v.flush().unwrap();
    let at = data_sector_offset(5) + 100;
    let mut byte = [0u8];
    io.read_exact_at(&mut byte, at).unwrap();
    io.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    assert_eq!(integrity_kind(read(&v, 5).unwrap_err()), ViolationKind::SectorTag);
    assert_eq!(ttp.reports(), vec![(ViolationKind::SectorTag, Some(5))]);
    assert_eq!(read(&v, 6).unwrap(), vec![0; S], "other sectors still read");
}

#[test]
fn swapped_sectors_fail_within_a_volume_and_between_volumes() {
    let (io, _ttp, v) = fresh();
    write(&v, 1, 1);
    write(&v, 2, 1);
    v.flush().unwrap();
    let mut one = vec![0u8; S];
    io.read_exact_at(&mut one, data_sector_offset(1)).unwrap();
    io.write_all_at(&one, data_sector_offset(2)).unwrap();
    assert_eq!(integrity_kind(read(&v, 2).unwrap_err()), ViolationKind::SectorTag);

    // Another volume of the same owner under the same keys would still differ by domain;
    // here even the same domain and keys: a sector copied from another volume fails.
    let (other_io, _t2, other) = fresh();
    write(&other, 3, 7);
    other.flush().unwrap();
    let mut foreign = vec![0u8; S];
    other_io.read_exact_at(&mut foreign, data_sector_offset(3)).unwrap();
    io.write_all_at(&foreign, data_sector_offset(1)).unwrap();
    assert_eq!(integrity_kind(read(&v, 1).unwrap_err()), ViolationKind::SectorTag);
}

#[test]
fn a_flipped_bit_in_a_tag_or_the_tree_is_caught() {
    let (io, ttp, v) = fresh();
    write(&v, 300, 1);
    v.flush().unwrap();
    drop(v);
    let g = Geometry::new(SECTORS).unwrap();
    // Tag: the committed tag block of sector 300 (block 2); which slot holds it is in the leaves.
    let flip = |offset: u64| {
        let mut b = [0u8];
        io.read_exact_at(&mut b, offset).unwrap();
        io.write_all_at(&[b[0] ^ 1], offset).unwrap();
    };
    for slot in 0..2 {
        flip(g.tag_block_offset(slot, 2) + 5);
    }
    let (v, _) = open(io.clone(), &ttp, false).unwrap();
    assert_eq!(integrity_kind(read(&v, 300).unwrap_err()), ViolationKind::TagBlock);
    drop(v);
    for slot in 0..2 {
        flip(g.tag_block_offset(slot, 2) + 5);
    }
    // Tree: a leaf of the committed leaf slot.
    let slot = (ttp.anchor().unwrap().epoch % 2) as u8;
    flip(g.leaf_slot_offset(slot) + 40);
    assert_eq!(integrity_kind(open(io.clone(), &ttp, false).unwrap_err()), ViolationKind::Tree);
    flip(g.leaf_slot_offset(slot) + 40);
    assert!(open(io, &ttp, false).is_ok());
}

#[test]
fn rollbacks_of_the_whole_volume_or_one_sector_are_refused() {
    let (io, ttp, v) = fresh();
    write(&v, 9, 1);
    v.flush().unwrap();
    let old = io.snapshot();
    write(&v, 9, 2);
    v.flush().unwrap();
    drop(v);
    let new = io.snapshot();

    io.restore(old.clone());
    assert_eq!(integrity_kind(open(io.clone(), &ttp, false).unwrap_err()), ViolationKind::Rollback);

    // One sector (data and its whole tag block, all slots) from the old copy.
    let g = Geometry::new(SECTORS).unwrap();
    let mut mixed = new.clone();
    let d = data_sector_offset(9) as usize;
    mixed[d..d + S].copy_from_slice(&old[d..d + S]);
    assert_eq!(integrity_kind(open_restored(&io, &ttp, mixed.clone(), 9)), ViolationKind::SectorTag);
    for slot in 0..2 {
        let t = g.tag_block_offset(slot, 0) as usize;
        mixed[t..t + S].copy_from_slice(&old[t..t + S]);
    }
    assert_eq!(integrity_kind(open_restored(&io, &ttp, mixed, 9)), ViolationKind::TagBlock);

    io.restore(new);
    let (v, _) = open(io, &ttp, false).unwrap();
    assert_eq!(read(&v, 9).unwrap(), pattern(9, 2));
}

fn open_restored(io: &Arc<MemoryIo>, ttp: &Arc<Ttp>, bytes: Vec<u8>, sector: u64) -> Error {
    io.restore(bytes);
    let (v, _) = open(io.clone(), ttp, false).unwrap();
    read(&v, sector).unwrap_err()
}

#[test]
fn truncation_and_a_format_1_copy_are_refused() {
    let (io, ttp, v) = fresh();
    write(&v, 0, 1);
    v.flush().unwrap();
    drop(v);
    let full = io.len().unwrap();
    io.set_len(full - BLOCK).unwrap();
    assert_eq!(integrity_kind(open(io.clone(), &ttp, false).unwrap_err()), ViolationKind::Truncated);
    io.set_len(DATA_OFFSET + SECTORS * BLOCK).unwrap();
    assert_eq!(integrity_kind(open(io.clone(), &ttp, false).unwrap_err()), ViolationKind::Truncated);
}

#[test]
fn a_read_only_open_before_the_first_commit_is_refused() {
    let io = Arc::new(MemoryIo::new(DATA_OFFSET + SECTORS * BLOCK));
    let ttp = Arc::new(Ttp::default());
    assert!(matches!(open(io, &ttp, true), Err(Error::Unsupported(_))));
}

#[test]
fn an_interrupted_initialisation_starts_again() {
    let io = Arc::new(MemoryIo::new(DATA_OFFSET + SECTORS * BLOCK));
    io.write_all_at(&pattern(0, 3), data_sector_offset(0)).unwrap(); // v1 data already there
    let refusing = Arc::new(RefusingTtp);
    let (xts, tagger) = keys();
    assert!(matches!(IntegrityVolume::open(io.clone(), xts, tagger, None, false, refusing), Err(Error::Commit(_))));
    let ttp = Arc::new(Ttp::default());
    let (v, opened) = open(io, &ttp, false).unwrap();
    assert_eq!(opened, Opened::Initialised { tagged: 1, unwritten: SECTORS - 1 });
    assert_eq!(v.geometry().data_sectors, SECTORS, "the geometry of the first attempt is kept");
    assert_eq!(ttp.anchor().unwrap().epoch, 1);
}

struct RefusingTtp;
impl Authority for RefusingTtp {
    fn commit(&self, _: u64, _: &[u8; 32]) -> Result<(), String> {
        Err("TTP unreachable".into())
    }
    fn report(&self, _: ViolationKind, _: Option<u64>) {}
}

/// An I/O channel that loses what was not synced when it "crashes": each write since the
/// last sync lands whole, not at all, or torn at 512-byte granularity.
struct CrashIo {
    durable: MemoryIo,
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl CrashIo {
    fn over(bytes: Vec<u8>) -> Self {
        let durable = MemoryIo::default();
        durable.restore(bytes);
        Self { durable, pending: Mutex::new(Vec::new()) }
    }

    /// The disk after a power cut: a random part of the unsynced writes.
    fn power_cut(&self, rng: &mut impl RngExt) -> Vec<u8> {
        let image = MemoryIo::default();
        image.restore(self.durable.snapshot());
        for (offset, data) in self.pending.lock().unwrap().iter() {
            for (i, piece) in data.chunks(512).enumerate() {
                if rng.random_bool(0.5) {
                    image.write_all_at(piece, offset + 512 * i as u64).unwrap();
                }
            }
        }
        image.snapshot()
    }

    /// The disk after kill -9: every completed write is in the page cache.
    fn process_kill(&self) -> Vec<u8> {
        let image = MemoryIo::default();
        image.restore(self.durable.snapshot());
        for (offset, data) in self.pending.lock().unwrap().iter() {
            image.write_all_at(data, *offset).unwrap();
        }
        image.snapshot()
    }
}

impl BlockIo for CrashIo {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.durable.read_exact_at(buf, offset)?;
        for (o, data) in self.pending.lock().unwrap().iter() {
            let (start, end) = (*o.max(&offset), (o + data.len() as u64).min(offset + buf.len() as u64));
            if start < end {
                buf[(start - offset) as usize..(end - offset) as usize]
                    .copy_from_slice(&data[(start - o) as usize..(end - o) as usize]);
            }
        }
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pending.lock().unwrap().push((offset, buf.to_vec()));
        Ok(())
    }
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.sync_data()?;
        self.durable.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        for (offset, data) in self.pending.lock().unwrap().drain(..) {
            self.durable.write_all_at(&data, offset)?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let pending_end = self.pending.lock().unwrap().iter().map(|(o, d)| o + d.len() as u64).max().unwrap_or(0);
        Ok(self.durable.len()?.max(pending_end))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.sync_data()?;
        self.durable.set_len(len)
    }
}

/// Crash at random points of a random workload, many times: every flushed write survives,
/// no alarm is raised, and a sector written after the last flush reads as its flushed
/// content, one of its later versions, or zeros (docs/FORMAT.md "Crash recovery").
#[test]
fn crashes_lose_no_flushed_write_and_raise_no_false_alarm() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let (mut recovered, mut torn) = (0, 0);
    for round in 0..24 {
        let (io, ttp, v) = fresh();
        drop(v);
        let crash = Arc::new(CrashIo::over(io.snapshot()));
        let (v, _) = open(crash.clone(), &ttp, false).unwrap();
        // flushed[s]: content as of the last flush; later[s]: versions written since.
        let mut flushed = vec![0u8; SECTORS as usize];
        let mut later: Vec<Vec<u8>> = vec![Vec::new(); SECTORS as usize];
        let mut version = 1u8;
        for _ in 0..rng.random_range(5..40) {
            if rng.random_bool(0.2) {
                v.flush().unwrap();
                for (s, versions) in later.iter_mut().enumerate() {
                    if let Some(&last) = versions.last() {
                        flushed[s] = last;
                    }
                    versions.clear();
                }
            } else {
                let first =
                    if rng.random_bool(0.5) { rng.random_range(0..40) } else { rng.random_range(0..SECTORS - 8) };
                let count = rng.random_range(1..8u64);
                version = version.wrapping_add(1).max(1);
                let mut buf: Vec<u8> = (first..first + count).flat_map(|s| pattern(s, version)).collect();
                v.write_sectors(first, &mut buf).unwrap();
                for s in first..first + count {
                    later[s as usize].push(version);
                }
            }
        }
        let power_cut = round % 2 == 0;
        let image = if power_cut { crash.power_cut(&mut rng) } else { crash.process_kill() };
        drop(v);
        let disk = Arc::new(MemoryIo::default());
        disk.restore(image);
        let (v, opened) =
            open(disk.clone(), &ttp, false).unwrap_or_else(|e| panic!("round {round}: recovery raised an alarm: {e}"));
        for s in 0..SECTORS {
            let got = read(&v, s).unwrap_or_else(|e| panic!("round {round}: sector {s}: {e}"));
            let mut allowed = vec![if flushed[s as usize] == 0 { vec![0; S] } else { pattern(s, flushed[s as usize]) }];
            allowed.extend(later[s as usize].iter().map(|&ver| pattern(s, ver)));
            if !later[s as usize].is_empty() && power_cut {
                allowed.push(vec![0; S]);
            }
            if !power_cut {
                // kill -9: the page cache keeps every completed write.
                allowed =
                    vec![later[s as usize].last().map(|&ver| pattern(s, ver)).unwrap_or_else(|| allowed[0].clone())];
            }
            assert!(allowed.contains(&got), "round {round} ({opened:?}): sector {s} holds an unexpected version");
        }
        assert!(ttp.reports().is_empty(), "round {round}: false alarm {:?}", ttp.reports());
        if let Opened::Recovered { reset, .. } = opened {
            recovered += 1;
            torn += u64::from(reset > 0);
        }
        // And the recovered volume is a normal one: it commits and reopens clean.
        write(&v, 0, 99);
        v.flush().unwrap();
        drop(v);
        assert!(matches!(open(disk, &ttp, false).unwrap().1, Opened::Clean { .. }));
    }
    // The workload must really have crashed with writes pending, some of them torn.
    assert!(recovered >= 12 && torn >= 3, "recovered {recovered} rounds, {torn} with torn sectors");
}

#[test]
fn verity_leaves_cover_verified_ciphertext_and_refuse_a_tampered_sector() {
    let (io, ttp, v) = fresh();
    write(&v, 4, 1);
    v.flush().unwrap();
    drop(v);
    let (v, _) = open(io.clone(), &ttp, true).unwrap();
    let salt = [3u8; 32];
    let leaves = v.verity_leaves(&salt).unwrap();
    assert_eq!(leaves.len() as u64, SECTORS);
    let mut ciphertext = vec![0u8; S];
    io.read_exact_at(&mut ciphertext, data_sector_offset(4)).unwrap();
    assert_eq!(leaves[4], super::verity::block_digest(&salt, &ciphertext));
    assert_eq!(leaves[5], super::verity::block_digest(&salt, &[0u8; S]), "never written: a zero block");
    io.write_all_at(&[ciphertext[0] ^ 1], data_sector_offset(4)).unwrap();
    assert_eq!(integrity_kind(v.verity_leaves(&salt).unwrap_err()), ViolationKind::SectorTag);
    assert_eq!(ttp.reports(), vec![(ViolationKind::SectorTag, Some(4))]);
}

/// The TTP holds a commit whose answer was lost: the volume writes nothing until the same
/// commit is sent again and accepted, so the disk never leaves the state that commit names.
#[test]
fn a_commit_whose_answer_was_lost_is_sent_again_before_any_write() {
    struct LosesOneAnswer {
        ttp: Arc<Ttp>,
        lost: Mutex<bool>,
    }
    impl Authority for LosesOneAnswer {
        fn commit(&self, epoch: u64, root: &[u8; 32]) -> Result<(), String> {
            self.ttp.commit(epoch, root)?;
            let mut lost = self.lost.lock().unwrap();
            if epoch == 2 && !*lost {
                *lost = true;
                return Err("connection reset before the answer".into());
            }
            Ok(())
        }
        fn report(&self, kind: ViolationKind, sector: Option<u64>) {
            self.ttp.report(kind, sector)
        }
    }
    let io = Arc::new(MemoryIo::new(DATA_OFFSET + SECTORS * BLOCK));
    let ttp = Arc::new(Ttp::default());
    let lossy = Arc::new(LosesOneAnswer { ttp: ttp.clone(), lost: Mutex::new(false) });
    let (xts, tagger) = keys();
    let (v, _) = IntegrityVolume::open(io.clone(), xts, tagger, None, false, lossy).unwrap();
    write(&v, 1, 1);
    assert!(matches!(v.flush(), Err(Error::Commit(_))), "the answer was lost");
    assert_eq!(ttp.anchor().unwrap().epoch, 2, "but the TTP holds epoch 2");
    write(&v, 2, 2); // sends epoch 2 again first, then writes in epoch 3
    v.flush().unwrap();
    assert_eq!(ttp.anchor().unwrap().epoch, 3);
    drop(v);
    let (v, opened) = open(io, &ttp, false).unwrap();
    assert_eq!(opened, Opened::Clean { epoch: 3 });
    assert_eq!((read(&v, 1).unwrap(), read(&v, 2).unwrap()), (pattern(1, 1), pattern(2, 2)));
}
