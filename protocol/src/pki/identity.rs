//! Who a certificate names: the Skydd [`Identity`] (subject CN + role extension) read out of a
//! certificate, and the rules that reading enforces (docs/PKI.md "How the role is carried").

use std::fmt;

use crate::error::{Error, Result};

use super::name::check_name;
use super::role_extension::{decode_role_extension, oid_string, ROLE_EXTENSION_OID};
use super::Role;

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

/// Read the Skydd identity (subject CN + role extension) out of a DER certificate.
/// This does not verify the certificate: the rustls verifiers of [`server_config`](super::server_config)
/// and [`client_config`](super::client_config) do that first.
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
