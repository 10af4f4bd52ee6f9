//! The store's side of format-2 integrity (docs/PROTOCOL.md "Integrity anchor"): every anchor
//! the TTP signed, and which host holds each domain's newest key release. Each change commits
//! in the same transaction as the audit record that reports it.

use super::{append_audit_in, hash32, sql_time, AuditEntry};
use crate::error::{Error, Result};
use protocol::domain::AccessMode;
use protocol::integrity::IntegrityAnchor;
use protocol::messages::AuditRecord;
use protocol::signing::SignedEnvelope;
use skydd_sql::Sql;

/// SQLite schema version 1 (see `schema.rs`; PostgreSQL's version 1 has the same tables): the anchors, and the newest release of
/// each domain.
pub(super) const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS integrity_anchors (
        domain_id TEXT NOT NULL, epoch INTEGER NOT NULL, root BLOB NOT NULL, host_id TEXT NOT NULL,
        committed_at INTEGER NOT NULL, envelope BLOB NOT NULL, audit_seq INTEGER NOT NULL,
        PRIMARY KEY (domain_id, epoch));
    CREATE TABLE IF NOT EXISTS latest_releases (
        domain_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, vm_id TEXT NOT NULL, mode TEXT NOT NULL,
        audit_seq INTEGER NOT NULL);";

/// The newest granted key release of a domain: only its host may commit an integrity root
/// (and only if `mode` is read-write) or report a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestRelease {
    /// The host the key went to.
    pub host_id: String,
    /// The VM it was released for.
    pub vm_id: String,
    /// The mode it was released in.
    pub mode: AccessMode,
    /// Sequence number of the release's audit record (the compare-and-set token of a commit).
    pub audit_seq: u64,
}

/// One anchor the TTP signed: decoded, and the envelope as it was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnchor {
    /// What the envelope's message decodes to.
    pub anchor: IntegrityAnchor,
    /// The TTP-signed envelope (context `integrity-anchor`), returned with every key release.
    pub envelope: SignedEnvelope,
}

pub(super) fn append_key_release(
    tx: &mut dyn Sql,
    entry: AuditEntry,
    mode: AccessMode,
) -> Result<(AuditRecord, Option<StoredAnchor>)> {
    let (Some(domain_id), Some(host_id), Some(vm_id)) =
        (entry.domain_id.clone(), entry.host_id.clone(), entry.vm_id.clone())
    else {
        return Err(Error::Store("a key release record must name its domain, host and VM".into()));
    };
    let record = append_audit_in(tx, entry)?;
    tx.execute(
        "INSERT INTO latest_releases (domain_id, host_id, vm_id, mode, audit_seq) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(domain_id) DO UPDATE SET host_id = excluded.host_id, vm_id = excluded.vm_id,
            mode = excluded.mode, audit_seq = excluded.audit_seq",
        &[domain_id.as_str().into(), host_id.into(), vm_id.into(), mode.as_str().into(), (record.seq as i64).into()],
    )?;
    let anchor = newest_anchor(tx, &domain_id)?;
    Ok((record, anchor))
}

pub(super) fn latest_release(sql: &mut dyn Sql, domain_id: &str) -> Result<Option<LatestRelease>> {
    let row = sql.query_row(
        "SELECT host_id, vm_id, mode, audit_seq FROM latest_releases WHERE domain_id = ?1",
        &[domain_id.into()],
    )?;
    row.map(|row| {
        let mode = row.text(2)?.parse().map_err(|e| Error::Store(format!("stored release mode: {e}")))?;
        Ok(LatestRelease { host_id: row.text(0)?, vm_id: row.text(1)?, mode, audit_seq: row.int(3)? as u64 })
    })
    .transpose()
}

pub(super) fn newest_anchor(sql: &mut dyn Sql, domain_id: &str) -> Result<Option<StoredAnchor>> {
    let row = sql.query_row(
        "SELECT epoch, root, envelope FROM integrity_anchors WHERE domain_id = ?1 ORDER BY epoch DESC LIMIT 1",
        &[domain_id.into()],
    )?;
    row.map(|row| {
        let epoch = row.int(0)?;
        let unreadable = |e: protocol::Error| Error::Store(format!("stored anchor {epoch} of domain {domain_id}: {e}"));
        let envelope = SignedEnvelope::decode(&row.blob(2)?).map_err(unreadable)?;
        let anchor = IntegrityAnchor::decode(&envelope.message).map_err(unreadable)?;
        if anchor.domain_id != domain_id
            || anchor.epoch != epoch as u64
            || anchor.root != hash32(row.blob(1)?, "anchor root")?
        {
            return Err(Error::Store(format!("stored anchor {epoch} of domain {domain_id} differs from its envelope")));
        }
        Ok(StoredAnchor { anchor, envelope })
    })
    .transpose()
}

