//! Issuing: the self-signed CA certificate and the end-entity certificates of the parties,
//! in the profile of docs/PKI.md "Certificates".

use std::fmt;
use std::net::IpAddr;

use protocol::pki::{
    check_ca_name, check_dns_name, check_name, encode_affiliation_extension, encode_role_extension, rfc3339,
    Affiliation, Role, AFFILIATION_EXTENSION_OID, ROLE_EXTENSION_OID,
};
use protocol::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::signing_ca::SigningCa;
use crate::validity::{Validity, CA_DAYS};
use crate::CertificateAuthority;

/// A certificate and its private key, both PEM. The key is wiped from memory on drop and is
/// never printed by `Debug`.
pub struct IssuedIdentity {
    /// The certificate, PEM; public, handed to the party and its peers.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM; written with mode 0600 and never logged.
    pub key_pem: Zeroizing<String>,
}

impl fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedIdentity").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

impl CertificateAuthority {
    /// Generate a new self-signed CA (ECDSA P-256, valid [`CA_DAYS`] days, path length 0:
    /// it issues end-entity certificates only). Returns `(ca_cert_pem, ca_key_pem)`.
    pub fn generate(name: &str) -> Result<(String, Zeroizing<String>)> {
        check_ca_name(name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "Skydd");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(i64::from(CA_DAYS));
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Certificate(format!("generating the CA key failed: {e}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Certificate(format!("self-signing the CA certificate failed: {e}")))?;
        Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
    }

    /// Issue an end-entity certificate for `name` with `role`, signed by the CA.
    /// SANs: DNS `name`, DNS `localhost`, IP 127.0.0.1.
    pub fn issue(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        role: Role,
        name: &str,
        validity: Validity,
    ) -> Result<IssuedIdentity> {
        Self::issue_with_sans(ca_cert_pem, ca_key_pem, role, name, validity, &[])
    }

    /// As [`issue`](Self::issue), plus `extra_sans`: each an IP address or a DNS name.
    pub fn issue_with_sans(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        role: Role,
        name: &str,
        validity: Validity,
        extra_sans: &[String],
    ) -> Result<IssuedIdentity> {
        Self::issue_affiliated(ca_cert_pem, ca_key_pem, role, name, validity, extra_sans, None)
    }

    /// As [`issue_with_sans`](Self::issue_with_sans), for a domain manager acting for an
    /// organisation in a role there: `affiliation` is written in the Skydd affiliation
    /// extension (docs/PKI.md "Affiliation"), which access policies read. Only a
    /// domain-manager certificate may carry one.
    pub fn issue_affiliated(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        role: Role,
        name: &str,
        validity: Validity,
        extra_sans: &[String],
        affiliation: Option<&Affiliation>,
    ) -> Result<IssuedIdentity> {
        check_name(name)?;
        if affiliation.is_some() && role != Role::DomainManager {
            return Err(Error::Certificate(format!(
                "only a domain-manager certificate carries an organisation and role, not a {role} certificate"
            )));
        }
        let (not_before, not_after) = validity.window()?;

        let SigningCa { issuer, not_after: ca_not_after } = SigningCa::load(ca_cert_pem, ca_key_pem)?;
        if not_after > ca_not_after {
            return Err(Error::Certificate(format!(
                "requested validity ends {} but the CA certificate expires {}: issue a shorter certificate",
                rfc3339(not_after),
                rfc3339(ca_not_after)
            )));
        }

        let mut sans = vec![dns_san(name)?, dns_san("localhost")?, SanType::IpAddress(IpAddr::from([127, 0, 0, 1]))];
        for extra in extra_sans {
            let san = match extra.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    check_dns_name(extra)?;
                    dns_san(extra)?
                }
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }

        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
        params.distinguished_name.push(DnType::OrganizationName, "Skydd");
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(ROLE_EXTENSION_OID, encode_role_extension(role)));
        if let Some(affiliation) = affiliation {
            params.custom_extensions.push(CustomExtension::from_oid_content(
                AFFILIATION_EXTENSION_OID,
                encode_affiliation_extension(affiliation),
            ));
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Certificate(format!("generating the key failed: {e}")))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| Error::Certificate(format!("signing the certificate failed: {e}")))?;
        Ok(IssuedIdentity { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

/// A fresh random serial number: 16 bytes, positive, with no leading zero byte.
pub(crate) fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

/// `name` as a DNS SAN (IA5String).
fn dns_san(name: &str) -> Result<SanType> {
    rcgen::string::Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|_| Error::Certificate(format!("{name:?} is not a valid DNS name")))
}

#[cfg(test)]
mod tests {
    use protocol::pki::{certs_from_pem, identity_from_certificate, Identity};

    use super::*;

    fn ca() -> (String, Zeroizing<String>) {
        CertificateAuthority::generate("Test Cloud CA").unwrap()
    }

    #[test]
    fn issue_and_parse_identity_for_every_role() {
        let (ca_pem, ca_key) = ca();
        for role in Role::ALL {
            let id = CertificateAuthority::issue(&ca_pem, &ca_key, role, "party-1", Validity::Days(30)).unwrap();
            let der = certs_from_pem(&id.cert_pem, "cert").unwrap().remove(0);
            let got = identity_from_certificate(&der).unwrap();
            assert_eq!(got, Identity { name: "party-1".into(), role });
            assert!(id.key_pem.contains("PRIVATE KEY"));
            assert!(!format!("{id:?}").contains("PRIVATE KEY"));
        }
    }

    #[test]
    fn issued_certificate_profile() {
        let (ca_pem, ca_key) = ca();
        let id = CertificateAuthority::issue_with_sans(
            &ca_pem,
            &ca_key,
            Role::SecureComponent,
            "host-7",
            Validity::Days(10),
            &["10.0.0.7".into(), "host-7.cloud.example".into()],
        )
        .unwrap();
        let der = certs_from_pem(&id.cert_pem, "cert").unwrap().remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!c.is_ca());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|g| g.to_string()).collect();
        for want in [
            "DNSName(host-7)",
            "DNSName(localhost)",
            "IPAddress(7f:00:00:01)",
            "IPAddress(0a:00:00:07)",
            "DNSName(host-7.cloud.example)",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let ext = c.extensions().iter().find(|e| e.oid.to_id_string() == "1.3.6.1.4.1.4200000000.1.1").unwrap();
        assert!(!ext.critical);
        assert_eq!(ext.value, encode_role_extension(Role::SecureComponent));
        let ou: Vec<_> = c.subject().iter_organizational_unit().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(ou, ["secure-component"]);
        // Days: not_after - not_before ~ 10 days + 5 min skew.
        let span = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
        assert_eq!(span, 10 * 86400 + 300);
    }

    #[test]
    fn chain_verifies_with_openssl() {
        use openssl::stack::Stack;
        use openssl::x509::store::X509StoreBuilder;
        use openssl::x509::{X509StoreContext, X509};
        let (ca_pem, ca_key) = ca();
        let id = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "ttp-a", Validity::Days(5)).unwrap();
        let ca = X509::from_pem(ca_pem.as_bytes()).unwrap();
        let leaf = X509::from_pem(id.cert_pem.as_bytes()).unwrap();
        let mut b = X509StoreBuilder::new().unwrap();
        b.add_cert(ca).unwrap();
        let store = b.build();
        let mut ctx = X509StoreContext::new().unwrap();
        let ok = ctx
            .init(&store, &leaf, &Stack::new().unwrap(), |c| {
                let r = c.verify_cert();
                Ok((r, c.error()))
            })
            .unwrap();
        assert!(ok.0.unwrap(), "openssl: {}", ok.1);
    }

