//! [`SqlStore`], the one implementation of [`CpStore`], over the embedded SQLite file
//! (`data_dir/cp.sqlite`, the default) or a PostgreSQL database that CP replicas share
//! (`database_url`; docs/ARCHITECTURE.md "Storage of state"). Each statement is written once
//! and runs on both engines (`skydd_sql`); each trait method is one statement or one
//! transaction.

use std::path::{Path, PathBuf};

use protocol::cloud::{Attachment, AttachmentStatus, ComputeHost, Instance};
use protocol::domain::AccessMode;
use protocol::refusal::Refusal;
use skydd_sql::{Backend, Database, Migrations, Row, Sql, Value};

use super::{AttachmentFilter, CpStore, DomainRecord, Page, PendingUpdate};
use crate::error::{Error, Result};

/// The schema as it has been since the first release: created if missing on every SQLite
/// open (schema version 1 on both engines).
const SQLITE_BASE: &str = "
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
       descriptor TEXT NOT NULL, recorded_at INTEGER NOT NULL);";

/// [`SQLITE_BASE`] in PostgreSQL's types.
const POSTGRES_V1: &str = "
    CREATE TABLE hosts (id TEXT PRIMARY KEY, agent_url TEXT NOT NULL);
    CREATE TABLE instances (id TEXT PRIMARY KEY, host TEXT NOT NULL);
    CREATE TABLE domains (
       id TEXT PRIMARY KEY, owner TEXT NOT NULL, version BIGINT NOT NULL,
       size_bytes BIGINT NOT NULL, created_at BIGINT NOT NULL,
       volume_path TEXT NOT NULL, deleted_at BIGINT);
    CREATE TABLE domain_managers (
       domain_id TEXT NOT NULL REFERENCES domains(id), manager TEXT NOT NULL,
       PRIMARY KEY (domain_id, manager));
    CREATE INDEX domain_managers_by_name ON domain_managers(manager, domain_id);
    CREATE TABLE attachments (
       id TEXT PRIMARY KEY, domain_id TEXT NOT NULL REFERENCES domains(id),
       instance_id TEXT NOT NULL, host TEXT NOT NULL, mode TEXT NOT NULL,
       device TEXT NOT NULL, mount_path TEXT NOT NULL, version BIGINT NOT NULL,
       status TEXT NOT NULL, created_at BIGINT NOT NULL);
    CREATE INDEX attachments_by_domain ON attachments(domain_id, status);
    CREATE TABLE pending_updates (
       domain_id TEXT PRIMARY KEY REFERENCES domains(id), version BIGINT NOT NULL,
       descriptor TEXT NOT NULL, recorded_at BIGINT NOT NULL);";

/// The cloud platform's schema on both engines.
static MIGRATIONS: Migrations = Migrations {
    service: "cp",
    // Version 1 is the base schema, which SQLite creates before the steps run.
    sqlite: &[(1, "")],
    postgres: &[(1, POSTGRES_V1)],
    sqlite_base: SQLITE_BASE,
    // "skydd-cp" in ASCII, distinct from the TTP's keys (the two may share a server).
    lock_key: 0x736b_7964_642d_6370,
};

/// The cloud platform's store (WAL + synchronous=FULL on SQLite, the server's
/// `synchronous_commit` on PostgreSQL): an acknowledged change survives a crash.
pub struct SqlStore {
    backend: Backend,
}

impl SqlStore {
    /// Opens or creates the SQLite database at `path`, brought to the newest schema.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_database(&Database::Sqlite(path.to_path_buf()))
    }

    /// Opens `database` (an SQLite file, or PostgreSQL shared by replicas) and brings it to
    /// the newest schema, replicas one at a time.
    pub fn open_database(database: &Database) -> Result<Self> {
        Ok(Self { backend: Backend::open(database, &MIGRATIONS)? })
    }

    /// A store that lives in memory only, for tests.
    pub fn in_memory() -> Result<Self> {
        Ok(Self { backend: Backend::in_memory(&MIGRATIONS)? })
    }

    fn read<T>(&self, work: impl FnOnce(&mut dyn Sql) -> Result<T>) -> Result<T> {
        self.backend.read(work)
    }

    fn write<T>(&self, work: impl FnOnce(&mut dyn Sql) -> Result<T>) -> Result<T> {
        self.backend.write(work)
    }

    /// Runs one writing statement in a transaction of its own.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64> {
        self.write(|tx| Ok(tx.execute(sql, params)?))
    }
}

