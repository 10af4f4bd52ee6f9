//! The one error type of the net library.

use std::path::PathBuf;

use thiserror::Error;

/// Everything the net library can fail with: on a request, a TLS file or the server loop.
#[derive(Debug, Error)]
pub enum Error {
    /// The TLS handshake with the peer failed: the peer refused our certificate, or we refused
    /// its certificate. `reason` says which rule failed.
    #[error("TLS with {peer} failed: {reason}")]
    Tls {
        /// The peer's address or URL.
        peer: String,
        /// The failed rule, in words.
        reason: String,
    },
    /// No connection could be made (refused, unreachable, name does not resolve, reset).
    /// `before_request`: it failed before the request was sent (refused, or while
    /// connecting); otherwise the connection broke later and the peer may have acted on it.
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer's address or URL.
        peer: String,
        /// What the connection attempt ran into.
        reason: String,
        /// True when the request was certainly never sent (safe to retry).
        before_request: bool,
    },
    /// The peer did not answer within the client's timeout; it may have acted on the request.
    #[error("request to {url} timed out")]
    Timeout {
        /// The URL that was requested.
        url: String,
    },
    /// The peer answered with a Skydd error body `{"code": ..., "message": ...}`.
    #[error("HTTP {status} {code}: {message}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The body's stable, machine-readable refusal code.
        code: String,
        /// The body's explanation for a person.
        message: String,
    },
    /// The peer answered with an HTTP error that is not a Skydd error body.
    #[error("HTTP {status} from {url}: {body}")]
    Http {
        /// The HTTP status code.
        status: u16,
        /// The URL that was requested.
        url: String,
        /// The response body as text (for the log and the person reading it).
        body: String,
    },
    /// A success response whose body does not parse as the expected type.
    #[error("response from {url} is not the expected JSON: {detail}")]
    Json {
        /// The URL that was requested.
        url: String,
        /// The JSON parser's complaint.
        detail: String,
    },
    /// A response body over the client's limit (`Client::with_max_body`); refused unread
    /// so a hostile peer cannot exhaust memory.
    #[error("response from {url} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The URL that was requested.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The request could not be built or sent for another reason (bad URL, body encoding).
    #[error("request to {url} failed: {detail}")]
    Request {
        /// The URL that was requested.
        url: String,
        /// What failed.
        detail: String,
    },
    /// A TLS file (CA, CRL, certificate or key) is missing, unreadable or not valid PEM.
    #[error("{}: {detail}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A private key file that users other than its owner (and its group, read-only) may
    /// read or change: refused rather than used.
    #[error(
        "key file {} has mode {mode:04o}: other users can read or change it; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (e.g. 0o644); refused if the group may write or others have
        /// any access.
        mode: u32,
    },
    /// Unusable settings: a base URL that is not https:// or does not parse, no trusted CA
    /// file, an HTTP client that cannot be built.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The accept loop could not bind or serve.
    #[error("server: {0}")]
    Serve(String),
    /// Building a TLS configuration from the loaded PEMs failed (protocol::pki).
    #[error(transparent)]
    Pki(#[from] protocol::Error),
}

/// `Result` with the net library's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the request certainly never reached the peer's handler: no connection, a
    /// TLS handshake that failed (the peer refused our certificate or we refused its), or a
    /// refusal of `net::serve`'s connection limits (429 `rate_limited` or
    /// `too_many_connections`, answered before the router). After a timeout, a reset or any
    /// other answer the peer may have acted on it.
    pub fn never_reached_peer(&self) -> bool {
        match self {
            Error::Connect { before_request, .. } => *before_request,
            Error::Tls { .. } => true,
            Error::Api { status: 429, code, .. } => code == "rate_limited" || code == "too_many_connections",
            _ => false,
        }
    }
}
