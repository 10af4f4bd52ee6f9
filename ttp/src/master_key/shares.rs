//! K_TTP split for its custodians: Shamir t-of-n over GF(256) (the `blahaj` crate), each
//! share one text line that says which master-key version it belongs to, its index, the
//! threshold and the key's fingerprint, and ends in a checksum so that a typo is caught
//! before combining (docs/OPERATOR.md "Master key custodians").
//!
//! `skydd-share:v<version>:<index>/<count>:t<threshold>:<fingerprint>:<share hex>:<checksum>`
//!
//! The checksum is the first 8 hex digits of SHA-256 over everything before it. The
//! fingerprint names the key, not its bytes ([`super::fingerprint`]), so a set of shares of
//! another key or version is refused, and a combination that yields another key is caught.

use std::collections::BTreeMap;

use blahaj::{Share, Sharks};
use protocol::kdf::MASTER_KEY_BYTES;
use protocol::secret::SecretBytes;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

const PREFIX: &str = "skydd-share";
/// At most this many custodians (a share's index is one byte, never 0).
pub const MAX_SHARES: u8 = 255;

/// One custodian's share, parsed and checked against its checksum.
pub struct ShareLine {
    /// The master-key version the share belongs to.
    pub version: u32,
    /// 1-based index of this share among `count`.
    pub index: u8,
    /// How many shares were made.
    pub count: u8,
    /// How many shares recover the key.
    pub threshold: u8,
    /// The key's fingerprint (hex), [`super::fingerprint`].
    pub fingerprint: String,
    share: Zeroizing<Vec<u8>>,
}

impl ShareLine {
    /// The share as its custodian keeps it: one line of text (no newline).
    pub fn to_text(&self) -> Zeroizing<String> {
        let body = Zeroizing::new(format!(
            "{PREFIX}:v{}:{}/{}:t{}:{}:{}",
            self.version,
            self.index,
            self.count,
            self.threshold,
            self.fingerprint,
            hex::encode(self.share.as_slice())
        ));
        Zeroizing::new(format!("{}:{}", body.as_str(), checksum(&body)))
    }

    /// Parses one share line (surrounding white space ignored), refusing a line whose
    /// checksum does not match: the text says which part is malformed, never the share.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let refuse = |what: &str| Error::MasterKey(format!("not a K_TTP share line: {what}"));
        let (body, sum) = text.rsplit_once(':').ok_or_else(|| refuse("no checksum"))?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(checksum(body).as_bytes(), sum.as_bytes())) {
            return Err(Error::MasterKey(
                "a share line's checksum does not match: it was mistyped or damaged; compare it with the custodian's copy"
                    .into(),
            ));
        }
        let parts: Vec<&str> = body.split(':').collect();
        let [prefix, version, position, threshold, fingerprint, share] = parts.as_slice() else {
            return Err(refuse("expected 7 fields separated by ':'"));
        };
        if *prefix != PREFIX {
            return Err(refuse(&format!("it must start with '{PREFIX}:'")));
        }
        let version =
            version.strip_prefix('v').and_then(|v| v.parse().ok()).ok_or_else(|| refuse("bad version field"))?;
        let (index, count) = position.split_once('/').ok_or_else(|| refuse("bad index/count field"))?;
        let index: u8 = index.parse().map_err(|_| refuse("bad share index"))?;
        let count: u8 = count.parse().map_err(|_| refuse("bad share count"))?;
        let threshold: u8 =
            threshold.strip_prefix('t').and_then(|t| t.parse().ok()).ok_or_else(|| refuse("bad threshold field"))?;
        let share = Zeroizing::new(hex::decode(share).map_err(|_| refuse("the share is not hex"))?);
        if index == 0 || index > count || threshold < 2 || threshold > count || share.len() != MASTER_KEY_BYTES + 1 {
            return Err(refuse("index, count, threshold or share length out of range"));
        }
        if share[0] != index {
            return Err(refuse("the share's x coordinate is not its index"));
        }
        Ok(Self { version, index, count, threshold, fingerprint: fingerprint.to_string(), share })
    }
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..4])
}

/// Splits `key` (K_TTP version `version`, fingerprint `fingerprint`) into `count` shares of
/// which any `threshold` recover it.
pub fn split(key: &SecretBytes, version: u32, fingerprint: &str, count: u8, threshold: u8) -> Result<Vec<ShareLine>> {
    if threshold < 2 || threshold > count {
        return Err(Error::MasterKey(format!(
            "a split needs 2 <= threshold <= shares <= {MAX_SHARES}; got threshold {threshold} of {count} shares"
        )));
    }
    Ok(Sharks(threshold)
        .dealer(key.expose())
        .take(count as usize)
        .map(|share| ShareLine {
            version,
            index: share.x.0,
            count,
            threshold,
            fingerprint: fingerprint.to_string(),
            share: Zeroizing::new(Vec::from(&share)),
        })
        .collect())
}

