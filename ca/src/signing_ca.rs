//! The CA certificate and key as a signer: checked to belong together before anything is
//! signed with them.

use protocol::pki::single_cert_der;
use protocol::{Error, Result};
use rcgen::{Issuer, KeyPair, PublicKeyData};
use time::OffsetDateTime;

/// The CA certificate and key, checked to belong together, ready to sign.
pub(crate) struct SigningCa {
    /// The CA's name, key identifier and key usages, with its key.
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's notAfter: nothing it signs may outlive it.
    pub(crate) not_after: OffsetDateTime,
}

impl SigningCa {
    /// Load the CA certificate and key; refuses a certificate that is not a CA and a key that
    /// is not the certificate's.
    pub(crate) fn load(ca_cert_pem: &str, ca_key_pem: &str) -> Result<SigningCa> {
        let key = KeyPair::from_pem(ca_key_pem)
            .map_err(|_| Error::Certificate("the CA key is not a valid PEM private key".into()))?;
        let ca_der = single_cert_der(ca_cert_pem, "CA certificate")?;
        let (ca_spki, not_after) = {
            let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
                .map_err(|e| Error::Certificate(format!("CA certificate does not parse: {e}")))?;
            if !ca.is_ca() {
                return Err(Error::Certificate(
                    "the CA certificate is not a CA (basicConstraints cA is not set)".into(),
                ));
            }
            (ca.public_key().raw.to_vec(), ca.validity().not_after.to_datetime())
        };
        if key.subject_public_key_info() != ca_spki {
            return Err(Error::Certificate("the CA key does not belong to the CA certificate".into()));
        }
        // rcgen signs with an `Issuer`; deriving it from the CA's own DER
        // (`Issuer::from_ca_cert_der`) keeps the issuer name and key identifier
        // byte-identical to the CA certificate.
        let issuer = Issuer::from_ca_cert_der(&ca_der.into(), key)
            .map_err(|e| Error::Certificate(format!("CA certificate is unusable: {e}")))?;
        Ok(SigningCa { issuer, not_after })
    }
}
