//! Moving a format-2 volume's integrity area to a new key generation, once its data area is
//! re-encrypted (docs/FORMAT.md "Key rotation of a format-2 volume").
//!
//! The committed tree (tags under the previous generation's `K_mac`, anchored by the TTP) is
//! left untouched until the TTP holds the new root: every new tag block goes to the tag slot
//! the committed tree does not use and the new leaves to the other leaf slot, exactly as an
//! ordinary epoch does. So a crash anywhere before the commit leaves the committed tree
//! whole, and the rebuild starts again; after it, the TTP's anchor names the new generation.
//!
//! Nothing under the new key is trusted on its own: each written sector is mapped back to the
//! ciphertext it had under the previous key (decrypt with the new key, encrypt with the old;
//! XTS with the same tweak) and checked against the tag the committed tree holds for it. So
//! a sector the provider altered at any time during the re-encryption is found here.

use rayon::prelude::*;
use zeroize::Zeroize;

use super::geometry::{Geometry, BLOCK, ENTRIES_PER_BLOCK, ENTRY_LEN};
use super::records::Superblock;
use super::tag::{is_unwritten, Tagger, UNWRITTEN};
use super::tree::{leaf_hash, volume_root, MerkleTree};
use super::volume::{committed_tree, io_err, newest_superblock, read_committed_tag_block, write_leaf_slot, Committed};
use super::{Anchor, Authority};
use crate::io::BlockIo;
use crate::layout::{data_sector_offset, SECTOR_SIZE};
use crate::xts::XtsEngine;
use crate::{Error, Result, ViolationKind};

/// One key generation's keys of a format-2 volume: the XTS engine of its data area and the
/// tagger of its integrity area.
#[derive(Clone, Copy)]
pub struct GenerationKeys<'a> {
    /// The data area's engine.
    pub xts: &'a XtsEngine,
    /// Tags, superblock and dirty map under this generation's `K_mac`.
    pub tagger: &'a Tagger,
}

/// The data sectors the newest superblock that verifies under `tagger` names; `None` when
/// none does (no integrity area yet, or one under another key).
pub fn data_sectors_under(io: &dyn BlockIo, tagger: &Tagger) -> Result<Option<u64>> {
    let len = io.len().map_err(io_err("reading the volume's length"))?;
    Ok(newest_superblock(io, len, tagger)?.map(|sb| sb.data_sectors))
}