/// Recovers K_TTP from shares that must all belong to one version and one key, with
/// distinct indices, at least the threshold of them; refuses otherwise, saying what is
/// missing. The recovered key's fingerprint must be the shares' (else: shares of
/// different splits were mixed).
pub fn combine(shares: &[ShareLine]) -> Result<SecretBytes> {
    let first = shares.first().ok_or_else(|| Error::MasterKey("no share given".into()))?;
    if let Some(other) = shares.iter().find(|s| {
        s.version != first.version
            || s.fingerprint != first.fingerprint
            || s.threshold != first.threshold
            || s.count != first.count
    }) {
        return Err(Error::MasterKey(format!(
            "shares of different keys were mixed: share {} is of version {} (fingerprint {}, {} of {}), share {} of version {} (fingerprint {}, {} of {})",
            first.index, first.version, first.fingerprint, first.threshold, first.count,
            other.index, other.version, other.fingerprint, other.threshold, other.count
        )));
    }
    let distinct: BTreeMap<u8, &ShareLine> = shares.iter().map(|s| (s.index, s)).collect();
    if distinct.len() < first.threshold as usize {
        return Err(Error::MasterKey(format!(
            "{} distinct share(s) of K_TTP version {} given, {} are needed: fewer than the threshold reveal nothing about the key, so nothing can be derived",
            distinct.len(),
            first.version,
            first.threshold
        )));
    }
    let parsed: Vec<Share> = distinct
        .values()
        .map(|s| Share::try_from(s.share.as_slice()).map_err(|e| Error::MasterKey(format!("share {}: {e}", s.index))))
        .collect::<Result<_>>()?;
    let mut recovered =
        Sharks(first.threshold).recover(&parsed).map_err(|e| Error::MasterKey(format!("combining the shares: {e}")))?;
    let key = SecretBytes::from_slice_wiping(&mut recovered);
    let fingerprint = super::fingerprint(&key)?;
    if fingerprint != first.fingerprint {
        return Err(Error::MasterKey(format!(
            "the shares combine to a key with fingerprint {fingerprint}, not {}: a share is from another split of version {}",
            first.fingerprint, first.version
        )));
    }
    Ok(key)
}

/// Reads share lines from text (files or a console): blank lines and `#` comments are
/// skipped.
pub fn parse_all(text: &str) -> Result<Vec<ShareLine>> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(ShareLine::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretBytes {
        let mut bytes: Vec<u8> = (0..MASTER_KEY_BYTES as u8).collect();
        SecretBytes::from_slice_wiping(&mut bytes)
    }

    #[test]
    fn threshold_shares_recover_the_key_and_fewer_derive_nothing() {
        let key = key();
        let fingerprint = super::super::fingerprint(&key).unwrap();
        let shares = split(&key, 1, &fingerprint, 5, 3).unwrap();
        let lines: Vec<ShareLine> = shares.iter().map(|s| ShareLine::parse(&s.to_text()).unwrap()).collect();
        let recovered = combine(&lines[1..4]).unwrap();
        assert_eq!(recovered.expose(), key.expose());
        let refusal = combine(&lines[..2]).err().unwrap().to_string();
        assert!(refusal.contains("2 distinct share(s) of K_TTP version 1 given, 3 are needed"), "{refusal}");
        // The same share twice is still one share.
        let again = [ShareLine::parse(&shares[0].to_text()).unwrap(), ShareLine::parse(&shares[0].to_text()).unwrap()];
        let mut duplicated: Vec<ShareLine> = again.into_iter().collect();
        duplicated.push(ShareLine::parse(&shares[1].to_text()).unwrap());
        assert!(combine(&duplicated).is_err());
    }

    #[test]
    fn a_typo_or_a_foreign_share_is_refused() {
        let key = key();
        let fingerprint = super::super::fingerprint(&key).unwrap();
        let shares = split(&key, 1, &fingerprint, 3, 2).unwrap();
        let text = shares[0].to_text();
        let mut typo = text.to_string();
        let at = typo.len() - 12;
        let replacement = if &typo[at..at + 1] == "0" { "1" } else { "0" };
        typo.replace_range(at..at + 1, replacement);
        assert!(ShareLine::parse(&typo).err().unwrap().to_string().contains("checksum does not match"));
        let other = split(&key, 1, &fingerprint, 3, 2).unwrap();
        let mixed = [ShareLine::parse(&text).unwrap(), ShareLine::parse(&other[1].to_text()).unwrap()];
        assert!(combine(&mixed).err().unwrap().to_string().contains("from another split"));
        let v2 = split(&key, 2, &fingerprint, 3, 2).unwrap();
        let versions = [ShareLine::parse(&text).unwrap(), ShareLine::parse(&v2[1].to_text()).unwrap()];
        assert!(combine(&versions).err().unwrap().to_string().contains("different keys were mixed"));
    }
}
