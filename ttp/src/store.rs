//! The TTP's persistent state behind one small trait ([`TtpStore`]), implemented once
//! ([`SqlStore`]) over two engines: SQLite, the embedded default, and PostgreSQL, for
//! replicas sharing one database (docs/ARCHITECTURE.md "Storage of state"). Every statement
//! is written once and runs on both; the engines only carry values (`engine`). Writes go
//! through a group committer (`group`) that lets concurrent requests share one transaction
//! and one flush. The TTP stores no key: host records, domain versions, tombstones,
//! challenges and the audit chain only.

use std::path::Path;
use std::sync::Arc;

use protocol::domain::AccessMode;
use protocol::messages::{AuditRecord, AUDIT_FORMAT_TAGGED, AUDIT_GENESIS_HASH};

use crate::error::{Error, Result};

#[cfg(test)]
mod bench;
mod group;
mod integrity;
mod schema;
#[cfg(test)]
mod tests;

pub use group::GroupCommit;
pub use skydd_sql::Database;
use skydd_sql::{Backend, Sql, Value};

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
    /// The K_TTP version that derives this domain's key, fixed at registration
    /// (docs/OPERATOR.md "Master key versions"); a key rotation moves it to the newest.
    pub master_key_version: u32,
    /// The newest key generation (1 until the first rotation): a header's registration must
    /// be of it (docs/PROTOCOL.md "Key rotation").
    pub key_generation: u64,
    /// The K_TTP version of generation `key_generation - 1`, kept from a rotation until a
    /// release of a header without a rotation shows the re-encryption finished.
    pub previous_master_key_version: Option<u32>,
}

/// How many registered domains one K_TTP version derives keys for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyUse {
    /// The master-key version.
    pub version: u32,
    /// Domains not deleted: their keys need this version.
    pub live_domains: u64,
    /// Deleted (crypto-shredded) domains registered under it: they need it no more.
    pub deleted_domains: u64,
}

/// An audit record before the store numbers and chains it.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    /// Unix seconds of the event.
    pub at: u64,
    /// What happened: `register`, `delete`, `enroll_begin`, `enroll`, `key_release`,
    /// `integrity_commit`, `integrity_violation`, `launch` or `launch_report` (among others).
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

