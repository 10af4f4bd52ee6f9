//! `cloud-platform ca ...`: the cloud's certificate authority on disk.
//!
//! A CA directory holds `ca.pem` (the root certificate, public: hand it to every party) and
//! `ca-key.pem` (the CA private key, mode 0600: keep it offline when not issuing) and
//! `crl.pem` (the signed certificate revocation list, public: services list it in their `crl`
//! setting). Issued identities are written as `NAME.pem` and `NAME-key.pem` (0600). Existing
//! certificates and keys are never overwritten; `crl.pem` is replaced atomically by `ca revoke`
//! and `ca crl`. The certificate and CRL profiles are in docs/PKI.md.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::pki::{RevocationList, RevocationReason, RevokedCertificate, Role};
use skydd_ca::{CertificateAuthority, Validity, DEFAULT_CRL_DAYS};
use zeroize::Zeroizing;

/// File name of the CA certificate in a CA directory (public: every party trusts it).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a CA directory (mode 0600; keep it offline when not
/// issuing).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The CA's revocation list (`net::TlsFiles::in_dir` picks it up next to `ca.pem`).
pub const CRL_FILE: &str = net::CRL_FILE;
/// Where a new revocation list is written before it replaces `crl.pem`. Created exclusively,
/// so it is also the lock that keeps two `ca revoke` / `ca crl` runs from losing an entry.
const CRL_TMP_FILE: &str = ".crl.pem.tmp";
/// Default subject CN of a new CA.
pub const DEFAULT_CA_NAME: &str = "Skydd Cloud CA";

/// Errors of the CA commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ca init` into a directory that already holds a CA file: overwriting it would make every
    /// certificate the old CA issued untrusted.
    #[error(
        "{} already holds a CA ({} exists); refusing to overwrite it. Every certificate it issued \
         would stop being trusted. Use another --dir, or remove the old CA deliberately first",
        dir.display(),
        existing.display()
    )]
    CaExists {
        /// The CA directory.
        dir: PathBuf,
        /// The CA file that is already there.
        existing: PathBuf,
    },
    /// A CA command (`ca issue`, `revoke`, `revoked`, `crl`) on a directory without a CA.
    #[error("{} does not hold a CA: {} is missing (run `cloud-platform ca init --dir {}` first)", dir.display(), missing.display(), dir.display())]
    NoCa {
        /// The directory given.
        dir: PathBuf,
        /// The CA file that is missing (`ca.pem` or `ca-key.pem`).
        missing: PathBuf,
    },
    /// `ca issue` would overwrite an issued certificate or key.
    #[error("{} already exists; refusing to overwrite it (remove it first to re-issue)", path.display())]
    Exists {
        /// The file that already exists.
        path: PathBuf,
    },
    /// The CA key is readable or writable by group or others; the CA refuses to use it until it
    /// is mode 0600.
    #[error(
        "CA key {} has mode {mode:04o}: other users can read or change it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The CA key file.
        path: PathBuf,
        /// Its permission bits, e.g. 0o644.
        mode: u32,
    },
    /// `ca revoke` of a certificate that is on the list already; nothing is changed.
    #[error(
        "{} is already revoked: since {}, reason {}; nothing changed (run `cloud-platform ca \
         revoked --dir {}` to see the list)",
        cert.display(),
        rfc3339(entry.revoked_at.unix_timestamp()),
        entry.reason.unwrap_or(RevocationReason::Unspecified),
        ca_dir.display()
    )]
    AlreadyRevoked {
        /// The certificate file given.
        cert: PathBuf,
        /// The CA directory.
        ca_dir: PathBuf,
        /// The existing entry (serial, time and reason of the revocation).
        entry: RevokedCertificate,
    },
    /// `ca revoke` of a certificate this CA did not issue or that does not parse.
    #[error("cannot revoke {}: {source}", cert.display())]
    NotRevocable {
        /// The certificate file given.
        cert: PathBuf,
        /// Why it cannot be revoked.
        source: protocol::Error,
    },
    /// `crl.pem` does not parse or its signature does not verify against `ca.pem`. Nothing
    /// is changed; deleting it would un-revoke every certificate on it (docs/PKI.md, "Revocation").
    #[error(
        "revocation list {} is unusable: {source}. Nothing was changed. Do not delete it (that \
         would un-revoke every certificate on it): restore it from a backup or the hosts that \
         hold a copy",
        path.display()
    )]
    BadCrl {
        /// The revocation list file.
        path: PathBuf,
        /// What is wrong with it.
        source: protocol::Error,
    },
    /// `ca revoked` on a CA made before revocation lists existed (`ca crl` publishes an empty
    /// one).
    #[error(
        "{} has no revocation list yet ({} is missing; the CA predates them). \
         `cloud-platform ca crl --dir {}` publishes an empty one",
        dir.display(),
        missing.display(),
        dir.display()
    )]
    NoCrl {
        /// The CA directory.
        dir: PathBuf,
        /// The revocation list file that is missing.
        missing: PathBuf,
    },
    /// Another `ca revoke` or `ca crl` holds the lock file (or one was interrupted and left it).
    #[error(
        "{} exists: another `cloud-platform ca revoke` or `ca crl` is updating the revocation \
         list, or one was interrupted. If none is running, remove that file and try again",
        path.display()
    )]
    CrlBusy {
        /// The lock file (`.crl.pem.tmp` in the CA directory).
        path: PathBuf,
    },
    /// The revocation list number cannot be increased any further: a new CA is needed.
    #[error("revocation list {} has number {number}, the last there can be; start a new CA", path.display())]
    CrlNumberExhausted {
        /// The revocation list file.
        path: PathBuf,
        /// Its current number.
        number: u64,
    },
    /// Reading, writing or creating a file or directory failed.
    #[error("{}: {detail}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done and the OS error.
        detail: String,
    },
    /// Generating, issuing, signing or checking a certificate or list failed in
    /// `protocol::pki`, e.g. a name that is not a valid certificate name.
    #[error(transparent)]
    Pki(#[from] protocol::Error),
}

