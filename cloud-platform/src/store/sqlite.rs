//! [`SqliteStore`], the embedded implementation of [`CpStore`]: the schema, and one SQL
//! statement (or transaction) per trait method.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::cloud::{Attachment, AttachmentStatus, ComputeHost, Instance};
use protocol::domain::AccessMode;
use protocol::refusal::Refusal;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{AttachmentFilter, CpStore, DomainRecord, Page, PendingUpdate};
use crate::error::{Error, Result};

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
        status: row.get::<_, String>(8)?.parse().map_err(|e: protocol::Error| {
            rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
        })?,
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
                Error::Conflict { code: Refusal::DomainExists, message: format!("domain {} already exists", record.id) }
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
                code: Refusal::DomainUnknown,
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
                    a.status.as_str(),
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
        let sql =
            format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE domain_id = ?1 AND status != ?2 ORDER BY id");
        Self::attachment_rows(&connection, &sql, &[&domain_id, &AttachmentStatus::Detached.as_str()])
    }

    fn set_attachment_status(&self, id: &str, status: AttachmentStatus) -> Result<()> {
        self.lock()?
            .execute("UPDATE attachments SET status = ?2 WHERE id = ?1", params![id, status.as_str()])
            .map_err(store_err("update attachment"))?;
        Ok(())
    }

    fn complete_attachment(&self, a: &Attachment) -> Result<()> {
        let changed = self
            .lock()?
            .execute(
                "UPDATE attachments SET device = ?2, mount_path = ?3, version = ?4, status = ?5 WHERE id = ?1",
                params![a.id, a.device, a.mount_path, a.version as i64, a.status.as_str()],
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