/// The single-use tokens a key release spends when it is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpentTokens {
    /// The quote challenge's id.
    pub challenge_id: String,
    /// SHA-256 of the mount grant's message.
    pub grant_hash: [u8; 32],
    /// The grant's expiry (unix seconds): its used mark is kept until then.
    pub grant_expires_at: u64,
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
    /// Registered domains per K_TTP version, oldest version first; a domain whose rotation
    /// may still be re-encrypting counts for its previous version too.
    fn master_key_use(&self) -> Result<Vec<MasterKeyUse>>;
    /// Moves the domain to key generation `expected_generation + 1` under K_TTP version
    /// `master_key_version`, keeping its current version as the previous one; only if it is
    /// still at `expected_generation` and not deleted (compare-and-set).
    fn rotate_domain_key(&self, domain_id: &str, expected_generation: u64, master_key_version: u32) -> Result<()>;
    /// Forgets the previous generation's K_TTP version once its re-encryption is over (the
    /// domain still at `generation`).
    fn finish_key_rotation(&self, domain_id: &str, generation: u64) -> Result<()>;

    /// Stores a quote challenge for `host_id` until `expires_at` (unix seconds), dropping
    /// expired ones.
    fn put_challenge(&self, challenge_id: &str, host_id: &str, nonce: &[u8], expires_at: u64) -> Result<()>;
    /// Removes and returns (host id, nonce, expiry) of a challenge: each is usable once.
    fn take_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>>;

    /// The challenge's (host id, nonce, expiry) without using it up: a key release checks the
    /// quote against it, then uses it up in [`TtpStore::commit_key_release`].
    fn peek_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>>;

    /// Marks a mount grant (by the SHA-256 of its message) used until it expires; `false` if
    /// it was used before. Expired marks are dropped as new ones arrive: an expired grant is
    /// refused for its expiry anyway.
    fn consume_grant(&self, grant_hash: &[u8; 32], expires_at: u64) -> Result<bool>;
    /// Numbers, chains and appends a record atomically; returns it.
    fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord>;
    /// The audit records in sequence order: every record with `None`, or only those naming
    /// `domain_id`. Does not verify the chain (the service does).
    fn audit_records(&self, domain_id: Option<&str>) -> Result<Vec<AuditRecord>>;

    /// The audit record numbered `seq`, if the log holds it.
    fn audit_record(&self, seq: u64) -> Result<Option<AuditRecord>>;
    /// Sequence number and hash of the newest audit record, if any.
    fn audit_head(&self) -> Result<Option<(u64, String)>>;
    /// The newest signed audit checkpoint: when it was signed (unix seconds) and its envelope.
    fn newest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>>;
    /// Stores a signed checkpoint of the chain at `seq`, signed at `at`.
    fn put_checkpoint(&self, seq: u64, at: u64, envelope: &[u8]) -> Result<()>;

    /// Appends the audit record of a granted key release (`entry` names domain, host and VM)
    /// and makes it the domain's [`LatestRelease`] in `mode`, in one transaction; returns the
    /// record and the domain's newest anchor as of that instant (docs/PROTOCOL.md "Integrity
    /// anchor": from then on only this release's host may commit).
    fn append_key_release(&self, entry: AuditEntry, mode: AccessMode) -> Result<(AuditRecord, Option<StoredAnchor>)>;
    /// A granted key release in one transaction: uses up the challenge (`Error::ChallengeInvalid`
    /// if another request did first), marks the grant used (`Error::GrantReplayed` if it was;
    /// the challenge stays used up, as for any refused release), then does what
    /// [`TtpStore::append_key_release`] does.
    fn commit_key_release(
        &self,
        spent: &SpentTokens,
        entry: AuditEntry,
        mode: AccessMode,
    ) -> Result<(AuditRecord, Option<StoredAnchor>)>;
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

/// The one implementation of [`TtpStore`], over SQLite or PostgreSQL. SQLite runs in WAL
/// mode with synchronous=FULL, PostgreSQL with its configured `synchronous_commit`: an
/// acknowledged registration or audit record survives a crash in both.
pub struct SqlStore {
    backend: Arc<Backend>,
    writes: group::Committer,
}

impl SqlStore {
    /// Opens or creates the SQLite database at `path`, brought to the newest schema; writes
    /// commit one by one.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_database(&Database::Sqlite(path.to_path_buf()), GroupCommit::Off)
    }

    /// A database in memory, for tests: everything is lost when it is dropped.
    pub fn in_memory() -> Result<Self> {
        Self::with_backend(Backend::in_memory(&schema::MIGRATIONS)?, GroupCommit::Off)
    }

    /// Opens `database` (creating its schema or migrating it to the newest version) with
    /// writes committed as `commit` says.
    pub fn open_database(database: &Database, commit: GroupCommit) -> Result<Self> {
        Self::with_backend(Backend::open(database, &schema::MIGRATIONS)?, commit)
    }

    fn with_backend(backend: Backend, commit: GroupCommit) -> Result<Self> {
        let backend = Arc::new(backend);
        Ok(Self { writes: group::Committer::start(backend.clone(), commit)?, backend })
    }

    fn read<T>(&self, work: impl FnOnce(&mut dyn Sql) -> Result<T>) -> Result<T> {
        self.backend.read(work)
    }

    /// Runs `work` in a write transaction, alone or with concurrent writes (group commit).
    /// `work` may run twice (once in a batch that failed, once alone), so it must not
    /// consume what it captured. A refusal it returns keeps the writes it made before (they
    /// commit with the batch); a store failure rolls everything back.
    fn write<T: Send + 'static>(&self, work: impl Fn(&mut dyn Sql) -> Result<T> + Send + 'static) -> Result<T> {
        self.writes.run(work)
    }
}

