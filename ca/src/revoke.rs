//! Revoking: the entry that revokes one certificate and the revocation list the CA signs
//! (docs/PKI.md "Revocation"). Reading a list back is `protocol::pki::read_revocation_list`.

use protocol::pki::{client_cert_verifier, describe_tls_error, single_cert_der, RevocationReason, RevokedCertificate};
use protocol::{Error, Result};
use rcgen::SerialNumber;
use rustls::pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::signing_ca::SigningCa;
use crate::CertificateAuthority;

/// How long a signed revocation list is valid (its nextUpdate) unless told otherwise.
/// Verifiers refuse every certificate of the CA once their list is past it, so a stale list
/// cannot silently stop revoking: the CA re-signs (`cloud-platform ca crl`) well before.
pub const DEFAULT_CRL_DAYS: u32 = 30;

impl CertificateAuthority {
    /// The entry that revokes `cert_pem` now. Refuses a certificate this CA did not issue
    /// (its signature must verify with the CA's key; an expired certificate can be revoked).
    pub fn revocation_entry(ca_cert_pem: &str, cert_pem: &str, reason: RevocationReason) -> Result<RevokedCertificate> {
        let der = single_cert_der(cert_pem, "certificate to revoke")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Error::Certificate(format!("certificate to revoke does not parse: {e}")))?;
        if cert.is_ca() {
            return Err(Error::Certificate(
                "the certificate to revoke is a CA certificate: Skydd lists end-entity certificates only".into(),
            ));
        }
        // Verify at the start of its validity, so that an expired certificate is still
        // recognised as ours.
        let issued_at = cert.validity().not_before.timestamp().max(0) as u64 + 1;
        client_cert_verifier(&[ca_cert_pem.to_string()], &[])?
            .verify_client_cert(
                &CertificateDer::from(der.as_slice()),
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(issued_at)),
            )
            .map_err(|e| {
                Error::Certificate(format!(
                    "the certificate to revoke was not issued by this CA: {}",
                    describe_tls_error(&e)
                ))
            })?;
        let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        Ok(RevokedCertificate {
            serial_hex: hex::encode(cert.raw_serial()),
            name,
            revoked_at: OffsetDateTime::now_utc(),
            reason: Some(reason),
        })
    }

    /// Signs revocation list number `crl_number` listing `revoked`, valid from now for
    /// `valid_days`. Returns it as PEM (`-----BEGIN X509 CRL-----`).
    pub fn sign_revocation_list(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        crl_number: u64,
        revoked: &[RevokedCertificate],
        valid_days: u32,
    ) -> Result<String> {
        if valid_days == 0 {
            return Err(Error::Certificate("a revocation list must be valid for at least one day".into()));
        }
        let ca = SigningCa::load(ca_cert_pem, ca_key_pem)?;
        let now = OffsetDateTime::now_utc();
        let mut entries = Vec::with_capacity(revoked.len());
        for entry in revoked {
            let serial = hex::decode(&entry.serial_hex)
                .map_err(|_| Error::Certificate(format!("serial {:?} is not hex", entry.serial_hex)))?;
            entries.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: entry.revoked_at,
                reason_code: entry.reason.map(rcgen_reason),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(i64::from(valid_days)),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: entries,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&ca.issuer)
            .map_err(|e| Error::Certificate(format!("signing the revocation list failed: {e}")))?;
        crl.pem().map_err(|e| Error::Certificate(format!("encoding the revocation list failed: {e}")))
    }
}

/// rcgen's name for a reason (the same RFC 5280 §5.3.1 code).
fn rcgen_reason(reason: RevocationReason) -> rcgen::RevocationReason {
    match reason {
        RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
        RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
        RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
    }
}

#[cfg(test)]
mod tests {
    use protocol::pki::read_revocation_list;
    use zeroize::Zeroizing;

    use super::*;
    use crate::Validity;
    use protocol::pki::Role;

    fn ca() -> (String, Zeroizing<String>) {
        CertificateAuthority::generate("Test Cloud CA").unwrap()
    }

    #[test]
    fn a_revocation_list_round_trips_and_names_what_it_revokes() {
        let (ca_pem, ca_key) = ca();
        let host =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::SecureComponent, "host-1", Validity::Days(5)).unwrap();
        let entry =
            CertificateAuthority::revocation_entry(&ca_pem, &host.cert_pem, RevocationReason::KeyCompromise).unwrap();
        assert_eq!(entry.name.as_deref(), Some("host-1"));
        let der = single_cert_der(&host.cert_pem, "host").unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(entry.serial_hex, hex::encode(parsed.raw_serial()));

        let pem =
            CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 7, std::slice::from_ref(&entry), 30).unwrap();
        assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");
        let list = read_revocation_list(&ca_pem, &pem).unwrap();
        assert_eq!(list.crl_number, 7);
        assert_eq!(list.revoked.len(), 1);
        let listed = list.find(&entry.serial_hex.to_uppercase()).unwrap();
        assert_eq!(listed.reason, Some(RevocationReason::KeyCompromise));
        assert_eq!(listed.revoked_at.unix_timestamp(), entry.revoked_at.unix_timestamp());
        let next = list.next_update.unwrap() - list.this_update;
        assert!(next > Duration::days(29) && next < Duration::days(31), "{next}");
    }

    #[test]
    fn revocation_refuses_what_is_not_this_cas() {
        let (ca_pem, ca_key) = ca();
        let (other_pem, other_key) = CertificateAuthority::generate("Other CA").unwrap();
        let foreign =
            CertificateAuthority::issue(&other_pem, &other_key, Role::CloudPlatform, "cp-x", Validity::Days(5))
                .unwrap();
        let e = CertificateAuthority::revocation_entry(&ca_pem, &foreign.cert_pem, RevocationReason::Unspecified)
            .unwrap_err();
        assert!(e.to_string().contains("not issued by this CA"), "{e}");
        let e = CertificateAuthority::revocation_entry(&ca_pem, &ca_pem, RevocationReason::Unspecified).unwrap_err();
        assert!(e.to_string().contains("is a CA certificate"), "{e}");

        let foreign_list = CertificateAuthority::sign_revocation_list(&other_pem, &other_key, 1, &[], 30).unwrap();
        let e = read_revocation_list(&ca_pem, &foreign_list).unwrap_err();
        assert!(e.to_string().contains("not by this CA"), "{e}");
        let e = CertificateAuthority::sign_revocation_list(&ca_pem, &other_key, 1, &[], 30).unwrap_err();
        assert!(e.to_string().contains("does not belong to the CA certificate"), "{e}");
        let e = CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 1, &[], 0).unwrap_err();
        assert!(e.to_string().contains("at least one day"), "{e}");
        let e = read_revocation_list(&ca_pem, &ca_pem).unwrap_err();
        assert!(e.to_string().contains("no X509 CRL block"), "{e}");
    }
}
