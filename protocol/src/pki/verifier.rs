//! The certificate checks of a Skydd link: WebPKI (chain to a trusted CA, validity, key
//! usage, revocation, and for servers the host name) first, then the role check on the
//! end-entity certificate. WebPKI failures keep their own rustls variants, so the peer gets
//! the precise TLS alert; a role refusal is a [`RoleRefused`] (`certificate_unknown`).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::{Error, Result};

use super::identity::{identity_from_certificate, Identity};
use super::pem::crls_from_pems;
use super::tls_config::{provider, root_store};
use super::Role;

/// WebPKI verification of a client's (or a signer's) certificate: chained to one of
/// `trusted_ca_pems`; when `crl_pems` holds lists, the end entity must not be on one, a
/// certificate of a CA without a list is refused, and so is everything once a list is past
/// its next update. The role is checked by the callers.
pub fn client_cert_verifier(trusted_ca_pems: &[String], crl_pems: &[String]) -> Result<Arc<dyn ClientCertVerifier>> {
    let roots = root_store(trusted_ca_pems)?;
    let crls = crls_from_pems(crl_pems)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    builder.build().map_err(|e| Error::Certificate(format!("building the certificate verifier failed: {e}")))
}

/// WebPKI client verification by [`client_cert_verifier`], then the check that the client's
/// role is one of `allowed`.
pub(super) fn role_client_verifier(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
    allowed: &[Role],
) -> Result<Arc<RoleClientVerifier>> {
    let inner = client_cert_verifier(trusted_ca_pems, crl_pems)?;
    Ok(Arc::new(RoleClientVerifier { inner, allowed: allowed.to_vec() }))
}

/// WebPKI verification of a server's certificate (chain, revocation, host name), then the
/// check that it carries `expected`.
pub(super) fn role_server_verifier(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
    expected: Role,
) -> Result<Arc<RoleServerVerifier>> {
    let roots = root_store(trusted_ca_pems)?;
    let crls = crls_from_pems(crl_pems)?;
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    let inner = builder.build().map_err(|e| Error::Certificate(format!("building the server verifier failed: {e}")))?;
    Ok(Arc::new(RoleServerVerifier { inner, expected }))
}

/// Why a certificate was refused by the role check (carried in
/// `rustls::CertificateError::Other`; the peer receives the `certificate_unknown` alert).
#[derive(Debug, Clone)]
pub struct RoleRefused(pub String);

impl fmt::Display for RoleRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for RoleRefused {}

fn refuse(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(RoleRefused(msg)))))
}

/// The role check that runs after WebPKI accepted the chain. (WebPKI failures keep their own
/// rustls variants, so the peer gets the precise TLS alert; [`describe_tls_error`] renders
/// them in words.)
fn checked_identity(
    end_entity: &CertificateDer<'_>,
    party: &str,
    allowed: &[Role],
) -> std::result::Result<Identity, rustls::Error> {
    let id = identity_from_certificate(end_entity)
        .map_err(|e| refuse(format!("{party} certificate is not a Skydd identity: {e}")))?;
    if !allowed.contains(&id.role) {
        let list = allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
        let msg = if party == "client" {
            format!("client certificate of {:?} has role {}, this endpoint accepts {list}", id.name, id.role)
        } else {
            format!("server certificate of {:?} has role {}, expected {list}", id.name, id.role)
        };
        return Err(refuse(msg));
    }
    Ok(id)
}

/// The handshake-signature methods of a role verifier: WebPKI's (`self.inner`), unchanged.
/// Only the certificate check differs between the client and the server verifier.
macro_rules! delegate_handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// WebPKI client verification, then the role check.
#[derive(Debug)]
pub(super) struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<Role>,
}

impl ClientCertVerifier for RoleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        checked_identity(end_entity, "client", &self.allowed)?;
        Ok(ClientCertVerified::assertion())
    }
    delegate_handshake_signatures!();
}

/// WebPKI server verification (chain + host name), then the role check.
#[derive(Debug)]
pub(super) struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Role,
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        checked_identity(end_entity, "server", &[self.expected])?;
        Ok(ServerCertVerified::assertion())
    }
    delegate_handshake_signatures!();
}