fn hash32(raw: Vec<u8>, what: &str) -> Result<[u8; 32]> {
    raw.try_into().map_err(|_| Error::Store(format!("stored {what} is not 32 bytes")))
}

/// A unix time as a signed 64-bit integer; a time beyond i64::MAX would be stored
/// negative and compare as long past (a used-grant mark purged at once), so it is refused.
fn sql_time(what: &str, unix_secs: u64) -> Result<i64> {
    i64::try_from(unix_secs)
        .map_err(|_| Error::Store(format!("{what} {unix_secs} is beyond the largest storable time")))
}

/// The advisory lock every replica takes before appending to the audit chain, so the chain
/// keeps one total order across them ("skydd-audit" in ASCII, truncated).
pub(crate) const AUDIT_CHAIN_LOCK: i64 = 7310593858020398177;

/// Numbers, chains and appends a record inside the caller's transaction, so that a record and
/// the state change it reports commit together or not at all.
fn append_audit_in(tx: &mut dyn Sql, entry: AuditEntry) -> Result<AuditRecord> {
    tx.advisory_lock(AUDIT_CHAIN_LOCK)?;
    let (seq, prev_hash) = match tx.query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])? {
        Some(row) => (row.int(0)? as u64 + 1, row.text(1)?),
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
        &[(seq as i64).into(), record.domain_id.clone().into(), json.into(), record.hash.clone().into()],
    )?;
    Ok(record)
}

/// Marks a grant used (`[hash, expiry]`), dropping expired marks first; `false` if it was.
fn mark_grant_used(tx: &mut dyn Sql, grant: &[Value; 2]) -> Result<bool> {
    tx.execute("DELETE FROM used_grants WHERE expires_at < ?1", &[(now_unix() as i64).into()])?;
    let inserted =
        tx.execute("INSERT INTO used_grants (grant_hash, expires_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING", grant)?;
    Ok(inserted == 1)
}

fn domain_row(domain_id: &str, row: skydd_sql::Row) -> Result<DomainRecord> {
    Ok(DomainRecord {
        domain_id: domain_id.to_string(),
        owner: row.text(0)?,
        latest_version: row.int(1)? as u64,
        descriptor: row.blob(2)?,
        descriptor_hash: hash32(row.blob(3)?, "descriptor hash")?,
        metadata_hash: hash32(row.blob(4)?, "metadata hash")?,
        deleted_at: row.opt_int(5)?.map(|t| t as u64),
        master_key_version: u32::try_from(row.int(6)?)
            .map_err(|_| Error::Store(format!("domain {domain_id} names an impossible master-key version")))?,
        key_generation: row.int(7)? as u64,
        previous_master_key_version: row
            .opt_int(8)?
            .map(u32::try_from)
            .transpose()
            .map_err(|_| Error::Store(format!("domain {domain_id} names an impossible master-key version")))?,
    })
}

