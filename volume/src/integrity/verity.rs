//! A dm-verity hash tree (format 1, SHA-256, 4096-byte data and hash blocks, salt first, no
//! superblock) over the **ciphertext** of a format-2 volume's data area: the kernel path for a
//! read-only attach (docs/FORMAT.md "Which paths enforce it"). The secure component verifies
//! every sector against its tag and the TTP-anchored tree first, then hands the kernel this
//! tree, so dm-verity refuses any block that changes afterwards.
//!
//! Layout, as the kernel's dm-verity reads it (`Documentation/admin-guide/device-mapper/verity.rst`):
//! level 0 holds `SHA-256(salt || data block)` for every data block, 128 digests per hash
//! block (zero-padded); level `i + 1` holds the digests of level `i`'s blocks the same way,
//! until a level is one block. The hash device stores the levels top first; the root digest
//! is `SHA-256(salt || the top block)`.

use sha2::{Digest, Sha256};

use super::geometry::BLOCK;

const DIGESTS_PER_BLOCK: usize = BLOCK as usize / 32;

/// `SHA-256(salt || block)`: a digest of dm-verity format 1.
pub fn block_digest(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(block);
    hasher.finalize().into()
}

/// A built tree: the bytes of the hash device and the root digest.
#[derive(Debug, Clone)]
pub struct VerityTree {
    /// The hash device's contents, levels top first.
    pub hash_device: Vec<u8>,
    /// The root digest dm-verity's table names.
    pub root: [u8; 32],
    /// Data blocks covered.
    pub data_blocks: u64,
}

impl VerityTree {
    /// The tree over data blocks whose level-0 digests are `leaves` (one per 4096-byte block).
    pub fn build(leaves: &[[u8; 32]], salt: &[u8]) -> Self {
        let pack = |digests: &[[u8; 32]]| -> Vec<Vec<u8>> {
            digests
                .chunks(DIGESTS_PER_BLOCK)
                .map(|chunk| {
                    let mut block = vec![0u8; BLOCK as usize];
                    for (i, d) in chunk.iter().enumerate() {
                        block[i * 32..(i + 1) * 32].copy_from_slice(d);
                    }
                    block
                })
                .collect()
        };
        let mut levels = vec![pack(leaves)];
        while levels.last().map(Vec::len).unwrap_or(0) > 1 {
            let below = levels.last().expect("a level");
            let digests: Vec<[u8; 32]> = below.iter().map(|b| block_digest(salt, b)).collect();
            levels.push(pack(&digests));
        }
        let top = levels.last().and_then(|l| l.first()).cloned().unwrap_or_else(|| vec![0u8; BLOCK as usize]);
        let root = block_digest(salt, &top);
        let hash_device = levels.iter().rev().flatten().flatten().copied().collect();
        Self { hash_device, root, data_blocks: leaves.len() as u64 }
    }

    /// The dm-verity table parameters after the two device names: `4096 4096 <blocks> 0
    /// sha256 <root> <salt>` (hash start block 0).
    pub fn table_tail(&self, salt: &[u8]) -> String {
        format!("4096 4096 {} 0 sha256 {} {}", self.data_blocks, hex::encode(self.root), hex::encode(salt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_stored_top_first_and_the_root_covers_the_top() {
        let salt = [7u8; 32];
        let blocks = 200usize; // two level-0 blocks, one level-1 block
        let leaves: Vec<[u8; 32]> = (0..blocks).map(|i| block_digest(&salt, &[i as u8; 4096])).collect();
        let tree = VerityTree::build(&leaves, &salt);
        assert_eq!(tree.hash_device.len(), 3 * 4096);
        let (top, level0) = tree.hash_device.split_at(4096);
        assert_eq!(&level0[..32], &leaves[0]);
        assert_eq!(&level0[4096 + 71 * 32..4096 + 72 * 32], &leaves[199]);
        assert_eq!(&top[..32], &block_digest(&salt, &level0[..4096]));
        assert_eq!(tree.root, block_digest(&salt, top));
    }

    /// Checked against cryptsetup's own implementation where `veritysetup` is installed.
    #[test]
    fn veritysetup_accepts_the_tree() {
        let Ok(status) = std::process::Command::new("veritysetup").arg("--version").output() else {
            eprintln!("veritysetup not installed (cryptsetup-bin): the qemu test checks the kernel instead");
            return;
        };
        assert!(status.status.success());
        let dir = std::env::temp_dir().join(format!("skydd-verity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let salt = [0x5au8; 32];
        let blocks = 300usize;
        let data: Vec<u8> = (0..blocks * 4096).map(|i| (i / 4096 + i % 251) as u8).collect();
        let leaves: Vec<[u8; 32]> = data.chunks(4096).map(|b| block_digest(&salt, b)).collect();
        let tree = VerityTree::build(&leaves, &salt);
        std::fs::write(dir.join("data"), &data).unwrap();
        std::fs::write(dir.join("hash"), &tree.hash_device).unwrap();
        let verify = |root: &str| {
            std::process::Command::new("veritysetup")
                .args([
                    "verify",
                    "--no-superblock",
                    "--hash=sha256",
                    "--data-block-size=4096",
                    "--hash-block-size=4096",
                ])
                .arg(format!("--data-blocks={blocks}"))
                .arg(format!("--salt={}", hex::encode(salt)))
                .arg(dir.join("data"))
                .arg(dir.join("hash"))
                .arg(root)
                .output()
                .unwrap()
        };
        let good = verify(&hex::encode(tree.root));
        assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
        let bad = verify(&hex::encode([0u8; 32]));
        assert!(!bad.status.success());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
