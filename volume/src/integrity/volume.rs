//! [`IntegrityVolume`]: a format-2 volume opened against the TTP's anchor.
//!
//! Epochs: the TTP holds the newest committed `(epoch e, root)`. Writes after it belong to
//! the open epoch `e + 1`: each zone is announced in the dirty map (durably) before its first
//! write, each written sector gets an entry tagged with `e + 1`, and each changed tag block
//! is written to the tag slot the committed tree does not use. A flush makes all of that
//! durable, writes the leaves of `e + 1` to leaf slot `(e + 1) % 2`, commits the new root and
//! only then switches. So at any crash the committed state is intact on disk, and the next
//! open settles the announced zones sector by sector (docs/FORMAT.md "Crash recovery").

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

use super::geometry::{superblock_offsets_for_len, Geometry, BLOCK, ENTRIES_PER_BLOCK, ENTRY_LEN, HASH_LEN};
use super::records::{DirtyMap, Superblock};
use super::tag::{entry_epoch, is_unwritten, Tagger, UNWRITTEN};
use super::tree::{leaf_hash, volume_root, Hash, MerkleTree};
use crate::device::{check_range, SectorDevice};
use crate::io::BlockIo;
use crate::layout::{data_sector_offset, data_sectors, SECTOR_SIZE};
use crate::xts::{XtsEngine, PARALLEL_THRESHOLD};
use crate::{Error, Result, ViolationKind};

/// Tag blocks kept in memory beyond the ones changed in the open epoch (16 384 = 64 MiB,
/// the tags of 8 GiB of data); clean ones are read again, and verified, when needed.
const CACHED_TAG_BLOCKS: usize = 16_384;

/// The newest committed state, as the TTP returned it with the key release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The committed epoch (≥ 1).
    pub epoch: u64,
    /// The volume root of that epoch.
    pub root: Hash,
}

/// The TTP, as a format-2 volume needs it.
pub trait Authority: Send + Sync {
    /// Commits `root` as `epoch` (signed and audited by the TTP). The volume switches to the
    /// new epoch only if this returns `Ok`.
    fn commit(&self, epoch: u64, root: &Hash) -> std::result::Result<(), String>;
    /// Reports what did not verify, for the domain's viewing history. Best effort; must
    /// not block for long.
    fn report(&self, kind: ViolationKind, sector: Option<u64>);
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The volume matched the anchor and no write was pending.
    Clean {
        /// The committed epoch now in force.
        epoch: u64,
    },
    /// The first open of a format-2 domain: every sector tagged as found, epoch 1 committed.
    Initialised {
        /// Sectors whose ciphertext was tagged.
        tagged: u64,
        /// Sectors that were all zero and now read as zeros.
        unwritten: u64,
    },
    /// Writes after the last commit were found (a crash) and settled sector by sector.
    Recovered {
        /// Zones the dirty map announced.
        zones: u64,
        /// Sectors holding a complete write of the open epoch: kept.
        kept_new: u64,
        /// Announced sectors whose write never landed: their committed content stays.
        kept_committed: u64,
        /// Sectors whose write was torn (neither old nor new): they read as zeros now.
        reset: u64,
        /// The epoch in force now (committed by this open when read-write).
        epoch: u64,
    },
}

/// A format-2 volume: sectors verified on read, tagged on write, committed at flush.
pub struct IntegrityVolume {
    io: Arc<dyn BlockIo>,
    xts: XtsEngine,
    tagger: Tagger,
    geometry: Geometry,
    authority: Arc<dyn Authority>,
    read_only: bool,
    state: Mutex<State>,
}

struct State {
    tree: MerkleTree,
    /// The tag slot (0 or 1) each block has in the committed tree.
    committed_slot: Vec<u8>,
    /// Blocks changed in the open epoch; they live in the other slot and in `blocks`.
    dirty: BTreeSet<u64>,
    /// Verified tag blocks (the open epoch's version for dirty ones).
    blocks: HashMap<u64, Vec<u8>>,
    epoch: u64,
    root: Hash,
    dirty_map: DirtyMap,
    /// A commit whose answer never came (the TTP may or may not hold it): the disk holds
    /// exactly its state, so nothing is written until the same commit is sent again and
    /// accepted (the TTP answers a retry of its newest commit with the same anchor).
    pending: Option<PendingCommit>,
}