/// `Result` with the CA commands' [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What `ca init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// The CA certificate (`ca.pem`).
    pub cert: PathBuf,
    /// The CA private key (`ca-key.pem`, mode 0600).
    pub key: PathBuf,
    /// The empty revocation list, number 1.
    pub crl: PathBuf,
}

/// What `ca issue` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    /// The certificate (`NAME.pem`).
    pub cert: PathBuf,
    /// Its private key (`NAME-key.pem`, mode 0600).
    pub key: PathBuf,
}

/// Options of `ca issue`.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The role carried in the certificate (docs/PKI.md, "How the role is carried"); it
    /// decides which APIs the holder may call.
    pub role: Role,
    /// The subject name: a host id, a domain manager's name, a service name. Also the file
    /// name stem.
    pub name: String,
    /// Where to write `NAME.pem` / `NAME-key.pem` (default: the CA directory).
    pub out: Option<PathBuf>,
    /// Validity in days from now; it cannot outlive the CA.
    pub days: u32,
    /// Extra subject alternative names (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// For a domain manager: the organisation it acts for and its role there, which access
    /// policies read (docs/PKI.md "Affiliation").
    pub affiliation: Option<protocol::pki::Affiliation>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), detail: format!("{what}: {e}") }
}

/// Create `dir` (0700) if needed and write a new CA into it, with an empty revocation list
/// (number 1, valid [`DEFAULT_CRL_DAYS`]). Refuses if any of the three files exists.
pub fn init(dir: &Path, name: &str) -> Result<CaPaths> {
    let paths = CaPaths { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE), crl: dir.join(CRL_FILE) };
    for existing in [&paths.cert, &paths.key, &paths.crl] {
        if existing.exists() {
            return Err(Error::CaExists { dir: dir.to_path_buf(), existing: existing.clone() });
        }
    }
    make_dir(dir)?;
    let (cert_pem, key_pem) = CertificateAuthority::generate(name)?;
    let crl_pem = CertificateAuthority::sign_revocation_list(&cert_pem, &key_pem, 1, &[], DEFAULT_CRL_DAYS)?;
    let mut written = Vec::new();
    for (path, pem, mode) in [
        (&paths.key, key_pem.as_str(), 0o600),
        (&paths.cert, cert_pem.as_str(), 0o644),
        (&paths.crl, crl_pem.as_str(), 0o644),
    ] {
        if let Err(e) = write_new(path, pem.as_bytes(), mode) {
            for path in written {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        written.push(path);
    }
    Ok(paths)
}

/// Issue a certificate for `opts.name` with `opts.role` from the CA in `ca_dir`.
pub fn issue(ca_dir: &Path, opts: &IssueOptions) -> Result<IssuedPaths> {
    protocol::pki::check_name(&opts.name)?;
    let ca = load_ca(ca_dir)?;
    let out = opts.out.clone().unwrap_or_else(|| ca_dir.to_path_buf());
    let paths =
        IssuedPaths { cert: out.join(format!("{}.pem", opts.name)), key: out.join(format!("{}-key.pem", opts.name)) };
    for p in [&paths.cert, &paths.key] {
        if p.exists() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    let issued = CertificateAuthority::issue_affiliated(
        &ca.cert_pem,
        &ca.key_pem,
        opts.role,
        &opts.name,
        Validity::Days(opts.days),
        &opts.sans,
        opts.affiliation.as_ref(),
    )?;
    make_dir(&out)?;
    write_new(&paths.key, issued.key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&paths.cert, issued.cert_pem.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&paths.key);
        return Err(e);
    }
    Ok(paths)
}

/// Revoke the certificate in `cert_path` (issued by the CA in `ca_dir`): add it to the
/// revocation list and publish list number previous + 1, valid [`DEFAULT_CRL_DAYS`], as
/// `ca_dir/crl.pem` (replaced atomically; services watching it pick it up within seconds).
/// A CA made before revocation lists existed has no `crl.pem`; its first list is number 1.
pub fn revoke(ca_dir: &Path, cert_path: &Path, reason: RevocationReason) -> Result<RevokedCertificate> {
    let cert_pem = read_text(cert_path, "cannot read the certificate to revoke")?;
    let (entry, _) = update_crl(ca_dir, DEFAULT_CRL_DAYS, |ca_cert_pem, revoked| {
        let entry = CertificateAuthority::revocation_entry(ca_cert_pem, &cert_pem, reason)
            .map_err(|source| Error::NotRevocable { cert: cert_path.to_path_buf(), source })?;
        if let Some(old) = revoked.iter().find(|r| r.serial_hex == entry.serial_hex) {
            return Err(Error::AlreadyRevoked {
                cert: cert_path.to_path_buf(),
                ca_dir: ca_dir.to_path_buf(),
                entry: old.clone(),
            });
        }
        revoked.push(entry.clone());
        Ok(entry)
    })?;
    Ok(entry)
}

/// Re-sign the revocation list of the CA in `ca_dir` with the same entries, the next number
/// and a next update `days` from now. Run it (from cron) well before the list expires: once
/// it is past its next update, every verifier refuses every certificate of this CA.
pub fn renew_crl(ca_dir: &Path, days: u32) -> Result<RevocationList> {
    let ((), list) = update_crl(ca_dir, days, |_, _| Ok(()))?;
    Ok(list)
}

/// The revocation list of the CA in `ca_dir`, its signature checked.
pub fn revoked(ca_dir: &Path) -> Result<RevocationList> {
    let ca_cert_path = existing_ca_file(ca_dir, CA_CERT_FILE)?;
    let ca_cert_pem = read_text(&ca_cert_path, "cannot read the CA certificate")?;
    let crl_path = ca_dir.join(CRL_FILE);
    if !crl_path.exists() {
        return Err(Error::NoCrl { dir: ca_dir.to_path_buf(), missing: crl_path });
    }
    read_crl(&crl_path, &ca_cert_pem)
}

/// The CA certificate and key of `ca_dir`, the key's mode checked.
struct LoadedCa {
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

fn load_ca(ca_dir: &Path) -> Result<LoadedCa> {
    let cert_path = existing_ca_file(ca_dir, CA_CERT_FILE)?;
    let key_path = existing_ca_file(ca_dir, CA_KEY_FILE)?;
    let cert_pem = read_text(&cert_path, "cannot read the CA certificate")?;
    check_key_mode(&key_path)?;
    let key_pem = Zeroizing::new(read_text(&key_path, "cannot read the CA key")?);
    Ok(LoadedCa { cert_pem, key_pem })
}

/// `ca_dir/file`, or [`Error::NoCa`] if it does not exist.
fn existing_ca_file(ca_dir: &Path, file: &str) -> Result<PathBuf> {
    let path = ca_dir.join(file);
    if !path.exists() {
        return Err(Error::NoCa { dir: ca_dir.to_path_buf(), missing: path });
    }
    Ok(path)
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, what, e))
}

