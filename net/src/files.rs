//! Loading a party's TLS material (trusted CA roots, own certificate, own key) from disk.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::pki::{self, Role, TrustedRoot};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::trusted_root_file::TrustedRootFile;

/// The revocation list's file name next to `ca.pem` (`cloud-platform ca init|revoke|crl`).
pub const CRL_FILE: &str = "crl.pem";

/// Largest PEM file read (certificates and keys are a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Where a party's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trusted CA root certificates: one file per CA (the own cloud's first; partners' for
    /// federation), each with the roles it may issue (a plain path: every role). A file may
    /// hold several certificates.
    pub ca: Vec<TrustedRootFile>,
    /// Own certificate (PEM), as written by `cloud-platform ca issue`.
    pub cert: PathBuf,
    /// Own private key (PEM). Must not be accessible to other users (mode 0600 or 0640).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM), one per trusted CA, as `cloud-platform ca revoke`
    /// writes them. Empty: revocation is not checked. Non-empty: a peer certificate whose
    /// CA has no list here is refused (its status is unknown), and so is every certificate
    /// once a list is past its next update.
    pub crl: Vec<PathBuf>,
}

/// The loaded PEMs. The key is wiped on drop and never printed by `Debug`.
pub struct TlsMaterial {
    /// Trusted CA roots (PEM, one per file) with the roles each may issue.
    pub trusted_roots: Vec<TrustedRoot>,
    /// Revocation lists (PEM), one string per file; empty when none is configured.
    pub crl_pems: Vec<String>,
    /// This party's certificate chain (PEM).
    pub cert_pem: String,
    /// This party's private key (PEM).
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("trusted_roots", &self.trusted_roots.len())
            .field("crl_pems", &self.crl_pems.len())
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsFiles {
    /// The usual layout of a directory: `ca.pem`, `crl.pem` (when the CA published one),
    /// `NAME.pem`, `NAME-key.pem`.
    pub fn in_dir(dir: impl AsRef<Path>, name: &str) -> Self {
        let dir = dir.as_ref();
        let crl = dir.join(CRL_FILE);
        TlsFiles {
            ca: vec![TrustedRootFile::any_role(dir.join("ca.pem"))],
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            crl: if crl.exists() { vec![crl] } else { Vec::new() },
        }
    }

    /// Every file these TLS settings read (to notice when one changes).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.ca
            .iter()
            .map(TrustedRootFile::path)
            .chain(self.crl.iter().chain([&self.cert, &self.key]).map(PathBuf::as_path))
    }

    /// Read every file; refuse a key file that other users can read or write.
    pub fn load(&self) -> Result<TlsMaterial> {
        if self.ca.is_empty() {
            return Err(Error::Config("no trusted CA file configured".into()));
        }
        let trusted_roots =
            self.ca.iter().map(|root| Ok(root.with_pem(read_pem_file(&root.file)?))).collect::<Result<Vec<_>>>()?;
        let crl_pems = self.crl.iter().map(|p| read_pem_file(p)).collect::<Result<Vec<_>>>()?;
        let cert_pem = read_pem_file(&self.cert)?;
        check_key_mode(&self.key)?;
        let key_pem = Zeroizing::new(read_pem_file(&self.key)?);
        Ok(TlsMaterial { trusted_roots, crl_pems, cert_pem, key_pem })
    }

    /// Load and build the server configuration (see `protocol::pki::server_config`).
    pub fn server_config(&self, allowed_client_roles: &[Role]) -> Result<Arc<rustls::ServerConfig>> {
        let m = self.load()?;
        m.server_config(allowed_client_roles)
    }

    /// Load and build the server configuration, and watch these files for changes (new
    /// revocation lists, renewed certificates) while serving.
    pub fn server_tls(&self, allowed_client_roles: &[Role]) -> Result<crate::server::ServerTls> {
        Ok(crate::server::ServerTls {
            config: self.server_config(allowed_client_roles)?,
            reload: Some(crate::server::TlsReload::new(self.clone(), allowed_client_roles)),
        })
    }

    /// Load and build the client configuration (see `protocol::pki::client_config`).
    pub fn client_config(&self, expected_server_role: Role) -> Result<rustls::ClientConfig> {
        let m = self.load()?;
        m.client_config(expected_server_role)
    }
}

impl TlsMaterial {
    /// Whose DSSE envelopes (image allowlists) to accept: the `cloud-platform` certificate
    /// named `signer_name` under these trusted roots (within their role limits) and
    /// revocation lists, as of now. The TTP and the secure component check allowlists with
    /// the TLS material they loaded at start-up, not a second read of the same files.
    pub fn signer_trust(&self, signer_name: &str) -> protocol::dsse::SignerTrust {
        let now_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        protocol::dsse::SignerTrust {
            roots: self.trusted_roots.clone(),
            crl_pems: self.crl_pems.clone(),
            signer_name: signer_name.to_string(),
            now_unix,
        }
    }

    /// A server configuration from this material that accepts only clients whose certificate
    /// carries one of `allowed_client_roles` (see `protocol::pki::server_config`).
    pub fn server_config(&self, allowed_client_roles: &[Role]) -> Result<Arc<rustls::ServerConfig>> {
        Ok(Arc::new(pki::server_config(
            &self.trusted_roots,
            &self.crl_pems,
            &self.cert_pem,
            &self.key_pem,
            allowed_client_roles,
        )?))
    }

    /// A client configuration from this material that accepts only a server whose certificate
    /// carries `expected_server_role` (see `protocol::pki::client_config`).
    pub fn client_config(&self, expected_server_role: Role) -> Result<rustls::ClientConfig> {
        Ok(pki::client_config(
            &self.trusted_roots,
            &self.crl_pems,
            &self.cert_pem,
            &self.key_pem,
            expected_server_role,
        )?)
    }

    /// Our own identity, read from our certificate.
    pub fn identity(&self) -> Result<pki::Identity> {
        let der = pki::certs_from_pem(&self.cert_pem, "own certificate")?;
        Ok(pki::identity_from_certificate(&der[0])?)
    }

    /// This party's signing key: the certificate's private key, with the leaf certificate to
    /// embed in what it signs (descriptors, grants, registrations, placements).
    pub fn signature_key(&self) -> Result<protocol::signing::SignatureKey> {
        let der = pki::certs_from_pem(&self.cert_pem, "own certificate")?;
        let leaf = der.first().ok_or_else(|| Error::Config("the certificate file holds no certificate".into()))?;
        Ok(protocol::signing::SignatureKey::from_pem(&self.key_pem, leaf.to_vec())?)
    }
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::File { path: path.to_path_buf(), detail: detail.to_string() }
}

/// Refuse a key file whose mode gives other users any access, or the group more than read.
pub fn check_key_mode(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| file_err(path, format!("cannot read key file: {e}")))?;
    if !meta.is_file() {
        return Err(file_err(path, "key path is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o037 != 0 {
        return Err(Error::KeyPermissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Reads a PEM file of at most 1 MiB (certificates, revocation lists, keys).
pub fn read_pem_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
    let mut buf = String::new();
    f.take(MAX_PEM_BYTES + 1)
        .read_to_string(&mut buf)
        .map_err(|e| file_err(path, format!("cannot read as text: {e}")))?;
    if buf.len() as u64 > MAX_PEM_BYTES {
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(file_err(path, format!("larger than {MAX_PEM_BYTES} bytes: not a PEM file")));
    }
    Ok(buf)
}