struct PendingCommit {
    epoch: u64,
    root: Hash,
    working: Vec<u8>,
}

impl State {
    fn working_slot(&self, block: u64) -> u8 {
        self.committed_slot[block as usize] ^ u8::from(self.dirty.contains(&block))
    }
}

impl std::fmt::Debug for IntegrityVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IntegrityVolume({:?}, read_only {})", self.geometry, self.read_only)
    }
}

pub(super) fn io_err(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(context, e)
}

impl IntegrityVolume {
    /// Opens the format-2 volume behind `io` with the keys the TTP released.
    ///
    /// With an `anchor` the on-disk tree must give its root (else a rollback or tree
    /// violation, reported to `authority`), and a crash's pending writes are settled. Without
    /// one (the domain never committed), a read-write open builds the tree over the data as it
    /// is and commits epoch 1; a read-only open is refused.
    pub fn open(
        io: Arc<dyn BlockIo>,
        xts: XtsEngine,
        tagger: Tagger,
        anchor: Option<Anchor>,
        read_only: bool,
        authority: Arc<dyn Authority>,
    ) -> Result<(Self, Opened)> {
        let len = io.len().map_err(io_err("reading the volume's length"))?;
        let superblock = newest_superblock(io.as_ref(), len, &tagger)?;
        let Some(anchor) = anchor else {
            if read_only {
                return Err(Error::Unsupported(
                    "this format-2 domain has no committed integrity root yet; attach it read-write once to build its tree"
                        .into(),
                ));
            }
            let sectors = match superblock {
                Some(sb) => sb.data_sectors,
                None => data_sectors(len),
            };
            return Self::initialise(io, xts, tagger, Geometry::new(sectors)?, authority);
        };
        let Committed { geometry, tree, committed_slot } =
            committed_tree(io.as_ref(), len, superblock, &tagger, anchor, authority.as_ref())?;
        let state = State {
            tree,
            committed_slot,
            dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            epoch: anchor.epoch,
            root: anchor.root,
            dirty_map: DirtyMap::new(&geometry, anchor.epoch + 1),
            pending: None,
        };
        let volume = Self { io, xts, tagger, geometry, authority, read_only, state: Mutex::new(state) };
        let opened = volume.recover()?;
        Ok((volume, opened))
    }

