//! The rustls configurations of a Skydd link: TLS 1.3 only, both ends present a certificate
//! chained to a trusted CA, not revoked, and carrying the role the other end expects
//! (docs/PKI.md "TLS"). The checks themselves are in [`super::verifier`].

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::error::{Error, Result};

use super::identity::{identity_from_certificate, Identity};
use super::pem::{certs_from_pem, key_from_pem};
use super::tls_error::describe_tls_error;
use super::trusted_root::TrustedRoot;
use super::verifier::{role_client_verifier, role_server_verifier, to_trusted_roots};
use super::Role;

/// The trust anchors: every certificate of every root's PEM (several for federated clouds);
/// refuses an empty list. The roots' limits are applied by [`super::verifier`].
pub(super) fn root_store(roots: &[TrustedRoot]) -> Result<Arc<RootCertStore>> {
    if roots.is_empty() {
        return Err(Error::Certificate("no trusted CA certificate configured".into()));
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        for der in certs_from_pem(&root.pem, &format!("trusted CA #{}", i + 1))? {
            store
                .add(der)
                .map_err(|e| Error::Certificate(format!("trusted CA #{} is not usable as a root: {e}", i + 1)))?;
        }
    }
    Ok(Arc::new(store))
}

/// The one cryptography provider of every Skydd link (ring).
pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Our own certificate chain, refused unless its first certificate is a Skydd identity.
fn own_chain(cert_pem: &str) -> Result<(Vec<CertificateDer<'static>>, Identity)> {
    let chain = certs_from_pem(cert_pem, "own certificate")?;
    let identity = identity_from_certificate(&chain[0])?;
    Ok((chain, identity))
}

/// Server side of a Skydd link: TLS 1.3 only, client certificate required, chained to one of
/// `trusted_roots` (several for federated clouds; PEM strings, or [`TrustedRoot`]s with the
/// roles each may issue), not revoked by `crl_pems` (see [`super::crls_from_pems`]), with a
/// role in `allowed_client_roles` that its root may issue.
pub fn server_config<R: Clone + Into<TrustedRoot>>(
    trusted_roots: &[R],
    crl_pems: &[String],
    cert_pem: &str,
    key_pem: &str,
    allowed_client_roles: &[Role],
) -> Result<rustls::ServerConfig> {
    if allowed_client_roles.is_empty() {
        return Err(Error::Certificate("no client role is allowed: the list is empty".into()));
    }
    let verifier = role_client_verifier(&to_trusted_roots(trusted_roots), crl_pems, allowed_client_roles)?;
    let (chain, _) = own_chain(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_unavailable)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(key_mismatch)
}

/// Client side of a Skydd link: TLS 1.3 only, presents our certificate, requires the server
/// certificate to chain to `trusted_roots`, not be revoked by `crl_pems`, match the host
/// name, and carry `expected_server_role`, which its root may issue.
pub fn client_config<R: Clone + Into<TrustedRoot>>(
    trusted_roots: &[R],
    crl_pems: &[String],
    cert_pem: &str,
    key_pem: &str,
    expected_server_role: Role,
) -> Result<rustls::ClientConfig> {
    let verifier = role_server_verifier(&to_trusted_roots(trusted_roots), crl_pems, expected_server_role)?;
    let (chain, _) = own_chain(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_unavailable)?
        .dangerous() // a custom verifier: WebPKI plus the role check, nothing weaker
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(key_mismatch)
}

/// A client configuration that presents no certificate (tests of the refusal; tools that only
/// probe). Skydd servers refuse it.
pub fn client_config_without_certificate<R: Clone + Into<TrustedRoot>>(
    trusted_roots: &[R],
    crl_pems: &[String],
    expected_server_role: Role,
) -> Result<rustls::ClientConfig> {
    let verifier = role_server_verifier(&to_trusted_roots(trusted_roots), crl_pems, expected_server_role)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls13_unavailable)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The provider offers no TLS 1.3 (cannot happen with ring; said in words if it does).
fn tls13_unavailable(e: rustls::Error) -> Error {
    Error::Certificate(format!("TLS 1.3 is not available: {e}"))
}

/// Our certificate and our key are not a pair.
fn key_mismatch(e: rustls::Error) -> Error {
    Error::InvalidKey(format!("own certificate and key do not fit together: {}", describe_tls_error(&e)))
}
