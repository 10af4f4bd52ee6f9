//! One entry of a service's `ca = [...]` list: a trusted CA root's PEM file and, for a
//! partner's root, the roles (and names) it may issue (docs/PKI.md "Federation").
//!
//! ```toml
//! ca = [
//!   "/etc/skydd/ca/ca.pem",                      # own root: every role
//!   { file = "/etc/skydd/partner/ca.pem", allow = [
//!       { role = "domain-manager" },
//!       { role = "secure-component", names = ["b-compute-07", "b-gpu-*"] },
//!   ] },
//! ]
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use protocol::pki::{RoleAllowance, RootLimit, TrustedRoot};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A trusted CA root file and what it may issue: a plain path may issue every role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRootFile {
    /// The root certificate(s), PEM.
    pub file: PathBuf,
    /// `None`: every role; `Some`: only certificates matching one of these entries.
    pub allow: Option<Vec<RoleAllowance>>,
}

impl TrustedRootFile {
    /// A root file that may issue every role.
    pub fn any_role(file: impl Into<PathBuf>) -> Self {
        TrustedRootFile { file: file.into(), allow: None }
    }

    /// A root file that may issue only what `allow` lists.
    pub fn limited(file: impl Into<PathBuf>, allow: Vec<RoleAllowance>) -> Self {
        TrustedRootFile { file: file.into(), allow: Some(allow) }
    }

    /// The root with its limit, from the file's contents.
    pub fn with_pem(&self, pem: String) -> TrustedRoot {
        let limit = match &self.allow {
            None => RootLimit::AnyRole,
            Some(allow) => RootLimit::Only(allow.clone()),
        };
        TrustedRoot { pem, limit }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl From<PathBuf> for TrustedRootFile {
    fn from(file: PathBuf) -> Self {
        TrustedRootFile::any_role(file)
    }
}

impl From<&Path> for TrustedRootFile {
    fn from(file: &Path) -> Self {
        TrustedRootFile::any_role(file)
    }
}

/// The table form (`{ file = "...", allow = [...] }`), unknown keys refused.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitedForm {
    file: PathBuf,
    allow: Vec<RoleAllowance>,
}

impl Serialize for TrustedRootFile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.allow {
            None => self.file.serialize(s),
            Some(allow) => LimitedForm { file: self.file.clone(), allow: allow.clone() }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TrustedRootFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = TrustedRootFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"a CA root file path, or { file = "PATH", allow = [{ role = "ROLE", names = [...] }, ...] }"#,
                )
            }
            fn visit_str<E: de::Error>(self, path: &str) -> Result<TrustedRootFile, E> {
                Ok(TrustedRootFile::any_role(path))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TrustedRootFile, A::Error> {
                let form = LimitedForm::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(TrustedRootFile::limited(form.file, form.allow))
            }
        }
        d.deserialize_any(EntryVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pki::Role;

    #[derive(Debug, Serialize, Deserialize)]
    struct Config {
        ca: Vec<TrustedRootFile>,
    }

    #[test]
    fn a_plain_path_and_a_limited_table_both_read() {
        let text = r#"
            ca = [
              "/etc/skydd/ca/ca.pem",
              { file = "/etc/skydd/partner/ca.pem", allow = [
                  { role = "domain-manager" },
                  { role = "secure-component", names = ["b-compute-07", "b-gpu-*"] },
              ] },
            ]
        "#;
        let config: Config = toml::from_str(text).unwrap();
        assert_eq!(config.ca[0], TrustedRootFile::any_role("/etc/skydd/ca/ca.pem"));
        assert_eq!(
            config.ca[1],
            TrustedRootFile::limited(
                "/etc/skydd/partner/ca.pem",
                vec![
                    RoleAllowance::role(Role::DomainManager),
                    RoleAllowance::named(Role::SecureComponent, &["b-compute-07", "b-gpu-*"]).unwrap(),
                ]
            )
        );
        // Written back and read again: the same (the lab writes configurations).
        let again: Config = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again.ca, config.ca);
    }

    #[test]
    fn mistakes_are_refused_in_words() {
        let e = toml::from_str::<Config>(r#"ca = [{ file = "/p.pem", allow = [{ role = "admin" }] }]"#).unwrap_err();
        assert!(e.to_string().contains("admin"), "{e}");
        let e = toml::from_str::<Config>(r#"ca = [{ file = "/p.pem", roles = ["ttp"] }]"#).unwrap_err();
        assert!(e.to_string().contains("roles"), "{e}");
        let e = toml::from_str::<Config>(r#"ca = [{ file = "/p.pem" }]"#).unwrap_err();
        assert!(e.to_string().contains("allow"), "{e}");
        let e = toml::from_str::<Config>(r#"ca = [7]"#).unwrap_err();
        assert!(e.to_string().contains("a CA root file path"), "{e}");
        let e = toml::from_str::<Config>(
            r#"ca = [{ file = "/p.pem", allow = [{ role = "secure-component", names = ["a b"] }] }]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("only letters"), "{e}");
    }
}
