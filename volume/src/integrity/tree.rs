//! The hash tree over a format-2 volume's tag blocks and the volume root the TTP anchors
//! (docs/FORMAT.md "Hash tree" and "Volume root"). BLAKE3 throughout, each kind of node
//! under its own prefix so a leaf can never pass for an inner node.
//!
//! - leaf of tag block `b` held in tag slot `s`: `BLAKE3(0x00 || b (u64 LE) || s (u8) || block)`;
//! - inner node: `BLAKE3(0x01 || left || right)`; a level of odd length is padded with 32
//!   zero bytes;
//! - volume root: `BLAKE3("skydd/v2/volume-root" || lp(domain_id) || data_sectors || epoch || tree root)`
//!   (integers u64 LE, `lp` a u32 LE length).

use std::collections::BTreeSet;

/// A 32-byte BLAKE3 hash.
pub type Hash = [u8; 32];

/// The leaf of tag block `block`, read from tag slot `slot`.
pub fn leaf_hash(block: u64, slot: u8, tag_block: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[0x00]);
    hasher.update(&block.to_le_bytes());
    hasher.update(&[slot]);
    hasher.update(tag_block);
    *hasher.finalize().as_bytes()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[0x01]);
    hasher.update(left);
    hasher.update(right);
    *hasher.finalize().as_bytes()
}

/// The value the TTP anchors for `epoch`.
pub fn volume_root(domain_id: &str, data_sectors: u64, epoch: u64, tree_root: &Hash) -> Hash {
    let label = b"skydd/v2/volume-root";
    let mut hasher = blake3::Hasher::new();
    hasher.update(label);
    hasher.update(&(domain_id.len() as u32).to_le_bytes());
    hasher.update(domain_id.as_bytes());
    hasher.update(&data_sectors.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(tree_root);
    *hasher.finalize().as_bytes()
}

/// Every level of the tree, leaves first, kept in memory (32 bytes per 512 KiB of data, about
/// twice that with the inner levels) so a changed leaf costs one path to the root.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// The tree over `leaves` (at least one).
    pub fn new(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().map(Vec::len).unwrap_or(1) > 1 {
            let below = levels.last().expect("at least one level");
            let above = below.chunks(2).map(|pair| node_hash(&pair[0], pair.get(1).unwrap_or(&[0; 32]))).collect();
            levels.push(above);
        }
        Self { levels }
    }

    /// Leaf `index`.
    pub fn leaf(&self, index: u64) -> &Hash {
        &self.levels[0][index as usize]
    }

    /// Every leaf, in order (what a leaf slot stores).
    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }

    /// Replaces leaves and recomputes only the paths above them.
    pub fn update(&mut self, changed: impl IntoIterator<Item = (u64, Hash)>) {
        let mut dirty = BTreeSet::new();
        for (index, hash) in changed {
            self.levels[0][index as usize] = hash;
            dirty.insert(index as usize / 2);
        }
        for level in 1..self.levels.len() {
            let mut next = BTreeSet::new();
            for &parent in &dirty {
                let below = &self.levels[level - 1];
                let right = below.get(2 * parent + 1).copied().unwrap_or([0; 32]);
                self.levels[level][parent] = node_hash(&below[2 * parent], &right);
                next.insert(parent / 2);
            }
            dirty = next;
        }
    }

    /// The root (the only node of the top level).
    pub fn root(&self) -> Hash {
        self.levels.last().and_then(|top| top.first()).copied().unwrap_or([0; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_update_equals_a_rebuild() {
        for n in [1usize, 2, 3, 7, 8, 129] {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(i as u64, 0, &[i as u8; 64])).collect();
            let mut tree = MerkleTree::new(leaves.clone());
            let mut changed = leaves.clone();
            let updates: Vec<(u64, Hash)> =
                (0..n).step_by(3).map(|i| (i as u64, leaf_hash(i as u64, 1, b"new"))).collect();
            for (i, h) in &updates {
                changed[*i as usize] = *h;
            }
            let before = tree.root();
            tree.update(updates);
            assert_eq!(tree.root(), MerkleTree::new(changed).root(), "{n} leaves");
            assert_ne!(tree.root(), before);
        }
    }

    #[test]
    fn a_leaf_is_bound_to_its_position_and_slot() {
        assert_ne!(leaf_hash(1, 0, b"x"), leaf_hash(2, 0, b"x"));
        assert_ne!(leaf_hash(1, 0, b"x"), leaf_hash(1, 1, b"x"));
        assert_ne!(volume_root("d", 10, 1, &[0; 32]), volume_root("d", 10, 2, &[0; 32]));
        assert_ne!(volume_root("d", 10, 1, &[0; 32]), volume_root("d", 11, 1, &[0; 32]));
    }
}
