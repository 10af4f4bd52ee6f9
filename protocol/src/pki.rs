//! Skydd's PKI: the cloud CA, the certificates it issues, the identity (name + role) every
//! certificate carries, and the rustls configurations that enforce both on every link.
//!
//! No I/O here: PEM strings and DER bytes in, PEM strings and rustls configurations out.
//! The byte-level profile is documented in docs/PKI.md.
//!
//! # How the role is carried
//! Every end-entity certificate carries its [`Role`] twice:
//! - authoritatively, in the non-critical private extension [`ROLE_EXTENSION_OID`] whose
//!   extnValue is the DER of `SkyddRole ::= SEQUENCE { version INTEGER (1), role UTF8String }`;
//! - for humans (`openssl x509 -text`), as the subject OU.
//!
//! [`identity_from_certificate`] requires the extension, requires the OU (when present) to
//! agree with it, and takes the name from the single subject CN. Nothing is guessed from the
//! name, the SANs or the issuer.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// OID of the Skydd role extension: 1.3.6.1.4.1.4200000000.1.1.
///
/// Skydd has no IANA Private Enterprise Number yet. Arc 4200000000 under
/// 1.3.6.1.4.1 is far outside the range IANA has assigned (sequentially, ~65 000 so far);
/// register a PEN and change this constant (and docs/PKI.md) before certificates of
/// different organisations must be told apart by it. Only certificates chained to a
/// CA the verifier trusts are ever read for it, so a collision cannot forge a role.
pub const ROLE_EXTENSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 4_200_000_000, 1, 1];

/// Version number inside the role extension.
pub const ROLE_EXTENSION_VERSION: u8 = 1;

/// Longest accepted party name (subject CN, file name stem, DNS label set).
pub const MAX_NAME_LEN: usize = 64;

/// Default lifetime of an issued certificate.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// Lifetime of a generated CA certificate.
pub const CA_DAYS: u32 = 3650;

/// The four kinds of party in a Skydd cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Trusted third party: derives domain keys, checks access and attestation, keeps audit.
    Ttp,
    /// Cloud platform (controller): stores ciphertext and headers, routes requests.
    CloudPlatform,
    /// Secure component on a compute host: unseals keys in the TPM, drives dm-crypt.
    SecureComponent,
    /// Domain manager (a hospital administrator's workstation): owns domains.
    DomainManager,
}

impl Role {
    /// Every role, in the order of docs/PKI.md "Roles" (for listing the accepted values).
    pub const ALL: [Role; 4] = [Role::Ttp, Role::CloudPlatform, Role::SecureComponent, Role::DomainManager];

    /// The wire / certificate / CLI string of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ttp => "ttp",
            Role::CloudPlatform => "cloud-platform",
            Role::SecureComponent => "secure-component",
            Role::DomainManager => "domain-manager",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            Error::Certificate(format!(
                "unknown role {s:?}: expected one of ttp, cloud-platform, secure-component, domain-manager"
            ))
        })
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who is at the other end of a verified connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The subject CN of the peer certificate.
    pub name: String,
    /// The role from the certificate's Skydd role extension (docs/PKI.md "How the role is
    /// carried"); each endpoint accepts only its listed roles.
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

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

/// How long an issued certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From five minutes ago (clock skew between hosts) for this many days.
    Days(u32),
    /// Exactly this window (tests use it to make expired or not-yet-valid certificates).
    Between {
        /// Start of validity.
        not_before: OffsetDateTime,
        /// End of validity (notAfter).
        not_after: OffsetDateTime,
    },
}

impl Validity {
    fn window(self) -> Result<(OffsetDateTime, OffsetDateTime)> {
        let (nb, na) = match self {
            Validity::Days(0) => return Err(Error::Certificate("validity of 0 days: must be at least 1".into())),
            Validity::Days(d) => {
                let now = OffsetDateTime::now_utc();
                (now - Duration::minutes(5), now + Duration::days(i64::from(d)))
            }
            Validity::Between { not_before, not_after } => (not_before, not_after),
        };
        if na <= nb {
            return Err(Error::Certificate(format!(
                "validity ends ({}) before it starts ({})",
                rfc3339(na),
                rfc3339(nb)
            )));
        }
        Ok((nb, na))
    }
}

