//! TTP configuration: one TOML file, overridable by flags (README.md "Operator's guide",
//! "2. The TTP"). Defaults suit the all-in-one cloud.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::kdf::MASTER_KEY_BYTES;
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The master key file under the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// The SQLite store under the data directory: domains, hosts, challenges, used grants and
/// the audit chain (never a key, never `r`).
pub const DATABASE_FILE: &str = "ttp.sqlite";

/// The TTP's configuration file (TOML, unknown keys refused), e.g. `/etc/skydd/ttp.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtpConfig {
    /// Address to listen on (mutual TLS).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Holds master.key (0600) and ttp.sqlite.
    pub data_dir: PathBuf,
    /// Trusted CA roots (PEM files): the own cloud's first, federated partners' after.
    pub ca: Vec<PathBuf>,
    /// Certificate revocation lists (PEM files), one per trusted CA (`cloud-platform ca
    /// revoke` keeps the cloud CA's in CA_DIR/crl.pem). Checked on every TLS client and
    /// every signer; a change is picked up without a restart. Empty: nothing is revoked.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// The TTP's own certificate and key (role ttp), also used to sign registrations.
    pub cert: PathBuf,
    /// The PKCS#8 PEM private key of `cert`; `net::TlsFiles` refuses it if others can read it or
    /// the group can write it (docs/PKI.md "Certificate profile").
    pub key: PathBuf,
    /// The attestation policy: trusted TPM vendor roots and reference PCR states.
    pub attestation: PathBuf,
    /// Certificate names of TTP replicas (same K_TTP, certificates from this TTP's own CA)
    /// whose registrations this TTP accepts besides its own. Any other TTP-role certificate,
    /// even from a trusted CA, is refused (docs/PROTOCOL.md "Registration").
    #[serde(default)]
    pub registration_replicas: Vec<String>,
    /// `[limits]`: connection and request-rate limits per identity (docs/CLOUD-API.md
    /// "Connection limits"); every key optional.
    #[serde(default)]
    pub limits: net::ConnectionLimits,
    /// `postgres://user@host:port/dbname`: keep the state in this PostgreSQL database, which
    /// TTP replicas share (docs/ARCHITECTURE.md "Replicated deployment"). Unset: the embedded
    /// SQLite file `data_dir/ttp.sqlite`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// At most this many PostgreSQL connections per TTP process (default 16); all replicas'
    /// pools together must stay under the server's `max_connections`.
    #[serde(default = "default_pool_size")]
    pub database_pool_size: usize,
    /// Concurrent decisions share one transaction and one flush (default true).
    #[serde(default = "default_group_commit")]
    pub group_commit: bool,
}

fn default_pool_size() -> usize {
    16
}

fn default_group_commit() -> bool {
    true
}

fn default_listen() -> String {
    "127.0.0.1:7443".to_string()
}

impl TtpConfig {
    /// The database this configuration names: PostgreSQL if `database_url` is set, the
    /// SQLite file in `data_dir` otherwise.
    pub fn database(&self) -> Result<crate::store::Database> {
        Ok(crate::store::Database::from_config(
            self.database_url.as_deref(),
            self.database_pool_size,
            self.data_dir.join(DATABASE_FILE),
        )?)
    }

    /// Opens the store this configuration names, with its group-commit setting.
    pub fn open_store(&self) -> Result<crate::store::SqlStore> {
        let commit = if self.group_commit { crate::store::GroupCommit::On } else { crate::store::GroupCommit::Off };
        crate::store::SqlStore::open_database(&self.database()?, commit)
    }
    /// Reads and parses the TOML file at `path`: `Error::Io` if it cannot be read,
    /// `Error::Config` naming the file and the key at fault otherwise.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io { context: format!("read {}", path.display()), source: e })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

/// Creates a fresh 32-byte K_TTP in `data_dir/master.key`, mode 0600; refuses to replace an
/// existing one (that would make every domain's key underivable).
pub fn create_master_key(data_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Io { context: format!("create {}", data_dir.display()), source: e })?;
    let path = data_dir.join(MASTER_KEY_FILE);
    let mut key = SecretBytes::zeroed(MASTER_KEY_BYTES);
    openssl_rand(key.expose_mut())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Config(format!(
                "{} already exists: replacing K_TTP would make every domain key underivable; move it away first if you really mean to",
                path.display()
            )),
            _ => Error::Io { context: format!("create {}", path.display()), source: e },
        })?;
    file.write_all(key.expose())
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::Io { context: format!("write {}", path.display()), source: e })?;
    Ok(path)
}

fn openssl_rand(buffer: &mut [u8]) -> Result<()> {
    openssl::rand::rand_bytes(buffer).map_err(|e| Error::Config(format!("the system random generator failed: {e}")))
}

/// Loads K_TTP into locked memory, refusing a file other users can read.
pub fn load_master_key(data_dir: &Path) -> Result<SecretBytes> {
    let path = data_dir.join(MASTER_KEY_FILE);
    let metadata = std::fs::metadata(&path).map_err(|e| Error::Io {
        context: format!("read {} (run `ttp init --data-dir {}` first)", path.display(), data_dir.display()),
        source: e,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{} has mode {mode:o}; K_TTP must be readable by its owner only (chmod 600)",
            path.display()
        )));
    }
    if metadata.len() != MASTER_KEY_BYTES as u64 {
        return Err(Error::Config(format!(
            "{} holds {} bytes, K_TTP is {MASTER_KEY_BYTES}",
            path.display(),
            metadata.len()
        )));
    }
    let mut key = SecretBytes::zeroed(MASTER_KEY_BYTES);
    let mut file =
        std::fs::File::open(&path).map_err(|e| Error::Io { context: format!("open {}", path.display()), source: e })?;
    std::io::Read::read_exact(&mut file, key.expose_mut())
        .map_err(|e| Error::Io { context: format!("read {}", path.display()), source: e })?;
    Ok(key)
}
