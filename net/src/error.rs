//! The one error type of the net library.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// The TLS handshake with the peer failed: the peer refused our certificate, or we refused
    /// its certificate. `reason` says which rule failed.
    #[error("TLS with {peer} failed: {reason}")]
    Tls { peer: String, reason: String },
    /// No connection could be made (refused, unreachable, name does not resolve, reset).
    /// `before_request`: it failed before the request was sent (refused, or while
    /// connecting); otherwise the connection broke later and the peer may have acted on it.
    #[error("cannot connect to {peer}: {reason}")]
    Connect { peer: String, reason: String, before_request: bool },
    #[error("request to {url} timed out")]
    Timeout { url: String },
    /// The peer answered with a Skydd error body `{"code": ..., "message": ...}`.
    #[error("HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The peer answered with an HTTP error that is not a Skydd error body.
    #[error("HTTP {status} from {url}: {body}")]
    Http {
        status: u16,
        url: String,
        body: String,
    },
    #[error("response from {url} is not the expected JSON: {detail}")]
    Json { url: String, detail: String },
    #[error("response from {url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("request to {url} failed: {detail}")]
    Request { url: String, detail: String },
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error(
        "key file {} has mode {mode:04o}: other users can read or change it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("server: {0}")]
    Serve(String),
    #[error(transparent)]
    Pki(#[from] protocol::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the request certainly never reached the peer's handler: no connection, or a
    /// TLS handshake that failed (the peer refused our certificate or we refused its). After
    /// a timeout, a reset or any answer the peer may have acted on it.
    pub fn never_reached_peer(&self) -> bool {
        match self {
            Error::Connect { before_request, .. } => *before_request,
            Error::Tls { .. } => true,
            _ => false,
        }
    }
}
