//! Starting the cloud platform from its configuration, in its own binary
//! (`cloud-platform serve`) or in-process (the all-in-one launcher).

use std::sync::Arc;

use net::{Role, TlsFiles};
use tokio_util::sync::CancellationToken;

use crate::config::{CpConfig, VOLUMES_DIR};
use crate::error::{Error, Result};
use crate::service::CloudPlatform;
use crate::store::SqlStore;
use crate::volumes::Volumes;

/// How long the CP waits for the TTP.
pub const TTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Builds the cloud platform from its configuration: TLS identity (role cloud-platform),
/// CA roots, the TTP client, the SQLite store and the volume directory.
pub fn build(config: &CpConfig) -> Result<(Arc<CloudPlatform>, net::ServerTls)> {
    let tls_files =
        TlsFiles { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone(), crl: config.crl.clone() };
    config.limits.serve_options().map_err(Error::Config)?;
    let material = tls_files.load().map_err(|e| Error::Config(format!("TLS files: {e}")))?;
    let identity = material.identity().map_err(|e| Error::Config(format!("own certificate: {e}")))?;
    if identity.role != Role::CloudPlatform {
        return Err(Error::Config(format!(
            "{} has role {}, the cloud platform needs a cloud-platform certificate",
            config.cert.display(),
            identity.role
        )));
    }
    // Both clients follow the TLS files: a revoked TTP or secure component certificate is
    // refused within 2 s of the list's update, without a restart.
    let ttp = net::Client::from_files(&config.ttp_url, &tls_files, Role::Ttp, TTP_TIMEOUT)
        .map_err(|e| Error::Config(format!("TLS to the TTP at {}: {e}", config.ttp_url)))?;
    tls_files
        .client_config(Role::SecureComponent)
        .map_err(|e| Error::Config(format!("TLS to secure components: {e}")))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Config(format!("create data directory {}: {e}", config.data_dir.display())))?;
    let store = SqlStore::open_database(&config.database()?)?;
    let volumes = Volumes::open(&config.data_dir.join(VOLUMES_DIR), config.max_volume_bytes)?;
    if config.reconcile_interval_secs == 0 {
        return Err(Error::Config(
            "reconcile_interval_secs must be at least 1 (seconds between two reconciliations with the compute hosts)"
                .into(),
        ));
    }
    let placer = material.signature_key().map_err(|e| Error::Config(format!("own signing key: {e}")))?;
    let cp = CloudPlatform::new(Arc::new(store), volumes, ttp, tls_files.clone(), placer)
        .with_reconcile_interval(std::time::Duration::from_secs(config.reconcile_interval_secs))
        .with_quota(config.quota);
    let tls = tls_files
        .server_tls(&[Role::CloudPlatform, Role::DomainManager])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    Ok((Arc::new(cp), tls))
}

/// Serves the cloud platform on `listener` until `shutdown` is cancelled, with the default
/// limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cp: Arc<CloudPlatform>,
    tls: net::ServerTls,
    shutdown: CancellationToken,
) -> Result<()> {
    serve_limited(listener, cp, tls, &net::ConnectionLimits::default(), shutdown).await
}

/// [`serve`] with the configuration's `[limits]`.
pub async fn serve_limited(
    listener: tokio::net::TcpListener,
    cp: Arc<CloudPlatform>,
    tls: net::ServerTls,
    limits: &net::ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<()> {
    let options = limits.serve_options().map_err(Error::Config)?;
    // Before answering anyone: finish the updates a crash interrupted (so no domain stays
    // behind its TTP registration), then enforce every header in force on the open attachments.
    match cp.finish_pending_updates().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(finished = n, "start-up finished interrupted domain updates"),
        Err(e) => tracing::error!(error = %e, "start-up could not read the interrupted domain updates"),
    }
    match cp.reconcile_attachments().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            detached = n,
            "start-up reconciliation detached attachments the header in force no longer allows"
        ),
        Err(e) => tracing::error!(error = %e, "start-up reconciliation of attachments failed"),
    }
    // Then, in the background (a host that does not answer must not keep the API down):
    // the reconciliation with the compute hosts, now and every interval.
    let reconciler = {
        let (cp, shutdown) = (cp.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                match cp.reconcile_hosts().await {
                    Ok(done) if done.changed_anything() => tracing::warn!(
                        adopted = done.adopted,
                        detached = done.detached,
                        marked_detached = done.marked_detached,
                        hosts_unreachable = done.hosts_unreachable,
                        "reconciled attachments with the compute hosts"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "reconciliation with the compute hosts failed; next round"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(cp.reconcile_interval()) => {}
                }
            }
        })
    };
    let served = net::serve_with(listener, tls, crate::api::router(cp), options, shutdown)
        .await
        .map_err(|e| Error::Config(format!("serve: {e}")));
    reconciler.abort();
    served
}