/// The cloud certificate authority.
pub struct CertificateAuthority;

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
        check_name(name)?;
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

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Certificate(format!("generating the key failed: {e}")))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| Error::Certificate(format!("signing the certificate failed: {e}")))?;
        Ok(IssuedIdentity { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }
}

/// The CA certificate and key, checked to belong together, ready to sign.
struct SigningCa {
    /// The CA's name, key identifier and key usages, with its key.
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl SigningCa {
    fn load(ca_cert_pem: &str, ca_key_pem: &str) -> Result<SigningCa> {
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

// ---- certificate revocation (docs/PKI.md, "Revocation") -----------------------------------

/// How long a signed revocation list is valid (its nextUpdate) unless told otherwise.
/// Verifiers refuse every certificate of the CA once their list is past it, so a stale list
/// cannot silently stop revoking: the CA re-signs (`cloud-platform ca crl`) well before.
pub const DEFAULT_CRL_DAYS: u32 = 30;

/// Why a certificate was revoked: the RFC 5280 §5.3.1 reasons that fit a Skydd party.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    /// No reason given; the CRLReason extension is left out of the entry, as RFC 5280 asks.
    Unspecified,
    /// The party's private key is (suspected to be) known to someone else.
    KeyCompromise,
    /// The party left the organisation or changed its role.
    AffiliationChanged,
    /// A new certificate replaces this one.
    Superseded,
    /// The party (a host, a VM, a manager) is decommissioned.
    CessationOfOperation,
}

impl RevocationReason {
    /// Every reason Skydd writes, in the order `ca revoke --reason` lists them.
    pub const ALL: [RevocationReason; 5] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
    ];

    /// The command-line and display form, e.g. `key-compromise`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
        }
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        }
    }

    /// The reason for a CRLReason code (RFC 5280 §5.3.1), if it is one Skydd writes.
    fn from_code(code: u8) -> Option<RevocationReason> {
        RevocationReason::ALL.into_iter().find(|r| r.to_rcgen() as u8 == code)
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RevocationReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RevocationReason::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let all = RevocationReason::ALL.map(|r| r.as_str()).join(", ");
            Error::Certificate(format!("unknown revocation reason {s:?}: use one of {all}"))
        })
    }
}

/// One certificate on a revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCertificate {
    /// The certificate's serial number in lower-case hex (`openssl x509 -serial` prints it in
    /// upper case).
    pub serial_hex: String,
    /// The subject CN, when known (not stored in the CRL; shown by the CA tools).
    pub name: Option<String>,
    /// When the CA revoked it (revocationDate, UTC).
    pub revoked_at: OffsetDateTime,
    /// The CRLReason; `None` for `unspecified` (the extension is left out) or a code Skydd does
    /// not write.
    pub reason: Option<RevocationReason>,
}

/// What a revocation list signed by the CA says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// Increases with every list the CA signs (RFC 5280 §5.2.3).
    pub crl_number: u64,
    /// thisUpdate: when the list was signed (5 minutes back-dated for clock skew).
    pub this_update: OffsetDateTime,
    /// nextUpdate: after this every certificate of the CA is refused until a newer list is
    /// published (`cloud-platform ca crl`).
    pub next_update: Option<OffsetDateTime>,
    /// The revoked certificates, in the order they were revoked.
    pub revoked: Vec<RevokedCertificate>,
}

impl RevocationList {
    /// The entry for `serial_hex`, if that certificate is revoked.
    pub fn find(&self, serial_hex: &str) -> Option<&RevokedCertificate> {
        self.revoked.iter().find(|r| r.serial_hex.eq_ignore_ascii_case(serial_hex))
    }
}

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
                reason_code: entry.reason.map(RevocationReason::to_rcgen),
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