/// Rebuilds the tags, tree and superblock of the format-2 volume behind `io` under
/// `new.tagger`, its data area being wholly under `new.xts` now; checks every written sector
/// against the tag the tree anchored by `anchor` holds (under `old`), reporting and refusing
/// one that does not verify; commits epoch `anchor.epoch + 1` through `authority` (the TTP,
/// for the new generation) and returns the new anchor. `progress(done, total)` counts data
/// sectors.
pub fn rekey(
    io: &dyn BlockIo,
    old: GenerationKeys<'_>,
    new: GenerationKeys<'_>,
    anchor: Anchor,
    authority: &dyn Authority,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Anchor> {
    let len = io.len().map_err(io_err("reading the volume's length"))?;
    let superblock = newest_superblock(io, len, old.tagger)?;
    let Committed { geometry, tree, committed_slot } =
        committed_tree(io, len, superblock, old.tagger, anchor, authority)?;
    let epoch = anchor.epoch + 1;
    let mut leaves = Vec::with_capacity(geometry.tag_blocks as usize);
    let mut working = Vec::with_capacity(geometry.tag_blocks as usize);
    let mut data = vec![0u8; ENTRIES_PER_BLOCK as usize * SECTOR_SIZE];
    let mut committed = vec![0u8; BLOCK as usize];
    for block in 0..geometry.tag_blocks {
        let slot = committed_slot[block as usize];
        read_committed_tag_block(io, &geometry, &tree, block, slot, &mut committed, authority)?;
        let sectors = geometry.sectors_of_block(block);
        let buf = &mut data[..(sectors.end - sectors.start) as usize * SECTOR_SIZE];
        io.read_exact_at(buf, data_sector_offset(sectors.start)).map_err(io_err("reading the data area"))?;
        let entries: Vec<std::result::Result<[u8; ENTRY_LEN], u64>> = buf
            .par_chunks(SECTOR_SIZE)
            .enumerate()
            .map(|(i, ciphertext)| {
                let sector = sectors.start + i as u64;
                let entry = &committed[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
                if is_unwritten(entry) {
                    return Ok(UNWRITTEN);
                }
                match under_previous_key(old.xts, new.xts, sector, ciphertext) {
                    Some(before) if old.tagger.verifies(sector, entry, &before) => {
                        Ok(new.tagger.entry(sector, epoch, ciphertext))
                    }
                    _ => Err(sector),
                }
            })
            .collect();
        let mut tag_block = vec![0u8; BLOCK as usize];
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = entry.map_err(|sector| {
                authority.report(ViolationKind::SectorTag, Some(sector));
                Error::Integrity {
                    kind: ViolationKind::SectorTag,
                    sector: Some(sector),
                    detail: "the sector does not match its tag under the previous key: it was altered during or before the key rotation".into(),
                }
            })?;
            tag_block[i * ENTRY_LEN..(i + 1) * ENTRY_LEN].copy_from_slice(&entry);
        }
        let new_slot = slot ^ 1;
        io.write_all_at(&tag_block, geometry.tag_block_offset(new_slot, block)).map_err(io_err("writing tags"))?;
        leaves.push(leaf_hash(block, new_slot, &tag_block));
        working.push(new_slot);
        progress(sectors.end, geometry.data_sectors);
    }
    data.zeroize();
    io.sync_data().map_err(io_err("syncing the new tags"))?;
    let tree = MerkleTree::new(leaves);
    write_leaf_slot(io, &geometry, (epoch % 2) as u8, &tree, &working)?;
    let root = volume_root(new.tagger.domain_id(), geometry.data_sectors, epoch, &tree.root());
    authority.commit(epoch, &root).map_err(Error::Commit)?;
    let anchor = Anchor { epoch, root };
    write_superblock(io, &geometry, new.tagger, anchor)?;
    Ok(anchor)
}

/// Makes sure a superblock under `tagger` names `anchor` (the rebuild's commit was accepted
/// but its superblock may not have reached the disk): the volume can then be opened with the
/// new generation's keys.
pub fn ensure_superblock(io: &dyn BlockIo, data_sectors: u64, tagger: &Tagger, anchor: Anchor) -> Result<()> {
    let len = io.len().map_err(io_err("reading the volume's length"))?;
    if newest_superblock(io, len, tagger)?.is_some_and(|sb| sb.epoch >= anchor.epoch) {
        return Ok(());
    }
    let geometry = Geometry::checked_against_len(data_sectors, len)?;
    write_superblock(io, &geometry, tagger, anchor)
}

/// Durably, unlike an ordinary commit's: until one exists under the new key, the volume
/// cannot be opened with it.
fn write_superblock(io: &dyn BlockIo, geometry: &Geometry, tagger: &Tagger, anchor: Anchor) -> Result<()> {
    let superblock = Superblock { data_sectors: geometry.data_sectors, epoch: anchor.epoch, root: anchor.root };
    io.write_durable_at(&superblock.encode(tagger), geometry.superblock_offset(superblock.slot()))
        .map_err(io_err("writing the integrity superblock"))
}

/// The ciphertext `sector` had under the previous key, from its ciphertext under the new
/// one (one whole sector); an all-zero sector was left as it was by the re-encryption. `None`
/// if an engine refused (it does not for whole sectors).
fn under_previous_key(old: &XtsEngine, new: &XtsEngine, sector: u64, ciphertext: &[u8]) -> Option<[u8; SECTOR_SIZE]> {
    let mut buf = [0u8; SECTOR_SIZE];
    buf.copy_from_slice(ciphertext);
    if buf.iter().all(|&b| b == 0) {
        return Some(buf);
    }
    let mapped = new.decrypt_sectors(sector, &mut buf).and_then(|()| old.encrypt_sectors(sector, &mut buf));
    match mapped {
        Ok(()) => Some(buf),
        Err(_) => {
            buf.zeroize();
            None
        }
    }
}
