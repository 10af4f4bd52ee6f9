//! Sector tags and the other keyed records of a format-2 volume (docs/FORMAT.md "Sector
//! tags"): BLAKE3 in keyed mode, each kind of record under its own key derived from `K_mac`
//! and the domain, so no tag of one kind or domain is ever valid as another:
//! `K_label = BLAKE3-keyed(K_mac, u32 LE len(label) || label || domain_id)`.
//!
//! Entry of sector `n` (32 bytes): `epoch` (u64 LE, the epoch whose writes produced it)
//! followed by the first 24 bytes of
//! `BLAKE3-keyed(K_sector, ciphertext || n (u64 LE) || epoch (u64 LE))`, `K_sector` the key of
//! label `skydd/v2/sector`. The ciphertext comes first so its four 1 KiB chunks are hashed
//! side by side (BLAKE3's SIMD works on whole chunks).
//! An entry of 32 zero bytes means "never written": the sector reads as zeros without a
//! look at the disk, so no provider-chosen bytes ever reach a reader.

use protocol::secret::SecretBytes;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use super::geometry::ENTRY_LEN;
use crate::{Error, Result};

const SECTOR_LABEL: &[u8] = b"skydd/v2/sector";
const TAG_LEN: usize = ENTRY_LEN - 8;
/// The entry of a sector that was never written.
pub const UNWRITTEN: [u8; ENTRY_LEN] = [0; ENTRY_LEN];

/// Computes and checks the keyed records of one domain's volume.
pub struct Tagger {
    key: SecretBytes,
    sector_key: SecretBytes,
    domain_id: String,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tagger(domain {}, key redacted)", self.domain_id)
    }
}

impl Tagger {
    /// A tagger for `domain_id` under the 32-byte `K_mac` the TTP released.
    pub fn new(mac_key: &SecretBytes, domain_id: &str) -> Result<Self> {
        if mac_key.len() != 32 {
            return Err(Error::Layout(format!("the sector-tag key is {} bytes, it must be 32", mac_key.len())));
        }
        let mut tagger =
            Self { key: mac_key.clone(), sector_key: SecretBytes::zeroed(32), domain_id: domain_id.to_string() };
        let mut sector_key = tagger.label_key(SECTOR_LABEL);
        tagger.sector_key.expose_mut().copy_from_slice(sector_key.as_bytes());
        sector_key.zeroize();
        Ok(tagger)
    }

    /// `K_label`: the key of one kind of record for this domain.
    fn label_key(&self, label: &[u8]) -> blake3::Hash {
        let key: &[u8; 32] = self.key.expose().try_into().expect("length checked in new");
        let mut hasher = blake3::Hasher::new_keyed(key);
        hasher.update(&(label.len() as u32).to_le_bytes());
        hasher.update(label);
        hasher.update(self.domain_id.as_bytes());
        hasher.finalize()
    }

    /// The domain whose volume this tagger serves.
    pub fn domain_id(&self) -> &str {
        &self.domain_id
    }

    /// The entry of sector `sector` holding `ciphertext` (one 4096-byte sector), written in `epoch`.
    pub fn entry(&self, sector: u64, epoch: u64, ciphertext: &[u8]) -> [u8; ENTRY_LEN] {
        let key: &[u8; 32] = self.sector_key.expose().try_into().expect("32 bytes");
        let mut hasher = blake3::Hasher::new_keyed(key);
        hasher.update(ciphertext);
        hasher.update(&sector.to_le_bytes());
        hasher.update(&epoch.to_le_bytes());
        let mut entry = [0u8; ENTRY_LEN];
        entry[..8].copy_from_slice(&epoch.to_le_bytes());
        let mut tag = hasher.finalize_xof();
        tag.fill(&mut entry[8..8 + TAG_LEN]);
        entry
    }

    /// Whether `entry` is the entry of `ciphertext` at `sector` (constant-time compare).
    pub fn verifies(&self, sector: u64, entry: &[u8], ciphertext: &[u8]) -> bool {
        let expected = self.entry(sector, entry_epoch(entry), ciphertext);
        bool::from(expected.ct_eq(entry))
    }

    /// The keyed MAC of a record (superblock, dirty map): `BLAKE3-keyed(K_label, body)`.
    pub fn record_mac(&self, label: &[u8], body: &[u8]) -> [u8; 32] {
        let mut key = self.label_key(label);
        let mac = *blake3::keyed_hash(key.as_bytes(), body).as_bytes();
        key.zeroize();
        mac
    }

    /// Whether `mac` is the MAC of `body` under `label` (constant-time compare).
    pub fn record_mac_verifies(&self, label: &[u8], body: &[u8], mac: &[u8]) -> bool {
        bool::from(self.record_mac(label, body).ct_eq(mac))
    }
}

/// The epoch an entry names (0 for [`UNWRITTEN`]).
pub fn entry_epoch(entry: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&entry[..8]);
    u64::from_le_bytes(raw)
}

/// Whether an entry is [`UNWRITTEN`].
pub fn is_unwritten(entry: &[u8]) -> bool {
    entry.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagger(domain: &str) -> Tagger {
        Tagger::new(&SecretBytes::from_slice_wiping(&mut [7u8; 32]), domain).unwrap()
    }

    #[test]
    fn an_entry_binds_sector_epoch_ciphertext_and_domain() {
        let t = tagger("00112233445566778899aabbccddeeff");
        let data = vec![0x5a; 4096];
        let entry = t.entry(9, 3, &data);
        assert_eq!(entry_epoch(&entry), 3);
        assert!(t.verifies(9, &entry, &data));
        assert!(!t.verifies(10, &entry, &data), "sector swap");
        let mut flipped = data.clone();
        flipped[100] ^= 1;
        assert!(!t.verifies(9, &entry, &flipped), "bit flip");
        let mut older = entry;
        older[..8].copy_from_slice(&2u64.to_le_bytes());
        assert!(!t.verifies(9, &older, &data), "epoch edited");
        assert!(!tagger("ffeeddccbbaa99887766554433221100").verifies(9, &entry, &data), "other domain");
        let other_key = Tagger::new(&SecretBytes::from_slice_wiping(&mut [8u8; 32]), t.domain_id()).unwrap();
        assert!(!other_key.verifies(9, &entry, &data), "other key");
    }
}
