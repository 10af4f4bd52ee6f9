//! Skydd's SQL layer: one interface over the two engines its services store their state in
//! (docs/ARCHITECTURE.md "Storage of state").
//!
//! - **SQLite**, the embedded default (`skydd up`, a single TTP or cloud platform): one
//!   connection behind a mutex, WAL with `synchronous=FULL`.
//! - **PostgreSQL**, for replicas sharing one database: a small pool of connections that
//!   reconnects on its own after a server restart.
//!
//! A service writes each statement once in SQLite's `?N` form; [`Sql`] runs it on either
//! engine with [`Value`]s and gives back [`Row`]s. [`Backend::open`] brings a database to the
//! newest version of the service's [`Migrations`] before it serves, replicas one at a time.
//! The crate knows nothing of any service's tables.

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::Connection;

mod engine;

pub use engine::{PgConnection, PgPool, Pooled, Row, Sql, Value};

/// What went wrong in the database layer; services map it into their own error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed a statement, a connection or a migration (the
    /// engine's own message says which).
    #[error("{0}")]
    Store(String),
    /// The configuration names no usable database (a malformed URL).
    #[error("{0}")]
    Config(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which database a service opens: an embedded SQLite file, or a PostgreSQL database that
/// replicas share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A `postgres://` URL and the number of connections the pool may open.
    Postgres {
        /// `postgres://user@host:port/dbname` (libpq URL syntax).
        url: String,
        /// At most this many connections per process.
        pool_size: usize,
    },
}

impl Database {
    /// The database a service's configuration names: `database_url` if given (it must be a
    /// `postgres://` or `postgresql://` URL), else the SQLite file `default_sqlite`.
    pub fn from_config(database_url: Option<&str>, pool_size: usize, default_sqlite: PathBuf) -> Result<Self> {
        match database_url {
            None => Ok(Database::Sqlite(default_sqlite)),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Database::Postgres { url: url.to_string(), pool_size: pool_size.max(1) })
            }
            Some(url) => Err(Error::Config(format!(
                "database_url {:?} is not a postgres:// URL (leave it out for the embedded SQLite file)",
                redact_password(url)
            ))),
        }
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_string() };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// A service's schema as numbered steps, the same version numbers on both engines, so every
/// statement of the service runs on both. Version 0 is an empty database.
pub struct Migrations {
    /// Names the service in errors and the PostgreSQL version table (`{service}_schema_version`).
    pub service: &'static str,
    /// SQLite's schema steps by version (counted in `PRAGMA user_version`).
    pub sqlite: &'static [(i64, &'static str)],
    /// PostgreSQL's schema steps by version, in PostgreSQL's types.
    pub postgres: &'static [(i64, &'static str)],
    /// Statements that run on every SQLite open before the numbered steps (for a schema
    /// that predates versioning: `CREATE TABLE IF NOT EXISTS ...`), or "".
    pub sqlite_base: &'static str,
    /// The advisory lock key replicas take while migrating (distinct per service).
    pub lock_key: i64,
}

/// How many read-only connections an SQLite file gets beside its writer.
const SQLITE_READERS: usize = 4;

