//! The TTP's schema on both engines and its versioned migrations, run at start-up: a
//! database is brought to the newest version before the store serves, each step in its own
//! transaction. SQLite counts versions in `PRAGMA user_version` (schema version 0 is the
//! first schema, created if missing); PostgreSQL in the table `ttp_schema_version`, and
//! replicas starting together migrate one at a time (an advisory lock).

use skydd_sql::Migrations;

use super::integrity;

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
const SQLITE_MIGRATIONS: &[(i64, &str)] =
    &[(1, integrity::SCHEMA), (2, CHECKPOINTS), (3, MASTER_KEY_VERSIONS), (4, KEY_GENERATIONS)];

/// Version 4 on both engines: each domain's newest key generation and, while a rotation may
/// still be re-encrypting, the K_TTP version of the generation before it (docs/PROTOCOL.md
/// "Key rotation"). Domains registered before rotations existed are at generation 1.
const KEY_GENERATIONS: &str = "
    ALTER TABLE domains ADD COLUMN key_generation BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE domains ADD COLUMN previous_master_key_version BIGINT;";

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
    (4, KEY_GENERATIONS),
];

/// The TTP's schema on both engines, for [`skydd_sql::Backend::open`].
pub(super) static MIGRATIONS: Migrations = Migrations {
    service: "ttp",
    sqlite: SQLITE_MIGRATIONS,
    postgres: POSTGRES_MIGRATIONS,
    sqlite_base: SQLITE_BASE,
    // "skydd-audit" + 1: distinct from the audit chain's lock.
    lock_key: 7310593858020398178,
};
