//! Certificate revocation as verifiers see it (docs/PKI.md "Revocation"): why a certificate was
//! revoked ([`RevocationReason`]), what a list signed by the CA says ([`RevocationList`]) and
//! reading one back ([`read_revocation_list`]). Signing lists is the CA's (crate `skydd-ca`);
//! enforcing them on every link is the verifiers' (`crl_pems` of [`super::server_config`]).

use std::fmt;

use time::OffsetDateTime;

use crate::error::{Error, Result};

use super::pem::{crls_from_pems, single_cert_der};

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

    /// The CRLReason code (RFC 5280 §5.3.1) of the reason.
    pub fn code(self) -> u8 {
        match self {
            RevocationReason::Unspecified => 0,
            RevocationReason::KeyCompromise => 1,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
        }
    }

    /// The reason for a CRLReason code (RFC 5280 §5.3.1), if it is one Skydd writes.
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        RevocationReason::ALL.into_iter().find(|r| r.code() == code)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_by_name_and_code() {
        for r in RevocationReason::ALL {
            assert_eq!(r.as_str().parse::<RevocationReason>().unwrap(), r);
            assert_eq!(RevocationReason::from_code(r.code()), Some(r));
        }
        assert_eq!(RevocationReason::from_code(2), None, "cACompromise is not a Skydd reason");
        assert!("stolen".parse::<RevocationReason>().unwrap_err().to_string().contains("key-compromise"));
    }
}