/// An SQLite database: one connection writes (SQLite writes serially anyway); reads of a
/// file go to read-only connections beside it, which WAL lets run while a write transaction
/// commits and flushes, so a decision's reads never wait behind another's fsync. An
/// in-memory database has no readers (another connection would open another database).
pub struct SqliteConnections {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

impl SqliteConnections {
    /// A free reader if one is, else the next in turn (waiting for it); the writer when
    /// there are no readers.
    fn reader(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        if self.readers.is_empty() {
            return lock(&self.writer);
        }
        for reader in &self.readers {
            if let Ok(guard) = reader.try_lock() {
                return Ok(guard);
            }
        }
        let turn = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len();
        lock(&self.readers[turn])
    }
}

/// The engine a store runs on.
pub enum Backend {
    /// SQLite: one writer, and readers beside it for a file.
    Sqlite(SqliteConnections),
    /// A pool of PostgreSQL connections.
    Postgres(PgPool),
}

impl Backend {
    /// Opens `database` and brings it to the newest version of `migrations`.
    pub fn open(database: &Database, migrations: &Migrations) -> Result<Self> {
        match database {
            Database::Sqlite(path) => {
                let open = || Connection::open(path).map_err(|e| Error::Store(format!("open {}: {e}", path.display())));
                let writer = migrate_sqlite(open()?, migrations)?;
                let readers = (0..SQLITE_READERS)
                    .map(|_| {
                        let reader = open()?;
                        reader
                            .execute_batch("PRAGMA query_only=1; PRAGMA busy_timeout=5000;")
                            .map_err(|e| Error::Store(format!("set up a reader of {}: {e}", path.display())))?;
                        reader.set_prepared_statement_cache_capacity(64);
                        Ok(Mutex::new(reader))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Backend::Sqlite(SqliteConnections {
                    writer: Mutex::new(writer),
                    readers,
                    next_reader: Default::default(),
                }))
            }
            // The `postgres` client runs its own small runtime and may not be driven from an
            // async worker: a service that opens its store inside one (a test, a server's
            // set-up) migrates on a thread of its own.
            Database::Postgres { url, pool_size } => std::thread::scope(|scope| {
                scope
                    .spawn(|| Self::postgres(PgPool::new(url, *pool_size), migrations))
                    .join()
                    .map_err(|_| Error::Store(format!("migrating the {} schema panicked", migrations.service)))?
            }),
        }
    }

    /// Opens `database` for reading only, as it is: no schema is created or migrated, and
    /// no statement can write (SQLite: a read-only connection with `query_only`; a missing
    /// file is an error, not a new database). For tools that run beside a serving service.
    /// PostgreSQL connections are opened as they are needed, each in read-only mode.
    pub fn open_read_only(database: &Database) -> Result<Self> {
        match database {
            Database::Sqlite(path) => {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let reader = Connection::open_with_flags(path, flags)
                    .map_err(|e| Error::Store(format!("open {} read-only: {e}", path.display())))?;
                reader
                    .execute_batch("PRAGMA query_only=1; PRAGMA busy_timeout=5000;")
                    .map_err(|e| Error::Store(format!("set up a reader of {}: {e}", path.display())))?;
                Ok(Backend::Sqlite(SqliteConnections {
                    writer: Mutex::new(reader),
                    readers: Vec::new(),
                    next_reader: Default::default(),
                }))
            }
            Database::Postgres { url, .. } => Ok(Backend::Postgres(PgPool::read_only(url, 1))),
        }
    }

    /// A database in memory with the newest schema, for tests: lost when dropped.
    pub fn in_memory(migrations: &Migrations) -> Result<Self> {
        let connection =
            Connection::open_in_memory().map_err(|e| Error::Store(format!("open an in-memory database: {e}")))?;
        Ok(Backend::Sqlite(SqliteConnections {
            writer: Mutex::new(migrate_sqlite(connection, migrations)?),
            readers: Vec::new(),
            next_reader: Default::default(),
        }))
    }

    /// Brings a PostgreSQL database to the newest schema, one replica at a time (two
    /// replicas starting together: the second waits, then finds the schema current).
    fn postgres(pool: PgPool, migrations: &Migrations) -> Result<Self> {
        let service = migrations.service;
        let table = format!("{service}_schema_version");
        {
            let mut connection = pool.get()?;
            connection.control("BEGIN")?;
            connection.advisory_lock(migrations.lock_key)?;
            connection.execute(&format!("CREATE TABLE IF NOT EXISTS {table} (version BIGINT NOT NULL)"), &[])?;
            let current = match connection.query_row(&format!("SELECT version FROM {table}"), &[])? {
                Some(row) => row.int(0)?,
                None => {
                    connection.execute(&format!("INSERT INTO {table} (version) VALUES (0)"), &[])?;
                    0
                }
            };
            for (version, sql) in migrations.postgres.iter().filter(|(version, _)| *version > current) {
                connection
                    .batch(sql)
                    .map_err(|e| Error::Store(format!("migrate the {service} schema to version {version}: {e}")))?;
                connection.execute(&format!("UPDATE {table} SET version = ?1"), &[(*version).into()])?;
            }
            connection.control("COMMIT")?;
        }
        Ok(Backend::Postgres(pool))
    }

    /// Runs `work` on a connection outside any explicit transaction: single reads (on
    /// SQLite a read-only connection; a statement that writes must go through
    /// [`Backend::transaction`] or [`Backend::write`]).
    pub fn read<T, E: From<Error>>(
        &self,
        work: impl FnOnce(&mut dyn Sql) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        match self {
            Backend::Sqlite(connections) => work(&mut *connections.reader()?),
            Backend::Postgres(pool) => work(&mut *pool.get()?),
        }
    }

    /// Runs `run` in one write transaction, committed once (`BEGIN IMMEDIATE` on SQLite, so
    /// the read of a compare-and-set and its write cannot interleave with another writer).
    /// `run` returns `false` if the transaction must not commit (a store failure); then it is
    /// rolled back and `Ok(false)` returned.
    pub fn transaction(&self, run: impl FnOnce(&mut dyn Sql) -> bool) -> Result<bool> {
        match self {
            Backend::Sqlite(connections) => {
                let mut connection = lock(&connections.writer)?;
                let control = |c: &Connection, command: &str| {
                    c.execute_batch(command).map_err(|e| Error::Store(format!("{command}: {e}")))
                };
                control(&connection, "BEGIN IMMEDIATE")?;
                if run(&mut *connection) {
                    if let Err(error) = control(&connection, "COMMIT") {
                        let _ = control(&connection, "ROLLBACK");
                        return Err(error);
                    }
                    Ok(true)
                } else {
                    control(&connection, "ROLLBACK")?;
                    Ok(false)
                }
            }
            Backend::Postgres(pool) => {
                let mut connection = pool.get()?;
                connection.control("BEGIN")?;
                if run(&mut *connection) {
                    connection.control("COMMIT").map(|()| true)
                } else {
                    connection.control("ROLLBACK")?;
                    Ok(false)
                }
            }
        }
    }

    /// Runs `work` in one write transaction: committed if it returns `Ok`, rolled back
    /// (whatever it wrote undone) if it returns an error, which is passed on.
    pub fn write<T, E: From<Error>>(
        &self,
        work: impl FnOnce(&mut dyn Sql) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut outcome = None;
        self.transaction(|tx| {
            let result = work(tx);
            let commit = result.is_ok();
            outcome = Some(result);
            commit
        })?;
        outcome.unwrap_or_else(|| Err(Error::Store("a transaction was never run".into()).into()))
    }
}

/// Brings an SQLite database to the newest schema (WAL, synchronous=FULL: an
/// acknowledged write survives a crash; foreign keys enforced).
fn migrate_sqlite(connection: Connection, migrations: &Migrations) -> Result<Connection> {
    let service = migrations.service;
    let failed = |what: &str, e: rusqlite::Error| Error::Store(format!("{what} ({service}): {e}"));
    connection
        .execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON;",
        )
        .map_err(|e| failed("set up the database", e))?;
    connection.set_prepared_statement_cache_capacity(64);
    connection.execute_batch(migrations.sqlite_base).map_err(|e| failed("create the schema", e))?;
    let current: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| failed("read the schema version", e))?;
    for (version, sql) in migrations.sqlite.iter().filter(|(version, _)| *version > current) {
        let failed =
            |e: rusqlite::Error| Error::Store(format!("migrate the {service} schema to version {version}: {e}"));
        let tx = connection.unchecked_transaction().map_err(failed)?;
        tx.execute_batch(&format!("{sql} PRAGMA user_version = {version};")).map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(connection)
}

fn lock(connection: &Mutex<Connection>) -> Result<std::sync::MutexGuard<'_, Connection>> {
    connection.lock().map_err(|_| Error::Store("database lock poisoned by an earlier panic".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows_in_a_message() {
        assert_eq!(redact_password("postgres://ttp:s3cret@db:5432/skydd"), "postgres://ttp:***@db:5432/skydd");
        assert_eq!(redact_password("postgres://ttp@db/skydd"), "postgres://ttp@db/skydd");
        let refused = Database::from_config(Some("mysql://u:pw@h/d"), 4, "x".into()).unwrap_err().to_string();
        assert!(refused.contains("mysql://u:***@h/d") && !refused.contains("pw"), "{refused}");
    }

    #[test]
    fn no_url_is_the_embedded_file_and_a_url_is_postgres() {
        assert_eq!(Database::from_config(None, 4, "a.sqlite".into()).unwrap(), Database::Sqlite("a.sqlite".into()));
        assert_eq!(
            Database::from_config(Some("postgresql://h/d"), 0, "a".into()).unwrap(),
            Database::Postgres { url: "postgresql://h/d".into(), pool_size: 1 }
        );
    }

    static STEPS: Migrations = Migrations {
        service: "test",
        sqlite: &[(1, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);")],
        postgres: &[(1, "CREATE TABLE t (k BIGINT PRIMARY KEY, v TEXT NOT NULL);")],
        sqlite_base: "",
        lock_key: 1,
    };

    #[test]
    fn a_failed_write_leaves_nothing_behind_and_a_migration_runs_once() {
        let dir = std::env::temp_dir().join(format!("skydd-sql-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let database = Database::Sqlite(dir.join("db.sqlite"));
        let backend = Backend::open(&database, &STEPS).unwrap();
        backend.write(|tx| tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", &[1i64.into(), "one".into()])).unwrap();
        let refused: Result<()> = backend.write(|tx| {
            tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", &[2i64.into(), "two".into()])?;
            Err(Error::Store("refused after a write".into()))
        });
        assert!(refused.is_err());
        drop(backend);
        // Opened again: version 1 is not run again (CREATE TABLE would fail), row 2 is gone.
        let backend = Backend::open(&database, &STEPS).unwrap();
        let rows = backend.read(|tx| tx.query("SELECT k, v FROM t ORDER BY k", &[])).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text(1).unwrap(), "one");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A tool's read-only open reads beside the service's open writer, writes nothing, and
    /// creates no database where there is none.
    #[test]
    fn a_read_only_open_reads_beside_the_writer_and_cannot_write() {
        let dir = std::env::temp_dir().join(format!("skydd-sql-ro-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let database = Database::Sqlite(dir.join("db.sqlite"));
        let missing = Database::Sqlite(dir.join("missing.sqlite"));
        assert!(Backend::open_read_only(&missing).is_err());
        assert!(!dir.join("missing.sqlite").exists(), "a read-only open created a database");
        let serving = Backend::open(&database, &STEPS).unwrap();
        serving.write(|tx| tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", &[1i64.into(), "one".into()])).unwrap();
        let reader = Backend::open_read_only(&database).unwrap();
        let rows = reader.read(|tx| tx.query("SELECT v FROM t", &[])).unwrap();
        assert_eq!(rows[0].text(0).unwrap(), "one");
        let refused: Result<u64> =
            reader.write(|tx| tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", &[2i64.into(), "two".into()]));
        assert!(refused.is_err(), "a read-only backend wrote");
        let rows = serving.read(|tx| tx.query("SELECT k FROM t", &[])).unwrap();
        assert_eq!(rows.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
