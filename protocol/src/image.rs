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

/// The `outcome` of a launch that started its VM.
pub const LAUNCH_OK: &str = "ok";
/// Longest [`LaunchReport::image_name`] in bytes (a file name, as `NAME_MAX`).
pub const MAX_IMAGE_NAME_BYTES: usize = 255;
/// Longest [`LaunchReport::message`] in bytes: it goes into an audit record as it is.
pub const MAX_LAUNCH_MESSAGE_BYTES: usize = 2048;

/// SC → TTP, `POST /v1/launches`: what became of one launch attempt on the calling host
/// (docs/PROTOCOL.md "Trusted launch"), so that a refused launch is in the TTP's audit log and
/// not only in the host's own. The host is the caller's certificate name, never a field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LaunchReport {
    /// The VM the launch was for (a name, as placements and access lists name VMs).
    pub vm_id: String,
    /// Hex SHA-256 (64 lowercase characters) of the image file as the host hashed it; `None`
    /// when the launch was refused before the file was hashed (it could not be opened, was
    /// not a regular file, was writable by others...).
    pub image_digest: Option<String>,
    /// The image's file name, without the directory: the digest says which image it is, the
    /// host's directory layout means nothing to the TTP. `None` when the path has none.
    pub image_name: Option<String>,
    /// [`LAUNCH_OK`], or the refusal's code (`image_not_allowed`, or another code of
    /// [`crate::refusal::Refusal`] for a launch that failed otherwise).
    pub outcome: String,
    /// What the host said of the launch: its refusal text, or what it started.
    pub message: String,
}

impl LaunchReport {
    /// A report whose free-text fields fit [`LaunchReport::validate`]: control characters in
    /// `image_name` and `message` (and a `/` in the name) become U+FFFD, each is cut at a
    /// character boundary to its limit, and an empty name is `None`, so any text a host
    /// produced can be sent. The id, digest and outcome are taken as they are.
    pub fn new(
        vm_id: &str,
        image_digest: Option<String>,
        image_name: Option<&str>,
        outcome: &str,
        message: &str,
    ) -> Self {
        Self {
            vm_id: vm_id.to_string(),
            image_digest,
            image_name: image_name
                .filter(|name| !name.is_empty())
                .map(|name| printable_prefix(&name.replace('/', "\u{FFFD}"), MAX_IMAGE_NAME_BYTES)),
            outcome: outcome.to_string(),
            message: printable_prefix(message, MAX_LAUNCH_MESSAGE_BYTES),
        }
    }

    /// Refuses a report the TTP must not write into its audit log, naming the field: a VM id
    /// that is not a name ([`crate::domain::validate_name`]), a digest that is not 64
    /// lowercase hex characters, an empty image name, one with a `/` or longer than
    /// [`MAX_IMAGE_NAME_BYTES`], an outcome that is neither [`LAUNCH_OK`] nor a refusal code,
    /// a message longer than [`MAX_LAUNCH_MESSAGE_BYTES`], and control characters in either
    /// text (the log is read on terminals).
    pub fn validate(&self) -> Result<()> {
        let malformed = |detail: String| Err(Error::Malformed { what: "launch report", detail });
        if crate::domain::validate_name("vm id", &self.vm_id).is_err() {
            // Not repeated: it may be huge or hostile.
            return malformed(format!(
                "vm_id ({} bytes) is not 1 to {} characters of A-Z a-z 0-9 . _ - @ : (not . or .., not starting with -)",
                self.vm_id.len(),
                crate::domain::MAX_NAME_BYTES
            ));
        }
        if let Some(digest) = &self.image_digest {
            if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return malformed(format!("image_digest ({} bytes) is not 64 lowercase hex characters", digest.len()));
            }
        }
        if let Some(name) = &self.image_name {
            if name.is_empty() || name.len() > MAX_IMAGE_NAME_BYTES {
                return malformed(format!(
                    "image_name is {} bytes; a file name is 1 to {MAX_IMAGE_NAME_BYTES}",
                    name.len()
                ));
            }
            if name.contains('/') {
                return malformed("image_name holds a '/': it is the file name only, not a path".into());
            }
            if name.chars().any(char::is_control) {
                return malformed("image_name holds a control character".into());
            }
        }
        if self.outcome != LAUNCH_OK && crate::refusal::Refusal::from_code(&self.outcome).is_none() {
            return malformed(format!(
                "outcome ({} bytes) is neither \"{LAUNCH_OK}\" nor a refusal code",
                self.outcome.len()
            ));
        }
        if self.message.len() > MAX_LAUNCH_MESSAGE_BYTES {
            return malformed(format!("message is {} bytes, more than {MAX_LAUNCH_MESSAGE_BYTES}", self.message.len()));
        }
        if self.message.chars().any(char::is_control) {
            return malformed("message holds a control character".into());
        }
        Ok(())
    }
}