/// Reads a revocation list and checks that the CA in `ca_cert_pem` signed it.
pub fn read_revocation_list(ca_cert_pem: &str, crl_pem: &str) -> Result<RevocationList> {
    let ders = crls_from_pems(&[crl_pem.to_string()])?;
    let [der] = ders.as_slice() else {
        return Err(Error::Certificate(format!(
            "the revocation list file holds {} lists, expected exactly one",
            ders.len()
        )));
    };
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| Error::Certificate(format!("revocation list does not parse: {e}")))?;
    let ca_der = single_cert_der(ca_cert_pem, "CA certificate")?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| Error::Certificate(format!("CA certificate does not parse: {e}")))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(Error::Certificate(format!(
            "the revocation list is issued by \"{}\", not by this CA (\"{}\")",
            crl.issuer(),
            ca.subject()
        )));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| {
        Error::Certificate(format!("the revocation list's signature does not verify with the CA's key: {e}"))
    })?;
    let crl_number = match crl.crl_number() {
        Some(n) => match n.to_u64_digits().as_slice() {
            [] => 0,
            [n] => *n,
            _ => return Err(Error::Certificate("the revocation list's number exceeds 64 bits".into())),
        },
        None => return Err(Error::Certificate("the revocation list has no CRL number".into())),
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedCertificate {
            serial_hex: hex::encode(r.raw_serial()),
            name: None,
            revoked_at: r.revocation_date.to_datetime(),
            reason: r.reason_code().and_then(|(_, code)| RevocationReason::from_code(code.0)),
        })
        .collect();
    Ok(RevocationList {
        crl_number,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        revoked,
    })
}

/// Every `X509 CRL` block of every PEM string, in order.
pub fn crls_from_pems(crl_pems: &[String]) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>> {
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

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

fn dns_san(name: &str) -> Result<SanType> {
    rcgen::string::Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|_| Error::Certificate(format!("{name:?} is not a valid DNS name")))
}

/// A party name: 1..=64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
/// The name becomes the subject CN, a DNS SAN and a file name, so nothing else is allowed.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Certificate("name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::Certificate(format!(
            "name {name:?} is {} characters, more than {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::Certificate(format!(
            "name {name:?} contains {c:?}: only letters, digits, '.', '_' and '-' are allowed"
        )));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(Error::Certificate(format!("name {name:?} must not start with '.' or '-'")));
    }
    Ok(())
}

fn check_ca_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(Error::Certificate(format!("CA name {name:?} must be 1..=128 printable characters")));
    }
    Ok(())
}

fn check_dns_name(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Certificate(format!("SAN {s:?} is neither an IP address nor a valid DNS name")))
    }
}

// ---- role extension encoding -------------------------------------------------------------

/// DER of `SEQUENCE { INTEGER version, UTF8String role }`.
pub fn encode_role_extension(role: Role) -> Vec<u8> {
    let r = role.as_str().as_bytes();
    let mut inner = vec![0x02, 0x01, ROLE_EXTENSION_VERSION, 0x0c, r.len() as u8];
    inner.extend_from_slice(r);
    let mut out = vec![0x30, inner.len() as u8];
    out.extend_from_slice(&inner);
    out
}

/// Strict inverse of [`encode_role_extension`]: exactly that shape, no trailing bytes.
pub fn decode_role_extension(der: &[u8]) -> Result<Role> {
    let bad = |why: &str| Error::Certificate(format!("Skydd role extension is malformed: {why}"));
    let [0x30, len, rest @ ..] = der else {
        return Err(bad("not a DER SEQUENCE"));
    };
    if *len as usize != rest.len() || *len >= 0x80 {
        return Err(bad("SEQUENCE length does not match"));
    }
    let [0x02, 0x01, version, 0x0c, slen, role @ ..] = rest else {
        return Err(bad("expected SEQUENCE { INTEGER, UTF8String }"));
    };
    if *version != ROLE_EXTENSION_VERSION {
        return Err(bad(&format!("version {version}, this build reads version {ROLE_EXTENSION_VERSION}")));
    }
    if *slen as usize != role.len() {
        return Err(bad("UTF8String length does not match"));
    }
    let s = std::str::from_utf8(role).map_err(|_| bad("role is not UTF-8"))?;
    s.parse()
}

