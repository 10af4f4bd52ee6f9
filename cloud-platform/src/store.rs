//! The cloud platform's persistent state behind one small trait, so SQLite (the embedded
//! default) and a future PostgreSQL store for replicas are two implementations, not two
//! code paths. It holds routing and bookkeeping only: never a key, and never a volume
//! header (the header holds the nonce `r`; it lives only in the volume file, so destroying
//! the file's header crypto-shreds the domain without a copy left in this database).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::cloud::{Attachment, ComputeHost, Instance, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};
use protocol::domain::AccessMode;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::{Error, Result};

/// What the CP records about a domain (the descriptor itself is in the volume header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRecord {
    /// The domain id: 32 lowercase hex characters, from the descriptor.
    pub id: String,
    /// The owner's certificate name; only the owner may update or delete the domain.
    pub owner: String,
    /// Domain managers the newest version is shared with.
    pub shared_with: Vec<String>,
    /// Newest version whose header was written.
    pub version: u64,
    /// Size of the data area in bytes (the volume file is 1 MiB larger).
    pub size_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The volume file (`data_dir/volumes/<id>.vol`).
    pub volume_path: PathBuf,
    /// Unix seconds of the deletion, if deleted.
    pub deleted_at: Option<u64>,
}

impl DomainRecord {
    /// Whether `name` may act for the domain (owner or shared with).
    pub fn is_manager(&self, name: &str) -> bool {
        self.owner == name || self.shared_with.iter().any(|m| m == name)
    }
}

/// One page request of a list endpoint: at most `limit` items with ids after `marker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Most items on the page (1 to 500).
    pub limit: usize,
    /// Only ids after this one; `None` for the first page.
    pub marker: Option<String>,
}

impl Page {
    /// From the query parameters: `limit` defaults to 50 and is capped at 500.
    pub fn new(limit: Option<usize>, marker: Option<String>) -> Result<Self> {
        let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
        if limit == 0 {
            return Err(Error::BadRequest(format!("limit must be between 1 and {MAX_PAGE_LIMIT}")));
        }
        Ok(Self { limit: limit.min(MAX_PAGE_LIMIT), marker: marker.filter(|m| !m.is_empty()) })
    }

    /// Store methods fetch `limit + 1` rows; this cuts the extra one off and answers the
    /// `next_marker` (the last id of the page) when it existed.
    pub fn finish<T>(&self, mut rows: Vec<T>, id: impl Fn(&T) -> &str) -> (Vec<T>, Option<String>) {
        if rows.len() > self.limit {
            rows.truncate(self.limit);
            let next = rows.last().map(|r| id(r).to_string());
            (rows, next)
        } else {
            (rows, None)
        }
    }

    fn fetch(&self) -> i64 {
        (self.limit + 1) as i64
    }

    fn after(&self) -> &str {
        self.marker.as_deref().unwrap_or("")
    }
}

/// A descriptor update the CP accepted but has not finished (written ahead, before the TTP
/// is asked): kill -9, a lost TTP, or a domain manager gone mid-request leave it here, and
/// the CP finishes it (docs/CLOUD-API.md, "Unfinished updates"). It holds the owner's signed
/// descriptor only; never a registration, which carries `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpdate {
    /// The domain being updated.
    pub domain_id: String,
    /// The version of the pending descriptor.
    pub version: u64,
    /// The owner's signed descriptor, as sent in the update.
    pub descriptor: protocol::signing::SignedEnvelope,
    /// Unix seconds.
    pub recorded_at: u64,
}

/// Which attachments to list.
#[derive(Debug, Clone, Default)]
pub struct AttachmentFilter {
    /// Only attachments of domains this domain manager owns or shares.
    pub manager: Option<String>,
    /// Only attachments of this domain (`?domain_id=`).
    pub domain_id: Option<String>,
}

