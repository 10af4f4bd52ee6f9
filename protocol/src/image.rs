//! Trusted launch: which VM images are approved, and how a host reports the image a VM was
//! launched from (docs/PROTOCOL.md "Trusted launch").
//!
//! `image-pipeline allowlist` signs the approved images' digests ([`AllowList`], a DSSE
//! envelope of type [`ALLOWLIST_PAYLOAD_TYPE`]). The secure component launches a VM only from
//! an image on that list, and reports it in the key release request ([`LaunchedImage`]). The
//! host's TPM quote is made over [`quote_qualifying_data`]`(nonce, image)`, so the report is
//! signed by the attested host's AK together with the TTP's fresh nonce: the TTP checks the
//! quote, then the image against its own copy of the allowlist.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dsse::{open_envelope, SignerTrust};
use crate::error::{Error, Result};

/// DSSE `payloadType` of a signed allowlist; [`verify_allowlist`] refuses an envelope of any
/// other type, so a provenance envelope cannot pass as an allowlist.
pub const ALLOWLIST_PAYLOAD_TYPE: &str = "application/vnd.skydd.image-allowlist+json";

/// The allowlist's `kind`.
pub const ALLOWLIST_KIND: &str = "skydd-image-allowlist/v1";

/// One approved image in the allowlist.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllowListEntry {
    /// The image's role.
    pub role: String,
    /// Its version number within the role.
    pub version: u64,
    /// Hex sha256 of `image.raw`.
    pub raw_sha256: String,
    /// Hex sha256 of `image.qcow2`.
    pub qcow2_sha256: String,
    /// Hex sha256 of the provenance envelope that describes it.
    pub provenance_sha256: String,
    /// When it was promoted, RFC 3339 UTC.
    pub promoted_at: String,
}

/// The approved images at the time of issue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllowList {
    /// Always [`ALLOWLIST_KIND`].
    pub kind: String,
    /// When the list was made, RFC 3339 UTC.
    pub issued_at: String,
    /// Name of the signer's certificate (normally `image-pipeline`).
    pub issuer: String,
    /// The promoted versions.
    pub images: Vec<AllowListEntry>,
}

impl AllowList {
    /// The entry whose raw or qcow2 image has this hex sha256, if any.
    pub fn find(&self, sha256: &str) -> Option<&AllowListEntry> {
        self.images.iter().find(|e| e.raw_sha256 == sha256 || e.qcow2_sha256 == sha256)
    }

    /// Whether a raw or qcow2 image with this hex sha256 is on the list.
    pub fn allows(&self, sha256: &str) -> bool {
        self.find(sha256).is_some()
    }

    /// The entry of a reported launched image: its digest is on the list, under the role and
    /// version the report names. The error says which part did not match, for a person.
    pub fn admit(&self, image: &LaunchedImage) -> std::result::Result<&AllowListEntry, String> {
        let entry = self.find(&image.sha256).ok_or_else(|| {
            format!(
                "image sha256 {} is not on the allowlist issued {} by {} ({} approved images)",
                image.sha256,
                self.issued_at,
                self.issuer,
                self.images.len()
            )
        })?;
        if entry.role != image.role || entry.version != image.version {
            return Err(format!(
                "image sha256 {} is {}@{} on the allowlist, but was reported as {}@{}",
                image.sha256, entry.role, entry.version, image.role, image.version
            ));
        }
        Ok(entry)
    }
}

/// Checks a signed allowlist (signature, signer, type, kind) and returns its contents.
pub fn verify_allowlist(envelope_bytes: &[u8], trust: &SignerTrust) -> Result<AllowList> {
    let (_, payload) = open_envelope(envelope_bytes, ALLOWLIST_PAYLOAD_TYPE, "allowlist", trust)?;
    let list: AllowList = serde_json::from_slice(&payload)
        .map_err(|e| Error::Malformed { what: "allowlist payload", detail: e.to_string() })?;
    if list.kind != ALLOWLIST_KIND {
        return Err(Error::Malformed {
            what: "allowlist payload",
            detail: format!("kind is {:?}, expected {ALLOWLIST_KIND}", list.kind),
        });
    }
    Ok(list)
}

