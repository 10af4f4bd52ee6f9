//! Where each part of a format-2 volume lies (docs/FORMAT.md "Version 2: integrity area").
//! Everything is counted in 4096-byte blocks after the data area; the two superblocks are the
//! last two blocks of the volume, so a reader finds them from the volume's length alone.

use crate::layout::{DATA_OFFSET, SECTOR_SIZE};
use crate::{Error, Result};

/// Bytes per block of the integrity area (the data sector size).
pub const BLOCK: u64 = SECTOR_SIZE as u64;
/// Bytes of one sector's tag entry: epoch (u64 LE) then a 24-byte tag.
pub const ENTRY_LEN: usize = 32;
/// Tag entries per tag block (4096 / 32).
pub const ENTRIES_PER_BLOCK: u64 = BLOCK / ENTRY_LEN as u64;
/// Bytes of one leaf hash.
pub const HASH_LEN: usize = 32;
/// Zones one dirty map can name (its bit field is 4000 bytes).
pub const MAX_ZONES: u64 = 32_000;
/// Tag blocks per zone at least: a zone is 16 tag blocks = 2048 sectors = 8 MiB of data.
pub const MIN_ZONE_BLOCKS: u64 = 16;

/// The layout of one format-2 volume, a pure function of its data-area size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data sectors (4096 bytes each) from [`DATA_OFFSET`], exactly as in format 1.
    pub data_sectors: u64,
    /// Tag blocks of one tag slot: `ceil(data_sectors / 128)`.
    pub tag_blocks: u64,
    /// Tag blocks per zone of the dirty map.
    pub zone_blocks: u64,
    /// Zones: `ceil(tag_blocks / zone_blocks)`, at most [`MAX_ZONES`].
    pub zones: u64,
    /// Blocks holding the leaf hashes of one leaf slot.
    pub leaf_hash_blocks: u64,
    /// Blocks holding the slot-selector bits of one leaf slot.
    pub selector_blocks: u64,
}

impl Geometry {
    /// The layout for a data area of `data_sectors` sectors (at least 1).
    pub fn new(data_sectors: u64) -> Result<Self> {
        if data_sectors == 0 {
            return Err(Error::Layout("a format-2 volume needs at least one data sector".into()));
        }
        let tag_blocks = data_sectors.div_ceil(ENTRIES_PER_BLOCK);
        let zone_blocks = MIN_ZONE_BLOCKS.max(tag_blocks.div_ceil(MAX_ZONES));
        Ok(Self {
            data_sectors,
            tag_blocks,
            zone_blocks,
            zones: tag_blocks.div_ceil(zone_blocks),
            leaf_hash_blocks: (tag_blocks * HASH_LEN as u64).div_ceil(BLOCK),
            selector_blocks: tag_blocks.div_ceil(8).div_ceil(BLOCK),
        })
    }

    /// The layout whose total length is exactly `volume_len`, read from the superblock's
    /// `data_sectors`: anything else means the volume was cut or extended.
    pub fn checked_against_len(data_sectors: u64, volume_len: u64) -> Result<Self> {
        let geometry = Self::new(data_sectors)?;
        if geometry.total_len() != volume_len {
            return Err(Error::Layout(format!(
                "the volume is {volume_len} bytes but a format-2 volume of {data_sectors} data sectors is {} bytes",
                geometry.total_len()
            )));
        }
        Ok(geometry)
    }

    /// First byte of the integrity area (right after the data area).
    pub fn area_start(&self) -> u64 {
        DATA_OFFSET + self.data_sectors * BLOCK
    }

    fn leaf_slot_blocks(&self) -> u64 {
        self.leaf_hash_blocks + self.selector_blocks
    }

    /// Leaf slot `slot` (0 or 1): the leaf hashes, then the selector bits.
    pub fn leaf_slot_offset(&self, slot: u8) -> u64 {
        self.area_start() + u64::from(slot) * self.leaf_slot_blocks() * BLOCK
    }

    /// Selector bits of leaf slot `slot`.
    pub fn selector_offset(&self, slot: u8) -> u64 {
        self.leaf_slot_offset(slot) + self.leaf_hash_blocks * BLOCK
    }

