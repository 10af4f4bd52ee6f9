//! The TTP's side of a format-2 volume's freshness (docs/PROTOCOL.md "Integrity anchor";
//! the on-disk tree is docs/FORMAT.md "Version 2"): the secure component that holds a
//! domain read-write commits the root of the volume's hash tree with a monotonic epoch, the
//! TTP signs and audits each commit and returns the newest with every key release, and a
//! host that finds a sector, tag or tree that does not verify reports it into the domain's
//! viewing history.

use serde::{Deserialize, Serialize};

use crate::domain::validate_name;
use crate::encoding::{Reader, Writer};
use crate::error::Result;
use crate::signing::SignedEnvelope;

const ANCHOR_MAGIC: &[u8] = b"SKYDD-INTEGRITY-ANCHOR\x01";
/// Version 2 of the anchor: version 1's fields, then `u64 key_generation`; used exactly for
/// key generation 2 and later, so an anchor of a never-rotated domain keeps its v1 bytes.
const ANCHOR_MAGIC_V2: &[u8] = b"SKYDD-INTEGRITY-ANCHOR\x02";

/// The key generation of every domain before its first rotation (serde default).
fn first_generation() -> u64 {
    1
}

/// The newest committed state of a format-2 volume, signed by the TTP (context
/// `integrity-anchor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityAnchor {
    /// The domain whose volume this is.
    pub domain_id: String,
    /// Starts at 1 with the first commit and grows by exactly 1 with each later one.
    pub epoch: u64,
    /// The volume root of docs/FORMAT.md "Volume root": binds the domain, the data-area size,
    /// the epoch and the hash tree over every sector tag.
    pub root: [u8; 32],
    /// The host that committed it (the caller's certificate name).
    pub host_id: String,
    /// Unix seconds.
    pub committed_at: u64,
    /// The key generation whose `K_mac` keys the tags under this root (docs/FORMAT.md "Key
    /// rotation of a format-2 volume"): 1 until the domain's first key rotation.
    pub key_generation: u64,
}

impl IntegrityAnchor {
    /// The canonical encoding the TTP signs (docs/PROTOCOL.md "Integrity anchor"): version 1
    /// for key generation 1 (byte for byte as before rotation), version 2 otherwise.
    pub fn encode(&self) -> Vec<u8> {
        let rotated = self.key_generation != 1;
        let mut writer = Writer::new(if rotated { ANCHOR_MAGIC_V2 } else { ANCHOR_MAGIC });
        writer.str(&self.domain_id).u64(self.epoch).bytes(&self.root).str(&self.host_id).u64(self.committed_at);
        if rotated {
            writer.u64(self.key_generation);
        }
        writer.finish()
    }

    /// Strict decoding of [`IntegrityAnchor::encode`]'s output, version 1 or 2 (no signature
    /// check). A version-2 encoding must name key generation 2 or more, so no anchor has two
    /// encodings.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let rotated = encoded.starts_with(ANCHOR_MAGIC_V2);
        let mut reader =
            Reader::new("integrity anchor", encoded, if rotated { ANCHOR_MAGIC_V2 } else { ANCHOR_MAGIC })?;
        let mut anchor = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            epoch: reader.u64("epoch")?,
            root: reader.array("root")?,
            host_id: reader.str("host id", 64)?.to_string(),
            committed_at: reader.u64("commit time")?,
            key_generation: 1,
        };
        if rotated {
            anchor.key_generation = reader.u64("key generation")?;
            if anchor.key_generation < 2 {
                return Err(crate::Error::malformed(
                    "integrity anchor",
                    format!("a version-2 anchor names key generation {}, not 2 or more", anchor.key_generation),
                ));
            }
        }
        reader.finish()?;
        validate_name("host id", &anchor.host_id)?;
        Ok(anchor)
    }
}

/// SC → TTP `POST /v1/domains/{id}/integrity/commits`: the new root after a flush or at
/// detach. Only the host holding the domain's newest key release, read-write, may commit
/// (`integrity_commit_forbidden`), and only the epoch after the newest (`integrity_epoch_stale`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityCommitRequest {
    /// The committing host; must equal the caller's certificate name.
    pub host_id: String,
    /// The newest committed epoch + 1 (1 for a volume's first commit).
    pub epoch: u64,
    /// The volume root at this epoch.
    #[serde(with = "crate::b64::array32")]
    pub root: [u8; 32],
    /// The key generation whose `K_mac` tagged the volume under this root: the domain's
    /// newest, or during a key rotation the one before it until the tree is rebuilt under the
    /// new key (absent: 1).
    #[serde(default = "first_generation")]
    pub key_generation: u64,
}

/// TTP → SC: the signed anchor of the accepted commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityCommitResponse {
    /// The [`IntegrityAnchor`] signed by the TTP.
    pub anchor: SignedEnvelope,
    /// Sequence number of the audit record of this commit.
    pub audit_seq: u64,
}

/// What a host found that does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A data sector whose ciphertext does not match its tag.
    SectorTag,
    /// A block of tags that does not match the hash tree.
    TagBlock,
    /// Hash tree or integrity superblock that does not give the anchored root.
    Tree,
    /// The volume holds an older committed state than the anchor.
    Rollback,
    /// The volume is shorter than its format-2 layout.
    Truncated,
}

impl ViolationKind {
    /// The stable name written into the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::SectorTag => "sector_tag",
            ViolationKind::TagBlock => "tag_block",
            ViolationKind::Tree => "tree",
            ViolationKind::Rollback => "rollback",
            ViolationKind::Truncated => "truncated",
        }
    }
}

/// SC → TTP `POST /v1/domains/{id}/integrity/violations`: a host found part of a volume that
/// does not verify; the TTP appends an `integrity_violation` record to the viewing history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityViolationReport {
    /// The reporting host; must equal the caller's certificate name.
    pub host_id: String,
    /// The VM the volume was opened for.
    pub vm_id: String,
    /// What did not verify.
    pub kind: ViolationKind,
    /// The data sector (4 KiB units from the data area's start), when one is known.
    pub sector: Option<u64>,
}

/// TTP → SC: where the report went in the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityViolationResponse {
    /// Sequence number of the `integrity_violation` audit record.
    pub audit_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_round_trips_and_refuses_trailing_bytes() {
        let anchor = IntegrityAnchor {
            domain_id: "00112233445566778899aabbccddeeff".into(),
            epoch: 7,
            root: [9; 32],
            host_id: "compute-1".into(),
            committed_at: 1_700_000_000,
            key_generation: 1,
        };
        let encoded = anchor.encode();
        assert!(encoded.starts_with(ANCHOR_MAGIC), "generation 1 keeps the version-1 bytes");
        assert_eq!(IntegrityAnchor::decode(&encoded).unwrap(), anchor);
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(IntegrityAnchor::decode(&longer).unwrap_err().to_string().contains("trailing"));

        let rotated = IntegrityAnchor { key_generation: 3, ..anchor.clone() };
        let encoded = rotated.encode();
        assert!(encoded.starts_with(ANCHOR_MAGIC_V2));
        assert_eq!(IntegrityAnchor::decode(&encoded).unwrap(), rotated);
        // Generation 1 written as version 2 would be a second encoding of the same anchor.
        let mut second = encoded[..encoded.len() - 8].to_vec();
        second.extend_from_slice(&1u64.to_be_bytes());
        assert!(IntegrityAnchor::decode(&second).unwrap_err().to_string().contains("not 2 or more"));
    }
}