/// The image a VM was launched from, as the host reports it in a key release request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchedImage {
    /// Hex sha256 (64 lowercase characters) of the image file the VM booted.
    pub sha256: String,
    /// The image's role, from the allowlist entry the host matched.
    pub role: String,
    /// The image's version within its role.
    pub version: u64,
}

impl LaunchedImage {
    /// The digest as bytes; refuses anything but 64 lowercase hex characters.
    pub fn digest(&self) -> Result<[u8; 32]> {
        let malformed = || Error::Malformed {
            what: "launched image",
            detail: format!("sha256 {:?} is not 64 lowercase hex characters", self.sha256),
        };
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(malformed());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut out).map_err(|_| malformed())?;
        Ok(out)
    }
}

/// Domain separation of [`quote_qualifying_data`].
const QUOTE_LABEL: &[u8] = b"skydd/v1/quote/launched-image\0";

/// What a key release quote is made over (the TPM's `qualifyingData`): the TTP's nonce as it
/// is when no image is reported, else SHA-256(label || nonce || image digest), so a reported
/// image is signed by the host's AK together with the fresh nonce and cannot be swapped on
/// the way (docs/PROTOCOL.md "Trusted launch").
pub fn quote_qualifying_data(nonce: &[u8], image: Option<&LaunchedImage>) -> Result<Vec<u8>> {
    let Some(image) = image else { return Ok(nonce.to_vec()) };
    let digest = image.digest()?;
    let mut hash = Sha256::new();
    hash.update(QUOTE_LABEL);
    hash.update((nonce.len() as u32).to_be_bytes());
    hash.update(nonce);
    hash.update(digest);
    Ok(hash.finalize().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(sha256: &str) -> LaunchedImage {
        LaunchedImage { sha256: sha256.into(), role: "web".into(), version: 2 }
    }

    #[test]
    fn the_quote_binds_the_image_to_the_nonce() {
        let nonce = [7u8; 32];
        let a = image(&"ab".repeat(32));
        let b = image(&"cd".repeat(32));
        assert_eq!(quote_qualifying_data(&nonce, None).unwrap(), nonce.to_vec());
        let with_a = quote_qualifying_data(&nonce, Some(&a)).unwrap();
        assert_eq!(with_a.len(), 32);
        assert_ne!(with_a, nonce.to_vec());
        assert_ne!(with_a, quote_qualifying_data(&nonce, Some(&b)).unwrap());
        assert_ne!(with_a, quote_qualifying_data(&[8u8; 32], Some(&a)).unwrap());
    }

    #[test]
    fn a_malformed_digest_is_refused() {
        for bad in ["", "AB".repeat(32).as_str(), &"ab".repeat(31), &"zz".repeat(32)] {
            let err = quote_qualifying_data(&[0; 32], Some(&image(bad))).unwrap_err().to_string();
            assert!(err.contains("not 64 lowercase hex"), "{bad}: {err}");
        }
    }

    #[test]
    fn find_matches_raw_and_qcow2_digests() {
        let entry = AllowListEntry {
            role: "web".into(),
            version: 1,
            raw_sha256: "aa".repeat(32),
            qcow2_sha256: "bb".repeat(32),
            provenance_sha256: "cc".repeat(32),
            promoted_at: String::new(),
        };
        let list = AllowList {
            kind: ALLOWLIST_KIND.into(),
            issued_at: String::new(),
            issuer: "image-pipeline".into(),
            images: vec![entry],
        };
        assert!(list.allows(&"aa".repeat(32)) && list.allows(&"bb".repeat(32)));
        assert!(!list.allows(&"cc".repeat(32)));
        let launched = |sha256: String, version| LaunchedImage { sha256, role: "web".into(), version };
        assert!(list.admit(&launched("bb".repeat(32), 1)).is_ok());
        let err = list.admit(&launched("bb".repeat(32), 2)).unwrap_err();
        assert!(err.contains("is web@1 on the allowlist, but was reported as web@2"), "{err}");
        let err = list.admit(&launched("cc".repeat(32), 1)).unwrap_err();
        assert!(err.contains("is not on the allowlist"), "{err}");
    }
}