    /// Tag block `block` of tag slot `slot`.
    pub fn tag_block_offset(&self, slot: u8, block: u64) -> u64 {
        self.area_start() + (2 * self.leaf_slot_blocks() + u64::from(slot) * self.tag_blocks + block) * BLOCK
    }

    /// Dirty map `slot` (0 or 1).
    pub fn dirty_map_offset(&self, slot: u8) -> u64 {
        self.area_start() + (2 * self.leaf_slot_blocks() + 2 * self.tag_blocks + u64::from(slot)) * BLOCK
    }

    /// Superblock `slot` (0 or 1): the last two blocks of the volume.
    pub fn superblock_offset(&self, slot: u8) -> u64 {
        self.total_len() - (2 - u64::from(slot)) * BLOCK
    }

    /// Length of the whole volume: header area, data area, integrity area.
    pub fn total_len(&self) -> u64 {
        self.area_start() + (2 * self.leaf_slot_blocks() + 2 * self.tag_blocks + 4) * BLOCK
    }

    /// Bytes of the integrity area (the cost of format 2 over format 1).
    pub fn integrity_len(&self) -> u64 {
        self.total_len() - self.area_start()
    }

    /// The zone of tag block `block`.
    pub fn zone_of(&self, block: u64) -> u64 {
        block / self.zone_blocks
    }

    /// The tag blocks of zone `zone`.
    pub fn blocks_of_zone(&self, zone: u64) -> std::ops::Range<u64> {
        zone * self.zone_blocks..((zone + 1) * self.zone_blocks).min(self.tag_blocks)
    }

    /// Data sectors covered by tag block `block`.
    pub fn sectors_of_block(&self, block: u64) -> std::ops::Range<u64> {
        block * ENTRIES_PER_BLOCK..((block + 1) * ENTRIES_PER_BLOCK).min(self.data_sectors)
    }
}

/// Where the superblocks of a volume `volume_len` bytes long would be, if it is format 2.
pub fn superblock_offsets_for_len(volume_len: u64) -> Option<[u64; 2]> {
    (volume_len >= DATA_OFFSET + 2 * BLOCK).then(|| [volume_len - 2 * BLOCK, volume_len - BLOCK])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gib_costs_about_1_6_percent() {
        let g = Geometry::new(262_144).unwrap();
        assert_eq!(g.tag_blocks, 2048);
        assert_eq!(g.zone_blocks, 16);
        assert_eq!(g.zones, 128);
        assert_eq!(g.leaf_hash_blocks, 16);
        assert_eq!(g.selector_blocks, 1);
        let overhead = g.integrity_len() as f64 / (g.data_sectors * BLOCK) as f64;
        assert!(overhead > 0.015 && overhead < 0.017, "{overhead}");
        assert_eq!(g.superblock_offset(1), g.total_len() - BLOCK);
        assert_eq!(superblock_offsets_for_len(g.total_len()), Some([g.superblock_offset(0), g.superblock_offset(1)]));
        assert!(Geometry::checked_against_len(262_144, g.total_len() - 4096).is_err());
    }

    #[test]
    fn regions_do_not_overlap() {
        for sectors in [1, 127, 128, 129, 5000, 300_000] {
            let g = Geometry::new(sectors).unwrap();
            let mut regions = [
                (g.leaf_slot_offset(0), g.selector_offset(0) + g.selector_blocks * BLOCK),
                (g.leaf_slot_offset(1), g.selector_offset(1) + g.selector_blocks * BLOCK),
                (g.tag_block_offset(0, 0), g.tag_block_offset(0, g.tag_blocks)),
                (g.tag_block_offset(1, 0), g.tag_block_offset(1, g.tag_blocks)),
                (g.dirty_map_offset(0), g.dirty_map_offset(0) + BLOCK),
                (g.dirty_map_offset(1), g.dirty_map_offset(1) + BLOCK),
                (g.superblock_offset(0), g.superblock_offset(0) + BLOCK),
                (g.superblock_offset(1), g.total_len()),
            ];
            regions.sort();
            assert_eq!(regions[0].0, g.area_start());
            for pair in regions.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "{sectors} sectors: regions must tile the area");
            }
            assert_eq!(regions.last().unwrap().1, g.total_len());
            assert!(g.zones <= MAX_ZONES);
        }
    }
}
