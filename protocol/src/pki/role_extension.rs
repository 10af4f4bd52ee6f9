//! The Skydd role extension: how a certificate carries its [`Role`] authoritatively
//! (docs/PKI.md "How the role is carried").
//!
//! extnValue is the DER of `SkyddRole ::= SEQUENCE { version INTEGER (1), role UTF8String }`;
//! [`encode_role_extension`] writes exactly that and [`decode_role_extension`] accepts nothing
//! else.

use crate::error::{Error, Result};

use super::Role;

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

/// The extension's OID in dotted form, for messages.
pub(super) fn oid_string() -> String {
    ROLE_EXTENSION_OID.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips() {
        for r in Role::ALL {
            assert_eq!(decode_role_extension(&encode_role_extension(r)).unwrap(), r);
        }
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
}