/// The cloud platform's persistent state (see the module documentation); [`SqliteStore`]
/// is the implementation. Methods block: callers run them off the async workers.
pub trait CpStore: Send + Sync {
    /// Inserts or replaces a compute host.
    fn put_host(&self, host: &ComputeHost) -> Result<()>;
    /// The host `id`, if registered.
    fn host(&self, id: &str) -> Result<Option<ComputeHost>>;
    /// Every registered host, by id.
    fn hosts(&self) -> Result<Vec<ComputeHost>>;

    /// Inserts or replaces an instance (a VM moved to another host).
    fn put_instance(&self, instance: &Instance) -> Result<()>;
    /// The instance `id`, if registered.
    fn instance(&self, id: &str) -> Result<Option<Instance>>;
    /// Up to `page.limit + 1` instances after the marker, by id.
    fn instances(&self, page: &Page) -> Result<Vec<Instance>>;

    /// Fails with `domain_exists` if the id is taken.
    fn insert_domain(&self, record: &DomainRecord) -> Result<()>;
    /// The domain `id`, deleted or not; `None` if it was never created.
    fn domain(&self, id: &str) -> Result<Option<DomainRecord>>;
    /// Up to `page.limit + 1` live domains `manager` owns or shares, by id.
    fn domains_for(&self, manager: &str, page: &Page) -> Result<Vec<DomainRecord>>;
    /// How many live domains `owner` has and the sum of their declared sizes in bytes
    /// (what the quota counts).
    fn owner_usage(&self, owner: &str) -> Result<(u64, u64)>;
    /// Records a new version written to the header (and its shared-with list), and ends a
    /// pending update of that version or older, in one transaction.
    fn update_domain(&self, id: &str, version: u64, shared_with: &[String]) -> Result<()>;
    /// Marks a domain deleted and drops its pending update.
    fn mark_domain_deleted(&self, id: &str, at: u64) -> Result<()>;

    /// Writes an update ahead of asking the TTP (replaces an older pending one).
    fn record_pending_update(&self, pending: &PendingUpdate) -> Result<()>;
    /// The pending update of `domain_id`, if any.
    fn pending_update(&self, domain_id: &str) -> Result<Option<PendingUpdate>>;
    /// Every pending update, by domain id (start-up).
    fn pending_updates(&self) -> Result<Vec<PendingUpdate>>;
    /// Forgets a pending update the TTP refused.
    fn drop_pending_update(&self, domain_id: &str) -> Result<()>;

    /// Records a new attachment (usually `attaching`, written ahead of asking the host);
    /// `created_at` in Unix seconds.
    fn insert_attachment(&self, attachment: &Attachment, created_at: u64) -> Result<()>;
    /// The attachment `id` in any status, if it exists.
    fn attachment(&self, id: &str) -> Result<Option<Attachment>>;
    /// Up to `page.limit + 1` attachments after the marker, by id.
    fn attachments(&self, filter: &AttachmentFilter, page: &Page) -> Result<Vec<Attachment>>;
    /// Attachments of a domain that are not detached (attached, or detaching).
    fn open_attachments_of_domain(&self, domain_id: &str) -> Result<Vec<Attachment>>;
    /// Sets the status of attachment `id` (one of [`ATTACHED`], [`DETACHED`], [`DETACHING`],
    /// [`ATTACHING`]).
    fn set_attachment_status(&self, id: &str, status: &str) -> Result<()>;
    /// Records what the host made of an `attaching` attachment: device, mount path, version,
    /// and the status `attached`.
    fn complete_attachment(&self, attachment: &Attachment) -> Result<()>;
    /// Forgets an `attaching` attachment the host refused (it never existed).
    fn delete_attachment(&self, id: &str) -> Result<()>;
}

