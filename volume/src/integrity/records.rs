//! The two small keyed records of a format-2 volume (docs/FORMAT.md "Superblock" and "Dirty
//! map"), each a 4096-byte block kept in two slots so a torn write leaves the other valid.

use super::geometry::{Geometry, BLOCK, MAX_ZONES};
use super::tag::Tagger;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"SKYDDINT";
const DIRTY_MAP_MAGIC: &[u8; 8] = b"SKYDDDTY";
const SUPERBLOCK_LABEL: &[u8] = b"skydd/v2/superblock";
const DIRTY_MAP_LABEL: &[u8] = b"skydd/v2/dirty-map";
const LAYOUT_VERSION: u32 = 1;
const MAC_AT: usize = BLOCK as usize - 32;
const BITS_AT: usize = 64;

/// What a superblock says: the geometry and the newest committed state this host wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Data sectors: the geometry.
    pub data_sectors: u64,
    /// The epoch committed when this superblock was written (0: built, not yet committed).
    pub epoch: u64,
    /// The volume root of that epoch.
    pub root: [u8; 32],
}

impl Superblock {
    /// The slot this superblock goes to (alternating with the epoch).
    pub fn slot(&self) -> u8 {
        (self.epoch % 2) as u8
    }

    /// The 4096-byte block: magic, layout version, reserved, data sectors, epoch, root, zeros, MAC.
    pub fn encode(&self, tagger: &Tagger) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK as usize];
        block[..8].copy_from_slice(SUPERBLOCK_MAGIC);
        block[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.data_sectors.to_le_bytes());
        block[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        block[32..64].copy_from_slice(&self.root);
        let mac = tagger.record_mac(SUPERBLOCK_LABEL, &block[..MAC_AT]);
        block[MAC_AT..].copy_from_slice(&mac);
        block
    }

    /// The superblock in `block`, if its magic, version, reserved bytes and MAC are right.
    pub fn decode(block: &[u8], tagger: &Tagger) -> Option<Self> {
        if block.len() != BLOCK as usize
            || &block[..8] != SUPERBLOCK_MAGIC
            || block[8..12] != LAYOUT_VERSION.to_le_bytes()
            || block[12..16] != [0; 4]
            || block[64..MAC_AT].iter().any(|&b| b != 0)
            || !tagger.record_mac_verifies(SUPERBLOCK_LABEL, &block[..MAC_AT], &block[MAC_AT..])
        {
            return None;
        }
        Some(Self { data_sectors: u64_at(block, 16), epoch: u64_at(block, 24), root: block[32..64].try_into().ok()? })
    }
}

/// The zones written since the last commit: announced, durably, before their first write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    /// The open (not yet committed) epoch these zones were written in.
    pub epoch: u64,
    /// Grows with each rewrite within the epoch; the newer valid slot wins.
    pub seq: u64,
    /// One flag per zone of the geometry.
    pub zones: Vec<bool>,
}

impl DirtyMap {
    /// An empty map for `epoch`.
    pub fn new(geometry: &Geometry, epoch: u64) -> Self {
        Self { epoch, seq: 0, zones: vec![false; geometry.zones as usize] }
    }

    /// The slot the map with this `seq` is written to.
    pub fn slot(&self) -> u8 {
        (self.seq % 2) as u8
    }

    /// The 4096-byte block: magic, version, reserved, epoch, seq, zone count, zeros, bits, MAC.
    pub fn encode(&self, tagger: &Tagger) -> Vec<u8> {
        let mut block = vec![0u8; BLOCK as usize];
        block[..8].copy_from_slice(DIRTY_MAP_MAGIC);
        block[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        block[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        block[24..32].copy_from_slice(&self.seq.to_le_bytes());
        block[32..40].copy_from_slice(&(self.zones.len() as u64).to_le_bytes());
        for (zone, _) in self.zones.iter().enumerate().filter(|(_, dirty)| **dirty) {
            block[BITS_AT + zone / 8] |= 1 << (zone % 8);
        }
        let mac = tagger.record_mac(DIRTY_MAP_LABEL, &block[..MAC_AT]);
        block[MAC_AT..].copy_from_slice(&mac);
        block
    }

    /// The map in `block`, if it is well formed, has `geometry`'s zone count and its MAC verifies.
    pub fn decode(block: &[u8], geometry: &Geometry, tagger: &Tagger) -> Option<Self> {
        let zones = geometry.zones as usize;
        if block.len() != BLOCK as usize
            || &block[..8] != DIRTY_MAP_MAGIC
            || block[8..12] != LAYOUT_VERSION.to_le_bytes()
            || u64_at(block, 32) != geometry.zones
            || geometry.zones > MAX_ZONES
            || !tagger.record_mac_verifies(DIRTY_MAP_LABEL, &block[..MAC_AT], &block[MAC_AT..])
        {
            return None;
        }
        let bits = &block[BITS_AT..MAC_AT];
        Some(Self {
            epoch: u64_at(block, 16),
            seq: u64_at(block, 24),
            zones: (0..zones).map(|z| bits[z / 8] & (1 << (z % 8)) != 0).collect(),
        })
    }
}

fn u64_at(block: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::secret::SecretBytes;

    #[test]
    fn records_round_trip_and_refuse_any_edit() {
        let tagger = Tagger::new(&SecretBytes::from_slice_wiping(&mut [1u8; 32]), "d").unwrap();
        let sb = Superblock { data_sectors: 5000, epoch: 9, root: [3; 32] };
        let mut block = sb.encode(&tagger);
        assert_eq!(Superblock::decode(&block, &tagger), Some(sb));
        block[30] ^= 1;
        assert_eq!(Superblock::decode(&block, &tagger), None);

        let g = Geometry::new(300_000).unwrap();
        let mut map = DirtyMap::new(&g, 4);
        map.seq = 3;
        map.zones[0] = true;
        map.zones[g.zones as usize - 1] = true;
        let mut block = map.encode(&tagger);
        assert_eq!(DirtyMap::decode(&block, &g, &tagger), Some(map));
        block[BITS_AT + 1] ^= 1;
        assert_eq!(DirtyMap::decode(&block, &g, &tagger), None);
    }
}
