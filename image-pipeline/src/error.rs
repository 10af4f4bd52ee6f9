//! The one error type of the image-pipeline library. Every variant names what was wrong and
//! where, so an operator can act on the message alone.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The crate's `Result`, with [`enum@Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a build, a store operation, verification or archival. The
/// `Display` text is the message the CLI prints, so each variant carries enough context (path,
/// step, package, version) to act on without a backtrace.
#[derive(Debug, Error)]
pub enum Error {
    /// A file system operation failed; built with [`Error::io`] or the [`fsx`] helpers.
    #[error("{context} ({path}): {source}")]
    Io {
        /// What was being done, e.g. "read profile" or "rename provenance into place".
        context: String,
        /// The file or directory concerned (host path).
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A profile could not be loaded: not found, not UTF-8, bad TOML, an unknown key, or a rule
    /// of [`Profile::validate`](crate::profile::Profile::validate) broken.
    #[error("profile {path}: {detail}")]
    Profile {
        /// Where the profile came from (file path, `builtin:NAME` or `store:ROLE@N`).
        path: String,
        /// The first problem found.
        detail: String,
    },
    /// An external program is not on PATH; the hint names the Debian package to install
    /// (docs/IMAGE-PIPELINE.md, "Requirements").
    #[error("the tool {tool} is missing: {hint}")]
    MissingTool {
        /// Program name, e.g. `mmdebstrap` or `oscap-chroot`.
        tool: String,
        /// Which package provides it (`scripts/install-deps.sh` installs them all).
        hint: String,
    },
    /// An external program ran and failed (or could not start); raised by
    /// [`process::run`](crate::process::run) and its spinner variant.
    #[error("step {step} failed: `{command}` exited with {status}; last output:\n{output}")]
    StepFailed {
        /// Pipeline step name as recorded in the provenance (`bootstrap`, `filesystem`, ...).
        step: String,
        /// The command line, cut at 400 characters.
        command: String,
        /// Exit status, or why it could not start or be waited for.
        status: String,
        /// The last 25 lines of stdout and stderr.
        output: String,
    },
    /// Text or binary data from a tool, the archive or an image did not have the expected
    /// form.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed (file, tool output, record).
        what: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The archive chain check failed for one package: its `.deb` is missing from the cache or
    /// hashes differently from its `Packages` stanza (docs/IMAGE-PIPELINE.md, "Stage 1:
    /// creation", step 1). The build stops.
    #[error("package {package} {version}: {detail}")]
    PackageHash {
        /// Debian package name.
        package: String,
        /// Installed version.
        version: String,
        /// Both hashes, or why no hash could be compared.
        detail: String,
    },
    /// A build or patch had security-check violations; the image is not stored, but the signed
    /// record of the failure is written (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 3).
    #[error("security checks failed for {image}: {violations} violation(s): {summary}")]
    ChecksFailed {
        /// The role, and where the signed failure record lies.
        image: String,
        /// Number of violations over all checks.
        violations: usize,
        /// Every violation, `check: detail`, joined by `; `.
        summary: String,
    },
    /// The signing key or certificate cannot be used: unreadable, not P-256 PKCS#8, not matching,
    /// or not a `cloud-platform` certificate (docs/IMAGE-PIPELINE.md, "Provenance").
    #[error("signing key: {0}")]
    SigningKey(String),
    /// `verify` (or an allowlist check) refused a signed record or image; the reason names the
    /// first deviation (docs/IMAGE-PIPELINE.md, "`verify IMAGE`").
    #[error("verification refused {subject}: {reason}")]
    VerifyRefused {
        /// What was verified: a build directory, an image file, a store version or a file.
        subject: String,
        /// The deviation, e.g. "the image was changed after it was built".
        reason: String,
    },
    /// The image store is inconsistent or an operation on it failed (docs/IMAGE-PIPELINE.md,
    /// "Stage 2: management").
    #[error("image store {path}: {detail}")]
    Store {
        /// The store directory (or the file in it) concerned.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A version reference matched nothing; the message lists the accepted forms.
    #[error("unknown image version {0:?}: expected ROLE@N (e.g. test-minimal@2), ROLE (its newest version) or a sha256 digest prefix")]
    UnknownVersion(String),
    /// The operation does not apply to the version's status, e.g. promoting a destroyed
    /// version or restoring one that was never archived.
    #[error("version {version} cannot be {action}: {reason}")]
    InvalidState {
        /// `ROLE@N`.
        version: String,
        /// The refused operation as a past participle ("promoted", "restored", ...).
        action: String,
        /// Why, in terms of the version's status.
        reason: String,
    },
    /// Archiving or restoring failed: the XTS engine refused the key, the `.skarc` file is not
    /// an archive or is truncated, or a digest differs from the signed record before encryption
    /// or after decryption (docs/IMAGE-PIPELINE.md, "Stage 3: archival and destruction").
    #[error("archive {what}: {detail}")]
    Archive {
        /// The archive file, the version (`ROLE@N`) or the operation (key, header, encryption,
        /// decryption) concerned.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// The [`KeySource`](crate::archive::KeySource) could not create, release or delete a domain
    /// key (TTP unreachable, quote refused, domain already tombstoned).
    #[error("archive key source: {0}")]
    KeySource(String),
    /// JSON could not be encoded or decoded (provenance, version records, envelopes).
    #[error("JSON {what}: {source}")]
    Json {
        /// Which document.
        what: String,
        /// serde_json's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// An error from the protocol crate: PKI (certificates, CRLs), signature keys, TTP
    /// messages.
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

impl Error {
    /// An [`Error::Io`] with `context` (what was being done) and the path it was done to.
    pub fn io(context: impl Into<String>, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), path: path.as_ref().to_path_buf(), source }
    }

    /// An [`Error::Parse`]: `what` could not be read as expected, because of `detail`.
    pub fn parse(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Parse { what: what.into(), detail: detail.into() }
    }

    /// An [`Error::Json`] for encoding or decoding the document `what`.
    pub fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json { what: what.into(), source }
    }

    /// An [`Error::Store`] naming the store directory (or a file in it).
    pub fn store(path: impl AsRef<Path>, detail: impl Into<String>) -> Self {
        Error::Store { path: path.as_ref().display().to_string(), detail: detail.into() }
    }

    /// An [`Error::VerifyRefused`]: `subject` is refused for `reason`.
    pub fn refused(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::VerifyRefused { subject: subject.into(), reason: reason.into() }
    }
}

/// Small helpers so file operations always carry their path.
pub mod fsx {
    use super::{Error, Result};
    use std::path::Path;

    /// Reads a whole file; `what` names it in the error ("read signing key").
    pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| Error::io(format!("read {what}"), path, e))
    }

