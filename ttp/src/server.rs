//! Starting the TTP service from its configuration.

use std::sync::Arc;

use net::{Role, TlsFiles};
use protocol::signing::SignatureKey;
use tokio_util::sync::CancellationToken;

use crate::attestation::AttestationPolicy;
use crate::config::TtpConfig;
use crate::error::{Error, Result};
use crate::master_key::ShareLine;
use crate::service::Ttp;

/// Builds the TTP from its configuration: K_TTP (every version unsealed from the TPM),
/// TLS identity, CA roots, policy, store.
pub fn build(config: &TtpConfig) -> Result<(Arc<Ttp>, net::ServerTls)> {
    build_with_shares(config, &[])
}

/// [`build`], with the versions of K_TTP that `shares` are given for combined from them
/// instead of unsealed (no TPM, or a TPM that refuses: `ttp serve --unseal-shares`).
pub fn build_with_shares(config: &TtpConfig, shares: &[ShareLine]) -> Result<(Arc<Ttp>, net::ServerTls)> {
    let tls_files =
        TlsFiles { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone(), crl: config.crl.clone() };
    let material = tls_files.load().map_err(|e| Error::Config(format!("TLS files: {e}")))?;
    let identity = material.identity().map_err(|e| Error::Config(format!("own certificate: {e}")))?;
    if identity.role != Role::Ttp {
        return Err(Error::Config(format!(
            "{} has role {}, the TTP needs a ttp certificate",
            config.cert.display(),
            identity.role
        )));
    }
    let cert_der = protocol::pki::certs_from_pem(&material.cert_pem, "own certificate")?
        .first()
        .map(|c| c.to_vec())
        .ok_or_else(|| Error::Config("own certificate file is empty".into()))?;
    let signing_key = SignatureKey::from_pem(&material.key_pem, cert_der)?;
    let policy_text = std::fs::read_to_string(&config.attestation).map_err(|e| Error::Io {
        context: format!("read attestation policy {}", config.attestation.display()),
        source: e,
    })?;
    let policy: AttestationPolicy = toml::from_str(&policy_text)
        .map_err(|e| Error::Config(format!("attestation policy {}: {e}", config.attestation.display())))?;
    let store = config.open_store()?;
    config.limits.serve_options().map_err(Error::Config)?;
    let master_keys = crate::master_key::unlock(&config.data_dir, &config.master_key, shares)?;
    let ttp = Ttp::new(master_keys, signing_key, material.trusted_roots.clone(), policy, Arc::new(store))?
        .with_revocation_lists(config.crl.clone())
        .with_registration_replicas(config.registration_replicas.clone());
    let ttp = match config.load_image_allowlist(&material)? {
        Some(allowlist) => {
            tracing::info!(
                images = allowlist.images.len(),
                issued_at = %allowlist.issued_at,
                "key releases only to VMs launched from allowlisted images"
            );
            ttp.with_image_allowlist(allowlist)
        }
        None => ttp,
    };
    let tls = tls_files
        .server_tls(&[Role::CloudPlatform, Role::SecureComponent, Role::DomainManager])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    Ok((Arc::new(ttp), tls))
}

/// Serves the TTP on `listener` until `shutdown` is cancelled, with the default limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ttp: Arc<Ttp>,
    tls: net::ServerTls,
    shutdown: CancellationToken,
) -> Result<()> {
    serve_limited(listener, ttp, tls, &net::ConnectionLimits::default(), shutdown).await
}

/// [`serve`] with the configuration's `[limits]`.
pub async fn serve_limited(
    listener: tokio::net::TcpListener,
    ttp: Arc<Ttp>,
    tls: net::ServerTls,
    limits: &net::ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<()> {
    let options = limits.serve_options().map_err(Error::Config)?;
    net::serve_with(listener, tls, crate::http::router(ttp), options, shutdown)
        .await
        .map_err(|e| Error::Config(format!("serve: {e}")))
}