fn read_crl(path: &Path, ca_cert_pem: &str) -> Result<RevocationList> {
    let pem = read_text(path, "cannot read the revocation list")?;
    protocol::pki::read_revocation_list(ca_cert_pem, &pem)
        .map_err(|source| Error::BadCrl { path: path.to_path_buf(), source })
}

/// Read-modify-write of `ca_dir/crl.pem`: `change` edits the entries of the current list
/// (none if there is no list yet), then list number current + 1, valid `days`, is signed,
/// written to `.crl.pem.tmp`, synced and renamed over `crl.pem`, and the directory synced.
/// The temporary file is created exclusively before the current list is read, so concurrent
/// runs cannot both publish the same number with different entries.
fn update_crl<T>(
    ca_dir: &Path,
    days: u32,
    change: impl FnOnce(&str, &mut Vec<RevokedCertificate>) -> Result<T>,
) -> Result<(T, RevocationList)> {
    let ca = load_ca(ca_dir)?;
    let crl_path = ca_dir.join(CRL_FILE);
    let tmp_path = ca_dir.join(CRL_TMP_FILE);
    let tmp = create_new(&tmp_path, 0o644).map_err(|e| match e {
        Error::Exists { path } => Error::CrlBusy { path },
        e => e,
    })?;
    let published = next_crl(&ca, &crl_path, days, change).and_then(|(out, list, pem)| {
        write_synced(tmp, &tmp_path, pem.as_bytes())?;
        std::fs::rename(&tmp_path, &crl_path)
            .map_err(|e| io_err(&crl_path, "cannot replace the revocation list", e))?;
        Ok((out, list))
    });
    if published.is_err() {
        // Unlock; the current list is untouched.
        let _ = std::fs::remove_file(&tmp_path);
    }
    let published = published?;
    std::fs::File::open(ca_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(ca_dir, "cannot sync the directory after replacing crl.pem", e))?;
    Ok(published)
}

