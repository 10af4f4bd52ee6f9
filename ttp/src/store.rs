//! The TTP's persistent state behind one small trait, so SQLite (embedded default) and a
//! future PostgreSQL store for replicas are two implementations, not two code paths.
//! The TTP stores no key: host records, domain versions, tombstones, challenges and the
//! audit chain only.

use std::path::Path;
use std::sync::Mutex;

use protocol::domain::AccessMode;
use protocol::messages::{AuditRecord, AUDIT_FORMAT_TAGGED, AUDIT_GENESIS_HASH};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Error, Result};

mod integrity;

pub use integrity::{LatestRelease, StoredAnchor};

/// How long an operator's `ttp host replace` approval stays usable (24 h).
pub const HOST_REPLACEMENT_TTL_SECS: u64 = 24 * 3600;

/// What the TTP knows about a registered domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRecord {
    /// The domain id (32 lowercase hex characters).
    pub domain_id: String,
    /// Certificate name of the owner; fixed at version 1 (`owner_mismatch` for any other signer
    /// of an update or deletion).
    pub owner: String,
    /// Newest registered version; keys are released only for it.
    pub latest_version: u64,
    /// The canonical descriptor of the latest version (holds the ACL and shared-with list).
    pub descriptor: Vec<u8>,
    /// SHA-256 of `descriptor`; a header's registration must name exactly this hash.
    pub descriptor_hash: [u8; 32],
    /// `H(meta)`, fixed at version 1: an update with other metadata is refused, because the
    /// metadata is bound into the key.
    pub metadata_hash: [u8; 32],
    /// Unix seconds of the tombstone, if deleted.
    pub deleted_at: Option<u64>,
}

/// An audit record before the store numbers and chains it.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    /// Unix seconds of the event.
    pub at: u64,
    /// What happened: `register`, `delete`, `enroll_begin`, `enroll`, `key_release`,
    /// `integrity_commit` or `integrity_violation`.
    pub event: String,
    /// `"ok"` or the refusal's error code (`Error::code`).
    pub outcome: String,
    /// Detail for a person: what was done or why it was refused.
    pub message: String,
    /// The domain concerned, if known (history queries select by it).
    pub domain_id: Option<String>,
    /// The compute host concerned, if any.
    pub host_id: Option<String>,
    /// The VM concerned, if any.
    pub vm_id: Option<String>,
    /// The authenticated caller's certificate name.
    pub actor: String,
}

/// The TTP's persistent state (docs/ARCHITECTURE.md "Storage of state"). Implementations
/// must make each method atomic: the service relies on `take_challenge`, `consume_grant`,
/// `update_domain` and `append_audit` each being one step that two concurrent requests
/// cannot both win.
pub trait TtpStore: Send + Sync {
    /// Stores or replaces the host record (JSON of `HostRecord`) of `host_id` without touching
    /// the EK pin; enrollment goes through [`TtpStore::enroll_host`]. For tools and tests.
    fn put_host(&self, host_id: &str, record_json: &str) -> Result<()>;
    /// The host record JSON of `host_id`, if the host is enrolled.
    fn host(&self, host_id: &str) -> Result<Option<String>>;
    /// Stores the host record of an enrollment with EK `ek_fingerprint`, atomically pinning
    /// the EK (docs/TPM.md "EK pinning"): the first enrollment of a host pins its EK; an EK
    /// enrolled under another host is refused (`Error::EkInUse`); another EK than the pinned
    /// one is refused (`Error::EkPinned`) unless the host was marked replaceable, in which
    /// case the mark is used up and the new EK pinned. Returns the EK it replaced, if any.
    fn enroll_host(&self, host_id: &str, ek_fingerprint: &str, record_json: &str) -> Result<Option<String>>;
    /// The EK fingerprint `host_id` is pinned to, if any.
    fn pinned_ek(&self, host_id: &str) -> Result<Option<String>>;
    /// Lets the next enrollment of `host_id` within [`HOST_REPLACEMENT_TTL_SECS`] pin another
    /// EK (once), for an operator who replaced the host's TPM; returns the EK pinned now. `Error::HostUnknown` if the host
    /// has no pinned EK.
    fn mark_host_replaceable(&self, host_id: &str, operator: &str, at: u64) -> Result<String>;

