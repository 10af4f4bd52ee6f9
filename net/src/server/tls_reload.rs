//! The server's TLS configuration ([`ServerTls`]) and, when it was built from files, watching
//! them ([`TlsReload`]): a new revocation list or a renewed certificate takes effect for new
//! connections without a restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use protocol::pki::Role;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::files::TlsFiles;

/// A server's TLS configuration and, when it was built from files, how to rebuild it.
#[derive(Clone)]
pub struct ServerTls {
    /// The configuration new connections are accepted with.
    pub config: Arc<rustls::ServerConfig>,
    /// If set, the files are watched and the configuration rebuilt when one changes: a new
    /// revocation list (`cloud-platform ca revoke`) takes effect for new connections without
    /// a restart, and so does a renewed certificate.
    pub reload: Option<TlsReload>,
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        ServerTls { config, reload: None }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("reload", &self.reload).finish_non_exhaustive()
    }
}

/// What [`ServerTls::reload`] watches and how the configuration is rebuilt.
#[derive(Debug, Clone)]
pub struct TlsReload {
    /// The TLS files the configuration is rebuilt from.
    pub files: TlsFiles,
    /// The client roles the rebuilt configuration accepts.
    pub allowed_client_roles: Vec<Role>,
    /// How often the files' modification times are compared.
    pub check_every: Duration,
}

impl TlsReload {
    /// Watch `files` every 2 s.
    pub fn new(files: TlsFiles, allowed_client_roles: &[Role]) -> Self {
        TlsReload { files, allowed_client_roles: allowed_client_roles.to_vec(), check_every: Duration::from_secs(2) }
    }
}

/// The acceptor new connections use now (the last one loaded).
pub(super) fn current_acceptor(acceptor: &RwLock<TlsAcceptor>) -> TlsAcceptor {
    // A poisoned lock only means a reload panicked; the acceptor inside is still whole.
    acceptor.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The files' modification times and sizes; a change in any means "reload".
pub(crate) fn tls_files_stamp(files: &TlsFiles) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files.paths().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

/// Every `check_every`, rebuild the configuration if a file changed; keep the old one if the
/// new files do not load.
pub(super) async fn watch_tls_files(
    reload: TlsReload,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    shutdown: CancellationToken,
) {
    let mut seen = tls_files_stamp(&reload.files);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(reload.check_every) => {}
        }
        let now = tls_files_stamp(&reload.files);
        if now == seen {
            continue;
        }
        seen = now;
        match reload.files.server_config(&reload.allowed_client_roles) {
            Ok(config) => {
                *acceptor.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
                tracing::info!(
                    revocation_lists = reload.files.crl.len(),
                    "TLS files changed: new connections use the reloaded certificates and revocation lists"
                );
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS files changed but do not load; still serving with the previous ones"
            ),
        }
    }
}
