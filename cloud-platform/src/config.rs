//! Cloud platform configuration: one TOML file, overridable by flags. Defaults suit the
//! all-in-one cloud.
//!
//! ```toml
//! listen = "127.0.0.1:7500"
//! data_dir = "/var/lib/skydd/cp"          # cp.sqlite and volumes/<domain>.vol
//! ca = ["/etc/skydd/ca.pem"]              # trusted CA roots (own cloud first)
//! cert = "/etc/skydd/cp-1.pem"            # role cloud-platform
//! key = "/etc/skydd/cp-1-key.pem"
//! ttp_url = "https://127.0.0.1:7443"
//! max_volume_bytes = 1099511627776        # optional, default 1 TiB
//! reconcile_interval_secs = 30            # optional: how often mappings are checked with the hosts
//! # database_url = "postgres://skydd-cp@db.example/skydd_cp"   # optional: replicas share it
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The SQLite database under the data directory.
pub const DATABASE_FILE: &str = "cp.sqlite";
/// The directory of volume files under the data directory.
pub const VOLUMES_DIR: &str = "volumes";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7500";
/// Default interval of the reconciliation with the compute hosts.
pub const DEFAULT_RECONCILE_INTERVAL_SECS: u64 = 30;
/// Default largest data area of one volume (1 TiB; the file is sparse).
pub const DEFAULT_MAX_VOLUME_BYTES: u64 = 1 << 40;

/// The cloud platform's configuration file (`cloud-platform serve --config cp.toml`; an
/// example is in the module documentation). Unknown keys are refused, so a misspelt option is an
/// error rather than a silent default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpConfig {
    /// Address to listen on (mutual TLS).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Holds cp.sqlite and volumes/ (sparse volume files).
    pub data_dir: PathBuf,
    /// Trusted CA roots: the own cloud's first, federated partners' after. Each a PEM file
    /// path (that root may issue every role), or `{ file = "PATH", allow = [{ role = "ROLE",
    /// names = ["NAME-or-PATTERN", ...] }, ...] }` to limit what it may issue (docs/PKI.md
    /// "Federation").
    pub ca: Vec<net::TrustedRootFile>,
    /// Certificate revocation lists (PEM files), one per trusted CA (CA_DIR/crl.pem).
    /// Checked on every TLS peer; a change is picked up for incoming connections without a
    /// restart. Empty: nothing is revoked.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// The CP's own certificate and key (role cloud-platform).
    pub cert: PathBuf,
    /// The private key of `cert` (PEM); keep it mode 0600.
    pub key: PathBuf,
    /// Where the TTP listens, e.g. "https://127.0.0.1:7443".
    pub ttp_url: String,
    /// Largest data area of one volume in bytes.
    #[serde(default = "default_max_volume_bytes")]
    pub max_volume_bytes: u64,
    /// Seconds between two reconciliations of the CP's attachments with what the compute
    /// hosts hold (the first runs at start-up): adopts attaches the CP never heard back
    /// about, detaches mappings it does not know (docs/CLOUD-API.md). At least 1.
    #[serde(default = "default_reconcile_interval_secs")]
    pub reconcile_interval_secs: u64,
    /// What one owner may hold (`[quota]`; defaults below).
    #[serde(default)]
    pub quota: Quota,
    /// `[limits]`: connection and request-rate limits per identity (docs/CLOUD-API.md
    /// "Connection limits"); every key optional.
    #[serde(default)]
    pub limits: net::ConnectionLimits,
    /// `postgres://user@host:port/dbname`: keep the CP's state in this PostgreSQL database,
    /// which CP replicas share (docs/ARCHITECTURE.md "Replicated deployment"; the replicas
    /// must also share `data_dir/volumes`). Unset: the embedded SQLite file
    /// `data_dir/cp.sqlite`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// At most this many PostgreSQL connections per CP process (default 8).
    #[serde(default = "default_pool_size")]
    pub database_pool_size: usize,
}

fn default_pool_size() -> usize {
    8
}

impl CpConfig {
    /// The database this configuration names: PostgreSQL if `database_url` is set, the
    /// SQLite file in `data_dir` otherwise.
    pub fn database(&self) -> Result<skydd_sql::Database> {
        Ok(skydd_sql::Database::from_config(
            self.database_url.as_deref(),
            self.database_pool_size,
            self.data_dir.join(DATABASE_FILE),
        )?)
    }
}

/// Per-owner limits of the cloud platform (docs/CLOUD-API.md, "Quotas"). A volume is a sparse
/// file, so its declared size is a promise of disk the provider must be able to keep: without
/// a bound one tenant could promise away the disk of all. Creating a domain beyond either
/// limit is refused with 403 `quota_exceeded`; deleting domains frees quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Live (not deleted) domains one owner may have. Default 256.
    pub max_domains: u64,
    /// Sum of the declared data sizes of one owner's live domains, in bytes. Default 8 TiB.
    pub max_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota { max_domains: 256, max_bytes: 8 << 40 }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_reconcile_interval_secs() -> u64 {
    DEFAULT_RECONCILE_INTERVAL_SECS
}

fn default_max_volume_bytes() -> u64 {
    DEFAULT_MAX_VOLUME_BYTES
}

impl CpConfig {
    /// Reads and parses the TOML file at `path`; fails with [`Error::Config`] naming the file
    /// and the bad key or value.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Encodes the configuration as TOML, e.g. for the all-in-one cloud and tests that write
    /// the file `serve` then reads.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("encode configuration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c: CpConfig = toml::from_str(
            r#"data_dir = "/d"
               ca = ["/ca.pem"]
               cert = "/c.pem"
               key = "/k.pem"
               ttp_url = "https://127.0.0.1:7443""#,
        )
        .unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN);
        assert_eq!(c.max_volume_bytes, DEFAULT_MAX_VOLUME_BYTES);
        let back: CpConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(back.ttp_url, c.ttp_url);
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = toml::from_str::<CpConfig>(
            r#"data_dir = "/d"
               ca = []
               cert = "/c"
               key = "/k"
               ttp_url = "https://x"
               tpp_url = "typo""#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tpp_url"), "{e}");
    }
}
