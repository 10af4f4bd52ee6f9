//! Helpers the service's unit tests share.

pub(crate) mod fixture;

use protocol::pki::Role;
use protocol::signing::SignatureKey;
use skydd_ca::{CertificateAuthority, Validity};

/// A signing key with a certificate for `name` in `role`, issued by `ca` (PEM cert, PEM key).
pub(crate) fn key_of(ca: &(String, zeroize::Zeroizing<String>), role: Role, name: &str) -> SignatureKey {
    let issued = CertificateAuthority::issue(&ca.0, &ca.1, role, name, Validity::Days(5)).unwrap();
    let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
    SignatureKey::from_pem(&issued.key_pem, der).unwrap()
}