    #[test]
    fn refusals_name_the_problem() {
        let (ca_pem, ca_key) = ca();
        let (other_ca, other_key) = ca();
        let e = CertificateAuthority::issue(&ca_pem, &other_key, Role::Ttp, "x", Validity::Days(1)).unwrap_err();
        assert!(e.to_string().contains("does not belong to the CA certificate"), "{e}");
        let _ = other_ca;
        let e = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "bad name", Validity::Days(1)).unwrap_err();
        assert!(e.to_string().contains("contains ' '"), "{e}");
        let e = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "x", Validity::Days(0)).unwrap_err();
        assert!(e.to_string().contains("0 days"), "{e}");
        let e =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "x", Validity::Days(CA_DAYS + 10)).unwrap_err();
        assert!(e.to_string().contains("CA certificate expires"), "{e}");
        let e = CertificateAuthority::issue("junk", &ca_key, Role::Ttp, "x", Validity::Days(1)).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let e = CertificateAuthority::issue(&ca_pem, "junk", Role::Ttp, "x", Validity::Days(1)).unwrap_err();
        assert!(!e.to_string().contains("junk"));
        let e =
            CertificateAuthority::issue_with_sans(&ca_pem, &ca_key, Role::Ttp, "x", Validity::Days(1), &["a b".into()])
                .unwrap_err();
        assert!(e.to_string().contains("neither an IP address nor a valid DNS name"), "{e}");
    }
}