fn managers(c: &mut dyn Sql, domain_id: &str) -> Result<Vec<String>> {
    c.query("SELECT manager FROM domain_managers WHERE domain_id = ?1 ORDER BY manager", &[domain_id.into()])?
        .iter()
        .map(|row| Ok(row.text(0)?))
        .collect()
}

fn set_managers(tx: &mut dyn Sql, domain_id: &str, managers: &[String]) -> Result<()> {
    for manager in managers {
        tx.execute(
            "INSERT INTO domain_managers (domain_id, manager) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            &[domain_id.into(), manager.as_str().into()],
        )?;
    }
    Ok(())
}

fn domain_rows(c: &mut dyn Sql, sql: &str, params: &[Value]) -> Result<Vec<DomainRecord>> {
    let rows = c.query(sql, params)?;
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let id = row.text(0)?;
        records.push(DomainRecord {
            shared_with: managers(c, &id)?,
            id,
            owner: row.text(1)?,
            version: unsigned(&row, 2)?,
            size_bytes: unsigned(&row, 3)?,
            created_at: unsigned(&row, 4)?,
            volume_path: PathBuf::from(row.text(5)?),
            deleted_at: row.opt_int(6)?.map(|t| t.max(0) as u64),
        });
    }
    Ok(records)
}

fn unsigned(row: &Row, index: usize) -> Result<u64> {
    let value = row.int(index)?;
    u64::try_from(value)
        .map_err(|_| Error::Store(format!("column {index} holds {value}, a count or time was expected")))
}

fn attachment_rows(c: &mut dyn Sql, sql: &str, params: &[Value]) -> Result<Vec<Attachment>> {
    c.query(sql, params)?.iter().map(attachment_from_row).collect()
}

fn attachment_from_row(row: &Row) -> Result<Attachment> {
    let id = row.text(0)?;
    let status = row.text(8)?;
    Ok(Attachment {
        status: status
            .parse()
            .map_err(|e: protocol::Error| Error::Store(format!("attachment {id} has status {status:?}: {e}")))?,
        domain_id: row.text(1)?,
        instance_id: row.text(2)?,
        host: row.text(3)?,
        mode: if row.text(4)? == "rw" { AccessMode::Rw } else { AccessMode::Ro },
        device: row.text(5)?,
        mount_path: row.text(6)?,
        version: unsigned(row, 7)?,
        id,
    })
}

fn pending_rows(c: &mut dyn Sql, filter: &str, params: &[Value]) -> Result<Vec<PendingUpdate>> {
    let sql = format!("SELECT domain_id, version, descriptor, recorded_at FROM pending_updates {filter}");
    let mut pending = Vec::new();
    for row in c.query(&sql, params)? {
        let domain_id = row.text(0)?;
        let descriptor = serde_json::from_str(&row.text(2)?)
            .map_err(|e| Error::Store(format!("the pending update of domain {domain_id} does not decode: {e}")))?;
        pending.push(PendingUpdate {
            version: unsigned(&row, 1)?,
            recorded_at: unsigned(&row, 3)?,
            descriptor,
            domain_id,
        });
    }
    Ok(pending)
}

const DOMAIN_COLUMNS: &str = "id, owner, version, size_bytes, created_at, volume_path, deleted_at";
const ATTACHMENT_COLUMNS: &str = "id, domain_id, instance_id, host, mode, device, mount_path, version, status";

impl CpStore for SqlStore {
    fn put_host(&self, host: &ComputeHost) -> Result<()> {
        self.execute(
            "INSERT INTO hosts (id, agent_url) VALUES (?1, ?2)
             ON CONFLICT(id) DO UPDATE SET agent_url = excluded.agent_url",
            &[host.id.as_str().into(), host.agent_url.as_str().into()],
        )
        .map(drop)
    }

    fn host(&self, id: &str) -> Result<Option<ComputeHost>> {
        self.read(|c| {
            c.query_row("SELECT id, agent_url FROM hosts WHERE id = ?1", &[id.into()])?
                .map(|row| Ok(ComputeHost { id: row.text(0)?, agent_url: row.text(1)? }))
                .transpose()
        })
    }

    fn hosts(&self) -> Result<Vec<ComputeHost>> {
        self.read(|c| {
            c.query("SELECT id, agent_url FROM hosts ORDER BY id", &[])?
                .iter()
                .map(|row| Ok(ComputeHost { id: row.text(0)?, agent_url: row.text(1)? }))
                .collect()
        })
    }