    /// What the TTP knows about `domain_id`, deleted or not; `None` if never registered.
    fn domain(&self, domain_id: &str) -> Result<Option<DomainRecord>>;
    /// Inserts version 1; fails if the domain exists.
    fn insert_domain(&self, record: &DomainRecord) -> Result<()>;
    /// Replaces the latest version only if it is still `expected_version` (compare-and-set,
    /// so two concurrent updates cannot both win).
    fn update_domain(&self, record: &DomainRecord, expected_version: u64) -> Result<()>;
    /// Marks the domain deleted at `at` (unix seconds); a domain already deleted keeps its first
    /// tombstone.
    fn tombstone_domain(&self, domain_id: &str, at: u64) -> Result<()>;

    /// Stores a quote challenge for `host_id` until `expires_at` (unix seconds), dropping
    /// expired ones.
    fn put_challenge(&self, challenge_id: &str, host_id: &str, nonce: &[u8], expires_at: u64) -> Result<()>;
    /// Removes and returns (host id, nonce, expiry) of a challenge: each is usable once.
    fn take_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>>;

    /// Marks a mount grant (by the SHA-256 of its message) used until it expires; `false` if
    /// it was used before. Expired marks are dropped as new ones arrive: an expired grant is
    /// refused for its expiry anyway.
    fn consume_grant(&self, grant_hash: &[u8; 32], expires_at: u64) -> Result<bool>;
    /// Numbers, chains and appends a record atomically; returns it.
    fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord>;
    /// The audit records in sequence order: every record with `None`, or only those naming
    /// `domain_id`. Does not verify the chain (the service does).
    fn audit_records(&self, domain_id: Option<&str>) -> Result<Vec<AuditRecord>>;

    /// Appends the audit record of a granted key release (`entry` names domain, host and VM)
    /// and makes it the domain's [`LatestRelease`] in `mode`, in one transaction; returns the
    /// record and the domain's newest anchor as of that instant (docs/PROTOCOL.md "Integrity
    /// anchor": from then on only this release's host may commit).
    fn append_key_release(&self, entry: AuditEntry, mode: AccessMode) -> Result<(AuditRecord, Option<StoredAnchor>)>;
    /// The newest granted key release of `domain_id`, if any.
    fn latest_release(&self, domain_id: &str) -> Result<Option<LatestRelease>>;
    /// The newest committed integrity anchor of `domain_id`, if any.
    fn newest_anchor(&self, domain_id: &str) -> Result<Option<StoredAnchor>>;
    /// Stores `anchor` and appends its audit record in one transaction, only if its epoch is
    /// still the newest + 1 (`Error::IntegrityEpochStale`) and the domain's newest release is
    /// still the one with audit record `release_seq` (`Error::IntegrityCommitForbidden`):
    /// compare-and-set, so two racing commits or a commit racing a release cannot both win.
    fn commit_anchor(&self, anchor: &StoredAnchor, release_seq: u64, entry: AuditEntry) -> Result<AuditRecord>;
}

/// The embedded SQLite implementation of [`TtpStore`] (WAL, synchronous=FULL, so an
/// acknowledged registration or audit record survives a crash).
pub struct SqliteStore {
    connection: Mutex<Connection>,
}

fn store_err(context: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::Store(format!("{context}: {e}"))
}

impl SqliteStore {
    /// Opens or creates the database at `path` and its schema.
    pub fn open(path: &Path) -> Result<Self> {
        let connection = Connection::open(path).map_err(store_err("open the TTP database"))?;
        Self::init(connection)
    }