    /// The layout in use.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The committed epoch and root now in force.
    pub fn committed(&self) -> Result<Anchor> {
        let st = self.lock()?;
        Ok(Anchor { epoch: st.epoch, root: st.root })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Unsupported("integrity state lock poisoned by a panic".into()))
    }

    fn initialise(
        io: Arc<dyn BlockIo>,
        xts: XtsEngine,
        tagger: Tagger,
        geometry: Geometry,
        authority: Arc<dyn Authority>,
    ) -> Result<(Self, Opened)> {
        io.set_len(geometry.total_len()).map_err(io_err("growing the volume by its integrity area"))?;
        // Written first, so an interrupted build finds the same geometry next time.
        let seed = Superblock { data_sectors: geometry.data_sectors, epoch: 0, root: [0; 32] };
        io.write_durable_at(&seed.encode(&tagger), geometry.superblock_offset(0))
            .map_err(io_err("writing the integrity superblock"))?;
        let (epoch, slot) = (1u64, 0u8);
        let mut leaves = Vec::with_capacity(geometry.tag_blocks as usize);
        let (mut tagged, mut unwritten) = (0u64, 0u64);
        let mut data = vec![0u8; ENTRIES_PER_BLOCK as usize * SECTOR_SIZE];
        for block in 0..geometry.tag_blocks {
            let sectors = geometry.sectors_of_block(block);
            let buf = &mut data[..(sectors.end - sectors.start) as usize * SECTOR_SIZE];
            io.read_exact_at(buf, data_sector_offset(sectors.start)).map_err(io_err("reading the data area"))?;
            let entries: Vec<[u8; ENTRY_LEN]> = buf
                .par_chunks(SECTOR_SIZE)
                .enumerate()
                .map(|(i, c)| {
                    if c.iter().all(|&b| b == 0) {
                        UNWRITTEN
                    } else {
                        tagger.entry(sectors.start + i as u64, epoch, c)
                    }
                })
                .collect();
            let mut tag_block = vec![0u8; BLOCK as usize];
            for (i, entry) in entries.iter().enumerate() {
                tag_block[i * ENTRY_LEN..(i + 1) * ENTRY_LEN].copy_from_slice(entry);
                if is_unwritten(entry) {
                    unwritten += 1;
                } else {
                    tagged += 1;
                }
            }
            io.write_all_at(&tag_block, geometry.tag_block_offset(slot, block)).map_err(io_err("writing tags"))?;
            leaves.push(leaf_hash(block, slot, &tag_block));
        }
        let tree = MerkleTree::new(leaves);
        let committed_slot = vec![slot; geometry.tag_blocks as usize];
        let state = State {
            tree,
            committed_slot,
            dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            epoch: 0,
            root: [0; 32],
            dirty_map: DirtyMap::new(&geometry, epoch),
            pending: None,
        };
        let volume = Self { io, xts, tagger, geometry, authority, read_only: false, state: Mutex::new(state) };
        {
            let mut st = volume.lock()?;
            volume.commit(&mut st, Vec::new())?;
        }
        Ok((volume, Opened::Initialised { tagged, unwritten }))
    }

    /// Tag block `block`, verified against the tree (or the open epoch's version).
    fn load_block<'s>(&self, st: &'s mut State, block: u64) -> Result<&'s mut Vec<u8>> {
        if !st.blocks.contains_key(&block) {
            if st.blocks.len() >= CACHED_TAG_BLOCKS + st.dirty.len() {
                let clean: Vec<u64> =
                    st.blocks.keys().copied().filter(|b| !st.dirty.contains(b)).take(CACHED_TAG_BLOCKS / 4).collect();
                for b in clean {
                    st.blocks.remove(&b);
                }
            }
            let slot = st.committed_slot[block as usize];
            let mut buf = vec![0u8; BLOCK as usize];
            read_committed_tag_block(
                self.io.as_ref(),
                &self.geometry,
                &st.tree,
                block,
                slot,
                &mut buf,
                self.authority.as_ref(),
            )?;
            st.blocks.insert(block, buf);
        }
        st.blocks.get_mut(&block).ok_or_else(|| Error::Unsupported("tag block cache lost an entry".into()))
    }

    fn entries(&self, st: &mut State, first: u64, count: u64) -> Result<Vec<[u8; ENTRY_LEN]>> {
        let mut out = Vec::with_capacity(count as usize);
        for sector in first..first + count {
            let block = self.load_block(st, sector / ENTRIES_PER_BLOCK)?;
            let at = (sector % ENTRIES_PER_BLOCK) as usize * ENTRY_LEN;
            let mut entry = [0u8; ENTRY_LEN];
            entry.copy_from_slice(&block[at..at + ENTRY_LEN]);
            out.push(entry);
        }
        Ok(out)
    }

    /// Announces the zones of `blocks` in the dirty map (durably) if they are not yet.
    fn announce(&self, st: &mut State, blocks: std::ops::RangeInclusive<u64>) -> Result<()> {
        let mut changed = false;
        for block in blocks {
            let zone = self.geometry.zone_of(block) as usize;
            if !st.dirty_map.zones[zone] {
                st.dirty_map.zones[zone] = true;
                changed = true;
            }
        }
        if changed {
            st.dirty_map.seq += 1;
            let block = st.dirty_map.encode(&self.tagger);
            self.io
                .write_durable_at(&block, self.geometry.dirty_map_offset(st.dirty_map.slot()))
                .map_err(io_err("writing the dirty map"))?;
        }
        Ok(())
    }

    /// Makes the open epoch durable, commits it through the authority and switches to it.
    /// `extra` are tag blocks to mark changed first (recovery).
    fn commit(&self, st: &mut State, extra: Vec<u64>) -> Result<()> {
        for block in extra {
            if st.dirty.insert(block) {
                let slot = st.working_slot(block);
                let buf = st.blocks.get(&block).cloned().unwrap_or_else(|| vec![0; BLOCK as usize]);
                self.io
                    .write_all_at(&buf, self.geometry.tag_block_offset(slot, block))
                    .map_err(io_err("writing tags"))?;
            }
        }
        let epoch = st.epoch + 1;
        self.io.sync_data().map_err(io_err("syncing data and tags"))?;
        let updates: Vec<(u64, Hash)> = st
            .dirty
            .iter()
            .map(|&b| {
                let block = st.blocks.get(&b).map(Vec::as_slice).unwrap_or(&[]);
                (b, leaf_hash(b, st.working_slot(b), block))
            })
            .collect();
        let working: Vec<u8> = (0..self.geometry.tag_blocks).map(|b| st.working_slot(b)).collect();
        st.tree.update(updates);
        write_leaf_slot(self.io.as_ref(), &self.geometry, (epoch % 2) as u8, &st.tree, &working)?;
        let root = volume_root(self.tagger.domain_id(), self.geometry.data_sectors, epoch, &st.tree.root());
        st.pending = Some(PendingCommit { epoch, root, working });
        self.finish_pending(st)
    }

    /// Sends the pending commit (again) and, once the TTP holds it, switches to its epoch.
    fn finish_pending(&self, st: &mut State) -> Result<()> {
        let Some(pending) = st.pending.take() else {
            return Ok(());
        };
        if let Err(e) = self.authority.commit(pending.epoch, &pending.root) {
            st.pending = Some(pending);
            return Err(Error::Commit(e));
        }
        let PendingCommit { epoch, root, working } = pending;
        let superblock = Superblock { data_sectors: self.geometry.data_sectors, epoch, root };
        // Not synced: the anchor is the TTP's; this only tells a rollback from a tampered tree.
        self.io
            .write_all_at(&superblock.encode(&self.tagger), self.geometry.superblock_offset(superblock.slot()))
            .map_err(io_err("writing the integrity superblock"))?;
        st.committed_slot = working;
        st.dirty.clear();
        st.epoch = epoch;
        st.root = root;
        st.dirty_map = DirtyMap::new(&self.geometry, epoch + 1);
        Ok(())
    }

    /// Settles the zones the dirty map of the open epoch announces (docs/FORMAT.md "Crash
    /// recovery"); read-write, the result is committed at once.
    fn recover(&self) -> Result<Opened> {
        let mut st = self.lock()?;
        let open_epoch = st.epoch + 1;
        let mut announced: Option<DirtyMap> = None;
        for slot in 0..2u8 {
            let mut block = vec![0u8; BLOCK as usize];
            self.io
                .read_exact_at(&mut block, self.geometry.dirty_map_offset(slot))
                .map_err(io_err("reading the dirty map"))?;
            if let Some(map) = DirtyMap::decode(&block, &self.geometry, &self.tagger) {
                if map.epoch == open_epoch && announced.as_ref().is_none_or(|a| map.seq > a.seq) {
                    announced = Some(map);
                }
            }
        }
        let Some(map) = announced else {
            return Ok(Opened::Clean { epoch: st.epoch });
        };
        let (mut kept_new, mut kept_committed, mut reset) = (0u64, 0u64, 0u64);
        let mut changed = Vec::new();
        let zones: Vec<u64> = (0..self.geometry.zones).filter(|&z| map.zones[z as usize]).collect();
        let mut data = vec![0u8; ENTRIES_PER_BLOCK as usize * SECTOR_SIZE];
        for &zone in &zones {
            for block in self.geometry.blocks_of_zone(zone) {
                let committed = self.load_block(&mut st, block)?.clone();
                let mut candidate = vec![0u8; BLOCK as usize];
                let other = st.committed_slot[block as usize] ^ 1;
                self.io
                    .read_exact_at(&mut candidate, self.geometry.tag_block_offset(other, block))
                    .map_err(io_err("reading a tag block"))?;
                let sectors = self.geometry.sectors_of_block(block);
                let buf = &mut data[..(sectors.end - sectors.start) as usize * SECTOR_SIZE];
                self.io
                    .read_exact_at(buf, data_sector_offset(sectors.start))
                    .map_err(io_err("reading the data area"))?;
                let mut settled = committed.clone();
                for (i, ciphertext) in buf.chunks(SECTOR_SIZE).enumerate() {
                    let sector = sectors.start + i as u64;
                    let at = i * ENTRY_LEN..(i + 1) * ENTRY_LEN;
                    let (old, new) = (&committed[at.clone()], &candidate[at.clone()]);
                    if entry_epoch(new) == open_epoch && self.tagger.verifies(sector, new, ciphertext) {
                        settled[at].copy_from_slice(new);
                        kept_new += u64::from(new != old);
                    } else if is_unwritten(old) || self.tagger.verifies(sector, old, ciphertext) {
                        kept_committed += u64::from(entry_epoch(new) == open_epoch);
                    } else {
                        // Announced, and neither the committed nor a new complete write:
                        // a torn write after the last flush. It reads as zeros from now on.
                        settled[at].copy_from_slice(&UNWRITTEN);
                        reset += 1;
                    }
                }
                if settled != committed {
                    st.blocks.insert(block, settled);
                    changed.push(block);
                }
            }
        }
        if self.read_only {
            // Cannot commit: serve the settled blocks from memory as the open epoch's.
            for block in changed {
                st.dirty.insert(block);
            }
        } else {
            self.commit(&mut st, changed)?;
        }
        Ok(Opened::Recovered { zones: zones.len() as u64, kept_new, kept_committed, reset, epoch: st.epoch })
    }
}