impl TtpStore for SqlStore {
    fn put_host(&self, host_id: &str, record_json: &str) -> Result<()> {
        let params = [host_id.into(), record_json.into()];
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO hosts (host_id, record) VALUES (?1, ?2)
                 ON CONFLICT(host_id) DO UPDATE SET record = excluded.record",
                &params,
            )
            .map(drop)
            .map_err(Error::from)
        })
    }

    fn host(&self, host_id: &str) -> Result<Option<String>> {
        self.read(|c| {
            c.query_row("SELECT record FROM hosts WHERE host_id = ?1", &[host_id.into()])?
                .map(|r| r.text(0))
                .transpose()
                .map_err(Error::from)
        })
    }

    fn enroll_host(&self, host_id: &str, ek_fingerprint: &str, record_json: &str) -> Result<Option<String>> {
        let (host_id, ek_fingerprint, record_json) =
            (host_id.to_string(), ek_fingerprint.to_string(), record_json.to_string());
        self.write(move |tx| {
            // Enrollments are rare; the audit lock keeps two replicas' pins of one EK serial.
            tx.advisory_lock(AUDIT_CHAIN_LOCK)?;
            let (host, ek): (Value, Value) = (host_id.as_str().into(), ek_fingerprint.as_str().into());
            let owner = tx.query_row("SELECT host_id FROM host_eks WHERE ek_fingerprint = ?1", std::slice::from_ref(&ek))?;
            if let Some(owner) = owner.map(|r| r.text(0)).transpose()?.filter(|owner| *owner != host_id) {
                return Err(Error::EkInUse(format!(
                    "EK {ek_fingerprint} is enrolled as host {owner}; one TPM is one host, so it cannot also enroll as {host_id}"
                )));
            }
            let pinned = tx.query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", std::slice::from_ref(&host))?;
            let replaced = match pinned.map(|r| r.text(0)).transpose()? {
                Some(pinned) if pinned != ek_fingerprint => {
                    // A mark older than HOST_REPLACEMENT_TTL_SECS no longer counts: an approval
                    // is for the replacement at hand, not a standing open door.
                    let cutoff = now_unix().saturating_sub(HOST_REPLACEMENT_TTL_SECS) as i64;
                    let marked = tx.execute(
                        "DELETE FROM host_replacements WHERE host_id = ?1 AND marked_at >= ?2",
                        &[host.clone(), cutoff.into()],
                    )?;
                    if marked != 1 {
                        return Err(Error::EkPinned(format!(
                            "host {host_id} is pinned to EK {pinned}, this enrollment presents EK {ek_fingerprint}; \
                             if its TPM was really replaced, an operator runs `ttp host replace --host {host_id}` first \
                             (an approval counts for {} hours)",
                            HOST_REPLACEMENT_TTL_SECS / 3600
                        )));
                    }
                    tx.execute("DELETE FROM host_eks WHERE host_id = ?1", std::slice::from_ref(&host))?;
                    Some(pinned)
                }
                _ => None,
            };
            tx.execute(
                "INSERT INTO host_eks (ek_fingerprint, host_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                &[ek, host.clone()],
            )?;
            tx.execute(
                "INSERT INTO hosts (host_id, record) VALUES (?1, ?2) ON CONFLICT(host_id) DO UPDATE SET record = excluded.record",
                &[host, record_json.as_str().into()],
            )?;
            Ok(replaced)
        })
    }

    fn pinned_ek(&self, host_id: &str) -> Result<Option<String>> {
        self.read(|c| {
            c.query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", &[host_id.into()])?
                .map(|r| r.text(0))
                .transpose()
                .map_err(Error::from)
        })
    }

    fn mark_host_replaceable(&self, host_id: &str, operator: &str, at: u64) -> Result<String> {
        let (host_id, operator) = (host_id.to_string(), operator.to_string());
        self.write(move |tx| {
            let pinned = tx
                .query_row("SELECT ek_fingerprint FROM host_eks WHERE host_id = ?1", &[host_id.as_str().into()])?
                .ok_or_else(|| Error::HostUnknown(host_id.clone()))?
                .text(0)?;
            tx.execute(
                "INSERT INTO host_replacements (host_id, operator, marked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(host_id) DO UPDATE SET operator = excluded.operator, marked_at = excluded.marked_at",
                &[host_id.as_str().into(), operator.as_str().into(), (at as i64).into()],
            )?;
            Ok(pinned)
        })
    }

    fn domain(&self, domain_id: &str) -> Result<Option<DomainRecord>> {
        self.read(|c| {
            c.query_row(
                "SELECT owner, latest_version, descriptor, descriptor_hash, metadata_hash, deleted_at, master_key_version,
                        key_generation, previous_master_key_version
                 FROM domains WHERE domain_id = ?1",
                &[domain_id.into()],
            )?
            .map(|row| domain_row(domain_id, row))
            .transpose()
        })
    }

    fn insert_domain(&self, record: &DomainRecord) -> Result<()> {
        let domain_id = record.domain_id.clone();
        let params = [
            record.domain_id.as_str().into(),
            record.owner.as_str().into(),
            (record.latest_version as i64).into(),
            record.descriptor.clone().into(),
            record.descriptor_hash.as_slice().into(),
            record.metadata_hash.as_slice().into(),
            i64::from(record.master_key_version).into(),
        ];
        self.write(move |tx| {
            let inserted = tx.execute(
                "INSERT INTO domains (domain_id, owner, latest_version, descriptor, descriptor_hash, metadata_hash, master_key_version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                &params,
            )?;
            if inserted != 1 {
                return Err(Error::VersionRollback(format!("domain {domain_id} is already registered")));
            }
            Ok(())
        })
    }

    fn update_domain(&self, record: &DomainRecord, expected_version: u64) -> Result<()> {
        let domain_id = record.domain_id.clone();
        let params = [
            record.domain_id.as_str().into(),
            (record.latest_version as i64).into(),
            record.descriptor.clone().into(),
            record.descriptor_hash.as_slice().into(),
            (expected_version as i64).into(),
        ];
        self.write(move |tx| {
            // Compare-and-set: a concurrent update (on any replica) that got there first
            // changed latest_version, so this one changes no row.
            let changed = tx.execute(
                "UPDATE domains SET latest_version = ?2, descriptor = ?3, descriptor_hash = ?4
                 WHERE domain_id = ?1 AND latest_version = ?5 AND deleted_at IS NULL",
                &params,
            )?;
            if changed != 1 {
                return Err(Error::VersionRollback(format!(
                    "domain {domain_id} changed concurrently: version {expected_version} is no longer the newest"
                )));
            }
            Ok(())
        })
    }

    fn tombstone_domain(&self, domain_id: &str, at: u64) -> Result<()> {
        let params = [domain_id.into(), (at as i64).into()];
        self.write(move |tx| {
            tx.execute("UPDATE domains SET deleted_at = ?2 WHERE domain_id = ?1 AND deleted_at IS NULL", &params)
                .map(drop)
                .map_err(Error::from)
        })
    }

    fn rotate_domain_key(&self, domain_id: &str, expected_generation: u64, master_key_version: u32) -> Result<()> {
        let domain_id = domain_id.to_string();
        let params = [
            domain_id.as_str().into(),
            (expected_generation as i64).into(),
            (expected_generation as i64 + 1).into(),
            i64::from(master_key_version).into(),
        ];
        self.write(move |tx| {
            let changed = tx.execute(
                "UPDATE domains SET key_generation = ?3, previous_master_key_version = master_key_version,
                        master_key_version = ?4
                 WHERE domain_id = ?1 AND key_generation = ?2 AND deleted_at IS NULL",
                &params,
            )?;
            if changed != 1 {
                return Err(Error::VersionRollback(format!(
                    "domain {domain_id} changed concurrently: key generation {expected_generation} is no longer the newest"
                )));
            }
            Ok(())
        })
    }

    fn finish_key_rotation(&self, domain_id: &str, generation: u64) -> Result<()> {
        let params = [domain_id.into(), (generation as i64).into()];
        self.write(move |tx| {
            tx.execute(
                "UPDATE domains SET previous_master_key_version = NULL WHERE domain_id = ?1 AND key_generation = ?2",
                &params,
            )
            .map(drop)
            .map_err(Error::from)
        })
    }

    fn master_key_use(&self) -> Result<Vec<MasterKeyUse>> {
        self.read(|c| {
            c.query(
                "SELECT version,
                        SUM(CASE WHEN deleted_at IS NULL THEN 1 ELSE 0 END),
                        SUM(CASE WHEN deleted_at IS NULL THEN 0 ELSE 1 END)
                 FROM (SELECT master_key_version AS version, deleted_at FROM domains
                       UNION ALL
                       SELECT previous_master_key_version, deleted_at FROM domains
                       WHERE previous_master_key_version IS NOT NULL
                         AND previous_master_key_version <> master_key_version) AS uses
                 GROUP BY version ORDER BY version",
                &[],
            )?
            .into_iter()
            .map(|row| {
                Ok(MasterKeyUse {
                    version: u32::try_from(row.int(0)?)
                        .map_err(|_| Error::Store("an impossible master-key version in domains".into()))?,
                    live_domains: row.int(1)? as u64,
                    deleted_domains: row.int(2)? as u64,
                })
            })
            .collect()
        })
    }

    fn put_challenge(&self, challenge_id: &str, host_id: &str, nonce: &[u8], expires_at: u64) -> Result<()> {
        let params =
            [challenge_id.into(), host_id.into(), nonce.into(), sql_time("challenge expiry", expires_at)?.into()];
        self.write(move |tx| {
            // Expired challenges are useless; drop them as new ones arrive.
            tx.execute("DELETE FROM challenges WHERE expires_at < ?1", &[(now_unix() as i64).into()])?;
            tx.execute(
                "INSERT INTO challenges (challenge_id, host_id, nonce, expires_at) VALUES (?1, ?2, ?3, ?4)",
                &params,
            )
            .map(drop)
            .map_err(Error::from)
        })
    }

    fn take_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>> {
        let params = [challenge_id.into()];
        self.write(move |tx| {
            // One statement: of two replicas deleting the same row, one gets it back.
            tx.query_row(
                "DELETE FROM challenges WHERE challenge_id = ?1 RETURNING host_id, nonce, expires_at",
                &params,
            )?
            .map(|row| Ok((row.text(0)?, row.blob(1)?, row.int(2)? as u64)))
            .transpose()
        })
    }

    fn peek_challenge(&self, challenge_id: &str) -> Result<Option<(String, Vec<u8>, u64)>> {
        self.read(|c| {
            c.query_row(
                "SELECT host_id, nonce, expires_at FROM challenges WHERE challenge_id = ?1",
                &[challenge_id.into()],
            )?
            .map(|row| Ok((row.text(0)?, row.blob(1)?, row.int(2)? as u64)))
            .transpose()
        })
    }

    fn consume_grant(&self, grant_hash: &[u8; 32], expires_at: u64) -> Result<bool> {
        let params = [grant_hash.as_slice().into(), sql_time("grant expiry", expires_at)?.into()];
        self.write(move |tx| mark_grant_used(tx, &params))
    }

    fn commit_key_release(
        &self,
        spent: &SpentTokens,
        entry: AuditEntry,
        mode: AccessMode,
    ) -> Result<(AuditRecord, Option<StoredAnchor>)> {
        let spent = spent.clone();
        let grant = [spent.grant_hash.as_slice().into(), sql_time("grant expiry", spent.grant_expires_at)?.into()];
        self.write(move |tx| {
            // One statement each: of two replicas spending the same token, one changes a row.
            let taken =
                tx.execute("DELETE FROM challenges WHERE challenge_id = ?1", &[spent.challenge_id.as_str().into()])?;
            if taken != 1 {
                return Err(Error::ChallengeInvalid(format!(
                    "challenge {} was used by a concurrent request",
                    spent.challenge_id
                )));
            }
            if !mark_grant_used(tx, &grant)? {
                return Err(Error::GrantReplayed(
                    "the grant was used for a key release before; every attach needs a new grant".into(),
                ));
            }
            integrity::append_key_release(tx, entry.clone(), mode)
        })
    }

    fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord> {
        self.write(move |tx| append_audit_in(tx, entry.clone()))
    }

    fn append_key_release(&self, entry: AuditEntry, mode: AccessMode) -> Result<(AuditRecord, Option<StoredAnchor>)> {
        self.write(move |tx| integrity::append_key_release(tx, entry.clone(), mode))
    }

    fn latest_release(&self, domain_id: &str) -> Result<Option<LatestRelease>> {
        self.read(|c| integrity::latest_release(c, domain_id))
    }

    fn newest_anchor(&self, domain_id: &str) -> Result<Option<StoredAnchor>> {
        self.read(|c| integrity::newest_anchor(c, domain_id))
    }

    fn commit_anchor(&self, anchor: &StoredAnchor, release_seq: u64, entry: AuditEntry) -> Result<AuditRecord> {
        let anchor = anchor.clone();
        self.write(move |tx| integrity::commit_anchor(tx, &anchor, release_seq, entry.clone()))
    }

    fn audit_record(&self, seq: u64) -> Result<Option<AuditRecord>> {
        let row = self.read(|c| Ok(c.query_row("SELECT record FROM audit WHERE seq = ?1", &[(seq as i64).into()])?))?;
        row.map(|row| {
            serde_json::from_str(&row.text(0)?)
                .map_err(|e| Error::AuditChainBroken(format!("audit record {seq} is not valid JSON: {e}")))
        })
        .transpose()
    }

    fn audit_head(&self) -> Result<Option<(u64, String)>> {
        let row = self.read(|c| Ok(c.query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?))?;
        row.map(|row| Ok((row.int(0)? as u64, row.text(1)?))).transpose()
    }

    fn newest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let row = self.read(|c| {
            Ok(c.query_row(
                "SELECT signed_at, envelope FROM audit_checkpoints ORDER BY signed_at DESC, seq DESC LIMIT 1",
                &[],
            )?)
        })?;
        row.map(|row| Ok((row.int(0)? as u64, row.blob(1)?))).transpose()
    }

    fn put_checkpoint(&self, seq: u64, at: u64, envelope: &[u8]) -> Result<()> {
        let params = [sql_time("checkpoint time", at)?.into(), (seq as i64).into(), envelope.into()];
        self.write(move |tx| {
            tx.execute("INSERT INTO audit_checkpoints (signed_at, seq, envelope) VALUES (?1, ?2, ?3)", &params)
                .map(drop)
                .map_err(Error::from)
        })
    }

    fn audit_records(&self, domain_id: Option<&str>) -> Result<Vec<AuditRecord>> {
        self.read(|c| read_audit_records(c, domain_id))
    }
}

