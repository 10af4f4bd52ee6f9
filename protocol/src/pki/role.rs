//! The four kinds of party in a Skydd cloud ([`Role`]) and the one string each is known by on
//! the wire, in certificates and on the command line (docs/PKI.md "Roles").

use std::fmt;

use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_strings_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&j).unwrap(), r);
        }
        let e = "admin".parse::<Role>().unwrap_err().to_string();
        assert!(e.contains("unknown role \"admin\""), "{e}");
    }
}
