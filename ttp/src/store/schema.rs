//! The TTP's schema on both engines and its versioned migrations, run at start-up: a
//! database is brought to the newest version before the store serves, each step in its own
//! transaction. SQLite counts versions in `PRAGMA user_version` (schema version 0 is the
//! first schema, created if missing); PostgreSQL in the table `ttp_schema_version`, and
//! replicas starting together migrate one at a time (an advisory lock).

use rusqlite::Connection;

use super::engine::{PgPool, Sql};
use super::{integrity, Backend};
use crate::error::{Error, Result};

/// The first SQLite schema (version 0), as it has been since the first release.
const SQLITE_BASE: &str = "
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
    CREATE INDEX IF NOT EXISTS audit_domain ON audit(domain_id, seq);";

/// Schema changes after version 0 on SQLite, by version.
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[(1, integrity::SCHEMA), (2, CHECKPOINTS), (3, MASTER_KEY_VERSIONS)];

/// Version 3 on both engines: the K_TTP version that derives each domain's key; domains
/// registered before versions existed used the one key there was, version 1.
const MASTER_KEY_VERSIONS: &str = "
    ALTER TABLE domains ADD COLUMN master_key_version BIGINT NOT NULL DEFAULT 1;
    CREATE INDEX IF NOT EXISTS domains_master_key_version ON domains(master_key_version);";

/// Version 2 on both engines: the signed checkpoints of the audit chain's head.
const CHECKPOINTS: &str = "
    CREATE TABLE IF NOT EXISTS audit_checkpoints (signed_at BIGINT NOT NULL, seq BIGINT NOT NULL, envelope BLOB NOT NULL);
    CREATE INDEX IF NOT EXISTS audit_checkpoints_newest ON audit_checkpoints(signed_at, seq);";

/// [`CHECKPOINTS`] in PostgreSQL's types.
const POSTGRES_CHECKPOINTS: &str = "
    CREATE TABLE IF NOT EXISTS audit_checkpoints (signed_at BIGINT NOT NULL, seq BIGINT NOT NULL, envelope BYTEA NOT NULL);
    CREATE INDEX IF NOT EXISTS audit_checkpoints_newest ON audit_checkpoints(signed_at, seq);";

/// The PostgreSQL schema by version: version 1 is SQLite's version 1 (the same tables and
/// columns, in PostgreSQL's types), so every statement of the store runs on both.
const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE hosts (host_id TEXT PRIMARY KEY, record TEXT NOT NULL);
     CREATE TABLE host_eks (ek_fingerprint TEXT PRIMARY KEY, host_id TEXT NOT NULL UNIQUE);
     CREATE TABLE host_replacements (host_id TEXT PRIMARY KEY, operator TEXT NOT NULL, marked_at BIGINT NOT NULL);
     CREATE TABLE domains (
        domain_id TEXT PRIMARY KEY, owner TEXT NOT NULL, latest_version BIGINT NOT NULL,
        descriptor BYTEA NOT NULL, descriptor_hash BYTEA NOT NULL, metadata_hash BYTEA NOT NULL,
        deleted_at BIGINT);
     CREATE TABLE challenges (
        challenge_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, nonce BYTEA NOT NULL, expires_at BIGINT NOT NULL);
     CREATE INDEX challenges_expiry ON challenges(expires_at);
     CREATE TABLE used_grants (grant_hash BYTEA PRIMARY KEY, expires_at BIGINT NOT NULL);
     CREATE INDEX used_grants_expiry ON used_grants(expires_at);
     CREATE TABLE audit (seq BIGINT PRIMARY KEY, domain_id TEXT, record TEXT NOT NULL, hash TEXT NOT NULL);
     CREATE INDEX audit_domain ON audit(domain_id, seq);
     CREATE TABLE integrity_anchors (
        domain_id TEXT NOT NULL, epoch BIGINT NOT NULL, root BYTEA NOT NULL, host_id TEXT NOT NULL,
        committed_at BIGINT NOT NULL, envelope BYTEA NOT NULL, audit_seq BIGINT NOT NULL,
        PRIMARY KEY (domain_id, epoch));
     CREATE TABLE latest_releases (
        domain_id TEXT PRIMARY KEY, host_id TEXT NOT NULL, vm_id TEXT NOT NULL, mode TEXT NOT NULL,
        audit_seq BIGINT NOT NULL);",
    ),
    (2, POSTGRES_CHECKPOINTS),
    (3, MASTER_KEY_VERSIONS),
];

/// Brings an SQLite database to the newest schema (WAL, synchronous=FULL: an acknowledged
/// write survives a crash).
pub(super) fn sqlite(connection: Connection) -> Result<Backend> {
    let failed = |what: &str, e: rusqlite::Error| Error::Store(format!("{what}: {e}"));
    connection
        .execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
        .map_err(|e| failed("set up the TTP database", e))?;
    connection.set_prepared_statement_cache_capacity(64);
    connection.execute_batch(SQLITE_BASE).map_err(|e| failed("create the TTP schema", e))?;
    let current: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| failed("read schema version", e))?;
    for (version, sql) in SQLITE_MIGRATIONS.iter().filter(|(version, _)| *version > current) {
        let failed = |e: rusqlite::Error| Error::Store(format!("migrate the TTP schema to version {version}: {e}"));
        let tx = connection.unchecked_transaction().map_err(failed)?;
        tx.execute_batch(&format!("{sql} PRAGMA user_version = {version};")).map_err(failed)?;
        tx.commit().map_err(failed)?;
    }
    Ok(Backend::Sqlite(std::sync::Mutex::new(connection)))
}

/// Brings a PostgreSQL database to the newest schema, one replica at a time.
pub(super) fn postgres(pool: PgPool) -> Result<Backend> {
    {
        let mut connection = pool.get()?;
        connection.control("BEGIN")?;
        // Two replicas starting together: the second waits, then finds the schema current.
        connection.execute("SELECT pg_advisory_xact_lock(7310593858020398178)", &[])?;
        connection.execute("CREATE TABLE IF NOT EXISTS ttp_schema_version (version BIGINT NOT NULL)", &[])?;
        let current = match connection.query_row("SELECT version FROM ttp_schema_version", &[])? {
            Some(row) => row.int(0)?,
            None => {
                connection.execute("INSERT INTO ttp_schema_version (version) VALUES (0)", &[])?;
                0
            }
        };
        for (version, sql) in POSTGRES_MIGRATIONS.iter().filter(|(version, _)| *version > current) {
            connection
                .batch(sql)
                .map_err(|e| Error::Store(format!("migrate the TTP schema to version {version}: {e}")))?;
            connection.execute("UPDATE ttp_schema_version SET version = ?1", &[(*version).into()])?;
        }
        connection.control("COMMIT")?;
    }
    Ok(Backend::Postgres(pool))
}