    /// A database in memory, for tests: everything is lost when it is dropped.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(store_err("open an in-memory database"))?)
    }

    fn init(connection: Connection) -> Result<Self> {
        // WAL + FULL sync: an acknowledged registration or audit record survives a crash.
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 PRAGMA synchronous=FULL;
                 PRAGMA busy_timeout=5000;
                 CREATE TABLE IF NOT EXISTS hosts (host_id TEXT PRIMARY KEY, record TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS host_eks (
                    ek_fingerprint TEXT PRIMARY KEY, host_id TEXT NOT NULL UNIQUE);
                 CREATE TABLE IF NOT EXISTS host_replacements (
                    host_id TEXT PRIMARY KEY, operator TEXT NOT NULL, marked_at INTEGER NOT NULL);
                 -- Hosts enrolled before EK pinning: pin the EK their record names.
                 INSERT OR IGNORE INTO host_eks (ek_fingerprint, host_id)
                    SELECT json_extract(record, '$.ek_fingerprint'), host_id FROM hosts
                    WHERE json_extract(record, '$.ek_fingerprint') IS NOT NULL;
                 CREATE TABLE IF NOT EXISTS domains (
                    domain_id TEXT PRIMARY KEY, owner TEXT NOT NULL, latest_version INTEGER NOT NULL,
                    descriptor BLOB NOT NULL, descriptor_hash BLOB NOT NULL, metadata_hash BLOB NOT NULL,
                    deleted_at INTEGER);
                 CREATE TABLE IF NOT EXISTS challenges (
                    challenge_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, nonce BLOB NOT NULL,
                    expires_at INTEGER NOT NULL);
                 CREATE INDEX IF NOT EXISTS challenges_expiry ON challenges(expires_at);
                 CREATE TABLE IF NOT EXISTS used_grants (
                    grant_hash BLOB PRIMARY KEY, expires_at INTEGER NOT NULL);
                 CREATE INDEX IF NOT EXISTS used_grants_expiry ON used_grants(expires_at);
                 CREATE TABLE IF NOT EXISTS audit (
                    seq INTEGER PRIMARY KEY, domain_id TEXT, record TEXT NOT NULL, hash TEXT NOT NULL);
                 CREATE INDEX IF NOT EXISTS audit_domain ON audit(domain_id, seq);",
            )
            .map_err(store_err("create the TTP schema"))?;
        migrate(&connection)?;
        Ok(Self { connection: Mutex::new(connection) })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.connection.lock().map_err(|_| Error::Store("database lock poisoned by an earlier panic".into()))
    }
}

/// Schema changes after the first schema, numbered by SQLite's `user_version`: a database is
/// brought to the newest version at open, each step in its own transaction.
const MIGRATIONS: &[(i64, &str)] = &[(1, integrity::SCHEMA)];

fn migrate(connection: &Connection) -> Result<()> {
    let current: i64 =
        connection.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(store_err("read schema version"))?;
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > current) {
        let failed = |e: rusqlite::Error| Error::Store(format!("migrate the TTP schema to version {version}: {e}"));
        let tx = connection.unchecked_transaction().map_err(failed)?;
        tx.execute_batch(&format!("{sql} PRAGMA user_version = {version};")).map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(())
}

fn hash32(raw: Vec<u8>, what: &str) -> Result<[u8; 32]> {
    raw.try_into().map_err(|_| Error::Store(format!("stored {what} is not 32 bytes")))
}

/// A unix time as SQLite's signed 64-bit integer; a time beyond i64::MAX would be stored
/// negative and compare as long past (a used-grant mark purged at once), so it is refused.
fn sql_time(what: &str, unix_secs: u64) -> Result<i64> {
    i64::try_from(unix_secs)
        .map_err(|_| Error::Store(format!("{what} {unix_secs} is beyond the largest storable time")))
}