// ---- identity -----------------------------------------------------------------------------

/// Read the Skydd identity (subject CN + role extension) out of a DER certificate.
/// This does not verify the certificate: the rustls verifiers below do that first.
pub fn identity_from_certificate(der: &[u8]) -> Result<Identity> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Certificate(format!("certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Certificate(format!("certificate is followed by {} stray bytes", rest.len())));
    }
    let subject = cert.subject();
    let mut cns = subject.iter_common_name();
    let name = match (cns.next(), cns.next()) {
        (Some(cn), None) => {
            cn.as_str().map_err(|_| Error::Certificate("subject CN is not a string".into()))?.to_string()
        }
        (None, _) => return Err(Error::Certificate(format!("certificate subject {subject} has no CN"))),
        (Some(_), Some(_)) => {
            return Err(Error::Certificate(format!("certificate subject {subject} has more than one CN")))
        }
    };
    check_name(&name).map_err(|e| Error::Certificate(format!("certificate subject CN is not a Skydd name: {e}")))?;

    let oid = x509_parser::der_parser::oid::Oid::from(ROLE_EXTENSION_OID)
        .map_err(|_| Error::Certificate("role extension OID is not encodable".into()))?;
    let mut role = None;
    for ext in cert.extensions() {
        if ext.oid == oid {
            if role.is_some() {
                return Err(Error::Certificate(format!(
                    "certificate of {name:?} carries the Skydd role extension twice"
                )));
            }
            role = Some(decode_role_extension(ext.value)?);
        }
    }
    let role = role.ok_or_else(|| {
        Error::Certificate(format!(
            "certificate of {name:?} carries no Skydd role extension ({}): it was not issued by `cloud-platform ca issue`",
            oid_string()
        ))
    })?;
    for ou in subject.iter_organizational_unit() {
        let ou = ou.as_str().unwrap_or("<not a string>");
        if ou != role.as_str() {
            return Err(Error::Certificate(format!(
                "certificate of {name:?} says role {role} in its extension but OU {ou:?} in its subject"
            )));
        }
    }
    Ok(Identity { name, role })
}

fn oid_string() -> String {
    ROLE_EXTENSION_OID.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(".")
}

// ---- PEM helpers --------------------------------------------------------------------------

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

fn single_cert_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    let mut certs = certs_from_pem(pem, what)?;
    if certs.len() != 1 {
        return Err(Error::Certificate(format!("{what} holds {} certificates, expected exactly one", certs.len())));
    }
    Ok(certs.remove(0).to_vec())
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    let mut rd = pem.as_bytes();
    // Never echo the key material in an error.
    match rustls_pemfile::private_key(&mut rd) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(Error::InvalidKey("the key file contains no PRIVATE KEY block".into())),
        Err(_) => Err(Error::InvalidKey("the key file is not valid PEM".into())),
    }
}

