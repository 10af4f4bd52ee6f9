//! Which names a certificate may carry: party names (subject CN, DNS SAN and file name at
//! once), CA names and extra DNS SANs (docs/PKI.md "Names").

use crate::error::{Error, Result};

/// Longest accepted party name (subject CN, file name stem, DNS label set).
pub const MAX_NAME_LEN: usize = 64;

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

/// A CA's subject CN: 1..=128 printable characters (it is never a file name or a host name).
pub fn check_ca_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(Error::Certificate(format!("CA name {name:?} must be 1..=128 printable characters")));
    }
    Ok(())
}

/// An extra DNS SAN: at most 253 characters of dot-separated labels, each 1..=63 of
/// `A-Z a-z 0-9 - _`, not starting or ending with `-`.
pub fn check_dns_name(s: &str) -> Result<()> {
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
