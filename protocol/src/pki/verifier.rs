//! The certificate checks of a Skydd link: WebPKI (chain to a trusted CA, validity, key
//! usage, revocation, and for servers the host name) first, then the role check on the
//! end-entity certificate. WebPKI failures keep their own rustls variants, so the peer gets
//! the precise TLS alert; a role refusal is a [`RoleRefused`] (`certificate_unknown`).

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::{Error, Result};

use super::identity::{identity_from_certificate, Identity};
use super::pem::{certs_from_pem, crls_from_pems};
use super::tls_config::{provider, root_store};
use super::trusted_root::{RootLimit, TrustedRoot};
use super::Role;

/// WebPKI verification of a client's (or a signer's) certificate: chained to one of
/// `trusted_roots` (PEM strings, or [`TrustedRoot`]s with their limits); when `crl_pems` holds
/// lists, the end entity must not be on one, a certificate of a CA without a list is refused,
/// and so is everything once a list is past its next update. When a root is limited
/// ([`RootLimit::Only`]), a certificate it may not issue is refused too. The endpoint's role
/// list is checked by the callers.
pub fn client_cert_verifier<R: Clone + Into<TrustedRoot>>(
    trusted_roots: &[R],
    crl_pems: &[String],
) -> Result<Arc<dyn ClientCertVerifier>> {
    let roots = to_trusted_roots(trusted_roots);
    let inner = webpki_client_verifier(&roots, crl_pems)?;
    match RootLimits::of(&roots)? {
        None => Ok(inner),
        Some(limits) => Ok(Arc::new(RoleClientVerifier {
            inner,
            allowed: Role::ALL.to_vec(),
            limits: Some(limits),
            party: "certificate",
        })),
    }
}

/// The roots as [`TrustedRoot`]s (a plain PEM string may issue every role).
pub(super) fn to_trusted_roots<R: Clone + Into<TrustedRoot>>(roots: &[R]) -> Vec<TrustedRoot> {
    roots.iter().cloned().map(Into::into).collect()
}