/// The list after `crl_path` (or after an empty list numbered 0 if there is none yet) with
/// `change` applied: `change`'s result, the list as signed, and its PEM.
fn next_crl<T>(
    ca: &LoadedCa,
    crl_path: &Path,
    days: u32,
    change: impl FnOnce(&str, &mut Vec<RevokedCertificate>) -> Result<T>,
) -> Result<(T, RevocationList, String)> {
    let (number, mut revoked) = if crl_path.exists() {
        let current = read_crl(crl_path, &ca.cert_pem)?;
        (current.crl_number, current.revoked)
    } else {
        (0, Vec::new())
    };
    let out = change(&ca.cert_pem, &mut revoked)?;
    let number =
        number.checked_add(1).ok_or_else(|| Error::CrlNumberExhausted { path: crl_path.to_path_buf(), number })?;
    let pem = CertificateAuthority::sign_revocation_list(&ca.cert_pem, &ca.key_pem, number, &revoked, days)?;
    let list = protocol::pki::read_revocation_list(&ca.cert_pem, &pem)?;
    Ok((out, list, pem))
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
        return Err(Error::KeyPermissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Create `path` (must not exist) with `mode` from the start (no window with a wider mode),
/// write `bytes` and sync.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let f = create_new(path, mode)?;
    write_synced(f, path, bytes)
}

/// Create `path` (must not exist: [`Error::Exists`]) with exactly `mode`.
fn create_new(path: &Path, mode: u32) -> Result<std::fs::File> {
    let f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Exists { path: path.to_path_buf() },
            _ => io_err(path, "cannot create", e),
        })?;
    // The umask may have narrowed the mode; make it exactly `mode`.
    if let Err(e) = f.set_permissions(std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(io_err(path, "cannot set the file mode", e));
    }
    Ok(f)
}

/// Write `bytes` to the new file `f` at `path` and sync; remove it if that fails.
fn write_synced(mut f: std::fs::File, path: &Path, bytes: &[u8]) -> Result<()> {
    let r = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(io_err(path, "cannot write", e));
    }
    Ok(())
}

/// A UNIX time (seconds) as RFC 3339 in UTC, e.g. `2026-05-01T12:00:00Z`, as the CA
/// commands print revocation times.
pub fn rfc3339(unix_seconds: i64) -> String {
    protocol::pki::unix_seconds_rfc3339(unix_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(role: Role, name: &str) -> IssueOptions {
        IssueOptions { role, name: name.into(), out: None, days: 30, sans: vec![], affiliation: None }
    }

    #[test]
    fn init_refuses_to_overwrite_and_issue_writes_0600_keys() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        let p = init(&ca, DEFAULT_CA_NAME).unwrap();
        assert_eq!(std::fs::metadata(&p.key).unwrap().permissions().mode() & 0o777, 0o600);
        let before = std::fs::read(&p.key).unwrap();
        let e = init(&ca, "other").unwrap_err();
        assert!(matches!(e, Error::CaExists { .. }), "{e}");
        assert!(e.to_string().contains("refusing to overwrite"));
        assert_eq!(std::fs::read(&p.key).unwrap(), before);

        let i = issue(&ca, &opts(Role::Ttp, "ttp-1")).unwrap();
        assert_eq!(std::fs::metadata(&i.key).unwrap().permissions().mode() & 0o777, 0o600);
        let e = issue(&ca, &opts(Role::Ttp, "ttp-1")).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");

        std::fs::set_permissions(&p.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = issue(&ca, &opts(Role::Ttp, "ttp-2")).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn rfc3339_is_utc_civil_time() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn issue_without_ca_says_so() {
        let d = tempfile::tempdir().unwrap();
        let e = issue(d.path(), &opts(Role::Ttp, "x")).unwrap_err().to_string();
        assert!(e.contains("does not hold a CA") && e.contains("ca init"), "{e}");
    }
}
