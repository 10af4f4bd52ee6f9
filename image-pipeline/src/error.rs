//! The one error type of the image-pipeline library. Every variant names what was wrong and
//! where, so an operator can act on the message alone.

use std::path::{Path, PathBuf};

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{context} ({path}): {source}")]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {path}: {detail}")]
    Profile { path: String, detail: String },
    #[error("the tool {tool} is missing: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("step {step} failed: `{command}` exited with {status}; last output:\n{output}")]
    StepFailed { step: String, command: String, status: String, output: String },
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("package {package} {version}: {detail}")]
    PackageHash { package: String, version: String, detail: String },
    #[error("security checks failed for {image}: {violations} violation(s): {summary}")]
    ChecksFailed { image: String, violations: usize, summary: String },
    #[error("signing key: {0}")]
    SigningKey(String),
    #[error("verification refused {subject}: {reason}")]
    VerifyRefused { subject: String, reason: String },
    #[error("image store {path}: {detail}")]
    Store { path: String, detail: String },
    #[error("unknown image version {0:?}: expected ROLE@N (e.g. test-minimal@2), ROLE (its newest version) or a sha256 digest prefix")]
    UnknownVersion(String),
    #[error("version {version} cannot be {action}: {reason}")]
    InvalidState { version: String, action: String, reason: String },
    #[error("archive {what}: {detail}")]
    Archive { what: String, detail: String },
    #[error("archive key source: {0}")]
    KeySource(String),
    #[error("JSON {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

impl Error {
    pub fn io(context: impl Into<String>, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), path: path.as_ref().to_path_buf(), source }
    }

    pub fn parse(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Parse { what: what.into(), detail: detail.into() }
    }

    pub fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json { what: what.into(), source }
    }

    pub fn store(path: impl AsRef<Path>, detail: impl Into<String>) -> Self {
        Error::Store { path: path.as_ref().display().to_string(), detail: detail.into() }
    }

    pub fn refused(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::VerifyRefused { subject: subject.into(), reason: reason.into() }
    }
}

/// Small helpers so file operations always carry their path.
pub mod fsx {
    use super::{Error, Result};
    use std::path::Path;

    pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| Error::io(format!("read {what}"), path, e))
    }

    pub fn read_string(path: &Path, what: &str) -> Result<String> {
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {what}"), path, e))
    }

    pub fn write(path: &Path, bytes: impl AsRef<[u8]>, what: &str) -> Result<()> {
        std::fs::write(path, bytes).map_err(|e| Error::io(format!("write {what}"), path, e))
    }

    /// Writes via a temporary file and rename, so a crash never leaves a half-written file.
    pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>, what: &str) -> Result<()> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        write(&tmp, bytes, what)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {what} into place"), path, e))
    }

    pub fn create_dir_all(path: &Path, what: &str) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(format!("create {what}"), path, e))
    }

    pub fn remove_dir_all_if_exists(path: &Path, what: &str) -> Result<()> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {what}"), path, e)),
        }
    }

    pub fn remove_file_if_exists(path: &Path, what: &str) -> Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("remove {what}"), path, e)),
        }
    }
}