/// The audit records in sequence order (all, or those naming `domain_id`), unverified.
fn read_audit_records(c: &mut dyn Sql, domain_id: Option<&str>) -> Result<Vec<AuditRecord>> {
    let rows = match domain_id {
        Some(domain_id) => {
            c.query("SELECT record FROM audit WHERE domain_id = ?1 ORDER BY seq", &[domain_id.into()])?
        }
        None => c.query("SELECT record FROM audit ORDER BY seq", &[])?,
    };
    rows.iter()
        .map(|row| {
            serde_json::from_str(&row.text(0)?)
                .map_err(|e| Error::AuditChainBroken(format!("an audit record is not valid JSON: {e}")))
        })
        .collect()
}

/// The audit log opened for reading only (`ttp audit`): no schema is created or migrated and
/// nothing can be written, so an operator can read it beside a serving TTP (SQLite in WAL
/// mode lets a reader run beside the writer; PostgreSQL connections are read-only).
pub struct AuditLogReader {
    backend: Backend,
}

impl AuditLogReader {
    /// Opens `database` read-only; an SQLite file that does not exist is an error.
    pub fn open(database: &Database) -> Result<Self> {
        Ok(Self { backend: Backend::open_read_only(database)? })
    }

    /// Every audit record in sequence order, unverified
    /// ([`crate::service::verify_whole_audit_chain`] checks them).
    pub fn records(&self) -> Result<Vec<AuditRecord>> {
        self.backend.read(|c| read_audit_records(c, None))
    }
}

/// Current time in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
