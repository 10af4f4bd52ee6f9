//! Trusted CA roots and what each may issue (docs/PKI.md "Federation"). The own cloud's root
//! issues every role; a partner cloud's root is usually limited to the roles (and names) its
//! parties need here, e.g. domain managers and one named secure component. The limit is
//! checked on every link and every signed object, after WebPKI found which root the
//! certificate chains to.

use std::fmt;

use crate::error::{Error, Result};

use super::name::MAX_NAME_LEN;
use super::{Identity, Role};

/// One trusted CA root (PEM; one file may hold several certificates) and the certificates it
/// may issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoot {
    /// The root certificate(s), PEM.
    pub pem: String,
    /// What a certificate chaining to this root may be.
    pub limit: RootLimit,
}

impl TrustedRoot {
    /// A root that may issue every role (the own cloud's).
    pub fn any_role(pem: impl Into<String>) -> Self {
        TrustedRoot { pem: pem.into(), limit: RootLimit::AnyRole }
    }

    /// A root that may issue only what `allow` lists.
    pub fn limited(pem: impl Into<String>, allow: Vec<RoleAllowance>) -> Self {
        TrustedRoot { pem: pem.into(), limit: RootLimit::Only(allow) }
    }
}

/// A plain PEM string is a root that may issue every role (backward compatible).
impl From<String> for TrustedRoot {
    fn from(pem: String) -> Self {
        TrustedRoot::any_role(pem)
    }
}

impl From<&String> for TrustedRoot {
    fn from(pem: &String) -> Self {
        TrustedRoot::any_role(pem.clone())
    }
}

impl From<&TrustedRoot> for TrustedRoot {
    fn from(root: &TrustedRoot) -> Self {
        root.clone()
    }
}

/// What certificates under one root may be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RootLimit {
    /// Every role, every name.
    #[default]
    AnyRole,
    /// Only a certificate matching one of these entries. An empty list allows nothing.
    Only(Vec<RoleAllowance>),
}

impl RootLimit {
    /// Whether a certificate naming `identity` may chain to a root with this limit.
    pub fn allows(&self, identity: &Identity) -> bool {
        match self {
            RootLimit::AnyRole => true,
            RootLimit::Only(allowances) => allowances.iter().any(|a| a.allows(identity)),
        }
    }
}

impl fmt::Display for RootLimit {
    /// `every role`, or e.g. `domain-manager; secure-component named b-compute-07 or b-gpu-*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootLimit::AnyRole => f.write_str("every role"),
            RootLimit::Only(allowances) if allowances.is_empty() => f.write_str("nothing"),
            RootLimit::Only(allowances) => {
                let parts: Vec<String> = allowances.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join("; "))
            }
        }
    }
}

/// One role a limited root may issue, optionally only under some names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleAllowance {
    /// The role.
    pub role: Role,
    /// The certificate names (subject CN) allowed for this role; absent: every name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<NamePattern>>,
}

impl RoleAllowance {
    /// This role under every name.
    pub fn role(role: Role) -> Self {
        RoleAllowance { role, names: None }
    }

    /// This role under the names matching `patterns` (see [`NamePattern`]).
    pub fn named(role: Role, patterns: &[&str]) -> Result<Self> {
        let names = patterns.iter().map(|p| NamePattern::new(p)).collect::<Result<Vec<_>>>()?;
        Ok(RoleAllowance { role, names: Some(names) })
    }

    fn allows(&self, identity: &Identity) -> bool {
        self.role == identity.role
            && self.names.as_ref().is_none_or(|names| names.iter().any(|n| n.matches(&identity.name)))
    }
}

impl fmt::Display for RoleAllowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.names {
            None => write!(f, "{}", self.role),
            Some(names) => {
                let names: Vec<&str> = names.iter().map(NamePattern::as_str).collect();
                write!(f, "{} named {}", self.role, names.join(" or "))
            }
        }
    }
}

/// A certificate name, or a pattern where `*` stands for any run of name characters
/// (`b-compute-*`, `*.partner.example`). Otherwise the characters of a name (docs/PKI.md
/// "Names").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamePattern(String);

