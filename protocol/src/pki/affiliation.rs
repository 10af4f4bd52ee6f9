//! The Skydd affiliation extension: the organisation a domain manager acts for and its role
//! there, as OrBAC names them (docs/PKI.md "Affiliation"). An access policy reads them from
//! the verified certificate of a grant's signer (`context.grant_signer_affiliation`,
//! docs/PROTOCOL.md "Access policy").
//!
//! extnValue is the DER of
//! `SkyddAffiliation ::= SEQUENCE { version INTEGER (1), organisation UTF8String, role UTF8String }`;
//! [`encode_affiliation_extension`] writes exactly that and [`decode_affiliation_extension`]
//! accepts nothing else. Only the CA writes it, so it is as trustworthy as the chain.

use crate::error::{Error, Result};

/// OID of the Skydd affiliation extension: 1.3.6.1.4.1.4200000000.1.2, next to the role
/// extension's (see [`ROLE_EXTENSION_OID`](super::ROLE_EXTENSION_OID) for the arc).
pub const AFFILIATION_EXTENSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 4_200_000_000, 1, 2];

/// Version number inside the affiliation extension.
pub const AFFILIATION_EXTENSION_VERSION: u8 = 1;

/// Longest organisation name, in bytes.
pub const MAX_ORGANISATION_LEN: usize = 64;

/// Longest role name, in bytes.
pub const MAX_ORGANISATION_ROLE_LEN: usize = 32;

/// Whom a domain manager acts for: an organisation (a hospital, a department) and the
/// manager's role in it (`cardiologist`, `er-lead`). Not the Skydd role of the certificate
/// (that is always domain-manager for a certificate carrying this).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Affiliation {
    /// The organisation, e.g. `Karolinska Cardiology`.
    pub organisation: String,
    /// The role in that organisation, e.g. `cardiologist`.
    pub role: String,
}

impl Affiliation {
    /// An affiliation whose names are checked: 1 to [`MAX_ORGANISATION_LEN`] (organisation)
    /// or [`MAX_ORGANISATION_ROLE_LEN`] (role) bytes of ASCII letters, digits, space and
    /// `-._'&`, not starting or ending with a space.
    pub fn new(organisation: &str, role: &str) -> Result<Self> {
        check_affiliation_name("organisation", organisation, MAX_ORGANISATION_LEN)?;
        check_affiliation_name("organisation role", role, MAX_ORGANISATION_ROLE_LEN)?;
        Ok(Self { organisation: organisation.to_string(), role: role.to_string() })
    }
}

fn check_affiliation_name(what: &str, value: &str, max: usize) -> Result<()> {
    let bad = |why: String| Error::Certificate(format!("{what} {value:?} {why}"));
    if value.is_empty() || value.len() > max {
        return Err(bad(format!("must be 1 to {max} bytes long")));
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        return Err(bad("starts or ends with a space".into()));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || " -._'&".contains(*c))) {
        return Err(bad(format!("contains {c:?}; allowed are ASCII letters, digits, space and -._'&")));
    }
    Ok(())
}

/// DER of `SEQUENCE { INTEGER version, UTF8String organisation, UTF8String role }`. The
/// name limits keep every length in DER's one-byte short form.
pub fn encode_affiliation_extension(affiliation: &Affiliation) -> Vec<u8> {
    let (org, role) = (affiliation.organisation.as_bytes(), affiliation.role.as_bytes());
    let mut inner = vec![0x02, 0x01, AFFILIATION_EXTENSION_VERSION, 0x0c, org.len() as u8];
    inner.extend_from_slice(org);
    inner.extend_from_slice(&[0x0c, role.len() as u8]);
    inner.extend_from_slice(role);
    let mut out = vec![0x30, inner.len() as u8];
    out.extend_from_slice(&inner);
    out
}

