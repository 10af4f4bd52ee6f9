//! TTP configuration: one TOML file, overridable by flags (README.md "Operator's guide",
//! "2. The TTP"). Defaults suit the all-in-one cloud.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
    /// Holds `master-key/` (each K_TTP version's record and TPM-sealed copy, never the key)
    /// and ttp.sqlite.
    pub data_dir: PathBuf,
    /// Trusted CA roots: the own cloud's first, federated partners' after. Each a PEM file
    /// path (that root may issue every role), or `{ file = "PATH", allow = [{ role = "ROLE",
    /// names = ["NAME-or-PATTERN", ...] }, ...] }` to limit what it may issue (docs/PKI.md
    /// "Federation").
    pub ca: Vec<net::TrustedRootFile>,
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
    /// `[master_key]`: the TPM holding K_TTP's sealed copies and the PCRs they are bound to
    /// (docs/OPERATOR.md "Master key custodians").
    #[serde(default)]
    pub master_key: crate::master_key::MasterKeyConfig,
    /// `[trusted_launch]`: when set, a key is released only to a VM its host launched from an
    /// image on the signed allowlist (docs/PROTOCOL.md "Trusted launch"; refusal
    /// `image_not_allowed`).
    #[serde(default)]
    pub trusted_launch: Option<TrustedLaunchConfig>,
}

/// The `[trusted_launch]` table of the TTP configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedLaunchConfig {
    /// The signed image allowlist (`image-pipeline allowlist --out FILE`). Read and verified
    /// at start: a new list takes a restart (replicas one at a time).
    pub allowlist: PathBuf,
    /// The name of the `cloud-platform` certificate that must sign it (default
    /// `image-pipeline`).
    #[serde(default = "default_image_signer")]
    pub signer: String,
}

fn default_image_signer() -> String {
    "image-pipeline".to_string()
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
    /// The verified image allowlist, if one is configured: signed by the `[trusted_launch]`
    /// signer under the trusted roots (within their role limits) and revocation lists of the
    /// TLS `material` the TTP loaded at start-up.
    pub fn load_image_allowlist(&self, material: &net::TlsMaterial) -> Result<Option<protocol::image::AllowList>> {
        let Some(TrustedLaunchConfig { allowlist: path, signer }) = &self.trusted_launch else { return Ok(None) };
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io { context: format!("read {}", path.display()), source: e })?;
        protocol::image::verify_allowlist(&bytes, &material.signer_trust(signer))
            .map(Some)
            .map_err(|e| Error::Config(format!("image allowlist {}: {e}", path.display())))
    }

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