impl NamePattern {
    /// Checks the pattern: 1..=64 characters of `A-Z a-z 0-9 . _ - *`.
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern.is_empty() || pattern.len() > MAX_NAME_LEN {
            return Err(Error::Certificate(format!("name pattern {pattern:?} must be 1 to {MAX_NAME_LEN} characters")));
        }
        if let Some(c) = pattern.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*'))) {
            return Err(Error::Certificate(format!(
                "name pattern {pattern:?} contains {c:?}: only letters, digits, '.', '_', '-' and '*' are allowed"
            )));
        }
        Ok(NamePattern(pattern.to_string()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches: literal characters match themselves, `*` any run (even empty).
    pub fn matches(&self, name: &str) -> bool {
        let mut pieces = self.0.split('*');
        let first = pieces.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else { return false };
        let pieces: Vec<&str> = pieces.collect();
        let Some((last, middle)) = pieces.split_last() else { return rest.is_empty() };
        for piece in middle {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl TryFrom<String> for NamePattern {
    type Error = Error;
    fn try_from(pattern: String) -> Result<Self> {
        NamePattern::new(&pattern)
    }
}

impl From<NamePattern> for String {
    fn from(pattern: NamePattern) -> String {
        pattern.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role, name: &str) -> Identity {
        Identity { name: name.into(), role }
    }

    #[test]
    fn patterns_match_literally_with_star_as_any_run() {
        let p = |s: &str| NamePattern::new(s).unwrap();
        assert!(p("b-compute-07").matches("b-compute-07"));
        assert!(!p("b-compute-07").matches("b-compute-070"));
        assert!(p("b-compute-*").matches("b-compute-"));
        assert!(p("b-compute-*").matches("b-compute-12"));
        assert!(!p("b-compute-*").matches("a-compute-12"));
        assert!(p("*.partner").matches("x.partner"));
        assert!(!p("*.partner").matches("x.partner.evil"));
        assert!(p("b-*-gpu-*").matches("b-1-gpu-2"));
        assert!(!p("b-*-gpu-*").matches("b-1-cpu-2"));
        assert!(p("*").matches("anything"));
        assert!(!p("a*a").matches("a"), "the prefix and suffix must not overlap");
        assert!(NamePattern::new("").is_err());
        assert!(NamePattern::new("b/compute").unwrap_err().to_string().contains("'/'"));
    }

    #[test]
    fn a_limited_root_allows_only_its_roles_and_names() {
        let limit = RootLimit::Only(vec![
            RoleAllowance::role(Role::DomainManager),
            RoleAllowance::named(Role::SecureComponent, &["b-compute-07"]).unwrap(),
        ]);
        assert!(limit.allows(&id(Role::DomainManager, "bob")));
        assert!(limit.allows(&id(Role::SecureComponent, "b-compute-07")));
        assert!(!limit.allows(&id(Role::SecureComponent, "b-compute-08")));
        assert!(!limit.allows(&id(Role::CloudPlatform, "cp")));
        assert!(!limit.allows(&id(Role::Ttp, "ttp")));
        assert!(RootLimit::AnyRole.allows(&id(Role::Ttp, "ttp")));
        assert!(!RootLimit::Only(Vec::new()).allows(&id(Role::DomainManager, "bob")));
        assert_eq!(limit.to_string(), "domain-manager; secure-component named b-compute-07");
    }

    #[test]
    fn allowances_read_from_toml_shaped_data() {
        let a: RoleAllowance = serde_json::from_str(r#"{"role":"secure-component","names":["b-*"]}"#).unwrap();
        assert_eq!(a, RoleAllowance::named(Role::SecureComponent, &["b-*"]).unwrap());
        let e = serde_json::from_str::<RoleAllowance>(r#"{"role":"secure-component","names":["b/*"]}"#).unwrap_err();
        assert!(e.to_string().contains("only letters"), "{e}");
        let e = serde_json::from_str::<RoleAllowance>(r#"{"role":"admin"}"#).unwrap_err();
        assert!(e.to_string().contains("admin"), "{e}");
        assert!(serde_json::from_str::<RoleAllowance>(r#"{"role":"ttp","name":["x"]}"#).is_err());
    }
}