/// Attachment statuses.
pub const ATTACHED: &str = "attached";
/// Closed: the host no longer has the mapping, or never attached it.
pub const DETACHED: &str = "detached";
/// The CP asked the host to detach (revocation, deletion) and the host did not confirm;
/// `DELETE /v1/attachments/{id}` and the CP's reconciliation with the host retry.
pub const DETACHING: &str = "detaching";
/// Written ahead before the CP asks the host to attach; `attached` once the host answered,
/// or settled by the reconciliation with the host if the answer never came.
pub const ATTACHING: &str = "attaching";

/// The embedded SQLite store (`data_dir/cp.sqlite`, WAL, synchronous=FULL): an
/// acknowledged change survives a crash.
pub struct SqliteStore {
    connection: Mutex<Connection>,
}

fn store_err(context: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| Error::Store(format!("{context}: {e}"))
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl SqliteStore {
    /// Opens or creates the database at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self> {
        let connection = Connection::open(path).map_err(store_err("open the cloud platform database"))?;
        Self::init(connection)
    }

    /// A store that lives in memory only, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(store_err("open an in-memory database"))?)
    }

    fn init(connection: Connection) -> Result<Self> {
        // WAL + FULL sync: an acknowledged domain or attachment survives a crash.
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 PRAGMA synchronous=FULL;
                 PRAGMA busy_timeout=5000;
                 PRAGMA foreign_keys=ON;
                 CREATE TABLE IF NOT EXISTS hosts (id TEXT PRIMARY KEY, agent_url TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, host TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS domains (
                    id TEXT PRIMARY KEY, owner TEXT NOT NULL, version INTEGER NOT NULL,
                    size_bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
                    volume_path TEXT NOT NULL, deleted_at INTEGER);
                 CREATE TABLE IF NOT EXISTS domain_managers (
                    domain_id TEXT NOT NULL REFERENCES domains(id), manager TEXT NOT NULL,
                    PRIMARY KEY (domain_id, manager));
                 CREATE INDEX IF NOT EXISTS domain_managers_by_name ON domain_managers(manager, domain_id);
                 CREATE TABLE IF NOT EXISTS attachments (
                    id TEXT PRIMARY KEY, domain_id TEXT NOT NULL REFERENCES domains(id),
                    instance_id TEXT NOT NULL, host TEXT NOT NULL, mode TEXT NOT NULL,
                    device TEXT NOT NULL, mount_path TEXT NOT NULL, version INTEGER NOT NULL,
                    status TEXT NOT NULL, created_at INTEGER NOT NULL);
                 CREATE INDEX IF NOT EXISTS attachments_by_domain ON attachments(domain_id, status);
                 CREATE TABLE IF NOT EXISTS pending_updates (
                    domain_id TEXT PRIMARY KEY REFERENCES domains(id), version INTEGER NOT NULL,
                    descriptor TEXT NOT NULL, recorded_at INTEGER NOT NULL);",
            )
            .map_err(store_err("create the cloud platform schema"))?;
        Ok(Self { connection: Mutex::new(connection) })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.connection.lock().map_err(|_| Error::Store("database lock poisoned by an earlier panic".into()))
    }

    fn managers(connection: &Connection, domain_id: &str) -> Result<Vec<String>> {
        let mut statement = connection
            .prepare_cached("SELECT manager FROM domain_managers WHERE domain_id = ?1 ORDER BY manager")
            .map_err(store_err("read domain managers"))?;
        let rows = statement
            .query_map(params![domain_id], |row| row.get::<_, String>(0))
            .map_err(store_err("read domain managers"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(store_err("read domain managers"))
    }

    fn domain_rows(connection: &Connection, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<DomainRecord>> {
        let mut statement = connection.prepare_cached(sql).map_err(store_err("list domains"))?;
        let rows = statement
            .query_map(args, |row| {
                Ok(DomainRecord {
                    id: row.get(0)?,
                    owner: row.get(1)?,
                    shared_with: Vec::new(),
                    version: row.get::<_, i64>(2)? as u64,
                    size_bytes: row.get::<_, i64>(3)? as u64,
                    created_at: row.get::<_, i64>(4)? as u64,
                    volume_path: PathBuf::from(row.get::<_, String>(5)?),
                    deleted_at: row.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                })
            })
            .map_err(store_err("list domains"))?;
        let mut records = rows.collect::<std::result::Result<Vec<_>, _>>().map_err(store_err("list domains"))?;
        for record in &mut records {
            record.shared_with = Self::managers(connection, &record.id)?;
        }
        Ok(records)
    }

    fn attachment_rows(connection: &Connection, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Attachment>> {
        let mut statement = connection.prepare_cached(sql).map_err(store_err("list attachments"))?;
        let rows = statement.query_map(args, attachment_from_row).map_err(store_err("list attachments"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(store_err("list attachments"))
    }
}

impl SqliteStore {
    fn pending_rows(
        connection: &Connection,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<PendingUpdate>> {
        let sql = format!("SELECT domain_id, version, descriptor, recorded_at FROM pending_updates {filter}");
        let mut statement = connection.prepare_cached(&sql).map_err(store_err("read pending updates"))?;
        let rows = statement
            .query_map(args, |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, String>(2)?, row.get::<_, i64>(3)?))
            })
            .map_err(store_err("read pending updates"))?;
        let mut pending = Vec::new();
        for row in rows {
            let (domain_id, version, descriptor, recorded_at) = row.map_err(store_err("read pending updates"))?;
            let descriptor = serde_json::from_str(&descriptor)
                .map_err(|e| Error::Store(format!("the pending update of domain {domain_id} does not decode: {e}")))?;
            pending.push(PendingUpdate {
                domain_id,
                version: version as u64,
                descriptor,
                recorded_at: recorded_at as u64,
            });
        }
        Ok(pending)
    }
}

const DOMAIN_COLUMNS: &str = "id, owner, version, size_bytes, created_at, volume_path, deleted_at";
const ATTACHMENT_COLUMNS: &str = "id, domain_id, instance_id, host, mode, device, mount_path, version, status";

fn attachment_from_row(row: &Row<'_>) -> rusqlite::Result<Attachment> {
    let mode: String = row.get(4)?;
    Ok(Attachment {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        instance_id: row.get(2)?,
        host: row.get(3)?,
        mode: if mode == "rw" { AccessMode::Rw } else { AccessMode::Ro },
        device: row.get(5)?,
        mount_path: row.get(6)?,
        version: row.get::<_, i64>(7)? as u64,
        status: row.get(8)?,
    })
}

impl CpStore for SqliteStore {
    fn put_host(&self, host: &ComputeHost) -> Result<()> {
        self.lock()?
            .execute(
                "INSERT INTO hosts (id, agent_url) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET agent_url = excluded.agent_url",
                params![host.id, host.agent_url],
            )
            .map_err(store_err("store host"))?;
        Ok(())
    }

    fn host(&self, id: &str) -> Result<Option<ComputeHost>> {
        self.lock()?
            .query_row("SELECT id, agent_url FROM hosts WHERE id = ?1", params![id], |row| {
                Ok(ComputeHost { id: row.get(0)?, agent_url: row.get(1)? })
            })
            .optional()
            .map_err(store_err("read host"))
    }

    fn hosts(&self) -> Result<Vec<ComputeHost>> {
        let connection = self.lock()?;
        let mut statement = connection
            .prepare_cached("SELECT id, agent_url FROM hosts ORDER BY id")
            .map_err(store_err("list hosts"))?;
        let rows = statement
            .query_map([], |row| Ok(ComputeHost { id: row.get(0)?, agent_url: row.get(1)? }))
            .map_err(store_err("list hosts"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(store_err("list hosts"))
    }

    fn put_instance(&self, instance: &Instance) -> Result<()> {
        self.lock()?
            .execute(
                "INSERT INTO instances (id, host) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET host = excluded.host",
                params![instance.id, instance.host],
            )
            .map_err(store_err("store instance"))?;
        Ok(())
    }

    fn instance(&self, id: &str) -> Result<Option<Instance>> {
        self.lock()?
            .query_row("SELECT id, host FROM instances WHERE id = ?1", params![id], |row| {
                Ok(Instance { id: row.get(0)?, host: row.get(1)? })
            })
            .optional()
            .map_err(store_err("read instance"))
    }

    fn instances(&self, page: &Page) -> Result<Vec<Instance>> {
        let connection = self.lock()?;
        let mut statement = connection
            .prepare_cached("SELECT id, host FROM instances WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(store_err("list instances"))?;
        let rows = statement
            .query_map(params![page.after(), page.fetch()], |row| Ok(Instance { id: row.get(0)?, host: row.get(1)? }))
            .map_err(store_err("list instances"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(store_err("list instances"))
    }

    fn insert_domain(&self, record: &DomainRecord) -> Result<()> {
        let mut connection = self.lock()?;
        let tx = connection.transaction().map_err(store_err("insert domain"))?;
        tx.execute(
            "INSERT INTO domains (id, owner, version, size_bytes, created_at, volume_path, deleted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
            params![
                record.id,
                record.owner,
                record.version as i64,
                record.size_bytes as i64,
                record.created_at as i64,
                record.volume_path.to_string_lossy()
            ],
        )
        .map_err(|e| {
            if is_constraint(&e) {
                Error::Conflict { code: "domain_exists", message: format!("domain {} already exists", record.id) }
            } else {
                Error::Store(format!("insert domain: {e}"))
            }
        })?;
        for manager in &record.shared_with {
            tx.execute(
                "INSERT OR IGNORE INTO domain_managers (domain_id, manager) VALUES (?1, ?2)",
                params![record.id, manager],
            )
            .map_err(store_err("insert domain managers"))?;
        }
        tx.commit().map_err(store_err("insert domain"))
    }

    fn domain(&self, id: &str) -> Result<Option<DomainRecord>> {
        let connection = self.lock()?;
        let sql = format!("SELECT {DOMAIN_COLUMNS} FROM domains WHERE id = ?1");
        Ok(Self::domain_rows(&connection, &sql, &[&id])?.pop())
    }

    fn owner_usage(&self, owner: &str) -> Result<(u64, u64)> {
        let connection = self.lock()?;
        let (count, bytes): (i64, i64) = connection
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM domains WHERE owner = ?1 AND deleted_at IS NULL",
                [owner],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| Error::Store(format!("quota usage of {owner}: {e}")))?;
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    fn domains_for(&self, manager: &str, page: &Page) -> Result<Vec<DomainRecord>> {
        let connection = self.lock()?;
        let sql = format!(
            "SELECT {DOMAIN_COLUMNS} FROM domains
             WHERE deleted_at IS NULL AND id > ?2
               AND (owner = ?1 OR id IN (SELECT domain_id FROM domain_managers WHERE manager = ?1))
             ORDER BY id LIMIT ?3"
        );
        Self::domain_rows(&connection, &sql, &[&manager, &page.after(), &page.fetch()])
    }

    fn update_domain(&self, id: &str, version: u64, shared_with: &[String]) -> Result<()> {
        let mut connection = self.lock()?;
        let tx = connection.transaction().map_err(store_err("update domain"))?;
        let changed = tx
            .execute(
                "UPDATE domains SET version = ?2 WHERE id = ?1 AND deleted_at IS NULL",
                params![id, version as i64],
            )
            .map_err(store_err("update domain"))?;
        if changed != 1 {
            return Err(Error::NotFound {
                code: "domain_unknown",
                message: format!("domain {id} is not stored (or was deleted)"),
            });
        }
        tx.execute("DELETE FROM domain_managers WHERE domain_id = ?1", params![id])
            .map_err(store_err("update domain managers"))?;
        for manager in shared_with {
            tx.execute(
                "INSERT OR IGNORE INTO domain_managers (domain_id, manager) VALUES (?1, ?2)",
                params![id, manager],
            )
            .map_err(store_err("update domain managers"))?;
        }
        tx.execute("DELETE FROM pending_updates WHERE domain_id = ?1 AND version <= ?2", params![id, version as i64])
            .map_err(store_err("end the pending update"))?;
        tx.commit().map_err(store_err("update domain"))
    }

    fn mark_domain_deleted(&self, id: &str, at: u64) -> Result<()> {
        let mut connection = self.lock()?;
        let tx = connection.transaction().map_err(store_err("mark domain deleted"))?;
        tx.execute("UPDATE domains SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL", params![id, at as i64])
            .map_err(store_err("mark domain deleted"))?;
        tx.execute("DELETE FROM pending_updates WHERE domain_id = ?1", params![id])
            .map_err(store_err("drop the pending update of a deleted domain"))?;
        tx.commit().map_err(store_err("mark domain deleted"))
    }

    fn record_pending_update(&self, pending: &PendingUpdate) -> Result<()> {
        let descriptor = serde_json::to_string(&pending.descriptor)
            .map_err(|e| Error::Store(format!("encode the pending descriptor: {e}")))?;
        self.lock()?
            .execute(
                "INSERT INTO pending_updates (domain_id, version, descriptor, recorded_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(domain_id) DO UPDATE SET version = excluded.version,
                    descriptor = excluded.descriptor, recorded_at = excluded.recorded_at",
                params![pending.domain_id, pending.version as i64, descriptor, pending.recorded_at as i64],
            )
            .map_err(store_err("record the pending update"))?;
        Ok(())
    }

    fn pending_update(&self, domain_id: &str) -> Result<Option<PendingUpdate>> {
        Ok(Self::pending_rows(&*self.lock()?, "WHERE domain_id = ?1", &[&domain_id])?.pop())
    }

    fn pending_updates(&self) -> Result<Vec<PendingUpdate>> {
        Self::pending_rows(&*self.lock()?, "ORDER BY domain_id", &[])
    }

    fn drop_pending_update(&self, domain_id: &str) -> Result<()> {
        self.lock()?
            .execute("DELETE FROM pending_updates WHERE domain_id = ?1", params![domain_id])
            .map_err(store_err("drop the pending update"))?;
        Ok(())
    }

    fn insert_attachment(&self, a: &Attachment, created_at: u64) -> Result<()> {
        self.lock()?
            .execute(
                "INSERT INTO attachments (id, domain_id, instance_id, host, mode, device, mount_path, version, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    a.id,
                    a.domain_id,
                    a.instance_id,
                    a.host,
                    a.mode.as_str(),
                    a.device,
                    a.mount_path,
                    a.version as i64,
                    a.status,
                    created_at as i64
                ],
            )
            .map_err(store_err("insert attachment"))?;
        Ok(())
    }

    fn attachment(&self, id: &str) -> Result<Option<Attachment>> {
        let connection = self.lock()?;
        let sql = format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id = ?1");
        Ok(Self::attachment_rows(&connection, &sql, &[&id])?.pop())
    }

    fn attachments(&self, filter: &AttachmentFilter, page: &Page) -> Result<Vec<Attachment>> {
        let connection = self.lock()?;
        let sql = format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments a
             WHERE a.id > ?1
               AND (?2 IS NULL OR a.domain_id = ?2)
               AND (?3 IS NULL OR a.domain_id IN (
                    SELECT id FROM domains WHERE owner = ?3
                    UNION SELECT domain_id FROM domain_managers WHERE manager = ?3))
             ORDER BY a.id LIMIT ?4"
        );
        Self::attachment_rows(&connection, &sql, &[&page.after(), &filter.domain_id, &filter.manager, &page.fetch()])
    }

    fn open_attachments_of_domain(&self, domain_id: &str) -> Result<Vec<Attachment>> {
        let connection = self.lock()?;
        let sql = format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE domain_id = ?1 AND status != '{DETACHED}' ORDER BY id"
        );
        Self::attachment_rows(&connection, &sql, &[&domain_id])
    }

    fn set_attachment_status(&self, id: &str, status: &str) -> Result<()> {
        self.lock()?
            .execute("UPDATE attachments SET status = ?2 WHERE id = ?1", params![id, status])
            .map_err(store_err("update attachment"))?;
        Ok(())
    }

    fn complete_attachment(&self, a: &Attachment) -> Result<()> {
        let changed = self
            .lock()?
            .execute(
                "UPDATE attachments SET device = ?2, mount_path = ?3, version = ?4, status = ?5 WHERE id = ?1",
                params![a.id, a.device, a.mount_path, a.version as i64, a.status],
            )
            .map_err(store_err("complete attachment"))?;
        if changed != 1 {
            return Err(Error::Store(format!("attachment {} is not stored", a.id)));
        }
        Ok(())
    }

    fn delete_attachment(&self, id: &str) -> Result<()> {
        self.lock()?
            .execute("DELETE FROM attachments WHERE id = ?1", params![id])
            .map_err(store_err("delete attachment"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(id: &str, owner: &str, shared: &[&str]) -> DomainRecord {
        DomainRecord {
            id: id.into(),
            owner: owner.into(),
            shared_with: shared.iter().map(|s| s.to_string()).collect(),
            version: 1,
            size_bytes: 4096,
            created_at: 10,
            volume_path: PathBuf::from(format!("/v/{id}.vol")),
            deleted_at: None,
        }
    }

    fn attachment(id: &str, domain_id: &str, vm: &str, status: &str) -> Attachment {
        Attachment {
            id: id.into(),
            domain_id: domain_id.into(),
            instance_id: vm.into(),
            host: "h1".into(),
            mode: AccessMode::Ro,
            device: "/dev/loop0".into(),
            mount_path: "/m".into(),
            version: 1,
            status: status.into(),
        }
    }

    #[test]
    fn domains_filtered_by_manager_and_paginated() {
        let s = SqliteStore::in_memory().unwrap();
        for i in 0..5 {
            s.insert_domain(&domain(&format!("d{i}"), "alice", if i == 3 { &["bob"] } else { &[] })).unwrap();
        }
        s.insert_domain(&domain("e0", "bob", &[])).unwrap();
        assert_eq!(s.insert_domain(&domain("d0", "x", &[])).unwrap_err().code(), "domain_exists");
        let page = Page::new(Some(2), None).unwrap();
        let (rows, next) = page.finish(s.domains_for("alice", &page).unwrap(), |d| &d.id);
        assert_eq!(rows.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d0", "d1"]);
        assert_eq!(next.as_deref(), Some("d1"));
        let page = Page::new(Some(2), Some("d3".into())).unwrap();
        let (rows, next) = page.finish(s.domains_for("alice", &page).unwrap(), |d| &d.id);
        assert_eq!(rows.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d4"]);
        assert_eq!(next, None);
        let page = Page::new(None, None).unwrap();
        let bob: Vec<_> = s.domains_for("bob", &page).unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(bob, ["d3", "e0"]);
        s.update_domain("d3", 2, &[]).unwrap();
        let bob: Vec<_> = s.domains_for("bob", &page).unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(bob, ["e0"]);
        s.mark_domain_deleted("e0", 20).unwrap();
        assert!(s.domains_for("bob", &page).unwrap().is_empty());
        assert_eq!(s.domain("e0").unwrap().unwrap().deleted_at, Some(20));
        assert_eq!(s.update_domain("e0", 2, &[]).unwrap_err().code(), "domain_unknown");
        assert_eq!(Page::new(Some(0), None).unwrap_err().code(), "bad_request");
        assert_eq!(Page::new(Some(10_000), None).unwrap().limit, MAX_PAGE_LIMIT);
    }

    #[test]
    fn attachments_by_domain_status_and_manager() {
        let s = SqliteStore::in_memory().unwrap();
        s.insert_domain(&domain("d1", "alice", &["bob"])).unwrap();
        s.insert_domain(&domain("d2", "carol", &[])).unwrap();
        s.insert_attachment(&attachment("a1", "d1", "vm-a", ATTACHED), 1).unwrap();
        s.insert_attachment(&attachment("a2", "d1", "vm-b", DETACHED), 1).unwrap();
        s.insert_attachment(&attachment("a3", "d2", "vm-c", ATTACHED), 1).unwrap();
        let page = Page::new(None, None).unwrap();
        let ids = |f: AttachmentFilter| s.attachments(&f, &page).unwrap().into_iter().map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(ids(AttachmentFilter::default()), ["a1", "a2", "a3"]);
        assert_eq!(ids(AttachmentFilter { manager: Some("bob".into()), domain_id: None }), ["a1", "a2"]);
        assert_eq!(ids(AttachmentFilter { manager: Some("carol".into()), domain_id: None }), ["a3"]);
        assert_eq!(ids(AttachmentFilter { manager: None, domain_id: Some("d2".into()) }), ["a3"]);
        assert_eq!(s.open_attachments_of_domain("d1").unwrap().len(), 1);
        assert_eq!(s.open_attachments_of_domain("d1").unwrap()[0].id, "a1", "vm-b's detached one is not open");
        s.set_attachment_status("a1", DETACHING).unwrap();
        assert_eq!(s.open_attachments_of_domain("d1").unwrap()[0].status, DETACHING);
        s.set_attachment_status("a1", DETACHED).unwrap();
        assert!(s.open_attachments_of_domain("d1").unwrap().is_empty());
        assert_eq!(s.attachment("a1").unwrap().unwrap().status, DETACHED);
    }

    fn pending(domain_id: &str, version: u64) -> PendingUpdate {
        PendingUpdate {
            domain_id: domain_id.into(),
            version,
            descriptor: protocol::signing::SignedEnvelope {
                message: vec![version as u8; 3],
                signature: vec![7; 64],
                signer_certificate: vec![1, 2],
            },
            recorded_at: 30,
        }
    }

    #[test]
    fn pending_updates_end_with_the_header_version_or_the_deletion() {
        let s = SqliteStore::in_memory().unwrap();
        s.insert_domain(&domain("d1", "alice", &[])).unwrap();
        s.insert_domain(&domain("d2", "alice", &[])).unwrap();
        assert_eq!(s.pending_update("d1").unwrap(), None);
        s.record_pending_update(&pending("d1", 2)).unwrap();
        s.record_pending_update(&pending("d2", 2)).unwrap();
        assert_eq!(s.pending_update("d1").unwrap(), Some(pending("d1", 2)));
        // A newer write-ahead replaces the older one (the older one was refused or superseded).
        s.record_pending_update(&pending("d1", 3)).unwrap();
        assert_eq!(s.pending_updates().unwrap(), vec![pending("d1", 3), pending("d2", 2)]);
        // Writing an older header leaves the pending update; writing its version ends it.
        s.update_domain("d1", 2, &[]).unwrap();
        assert_eq!(s.pending_update("d1").unwrap(), Some(pending("d1", 3)));
        s.update_domain("d1", 3, &["bob".into()]).unwrap();
        assert_eq!(s.pending_update("d1").unwrap(), None);
        s.mark_domain_deleted("d2", 40).unwrap();
        assert!(s.pending_updates().unwrap().is_empty());
        s.record_pending_update(&pending("d1", 4)).unwrap();
        s.drop_pending_update("d1").unwrap();
        assert_eq!(s.pending_update("d1").unwrap(), None);
        // Only domains the CP stores can have one.
        assert_eq!(s.record_pending_update(&pending("nope", 2)).unwrap_err().code(), "store_error");
    }
}