/// rustls's WebPKI client verifier over `roots` and `crl_pems` (no role, no root limit).
fn webpki_client_verifier(roots: &[TrustedRoot], crl_pems: &[String]) -> Result<Arc<dyn ClientCertVerifier>> {
    let store = root_store(roots)?;
    let crls = crls_from_pems(crl_pems)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(store, provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    builder.build().map_err(|e| Error::Certificate(format!("building the certificate verifier failed: {e}")))
}

/// WebPKI client verification, then the check that the client's role is one of `allowed`
/// and that its root may issue it.
pub(super) fn role_client_verifier(
    roots: &[TrustedRoot],
    crl_pems: &[String],
    allowed: &[Role],
) -> Result<Arc<RoleClientVerifier>> {
    let inner = webpki_client_verifier(roots, crl_pems)?;
    Ok(Arc::new(RoleClientVerifier {
        inner,
        allowed: allowed.to_vec(),
        limits: RootLimits::of(roots)?,
        party: "client certificate",
    }))
}

/// WebPKI verification of a server's certificate (chain, revocation, host name), then the
/// check that it carries `expected` and that its root may issue it.
pub(super) fn role_server_verifier(
    roots: &[TrustedRoot],
    crl_pems: &[String],
    expected: Role,
) -> Result<Arc<RoleServerVerifier>> {
    let store = root_store(roots)?;
    let crls = crls_from_pems(crl_pems)?;
    let mut builder = WebPkiServerVerifier::builder_with_provider(store, provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    let inner = builder.build().map_err(|e| Error::Certificate(format!("building the server verifier failed: {e}")))?;
    Ok(Arc::new(RoleServerVerifier { inner, expected, limits: RootLimits::of(roots)? }))
}

/// The trusted roots as WebPKI anchors with each root's limit, built only when some root is
/// limited: after rustls accepted a chain, the chain is built again here, and a path is
/// accepted only if its anchor's root may issue the certificate's identity.
#[derive(Debug)]
pub(super) struct RootLimits {
    anchors: Vec<TrustAnchor<'static>>,
    /// Index into `roots` of each anchor.
    owner: Vec<usize>,
    /// Each configured root's name in messages and its limit.
    roots: Vec<(String, RootLimit)>,
}

impl RootLimits {
    /// `None` when every root may issue every role (nothing to check).
    fn of(roots: &[TrustedRoot]) -> Result<Option<Self>> {
        if roots.iter().all(|r| r.limit == RootLimit::AnyRole) {
            return Ok(None);
        }
        let mut limits = RootLimits { anchors: Vec::new(), owner: Vec::new(), roots: Vec::new() };
        for (i, root) in roots.iter().enumerate() {
            let what = format!("trusted CA #{}", i + 1);
            let certs = certs_from_pem(&root.pem, &what)?;
            let label = match certs.first().and_then(|c| ca_common_name(c)) {
                Some(cn) => format!("{cn:?} ({what})"),
                None => what.clone(),
            };
            for der in &certs {
                let anchor = webpki::anchor_from_trusted_cert(der)
                    .map_err(|e| Error::Certificate(format!("{what} is not usable as a root: {e}")))?;
                limits.anchors.push(anchor.to_owned());
                limits.owner.push(i);
            }
            limits.roots.push((label, root.limit.clone()));
        }
        Ok(Some(limits))
    }

    /// Accepts `end_entity` (already verified by rustls) only along a path whose root may
    /// issue `identity`; else says which root issued it and what that root may issue.
    fn check(
        &self,
        party: &str,
        identity: &Identity,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> std::result::Result<(), rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| refuse(format!("{party} of {:?} does not parse: {e}", identity.name)))?;
        let refused_by = Cell::new(None);
        let root_may_issue = |path: &webpki::VerifiedPath<'_>| {
            // The same certificate may be listed under two roots: any of them may allow it.
            let mut roots = self.anchors.iter().zip(&self.owner).filter(|(a, _)| *a == path.anchor()).map(|(_, &r)| r);
            let first = roots.clone().next();
            if roots.any(|root| self.roots[root].1.allows(identity)) {
                Ok(())
            } else {
                refused_by.set(first);
                Err(webpki::Error::UnknownIssuer)
            }
        };
        let algorithms = provider().signature_verification_algorithms.all;
        match cert.verify_for_usage(algorithms, &self.anchors, intermediates, now, usage, None, Some(&root_may_issue)) {
            Ok(_) => Ok(()),
            Err(e) => Err(refuse(match refused_by.get() {
                Some(root) => {
                    let (label, limit) = &self.roots[root];
                    format!(
                        "{party} of {:?} (role {}) is issued by trusted root {label}, which may issue only {limit}",
                        identity.name, identity.role
                    )
                }
                None => {
                    format!("{party} of {:?}: no chain to a trusted root found for the root limits: {e}", identity.name)
                }
            })),
        }
    }
}

/// The subject CN of a CA certificate, for messages.
fn ca_common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
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
    let id =
        identity_from_certificate(end_entity).map_err(|e| refuse(format!("{party} is not a Skydd identity: {e}")))?;
    if !allowed.contains(&id.role) {
        let list = allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
        let msg = if party == "server certificate" {
            format!("server certificate of {:?} has role {}, expected {list}", id.name, id.role)
        } else {
            format!("{party} of {:?} has role {}, this endpoint accepts {list}", id.name, id.role)
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

/// WebPKI client verification, then the role check and the root limits.
#[derive(Debug)]
pub(super) struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<Role>,
    limits: Option<RootLimits>,
    /// "client certificate" (TLS) or "certificate" (a signer's), in messages.
    party: &'static str,
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
        let identity = checked_identity(end_entity, self.party, &self.allowed)?;
        if let Some(limits) = &self.limits {
            limits.check(self.party, &identity, end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        }
        Ok(ClientCertVerified::assertion())
    }
    delegate_handshake_signatures!();
}

/// WebPKI server verification (chain + host name), then the role check and the root limits.
#[derive(Debug)]
pub(super) struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Role,
    limits: Option<RootLimits>,
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
        let identity = checked_identity(end_entity, "server certificate", &[self.expected])?;
        if let Some(limits) = &self.limits {
            limits.check(
                "server certificate",
                &identity,
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }
    delegate_handshake_signatures!();
}