/// Numbers, chains and appends a record inside the caller's transaction, so that a record and
/// the state change it reports commit together or not at all.
fn append_audit_in(tx: &Transaction<'_>, entry: AuditEntry) -> Result<AuditRecord> {
    let last: Option<(i64, String)> = tx
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(store_err("read audit head"))?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq as u64 + 1, hash),
        None => (1, AUDIT_GENESIS_HASH.to_string()),
    };
    let mut record = AuditRecord {
        seq,
        at: entry.at,
        event: entry.event,
        outcome: entry.outcome,
        message: entry.message,
        domain_id: entry.domain_id,
        host_id: entry.host_id,
        vm_id: entry.vm_id,
        actor: entry.actor,
        prev_hash,
        hash: String::new(),
        format: AUDIT_FORMAT_TAGGED,
    };
    record.hash = record.compute_hash();
    let json = serde_json::to_string(&record).map_err(|e| Error::Store(format!("encode audit record: {e}")))?;
    tx.execute(
        "INSERT INTO audit (seq, domain_id, record, hash) VALUES (?1, ?2, ?3, ?4)",
        params![seq as i64, record.domain_id, json, record.hash],
    )
    .map_err(store_err("append audit record"))?;
    Ok(record)
}

impl TtpStore for SqliteStore {
    fn put_host(&self, host_id: &str, record_json: &str) -> Result<()> {
        self.lock()?
            .execute(
                "INSERT INTO hosts (host_id, record) VALUES (?1, ?2)
                 ON CONFLICT(host_id) DO UPDATE SET record = excluded.record",
                params![host_id, record_json],
            )
            .map_err(store_err("store host record"))?;
        Ok(())
    }

    fn host(&self, host_id: &str) -> Result<Option<String>> {
        self.lock()?
            .query_row("SELECT record FROM hosts WHERE host_id = ?1", params![host_id], |row| row.get(0))
            .optional()
            .map_err(store_err("read host record"))
    }