/// Strict inverse of [`encode_affiliation_extension`]: exactly that shape, names that pass
/// [`Affiliation::new`], no trailing bytes.
pub fn decode_affiliation_extension(der: &[u8]) -> Result<Affiliation> {
    let bad = |why: &str| Error::Certificate(format!("Skydd affiliation extension is malformed: {why}"));
    let [0x30, len, rest @ ..] = der else {
        return Err(bad("not a DER SEQUENCE"));
    };
    if *len as usize != rest.len() || *len >= 0x80 {
        return Err(bad("SEQUENCE length does not match"));
    }
    let [0x02, 0x01, version, 0x0c, org_len, rest @ ..] = rest else {
        return Err(bad("expected SEQUENCE { INTEGER, UTF8String, UTF8String }"));
    };
    if *version != AFFILIATION_EXTENSION_VERSION {
        return Err(bad(&format!("version {version}, this build reads version {AFFILIATION_EXTENSION_VERSION}")));
    }
    let (org, rest) = rest.split_at_checked(*org_len as usize).ok_or_else(|| bad("organisation is cut short"))?;
    let [0x0c, role_len, role @ ..] = rest else {
        return Err(bad("expected the role UTF8String after the organisation"));
    };
    if *role_len as usize != role.len() {
        return Err(bad("role UTF8String length does not match"));
    }
    let org = std::str::from_utf8(org).map_err(|_| bad("organisation is not UTF-8"))?;
    let role = std::str::from_utf8(role).map_err(|_| bad("role is not UTF-8"))?;
    Affiliation::new(org, role)
}

/// The affiliation a DER certificate carries, if any. Like
/// [`identity_from_certificate`](super::identity_from_certificate) this does not verify the
/// certificate: read it only from a certificate already verified.
pub fn affiliation_from_certificate(der: &[u8]) -> Result<Option<Affiliation>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Certificate(format!("certificate does not parse: {e}")))?;
    let oid = x509_parser::der_parser::oid::Oid::from(AFFILIATION_EXTENSION_OID)
        .map_err(|_| Error::Certificate("affiliation extension OID is not encodable".into()))?;
    let mut found = None;
    for ext in cert.extensions().iter().filter(|ext| ext.oid == oid) {
        if found.is_some() {
            return Err(Error::Certificate("certificate carries the Skydd affiliation extension twice".into()));
        }
        found = Some(decode_affiliation_extension(ext.value)?);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_affiliation_round_trips_in_its_exact_bytes() {
        let a = Affiliation::new("Karolinska Cardiology", "cardiologist").unwrap();
        let der = encode_affiliation_extension(&a);
        assert_eq!(&der[..7], b"\x30\x28\x02\x01\x01\x0c\x15");
        assert_eq!(decode_affiliation_extension(&der).unwrap(), a);
        let longest =
            Affiliation::new(&"o".repeat(MAX_ORGANISATION_LEN), &"r".repeat(MAX_ORGANISATION_ROLE_LEN)).unwrap();
        assert_eq!(decode_affiliation_extension(&encode_affiliation_extension(&longest)).unwrap(), longest);
    }

    #[test]
    fn the_decoder_accepts_nothing_but_the_encoding() {
        let good = encode_affiliation_extension(&Affiliation::new("St Erik", "er-lead").unwrap());
        let mut trailing = good.clone();
        trailing.push(0);
        trailing[1] += 1;
        assert!(decode_affiliation_extension(&trailing).unwrap_err().to_string().contains("role UTF8String"));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(decode_affiliation_extension(&v2).unwrap_err().to_string().contains("version 2"));
        let mut cut = good.clone();
        cut[6] = 60;
        assert!(decode_affiliation_extension(&cut).is_err());
        let mut control = good.clone();
        control[7] = b'\n';
        assert!(decode_affiliation_extension(&control).unwrap_err().to_string().contains("contains '\\n'"));
        assert!(decode_affiliation_extension(&good[..good.len() - 1]).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(Affiliation::new("", "x").is_err());
        assert!(Affiliation::new(" Karolinska", "x").is_err());
        assert!(Affiliation::new("Karolinska", &"r".repeat(MAX_ORGANISATION_ROLE_LEN + 1)).is_err());
        assert!(Affiliation::new("Karolinska\"", "x").unwrap_err().to_string().contains("allowed are"));
        assert!(Affiliation::new("St. Göran", "x").is_err());
    }
}
