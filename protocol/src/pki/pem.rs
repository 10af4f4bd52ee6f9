//! PEM in, DER out: certificates, private keys and revocation lists as rustls takes them. A
//! key's bytes never appear in an error.

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// All certificates in a PEM string, in order.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut rd = pem.as_bytes();
    let certs = rustls_pemfile::certs(&mut rd)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("{what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Certificate(format!("{what} contains no CERTIFICATE block")));
    }
    Ok(certs)
}

/// The one certificate in a PEM string, as DER; refuses none or several.
pub fn single_cert_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    let mut certs = certs_from_pem(pem, what)?;
    if certs.len() != 1 {
        return Err(Error::Certificate(format!("{what} holds {} certificates, expected exactly one", certs.len())));
    }
    Ok(certs.remove(0).to_vec())
}

pub(super) fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    let mut rd = pem.as_bytes();
    // Never echo the key material in an error.
    match rustls_pemfile::private_key(&mut rd) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(Error::InvalidKey("the key file contains no PRIVATE KEY block".into())),
        Err(_) => Err(Error::InvalidKey("the key file is not valid PEM".into())),
    }
}

/// Every `X509 CRL` block of every PEM string, in order.
pub fn crls_from_pems(crl_pems: &[String]) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let mut all = Vec::new();
    for (i, pem) in crl_pems.iter().enumerate() {
        let mut rd = pem.as_bytes();
        let crls = rustls_pemfile::crls(&mut rd)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(format!("revocation list #{} is not valid PEM: {e}", i + 1)))?;
        if crls.is_empty() {
            return Err(Error::Certificate(format!("revocation list #{} contains no X509 CRL block", i + 1)));
        }
        all.extend(crls);
    }
    Ok(all)
}