impl IntegrityVolume {
    /// Checks every written sector against its tag (reporting and refusing any that does
    /// not verify) and returns the dm-verity level-0 digest of each data block
    /// (`SHA-256(salt || ciphertext)`), a never-written sector counting as an all-zero block:
    /// the input of [`super::verity::VerityTree::build`] for a read-only kernel mapping.
    pub fn verity_leaves(&self, salt: &[u8]) -> Result<Vec<Hash>> {
        let zero_digest = super::verity::block_digest(salt, &[0u8; SECTOR_SIZE]);
        let mut out = Vec::with_capacity(self.geometry.data_sectors as usize);
        let mut data = vec![0u8; ENTRIES_PER_BLOCK as usize * SECTOR_SIZE];
        for block in 0..self.geometry.tag_blocks {
            let sectors = self.geometry.sectors_of_block(block);
            let count = sectors.end - sectors.start;
            let entries = {
                let mut st = self.lock()?;
                self.entries(&mut st, sectors.start, count)?
            };
            let buf = &mut data[..count as usize * SECTOR_SIZE];
            self.io.read_exact_at(buf, data_sector_offset(sectors.start)).map_err(io_err("reading the data area"))?;
            let digests: Vec<std::result::Result<Hash, u64>> = buf
                .par_chunks(SECTOR_SIZE)
                .enumerate()
                .map(|(i, c)| {
                    let sector = sectors.start + i as u64;
                    if is_unwritten(&entries[i]) {
                        Ok(zero_digest)
                    } else if self.tagger.verifies(sector, &entries[i], c) {
                        Ok(super::verity::block_digest(salt, c))
                    } else {
                        Err(sector)
                    }
                })
                .collect();
            for digest in digests {
                match digest {
                    Ok(d) => out.push(d),
                    Err(sector) => {
                        self.authority.report(ViolationKind::SectorTag, Some(sector));
                        return Err(Error::Integrity {
                            kind: ViolationKind::SectorTag,
                            sector: Some(sector),
                            detail: "the sector does not match its tag".into(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

impl SectorDevice for IntegrityVolume {
    fn data_sectors(&self) -> u64 {
        self.geometry.data_sectors
    }

    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let count = check_range(self.geometry.data_sectors, first, buf.len())?;
        let entries = {
            let mut st = self.lock()?;
            self.entries(&mut st, first, count)?
        };
        self.io.read_exact_at(buf, data_sector_offset(first)).map_err(io_err("reading the data area"))?;
        let check = |(i, c): (usize, &[u8])| {
            let e = &entries[i];
            (!is_unwritten(e) && !self.tagger.verifies(first + i as u64, e, c)).then_some(first + i as u64)
        };
        let bad: Vec<u64> = if buf.len() >= PARALLEL_THRESHOLD {
            buf.par_chunks(SECTOR_SIZE).enumerate().filter_map(check).collect()
        } else {
            buf.chunks(SECTOR_SIZE).enumerate().filter_map(check).collect()
        };
        if let Some(&sector) = bad.first() {
            for &s in bad.iter().take(16) {
                self.authority.report(ViolationKind::SectorTag, Some(s));
            }
            return Err(Error::Integrity {
                kind: ViolationKind::SectorTag,
                sector: Some(sector),
                detail: format!("{} sector(s) of this read do not match their tags", bad.len()),
            });
        }
        self.xts.decrypt_sectors(first, buf)?;
        for (i, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            if is_unwritten(&entries[i]) {
                chunk.fill(0);
            }
        }
        Ok(())
    }

    fn write_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::Unsupported("a write through a read-only mapping".into()));
        }
        let count = check_range(self.geometry.data_sectors, first, buf.len())?;
        if count == 0 {
            return Ok(());
        }
        let mut st = self.lock()?;
        self.finish_pending(&mut st)?;
        let epoch = st.epoch + 1;
        let blocks = first / ENTRIES_PER_BLOCK..=(first + count - 1) / ENTRIES_PER_BLOCK;
        for block in blocks.clone() {
            self.load_block(&mut st, block)?;
        }
        self.announce(&mut st, blocks.clone())?;
        self.xts.encrypt_sectors(first, buf)?;
        let tag = |(i, c): (usize, &[u8])| self.tagger.entry(first + i as u64, epoch, c);
        let entries: Vec<[u8; ENTRY_LEN]> = if buf.len() >= PARALLEL_THRESHOLD {
            buf.par_chunks(SECTOR_SIZE).enumerate().map(tag).collect()
        } else {
            buf.chunks(SECTOR_SIZE).enumerate().map(tag).collect()
        };
        self.io.write_all_at(buf, data_sector_offset(first)).map_err(io_err("writing the data area"))?;
        for (i, entry) in entries.iter().enumerate() {
            let sector = first + i as u64;
            let block = self.load_block(&mut st, sector / ENTRIES_PER_BLOCK)?;
            let at = (sector % ENTRIES_PER_BLOCK) as usize * ENTRY_LEN;
            block[at..at + ENTRY_LEN].copy_from_slice(entry);
        }
        for block in blocks {
            st.dirty.insert(block);
            let slot = st.working_slot(block);
            let buf =
                st.blocks.get(&block).ok_or_else(|| Error::Unsupported("tag block cache lost an entry".into()))?;
            self.io.write_all_at(buf, self.geometry.tag_block_offset(slot, block)).map_err(io_err("writing tags"))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.pending.is_some() {
            return self.finish_pending(&mut st);
        }
        if self.read_only || st.dirty.is_empty() {
            return self.io.sync_data().map_err(io_err("syncing the volume"));
        }
        self.commit(&mut st, Vec::new())
    }
}

/// The committed state the anchor names, checked: the superblock's geometry fits the
/// volume's length, and leaf slot `epoch % 2` gives the anchored root (else a rollback, tree
/// or truncation violation, reported to `authority`).
pub(super) struct Committed {
    pub(super) geometry: Geometry,
    pub(super) tree: MerkleTree,
    /// The tag slot (0 or 1) each block has in the committed tree.
    pub(super) committed_slot: Vec<u8>,
}

pub(super) fn committed_tree(
    io: &dyn BlockIo,
    len: u64,
    superblock: Option<Superblock>,
    tagger: &Tagger,
    anchor: Anchor,
    authority: &dyn Authority,
) -> Result<Committed> {
    let fail = |kind: ViolationKind, detail: String| {
        authority.report(kind, None);
        Error::Integrity { kind, sector: None, detail }
    };
    let Some(sb) = superblock else {
        return Err(fail(
            ViolationKind::Truncated,
            format!(
                "the volume ({len} bytes) has no valid integrity superblock at its end, but the TTP anchors epoch {}: \
                     it was cut, extended or replaced by a format-1 copy",
                anchor.epoch
            ),
        ));
    };
    let geometry = Geometry::checked_against_len(sb.data_sectors, len)
        .map_err(|e| fail(ViolationKind::Truncated, e.to_string()))?;
    let slot = (anchor.epoch % 2) as u8;
    let (leaves, committed_slot) = read_leaf_slot(io, &geometry, slot)?;
    let tree = MerkleTree::new(leaves);
    let root = volume_root(tagger.domain_id(), geometry.data_sectors, anchor.epoch, &tree.root());
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&root[..], &anchor.root[..])) {
        return Err(if sb.epoch < anchor.epoch {
            fail(
                ViolationKind::Rollback,
                format!(
                    "the volume holds epoch {} but the TTP committed epoch {}: an older copy was restored",
                    sb.epoch, anchor.epoch
                ),
            )
        } else {
            fail(
                ViolationKind::Tree,
                format!("the hash tree does not give the root the TTP committed for epoch {}", anchor.epoch),
            )
        });
    }
    Ok(Committed { geometry, tree, committed_slot })
}

/// Reads tag block `block` from tag slot `slot` into `buf` and checks it against its leaf
/// in the committed `tree`; one that does not match is reported and refused (`tag_block`).
pub(super) fn read_committed_tag_block(
    io: &dyn BlockIo,
    geometry: &Geometry,
    tree: &MerkleTree,
    block: u64,
    slot: u8,
    buf: &mut [u8],
    authority: &dyn Authority,
) -> Result<()> {
    io.read_exact_at(buf, geometry.tag_block_offset(slot, block)).map_err(io_err("reading a tag block"))?;
    if leaf_hash(block, slot, buf) != *tree.leaf(block) {
        let sector = block * ENTRIES_PER_BLOCK;
        authority.report(ViolationKind::TagBlock, Some(sector));
        return Err(Error::Integrity {
            kind: ViolationKind::TagBlock,
            sector: Some(sector),
            detail: format!(
                "tag block {block} (sectors {:?}) does not match the hash tree",
                geometry.sectors_of_block(block)
            ),
        });
    }
    Ok(())
}

/// Writes the leaves of `tree` and the tag slot of each block (`working`) to leaf slot
/// `slot`, then syncs: the tree of the epoch about to be committed.
pub(super) fn write_leaf_slot(
    io: &dyn BlockIo,
    geometry: &Geometry,
    slot: u8,
    tree: &MerkleTree,
    working: &[u8],
) -> Result<()> {
    let mut leaves = Vec::with_capacity((geometry.leaf_hash_blocks * BLOCK) as usize);
    for leaf in tree.leaves() {
        leaves.extend_from_slice(leaf);
    }
    leaves.resize((geometry.leaf_hash_blocks * BLOCK) as usize, 0);
    let mut selectors = vec![0u8; (geometry.selector_blocks * BLOCK) as usize];
    for (b, s) in working.iter().enumerate() {
        selectors[b / 8] |= s << (b % 8);
    }
    io.write_all_at(&leaves, geometry.leaf_slot_offset(slot)).map_err(io_err("writing leaves"))?;
    io.write_all_at(&selectors, geometry.selector_offset(slot)).map_err(io_err("writing leaves"))?;
    io.sync_data().map_err(io_err("syncing the hash tree"))
}

/// The newest superblock that verifies and whose geometry fits `len`.
pub(super) fn newest_superblock(io: &dyn BlockIo, len: u64, tagger: &Tagger) -> Result<Option<Superblock>> {
    let Some(offsets) = superblock_offsets_for_len(len) else {
        return Ok(None);
    };
    let mut newest: Option<Superblock> = None;
    for offset in offsets {
        let mut block = vec![0u8; BLOCK as usize];
        io.read_exact_at(&mut block, offset).map_err(io_err("reading the integrity superblock"))?;
        if let Some(sb) = Superblock::decode(&block, tagger) {
            let fits = Geometry::checked_against_len(sb.data_sectors, len).is_ok();
            if fits && newest.is_none_or(|n| sb.epoch > n.epoch) {
                newest = Some(sb);
            }
        }
    }
    Ok(newest)
}

/// The leaves and tag-slot selectors stored in leaf slot `slot`.
pub(super) fn read_leaf_slot(io: &dyn BlockIo, geometry: &Geometry, slot: u8) -> Result<(Vec<Hash>, Vec<u8>)> {
    let mut raw = vec![0u8; (geometry.leaf_hash_blocks * BLOCK) as usize];
    io.read_exact_at(&mut raw, geometry.leaf_slot_offset(slot)).map_err(io_err("reading leaves"))?;
    let leaves = raw
        .chunks(HASH_LEN)
        .take(geometry.tag_blocks as usize)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect();
    let mut bits = vec![0u8; (geometry.selector_blocks * BLOCK) as usize];
    io.read_exact_at(&mut bits, geometry.selector_offset(slot)).map_err(io_err("reading leaves"))?;
    let selectors = (0..geometry.tag_blocks as usize).map(|b| (bits[b / 8] >> (b % 8)) & 1).collect();
    Ok((leaves, selectors))
}