/// TTP → SC: where the report went in the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchReportResponse {
    /// Sequence number of the `launch` audit record.
    pub audit_seq: u64,
}

/// `text` with control characters replaced by U+FFFD, cut to at most `limit` bytes at a
/// character boundary.
fn printable_prefix(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit));
    for c in text.chars().map(|c| if c.is_control() { '\u{FFFD}' } else { c }) {
        if out.len() + c.len_utf8() > limit {
            break;
        }
        out.push(c);
    }
    out
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

    fn refusal_of(report: &LaunchReport) -> String {
        report.validate().expect_err("the report is refused").to_string()
    }

    #[test]
    fn a_launch_report_round_trips_and_refuses_unknown_fields() {
        let report = LaunchReport::new(
            "vm-x",
            Some("ab".repeat(32)),
            Some("web.qcow2"),
            "image_not_allowed",
            "/images/web.qcow2: sha256 abab… is not on the allowlist",
        );
        report.validate().unwrap();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["image_name"], "web.qcow2");
        assert_eq!(serde_json::from_value::<LaunchReport>(json.clone()).unwrap(), report);
        let mut extra = json;
        extra["host_id"] = "compute-9".into();
        let err = serde_json::from_value::<LaunchReport>(extra).unwrap_err().to_string();
        assert!(err.contains("unknown field `host_id`"), "{err}");
    }

    #[test]
    fn a_launch_report_with_a_bad_id_digest_outcome_or_text_is_refused() {
        let good = LaunchReport::new("vm-x", Some("ab".repeat(32)), Some("web.raw"), "ok", "launched");
        let with = |change: fn(&mut LaunchReport)| {
            let mut report = good.clone();
            change(&mut report);
            refusal_of(&report)
        };
        assert_eq!(
            with(|r| r.vm_id = "../etc".into()),
            "malformed launch report: vm_id (6 bytes) is not 1 to 64 characters of A-Z a-z 0-9 . _ - @ : \
             (not . or .., not starting with -)"
        );
        assert_eq!(
            with(|r| r.image_digest = Some("AB".repeat(32))),
            "malformed launch report: image_digest (64 bytes) is not 64 lowercase hex characters"
        );
        assert_eq!(
            with(|r| r.image_digest = Some("ab".repeat(31))),
            "malformed launch report: image_digest (62 bytes) is not 64 lowercase hex characters"
        );
        assert_eq!(
            with(|r| r.outcome = "fine".into()),
            "malformed launch report: outcome (4 bytes) is neither \"ok\" nor a refusal code"
        );
        assert_eq!(
            with(|r| r.image_name = Some("/var/lib/web.raw".into())),
            "malformed launch report: image_name holds a '/': it is the file name only, not a path"
        );
        assert_eq!(
            with(|r| r.message = "line\nforged line".into()),
            "malformed launch report: message holds a control character"
        );
        assert_eq!(
            with(|r| r.message = "x".repeat(MAX_LAUNCH_MESSAGE_BYTES + 1)),
            "malformed launch report: message is 2049 bytes, more than 2048"
        );
        // A refusal before the file was hashed has no digest, and that is well-formed.
        let unhashed = LaunchReport { image_digest: None, outcome: "image_not_allowed".into(), ..good };
        unhashed.validate().unwrap();
    }

    #[test]
    fn new_makes_any_host_text_sendable() {
        let long = format!("{}é", "x".repeat(MAX_LAUNCH_MESSAGE_BYTES - 1));
        let report = LaunchReport::new("vm-x", None, Some("evil\u{1b}[2J/name"), "io_error", &format!("a\nb{long}"));
        report.validate().unwrap();
        assert_eq!(report.image_name.as_deref(), Some("evil\u{FFFD}[2J\u{FFFD}name"));
        assert!(report.message.starts_with("a\u{FFFD}b"));
        assert!(report.message.len() <= MAX_LAUNCH_MESSAGE_BYTES && !report.message.ends_with('é'));
        assert_eq!(LaunchReport::new("vm-x", None, Some(""), "ok", "").image_name, None);
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