fn root_store(trusted_ca_pems: &[String]) -> Result<Arc<RootCertStore>> {
    if trusted_ca_pems.is_empty() {
        return Err(Error::Certificate("no trusted CA certificate configured".into()));
    }
    let mut store = RootCertStore::empty();
    for (i, pem) in trusted_ca_pems.iter().enumerate() {
        for der in certs_from_pem(pem, &format!("trusted CA #{}", i + 1))? {
            store
                .add(der)
                .map_err(|e| Error::Certificate(format!("trusted CA #{} is not usable as a root: {e}", i + 1)))?;
        }
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn own_chain(cert_pem: &str) -> Result<(Vec<CertificateDer<'static>>, Identity)> {
    let chain = certs_from_pem(cert_pem, "own certificate")?;
    let identity = identity_from_certificate(&chain[0])?;
    Ok((chain, identity))
}

// ---- rustls configurations ----------------------------------------------------------------

/// Server side of a Skydd link: TLS 1.3 only, client certificate required, chained to one of
/// `trusted_ca_pems` (several for federated clouds), not revoked by `crl_pems` (see
/// [`crls_from_pems`]), with a role in `allowed_client_roles`.
pub fn server_config(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
    cert_pem: &str,
    key_pem: &str,
    allowed_client_roles: &[Role],
) -> Result<rustls::ServerConfig> {
    if allowed_client_roles.is_empty() {
        return Err(Error::Certificate("no client role is allowed: the list is empty".into()));
    }
    let inner = client_cert_verifier(trusted_ca_pems, crl_pems)?;
    let verifier = RoleClientVerifier { inner, allowed: allowed_client_roles.to_vec() };
    let (chain, _) = own_chain(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Certificate(format!("TLS 1.3 is not available: {e}")))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| {
            Error::InvalidKey(format!("own certificate and key do not fit together: {}", describe_tls_error(&e)))
        })
}

/// Client side of a Skydd link: TLS 1.3 only, presents our certificate, requires the server
/// certificate to chain to `trusted_ca_pems`, not be revoked by `crl_pems`, match the host
/// name, and carry `expected_server_role`.
pub fn client_config(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
    cert_pem: &str,
    key_pem: &str,
    expected_server_role: Role,
) -> Result<rustls::ClientConfig> {
    let verifier = role_server_verifier(trusted_ca_pems, crl_pems, expected_server_role)?;
    let (chain, _) = own_chain(cert_pem)?;
    let key = key_from_pem(key_pem)?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Certificate(format!("TLS 1.3 is not available: {e}")))?
        .dangerous() // a custom verifier: WebPKI plus the role check, nothing weaker
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            Error::InvalidKey(format!("own certificate and key do not fit together: {}", describe_tls_error(&e)))
        })
}