pub(super) fn commit_anchor(
    tx: &mut dyn Sql,
    stored: &StoredAnchor,
    release_seq: u64,
    entry: AuditEntry,
) -> Result<AuditRecord> {
    let anchor = &stored.anchor;
    // First the chain's lock: the epoch and release read below are then the newest on every
    // replica until this transaction ends.
    tx.advisory_lock(super::AUDIT_CHAIN_LOCK)?;
    let newest = tx
        .query_row(
            "SELECT COALESCE(MAX(epoch), 0) FROM integrity_anchors WHERE domain_id = ?1",
            &[anchor.domain_id.as_str().into()],
        )?
        .map_or(Ok(0), |row| row.int(0))?;
    if anchor.epoch != newest as u64 + 1 {
        return Err(Error::IntegrityEpochStale(format!(
            "domain {} is at epoch {newest} (committed concurrently); epoch {} is not the next one",
            anchor.domain_id, anchor.epoch
        )));
    }
    let release = latest_release(tx, &anchor.domain_id)?;
    if release.as_ref().map(|r| r.audit_seq) != Some(release_seq) {
        return Err(Error::IntegrityCommitForbidden(format!(
            "a newer key release of domain {} (audit record {}) superseded the one {} holds",
            anchor.domain_id,
            release.map_or_else(|| "-".to_string(), |r| r.audit_seq.to_string()),
            anchor.host_id
        )));
    }
    let record = append_audit_in(tx, entry)?;
    tx.execute(
        "INSERT INTO integrity_anchors (domain_id, epoch, root, host_id, committed_at, envelope, audit_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &[
            anchor.domain_id.as_str().into(),
            sql_time("epoch", anchor.epoch)?.into(),
            anchor.root.as_slice().into(),
            anchor.host_id.as_str().into(),
            sql_time("commit time", anchor.committed_at)?.into(),
            stored.envelope.encode().into(),
            (record.seq as i64).into(),
        ],
    )?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::super::{SqlStore, TtpStore};
    use super::*;
    use rusqlite::Connection;

    /// A database made before schema version 1 gains the integrity tables at open (and, at
    /// version 3, each domain's K_TTP version: 1 for domains registered before; at version 4
    /// its key generation), and a
    /// reopened one keeps what it holds.
    #[test]
    fn schema_migrates_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttp.db");
        drop(SqlStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP TABLE integrity_anchors; DROP TABLE latest_releases;
                 DROP INDEX domains_master_key_version; ALTER TABLE domains DROP COLUMN master_key_version;
                 ALTER TABLE domains DROP COLUMN key_generation;
                 ALTER TABLE domains DROP COLUMN previous_master_key_version;
                 INSERT INTO domains (domain_id, owner, latest_version, descriptor, descriptor_hash, metadata_hash)
                    VALUES ('d', 'dm-alice', 1, x'00', zeroblob(32), zeroblob(32));
                 PRAGMA user_version = 0;",
            )
            .unwrap();
        let entry = AuditEntry {
            event: "key_release".into(),
            domain_id: Some("d".into()),
            host_id: Some("h".into()),
            vm_id: Some("v".into()),
            ..Default::default()
        };
        drop(SqlStore::open(&path).unwrap());
        let version: i64 =
            Connection::open(&path).unwrap().query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        assert_eq!(version, 4);
        let store = SqlStore::open(&path).unwrap();
        let kept = store.domain("d").unwrap().expect("kept");
        // Version 4: a domain registered before rotations is at key generation 1.
        assert_eq!((kept.master_key_version, kept.key_generation, kept.previous_master_key_version), (1, 1, None));
        store.append_key_release(entry, AccessMode::Rw).unwrap();
        drop(store);
        let release = SqlStore::open(&path).unwrap().latest_release("d").unwrap().expect("kept");
        assert_eq!((release.host_id.as_str(), release.mode), ("h", AccessMode::Rw));
    }
}