    /// Reads a whole UTF-8 file; `what` names it in the error.
    pub fn read_string(path: &Path, what: &str) -> Result<String> {
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {what}"), path, e))
    }

    /// Writes (creates or truncates) a file; not atomic, see [`write_atomic`] for records.
    pub fn write(path: &Path, bytes: impl AsRef<[u8]>, what: &str) -> Result<()> {
        std::fs::write(path, bytes).map_err(|e| Error::io(format!("write {what}"), path, e))
    }

    /// Writes via a temporary file and rename, so a crash never leaves a half-written file.
    pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>, what: &str) -> Result<()> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        write(&tmp, bytes, what)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {what} into place"), path, e))
    }

    /// Creates a directory and its parents; `what` names it in the error.
    pub fn create_dir_all(path: &Path, what: &str) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(format!("create {what}"), path, e))
    }

    /// Removes a directory tree; a missing directory is not an error (work directories, retries).
    pub fn remove_dir_all_if_exists(path: &Path, what: &str) -> Result<()> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {what}"), path, e)),
        }
    }

    /// Removes a file; `Ok(true)` if it existed, `Ok(false)` if it was already gone (so hardening
    /// and `destroy` can record what they actually removed).
    pub fn remove_file_if_exists(path: &Path, what: &str) -> Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("remove {what}"), path, e)),
        }
    }
}