/// A client configuration that presents no certificate (tests of the refusal; tools that only
/// probe). Skydd servers refuse it.
pub fn client_config_without_certificate(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
    expected_server_role: Role,
) -> Result<rustls::ClientConfig> {
    let verifier = role_server_verifier(trusted_ca_pems, crl_pems, expected_server_role)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Certificate(format!("TLS 1.3 is not available: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// WebPKI verification of a client's (or a signer's) certificate: chained to one of
/// `trusted_ca_pems`; when `crl_pems` holds lists, the end entity must not be on one, a
/// certificate of a CA without a list is refused, and so is everything once a list is past
/// its next update. The role is checked by the callers.
pub(crate) fn client_cert_verifier(
    trusted_ca_pems: &[String],
    crl_pems: &[String],
) -> Result<Arc<dyn ClientCertVerifier>> {
    let roots = root_store(trusted_ca_pems)?;
    let crls = crls_from_pems(crl_pems)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    builder.build().map_err(|e| Error::Certificate(format!("building the certificate verifier failed: {e}")))
}

fn role_server_verifier(
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

/// WebPKI client verification, then the role check.
#[derive(Debug)]
struct RoleClientVerifier {
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
}

/// WebPKI server verification (chain + host name), then the role check.
#[derive(Debug)]
struct RoleServerVerifier {
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
}

// ---- human-readable TLS errors ------------------------------------------------------------

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn unix_rfc3339(t: UnixTime) -> String {
    match OffsetDateTime::from_unix_timestamp(t.as_secs() as i64) {
        Ok(t) => rfc3339(t),
        Err(_) => format!("{} (UNIX)", t.as_secs()),
    }
}

/// Say in words which rule a rustls error stands for. Used by both ends: a local verifier
/// failure names the certificate problem; a received alert says what the peer refused.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => "no client certificate presented".into(),
        E::InvalidCertificate(c) => describe_certificate_error(c),
        E::InvalidCertRevocationList(c) => {
            format!("the configured revocation list is unusable ({c:?}): it must be a CRL signed by a trusted CA")
        }
        E::AlertReceived(a) => describe_alert(*a),
        E::PeerIncompatible(p) => {
            format!("peer is incompatible (Skydd speaks TLS 1.3 only): {p:?}")
        }
        other => other.to_string(),
    }
}

fn describe_certificate_error(c: &CertificateError) -> String {
    match c {
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::ExpiredContext { time, not_after } => {
            format!("certificate expired at {} (checked at {})", unix_rfc3339(*not_after), unix_rfc3339(*time))
        }
        CertificateError::NotValidYet => "certificate is not valid yet".into(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "certificate is not valid before {} (checked at {})",
            unix_rfc3339(*not_before),
            unix_rfc3339(*time)
        ),
        CertificateError::UnknownIssuer => "certificate is not issued by a trusted CA".into(),
        CertificateError::Revoked => "certificate is revoked (listed in its CA's certificate revocation list)".into(),
        CertificateError::UnknownRevocationStatus => {
            "revocation status unknown: no revocation list of the certificate's CA is configured".into()
        }
        CertificateError::ExpiredRevocationList | CertificateError::ExpiredRevocationListContext { .. } => format!(
            "the configured revocation list is past its next update ({c}): the CA must publish \
             a fresh one (`cloud-platform ca crl`)"
        ),
        CertificateError::BadSignature => "certificate signature does not verify".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("certificate is not allowed for this purpose (extended key usage): {c}")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("certificate is not valid for the server name: {c}")
        }
        CertificateError::Other(o) => o.to_string(),
        other => format!("certificate refused: {other}"),
    }
}

fn describe_alert(a: AlertDescription) -> String {
    let what = match a {
        AlertDescription::CertificateRequired => "the peer requires a client certificate and none was presented",
        AlertDescription::CertificateExpired => "the peer refused our certificate: it is expired or not yet valid",
        AlertDescription::UnknownCA => "the peer refused our certificate: it is not issued by a CA the peer trusts",
        AlertDescription::CertificateUnknown => {
            "the peer refused our certificate: its role is not accepted there, or it is not a Skydd identity"
        }
        AlertDescription::BadCertificate => "the peer refused our certificate as malformed",
        AlertDescription::AccessDenied => "the peer denied access to our certificate",
        AlertDescription::CertificateRevoked => "the peer refused our certificate: it is revoked",
        AlertDescription::UnsupportedCertificate => {
            "the peer refused our certificate: wrong key usage or extended key usage"
        }
        AlertDescription::ProtocolVersion => "the peer does not speak TLS 1.3",
        AlertDescription::HandshakeFailure => "the TLS handshake failed at the peer",
        _ => "the peer aborted the TLS handshake",
    };
    format!("{what} (TLS alert {a:?})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, Zeroizing<String>) {
        CertificateAuthority::generate("Test Cloud CA").unwrap()
    }

    #[test]
    fn role_strings_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            assert_eq!(decode_role_extension(&encode_role_extension(r)).unwrap(), r);
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&j).unwrap(), r);
        }
        let e = "admin".parse::<Role>().unwrap_err().to_string();
        assert!(e.contains("unknown role \"admin\""), "{e}");
    }

    #[test]
    fn role_extension_is_strict() {
        let good = encode_role_extension(Role::Ttp);
        assert_eq!(good, b"\x30\x08\x02\x01\x01\x0c\x03ttp");
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_role_extension(&trailing).is_err());
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(decode_role_extension(&v2).unwrap_err().to_string().contains("version 2"));
        let unknown = b"\x30\x0a\x02\x01\x01\x0c\x05admin";
        assert!(decode_role_extension(unknown).unwrap_err().to_string().contains("unknown role"));
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

    #[test]
    fn certificate_without_role_is_not_an_identity() {
        let (ca_pem, _) = ca();
        let der = certs_from_pem(&ca_pem, "ca").unwrap().remove(0);
        let e = identity_from_certificate(&der).unwrap_err().to_string();
        assert!(e.contains("no CN") || e.contains("not a Skydd name") || e.contains("no Skydd role"), "{e}");
        // A plain rcgen certificate with a good CN but no extension.
        let mut p = CertificateParams::new(vec!["plain".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "plain");
        let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let c = p.self_signed(&k).unwrap();
        let e = identity_from_certificate(c.der()).unwrap_err().to_string();
        assert!(e.contains("carries no Skydd role extension (1.3.6.1.4.1.4200000000.1.1)"), "{e}");
        // OU disagreeing with the extension.
        let mut p = CertificateParams::new(vec!["mixed".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "mixed");
        p.distinguished_name.push(DnType::OrganizationalUnitName, "ttp");
        p.custom_extensions
            .push(CustomExtension::from_oid_content(ROLE_EXTENSION_OID, encode_role_extension(Role::DomainManager)));
        let c = p.self_signed(&k).unwrap();
        let e = identity_from_certificate(c.der()).unwrap_err().to_string();
        assert!(e.contains("role domain-manager in its extension but OU \"ttp\""), "{e}");
    }

    #[test]
    fn configs_build_and_refuse_bad_input() {
        let (ca_pem, ca_key) = ca();
        let id = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "ttp", Validity::Days(5)).unwrap();
        let cas = vec![ca_pem.clone()];
        server_config(&cas, &[], &id.cert_pem, &id.key_pem, &[Role::SecureComponent]).unwrap();
        client_config(&cas, &[], &id.cert_pem, &id.key_pem, Role::CloudPlatform).unwrap();
        let e = server_config(&cas, &[], &id.cert_pem, &id.key_pem, &[]).unwrap_err();
        assert!(e.to_string().contains("no client role is allowed"));
        let e = server_config(&[], &[], &id.cert_pem, &id.key_pem, &[Role::Ttp]).unwrap_err();
        assert!(e.to_string().contains("no trusted CA"));
        let other = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "ttp", Validity::Days(5)).unwrap();
        let e = server_config(&cas, &[], &id.cert_pem, &other.key_pem, &[Role::Ttp]).unwrap_err();
        assert!(e.to_string().contains("do not fit together"), "{e}");
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
        assert!("stolen".parse::<RevocationReason>().unwrap_err().to_string().contains("key-compromise"));
    }

    #[test]
    fn a_revoked_signer_is_refused_and_an_unlisted_one_accepted() {
        let (ca_pem, ca_key) = ca();
        let alice =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "alice", Validity::Days(60)).unwrap();
        let bob =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "bob", Validity::Days(60)).unwrap();
        let entry =
            CertificateAuthority::revocation_entry(&ca_pem, &alice.cert_pem, RevocationReason::AffiliationChanged)
                .unwrap();
        let crl = CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 2, &[entry], 30).unwrap();
        let cas = vec![ca_pem.clone()];
        let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
        let der = |pem: &str| single_cert_der(pem, "signer").unwrap();
        let e = crate::signing::verify_signer_certificate(&der(&alice.cert_pem), &cas, std::slice::from_ref(&crl), now)
            .unwrap_err();
        assert!(e.to_string().contains("certificate is revoked"), "{e}");
        let bob_id =
            crate::signing::verify_signer_certificate(&der(&bob.cert_pem), &cas, std::slice::from_ref(&crl), now)
                .unwrap();
        assert_eq!(bob_id.name, "bob");
        // Without the list, alice still verifies: the list is what revokes.
        crate::signing::verify_signer_certificate(&der(&alice.cert_pem), &cas, &[], now).unwrap();
        // A list past its next update revokes everything: it can no longer be trusted to be complete.
        let later = now + 31 * 86_400;
        let e = crate::signing::verify_signer_certificate(&der(&bob.cert_pem), &cas, &[crl], later).unwrap_err();
        assert!(e.to_string().contains("past its next update"), "{e}");
    }
}
