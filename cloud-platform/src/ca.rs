//! `cloud-platform ca ...`: the cloud's certificate authority on disk.
//!
//! A CA directory holds `ca.pem` (the root certificate, public: hand it to every party) and
//! `ca-key.pem` (the CA private key, mode 0600: keep it offline when not issuing). Issued
//! identities are written as `NAME.pem` and `NAME-key.pem` (0600). Existing files are never
//! overwritten. The certificate profile is in docs/PKI.md.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::pki::{CertificateAuthority, Role, Validity};
use zeroize::Zeroizing;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Default subject CN of a new CA.
pub const DEFAULT_CA_NAME: &str = "Skydd Cloud CA";

/// Errors of the CA commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{} already holds a CA ({} exists); refusing to overwrite it. Every certificate it issued \
         would stop being trusted. Use another --dir, or remove the old CA deliberately first",
        dir.display(),
        existing.display()
    )]
    CaExists { dir: PathBuf, existing: PathBuf },
    #[error("{} does not hold a CA: {} is missing (run `cloud-platform ca init --dir {}` first)", dir.display(), missing.display(), dir.display())]
    NoCa { dir: PathBuf, missing: PathBuf },
    #[error("{} already exists; refusing to overwrite it (remove it first to re-issue)", path.display())]
    Exists { path: PathBuf },
    #[error(
        "CA key {} has mode {mode:04o}: other users can read or change it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{}: {detail}", path.display())]
    Io { path: PathBuf, detail: String },
    #[error(transparent)]
    Pki(#[from] protocol::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `ca init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What `ca issue` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Options of `ca issue`.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub role: Role,
    pub name: String,
    /// Where to write `NAME.pem` / `NAME-key.pem` (default: the CA directory).
    pub out: Option<PathBuf>,
    pub days: u32,
    /// Extra subject alternative names (DNS names or IP addresses).
    pub sans: Vec<String>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        detail: format!("{what}: {e}"),
    }
}

/// Create `dir` (0700) if needed and write a new CA into it. Refuses if either file exists.
pub fn init(dir: &Path, name: &str) -> Result<CaPaths> {
    let paths = CaPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for existing in [&paths.cert, &paths.key] {
        if existing.exists() {
            return Err(Error::CaExists {
                dir: dir.to_path_buf(),
                existing: existing.clone(),
            });
        }
    }
    make_dir(dir)?;
    let (cert_pem, key_pem) = CertificateAuthority::generate(name)?;
    write_new(&paths.key, key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&paths.cert, cert_pem.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&paths.key);
        return Err(e);
    }
    Ok(paths)
}

/// Issue a certificate for `opts.name` with `opts.role` from the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, opts: &IssueOptions) -> Result<IssuedPaths> {
    protocol::pki::check_name(&opts.name)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    for p in [&ca_cert_path, &ca_key_path] {
        if !p.exists() {
            return Err(Error::NoCa {
                dir: ca_dir.to_path_buf(),
                missing: p.clone(),
            });
        }
    }
    let out = opts.out.clone().unwrap_or_else(|| ca_dir.to_path_buf());
    let paths = IssuedPaths {
        cert: out.join(format!("{}.pem", opts.name)),
        key: out.join(format!("{}-key.pem", opts.name)),
    };
    for p in [&paths.cert, &paths.key] {
        if p.exists() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    let ca_cert = std::fs::read_to_string(&ca_cert_path)
        .map_err(|e| io_err(&ca_cert_path, "cannot read the CA certificate", e))?;
    check_key_mode(&ca_key_path)?;
    let ca_key = Zeroizing::new(
        std::fs::read_to_string(&ca_key_path)
            .map_err(|e| io_err(&ca_key_path, "cannot read the CA key", e))?,
    );
    let issued = CertificateAuthority::issue_with_sans(
        &ca_cert,
        &ca_key,
        opts.role,
        &opts.name,
        Validity::Days(opts.days),
        &opts.sans,
    )?;
    make_dir(&out)?;
    write_new(&paths.key, issued.key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&paths.cert, issued.cert_pem.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&paths.key);
        return Err(e);
    }
    Ok(paths)
}

fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, "cannot create directory", e))
}

fn check_key_mode(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, "cannot read the CA key", e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Create `path` (must not exist) with `mode` from the start (no window with a wider mode),
/// write `bytes` and sync.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Exists {
                path: path.to_path_buf(),
            },
            _ => io_err(path, "cannot create", e),
        })?;
    // The umask may have narrowed the mode; make it exactly `mode`.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(path, "cannot set the file mode", e))?;
    let r = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(io_err(path, "cannot write", e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(role: Role, name: &str) -> IssueOptions {
        IssueOptions {
            role,
            name: name.into(),
            out: None,
            days: 30,
            sans: vec![],
        }
    }

    #[test]
    fn init_refuses_to_overwrite_and_issue_writes_0600_keys() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        let p = init(&ca, DEFAULT_CA_NAME).unwrap();
        assert_eq!(
            std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let before = std::fs::read(&p.key).unwrap();
        let e = init(&ca, "other").unwrap_err();
        assert!(matches!(e, Error::CaExists { .. }), "{e}");
        assert!(e.to_string().contains("refusing to overwrite"));
        assert_eq!(std::fs::read(&p.key).unwrap(), before);

        let i = issue(&ca, &opts(Role::Ttp, "ttp-1")).unwrap();
        assert_eq!(
            std::fs::metadata(&i.key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let e = issue(&ca, &opts(Role::Ttp, "ttp-1")).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");

        std::fs::set_permissions(&p.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = issue(&ca, &opts(Role::Ttp, "ttp-2")).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn issue_without_ca_says_so() {
        let d = tempfile::tempdir().unwrap();
        let e = issue(d.path(), &opts(Role::Ttp, "x"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not hold a CA") && e.contains("ca init"),
            "{e}"
        );
    }
}
