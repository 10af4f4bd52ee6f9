//! The domain manager's configuration file (TOML): where the cloud platform and the TTP
//! are, and this manager's certificate and key (issued by the cloud CA, role
//! domain-manager). `skydd up` writes one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The parsed configuration file; `deny_unknown_fields`, so a misspelt key is refused
/// rather than silently ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmConfig {
    /// e.g. "https://127.0.0.1:7700"
    pub cloud_platform_url: String,
    /// e.g. "https://127.0.0.1:7443"
    pub ttp_url: String,
    /// Trusted CA roots: the own cloud's first, federated partners' after. Each a PEM file
    /// path (that root may issue every role), or `{ file = "PATH", allow = [{ role = "ROLE",
    /// names = ["NAME-or-PATTERN", ...] }, ...] }` to limit what it may issue (docs/PKI.md
    /// "Federation").
    pub ca: Vec<net::TrustedRootFile>,
    /// Certificate revocation lists (PEM files), one per trusted CA (CA_DIR/crl.pem):
    /// servers and the owners' signatures on stored descriptors are checked against them.
    /// Empty: nothing is revoked.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// This manager's certificate (its name is the subject CN) and key.
    pub cert: PathBuf,
    /// This manager's private key (PEM), matching `cert`; it signs descriptors, mount grants
    /// and deletions.
    pub key: PathBuf,
}

impl DmConfig {
    /// Reads and parses the file at `path`; a missing file is refused with a hint to pass
    /// `--config`, set SKYDD_DM_CONFIG or run `skydd up`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read {}: {e} (pass --config or set SKYDD_DM_CONFIG; `skydd up` writes one)",
                path.display()
            ))
        })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The TLS files of this configuration, for the mTLS clients to the cloud platform and the TTP.
    pub fn tls_files(&self) -> net::TlsFiles {
        net::TlsFiles { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone(), crl: self.crl.clone() }
    }
}
