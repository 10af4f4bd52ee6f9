//! The I/O glue every Skydd service shares: the mutual-TLS HTTPS accept loop ([`serve`]),
//! the mTLS JSON client ([`Client`]), loading TLS files from disk ([`TlsFiles`]) and the one
//! JSON error body every service answers with ([`error_response`], [`ApiError`]).
//!
//! Certificates, roles and the rustls configurations come from `protocol::pki`; this crate
//! only moves bytes. See docs/PKI.md.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
mod connection_limits;
pub mod error;
pub mod files;
mod limits;
pub mod response;
pub mod server;
mod signals;
pub mod trusted_root_file;

pub use client::Client;
pub use connection_limits::ConnectionLimits;
pub use error::{Error, Result};
pub use files::{read_pem_file, TlsFiles, TlsMaterial, CRL_FILE};
pub use protocol::pki::{Identity, Role};
pub use response::{error_response, run_to_completion, ApiError, ErrorBody};
pub use server::{
    serve, serve_with, HandshakeFailure, PeerCertificates, RateLimit, ServeOptions, ServerTls, TlsReload,
};
pub use signals::stop_on_signals;
pub use trusted_root_file::TrustedRootFile;
