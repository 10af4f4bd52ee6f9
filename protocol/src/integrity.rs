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
}

impl IntegrityAnchor {
    /// The canonical encoding the TTP signs (docs/PROTOCOL.md "Integrity anchor").
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(ANCHOR_MAGIC)
            .str(&self.domain_id)
            .u64(self.epoch)
            .bytes(&self.root)
            .str(&self.host_id)
            .u64(self.committed_at)
            .finish()
    }

    /// Strict decoding of [`IntegrityAnchor::encode`]'s output (no signature check).
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("integrity anchor", encoded, ANCHOR_MAGIC)?;
        let anchor = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            epoch: reader.u64("epoch")?,
            root: reader.array("root")?,
            host_id: reader.str("host id", 64)?.to_string(),
            committed_at: reader.u64("commit time")?,
        };
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
        };
        let encoded = anchor.encode();
        assert_eq!(IntegrityAnchor::decode(&encoded).unwrap(), anchor);
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(IntegrityAnchor::decode(&longer).unwrap_err().to_string().contains("trailing"));
    }
}