    fn put_instance(&self, instance: &Instance) -> Result<()> {
        self.execute(
            "INSERT INTO instances (id, host) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET host = excluded.host",
            &[instance.id.as_str().into(), instance.host.as_str().into()],
        )
        .map(drop)
    }

    fn instance(&self, id: &str) -> Result<Option<Instance>> {
        self.read(|c| {
            c.query_row("SELECT id, host FROM instances WHERE id = ?1", &[id.into()])?
                .map(|row| Ok(Instance { id: row.text(0)?, host: row.text(1)? }))
                .transpose()
        })
    }

    fn instances(&self, page: &Page) -> Result<Vec<Instance>> {
        self.read(|c| {
            c.query(
                "SELECT id, host FROM instances WHERE id > ?1 ORDER BY id LIMIT ?2",
                &[page.after().into(), page.fetch().into()],
            )?
            .iter()
            .map(|row| Ok(Instance { id: row.text(0)?, host: row.text(1)? }))
            .collect()
        })
    }

    fn insert_domain(&self, record: &DomainRecord) -> Result<()> {
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO domains (id, owner, version, size_bytes, created_at, volume_path, deleted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL) ON CONFLICT DO NOTHING",
                &[
                    record.id.as_str().into(),
                    record.owner.as_str().into(),
                    (record.version as i64).into(),
                    (record.size_bytes as i64).into(),
                    (record.created_at as i64).into(),
                    record.volume_path.to_string_lossy().into_owned().into(),
                ],
            )?;
            if inserted != 1 {
                return Err(Error::Conflict {
                    code: Refusal::DomainExists,
                    message: format!("domain {} already exists", record.id),
                });
            }
            set_managers(tx, &record.id, &record.shared_with)
        })
    }

    fn domain(&self, id: &str) -> Result<Option<DomainRecord>> {
        let sql = format!("SELECT {DOMAIN_COLUMNS} FROM domains WHERE id = ?1");
        self.read(|c| Ok(domain_rows(c, &sql, &[id.into()])?.pop()))
    }

    fn owner_usage(&self, owner: &str) -> Result<(u64, u64)> {
        self.read(|c| {
            // SUM is NUMERIC on PostgreSQL; cast so both engines answer a 64-bit integer.
            let row = c.query_row(
                "SELECT COUNT(*), CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM domains
                 WHERE owner = ?1 AND deleted_at IS NULL",
                &[owner.into()],
            )?;
            let row = row.ok_or_else(|| Error::Store(format!("quota usage of {owner}: no row")))?;
            Ok((row.int(0)?.max(0) as u64, row.int(1)?.max(0) as u64))
        })
    }

    fn domains_for(&self, manager: &str, page: &Page) -> Result<Vec<DomainRecord>> {
        let sql = format!(
            "SELECT {DOMAIN_COLUMNS} FROM domains
             WHERE deleted_at IS NULL AND id > ?2
               AND (owner = ?1 OR id IN (SELECT domain_id FROM domain_managers WHERE manager = ?1))
             ORDER BY id LIMIT ?3"
        );
        self.read(|c| domain_rows(c, &sql, &[manager.into(), page.after().into(), page.fetch().into()]))
    }

    fn update_domain(&self, id: &str, version: u64, shared_with: &[String]) -> Result<()> {
        self.write(|tx| {
            let changed = tx.execute(
                "UPDATE domains SET version = ?2 WHERE id = ?1 AND deleted_at IS NULL",
                &[id.into(), (version as i64).into()],
            )?;
            if changed != 1 {
                return Err(Error::NotFound {
                    code: Refusal::DomainUnknown,
                    message: format!("domain {id} is not stored (or was deleted)"),
                });
            }
            tx.execute("DELETE FROM domain_managers WHERE domain_id = ?1", &[id.into()])?;
            set_managers(tx, id, shared_with)?;
            tx.execute(
                "DELETE FROM pending_updates WHERE domain_id = ?1 AND version <= ?2",
                &[id.into(), (version as i64).into()],
            )?;
            Ok(())
        })
    }

    fn mark_domain_deleted(&self, id: &str, at: u64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE domains SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL",
                &[id.into(), (at as i64).into()],
            )?;
            tx.execute("DELETE FROM pending_updates WHERE domain_id = ?1", &[id.into()])?;
            Ok(())
        })
    }

    fn record_pending_update(&self, pending: &PendingUpdate) -> Result<()> {
        let descriptor = serde_json::to_string(&pending.descriptor)
            .map_err(|e| Error::Store(format!("encode the pending descriptor: {e}")))?;
        self.execute(
            "INSERT INTO pending_updates (domain_id, version, descriptor, recorded_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(domain_id) DO UPDATE SET version = excluded.version,
                descriptor = excluded.descriptor, recorded_at = excluded.recorded_at",
            &[
                pending.domain_id.as_str().into(),
                (pending.version as i64).into(),
                descriptor.into(),
                (pending.recorded_at as i64).into(),
            ],
        )
        .map(drop)
    }

    fn pending_update(&self, domain_id: &str) -> Result<Option<PendingUpdate>> {
        self.read(|c| Ok(pending_rows(c, "WHERE domain_id = ?1", &[domain_id.into()])?.pop()))
    }

    fn pending_updates(&self) -> Result<Vec<PendingUpdate>> {
        self.read(|c| pending_rows(c, "ORDER BY domain_id", &[]))
    }

    fn drop_pending_update(&self, domain_id: &str) -> Result<()> {
        self.execute("DELETE FROM pending_updates WHERE domain_id = ?1", &[domain_id.into()]).map(drop)
    }

    fn insert_attachment(&self, a: &Attachment, created_at: u64) -> Result<()> {
        self.execute(
            "INSERT INTO attachments (id, domain_id, instance_id, host, mode, device, mount_path, version, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            &[
                a.id.as_str().into(),
                a.domain_id.as_str().into(),
                a.instance_id.as_str().into(),
                a.host.as_str().into(),
                a.mode.as_str().into(),
                a.device.as_str().into(),
                a.mount_path.as_str().into(),
                (a.version as i64).into(),
                a.status.as_str().into(),
                (created_at as i64).into(),
            ],
        )
        .map(drop)
    }

    fn attachment(&self, id: &str) -> Result<Option<Attachment>> {
        let sql = format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE id = ?1");
        self.read(|c| Ok(attachment_rows(c, &sql, &[id.into()])?.pop()))
    }

    fn attachments(&self, filter: &AttachmentFilter, page: &Page) -> Result<Vec<Attachment>> {
        // Each filter is a parameter that may be NULL; the casts give PostgreSQL its type.
        let sql = format!(
            "SELECT {ATTACHMENT_COLUMNS} FROM attachments a
             WHERE a.id > ?1
               AND (CAST(?2 AS TEXT) IS NULL OR a.domain_id = ?2)
               AND (CAST(?3 AS TEXT) IS NULL OR a.domain_id IN (
                    SELECT id FROM domains WHERE owner = ?3
                    UNION SELECT domain_id FROM domain_managers WHERE manager = ?3))
             ORDER BY a.id LIMIT ?4"
        );
        let params =
            [page.after().into(), filter.domain_id.clone().into(), filter.manager.clone().into(), page.fetch().into()];
        self.read(|c| attachment_rows(c, &sql, &params))
    }

    fn open_attachments_of_domain(&self, domain_id: &str) -> Result<Vec<Attachment>> {
        let sql =
            format!("SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE domain_id = ?1 AND status != ?2 ORDER BY id");
        self.read(|c| attachment_rows(c, &sql, &[domain_id.into(), AttachmentStatus::Detached.as_str().into()]))
    }

    fn set_attachment_status(&self, id: &str, status: AttachmentStatus) -> Result<()> {
        self.execute("UPDATE attachments SET status = ?2 WHERE id = ?1", &[id.into(), status.as_str().into()]).map(drop)
    }

    fn complete_attachment(&self, a: &Attachment) -> Result<()> {
        let changed = self.execute(
            "UPDATE attachments SET device = ?2, mount_path = ?3, version = ?4, status = ?5 WHERE id = ?1",
            &[
                a.id.as_str().into(),
                a.device.as_str().into(),
                a.mount_path.as_str().into(),
                (a.version as i64).into(),
                a.status.as_str().into(),
            ],
        )?;
        if changed != 1 {
            return Err(Error::Store(format!("attachment {} is not stored", a.id)));
        }
        Ok(())
    }

    fn delete_attachment(&self, id: &str) -> Result<()> {
        self.execute("DELETE FROM attachments WHERE id = ?1", &[id.into()]).map(drop)
    }
}