    fn enroll_host(&self, host_id: &str, ek_fingerprint: &str, record_json: &str) -> Result<Option<String>> {
        let mut connection = self.lock()?;
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err("begin enrollment transaction"))?;
        let owner: Option<String> = tx
            .query_row("SELECT host_id FROM host_eks WHERE ek_fingerprint = ?1", params![ek_fingerprint], |row| {
                row.get(0)
            })
            .optional()
            .map_err(store_err("read EK pin"))?;
        if let Some(owner) = owner.filter(|owner| owner != host_id) {
            return Err(Error::EkInUse(format!(
                "EK {ek_fingerprint} is enrolled as host {owner}; one TPM is one host, so it cannot also enroll as {host_id}"
            )));
        }
        let pinned: Option<String> = tx
            .query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", params![host_id], |row| row.get(0))
            .optional()
            .map_err(store_err("read EK pin"))?;
        let replaced = match pinned {
            Some(pinned) if pinned != ek_fingerprint => {
                // A mark older than HOST_REPLACEMENT_TTL_SECS no longer counts: an approval
                // is for the replacement at hand, not a standing open door.
                let cutoff = now_unix().saturating_sub(HOST_REPLACEMENT_TTL_SECS) as i64;
                let marked = tx
                    .execute(
                        "DELETE FROM host_replacements WHERE host_id = ?1 AND marked_at >= ?2",
                        params![host_id, cutoff],
                    )
                    .map_err(store_err("use the replacement mark"))?;
                if marked != 1 {
                    return Err(Error::EkPinned(format!(
                        "host {host_id} is pinned to EK {pinned}, this enrollment presents EK {ek_fingerprint}; \
                         if its TPM was really replaced, an operator runs `ttp host replace --host {host_id}` first \
                         (an approval counts for {} hours)",
                        HOST_REPLACEMENT_TTL_SECS / 3600
                    )));
                }
                tx.execute("DELETE FROM host_eks WHERE host_id = ?1", params![host_id])
                    .map_err(store_err("unpin the old EK"))?;
                Some(pinned)
            }
            _ => None,
        };
        tx.execute(
            "INSERT OR IGNORE INTO host_eks (ek_fingerprint, host_id) VALUES (?1, ?2)",
            params![ek_fingerprint, host_id],
        )
        .map_err(store_err("pin the EK"))?;
        tx.execute(
            "INSERT INTO hosts (host_id, record) VALUES (?1, ?2) ON CONFLICT(host_id) DO UPDATE SET record = excluded.record",
            params![host_id, record_json],
        )
        .map_err(store_err("store host record"))?;
        tx.commit().map_err(store_err("commit enrollment"))?;
        Ok(replaced)
    }

    fn pinned_ek(&self, host_id: &str) -> Result<Option<String>> {
        self.lock()?
            .query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", params![host_id], |row| row.get(0))
            .optional()
            .map_err(store_err("read EK pin"))
    }

    fn mark_host_replaceable(&self, host_id: &str, operator: &str, at: u64) -> Result<String> {
        let mut connection = self.lock()?;
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err("begin replacement transaction"))?;
        let pinned: String = tx
            .query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", params![host_id], |row| row.get(0))
            .optional()
            .map_err(store_err("read EK pin"))?
            .ok_or_else(|| Error::HostUnknown(host_id.to_string()))?;
        tx.execute(
            "INSERT INTO host_replacements (host_id, operator, marked_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(host_id) DO UPDATE SET operator = excluded.operator, marked_at = excluded.marked_at",
            params![host_id, operator, at as i64],
        )
        .map_err(store_err("mark the host replaceable"))?;
        tx.commit().map_err(store_err("commit replacement mark"))?;
        Ok(pinned)
    }

    fn domain(&self, domain_id: &str) -> Result<Option<DomainRecord>> {
        let row = self
            .lock()?
            .query_row(
                "SELECT owner, latest_version, descriptor, descriptor_hash, metadata_hash, deleted_at
                 FROM domains WHERE domain_id = ?1",
                params![domain_id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, Vec<u8>>(3)?,
                        row.get::<_, Vec<u8>>(4)?,
                        row.get::<_, Option<i64>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(store_err("read domain"))?;
        row.map(|(owner, version, descriptor, descriptor_hash, metadata_hash, deleted_at)| {
            Ok(DomainRecord {
                domain_id: domain_id.to_string(),
                owner,
                latest_version: version as u64,
                descriptor,
                descriptor_hash: hash32(descriptor_hash, "descriptor hash")?,
                metadata_hash: hash32(metadata_hash, "metadata hash")?,
                deleted_at: deleted_at.map(|t| t as u64),
            })
        })
        .transpose()
    }

    fn insert_domain(&self, record: &DomainRecord) -> Result<()> {
        self.lock()?
            .execute(
                "INSERT INTO domains (domain_id, owner, latest_version, descriptor, descriptor_hash, metadata_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.domain_id,
                    record.owner,
                    record.latest_version as i64,
                    record.descriptor,
                    record.descriptor_hash.to_vec(),
                    record.metadata_hash.to_vec()
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    Error::VersionRollback(format!("domain {} is already registered", record.domain_id))
                }
                other => Error::Store(format!("insert domain: {other}")),
            })?;
        Ok(())
    }

    fn update_domain(&self, record: &DomainRecord, expected_version: u64) -> Result<()> {
        let changed = self
            .lock()?
            .execute(
                "UPDATE domains SET latest_version = ?2, descriptor = ?3, descriptor_hash = ?4
                 WHERE domain_id = ?1 AND latest_version = ?5 AND deleted_at IS NULL",
                params![
                    record.domain_id,
                    record.latest_version as i64,
                    record.descriptor,
                    record.descriptor_hash.to_vec(),
                    expected_version as i64
                ],
            )
            .map_err(store_err("update domain"))?;
        if changed != 1 {
            return Err(Error::VersionRollback(format!(
                "domain {} changed concurrently: version {expected_version} is no longer the newest",
                record.domain_id
            )));
        }
        Ok(())
    }

    fn tombstone_domain(&self, domain_id: &str, at: u64) -> Result<()> {
        self.lock()?
            .execute(
                "UPDATE domains SET deleted_at = ?2 WHERE domain_id = ?1 AND deleted_at IS NULL",
                params![domain_id, at as i64],
            )
            .map_err(store_err("tombstone domain"))?;
        Ok(())
    }

    fn put_challenge(&self, challenge_id: &str, host_id: &str, nonce: &[u8], expires_at: u64) -> Result<()> {
        let connection = self.lock()?;
        // Expired challenges are useless; drop them as new ones arrive.
        connection
            .execute("DELETE FROM challenges WHERE expires_at < ?1", params![now_unix() as i64])
            .map_err(store_err("expire challenges"))?;
        connection
            .execute(
                "INSERT INTO challenges (challenge_id, host_id, nonce, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![challenge_id, host_id, nonce, sql_time("challenge expiry", expires_at)?],
            )
            .map_err(store_err("store challenge"))?;
        Ok(())
    }

    fn take_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>> {
        let mut connection = self.lock()?;
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err("begin challenge transaction"))?;
        let found = tx
            .query_row(
                "SELECT host_id, nonce, expires_at FROM challenges WHERE challenge_id = ?1",
                params![challenge_id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, i64>(2)? as u64)),
            )
            .optional()
            .map_err(store_err("read challenge"))?;
        tx.execute("DELETE FROM challenges WHERE challenge_id = ?1", params![challenge_id])
            .map_err(store_err("consume challenge"))?;
        tx.commit().map_err(store_err("commit challenge"))?;
        Ok(found)
    }

    fn consume_grant(&self, grant_hash: &[u8; 32], expires_at: u64) -> Result<bool> {
        let connection = self.lock()?;
        connection
            .execute("DELETE FROM used_grants WHERE expires_at < ?1", params![now_unix() as i64])
            .map_err(store_err("expire used grants"))?;
        let inserted = connection
            .execute(
                "INSERT OR IGNORE INTO used_grants (grant_hash, expires_at) VALUES (?1, ?2)",
                params![grant_hash.as_slice(), sql_time("grant expiry", expires_at)?],
            )
            .map_err(store_err("mark the grant used"))?;
        Ok(inserted == 1)
    }

    fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord> {
        let mut connection = self.lock()?;
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(store_err("begin audit transaction"))?;
        let record = append_audit_in(&tx, entry)?;
        tx.commit().map_err(store_err("commit audit record"))?;
        Ok(record)
    }

    fn append_key_release(&self, entry: AuditEntry, mode: AccessMode) -> Result<(AuditRecord, Option<StoredAnchor>)> {
        let mut connection = self.lock()?;
        integrity::append_key_release(&mut connection, entry, mode)
    }

    fn latest_release(&self, domain_id: &str) -> Result<Option<LatestRelease>> {
        integrity::latest_release(&*self.lock()?, domain_id)
    }

    fn newest_anchor(&self, domain_id: &str) -> Result<Option<StoredAnchor>> {
        integrity::newest_anchor(&*self.lock()?, domain_id)
    }

    fn commit_anchor(&self, anchor: &StoredAnchor, release_seq: u64, entry: AuditEntry) -> Result<AuditRecord> {
        let mut connection = self.lock()?;
        integrity::commit_anchor(&mut connection, anchor, release_seq, entry)
    }

    fn audit_records(&self, domain_id: Option<&str>) -> Result<Vec<AuditRecord>> {
        let connection = self.lock()?;
        let mut statement = connection
            .prepare(match domain_id {
                Some(_) => "SELECT record FROM audit WHERE domain_id = ?1 ORDER BY seq",
                None => "SELECT record FROM audit WHERE ?1 IS NULL OR ?1 IS NOT NULL ORDER BY seq",
            })
            .map_err(store_err("query audit"))?;
        let rows =
            statement.query_map(params![domain_id], |row| row.get::<_, String>(0)).map_err(store_err("query audit"))?;
        let mut records = Vec::new();
        for row in rows {
            let json = row.map_err(store_err("read audit record"))?;
            records.push(
                serde_json::from_str(&json)
                    .map_err(|e| Error::AuditChainBroken(format!("an audit record is not valid JSON: {e}")))?,
            );
        }
        Ok(records)
    }
}

/// Current time in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
