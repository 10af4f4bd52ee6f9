//! The central image store: a directory, content-addressed by sha256, with a version history
//! per role.
//!
//! ```text
//! STORE/blobs/sha256/<hex>        immutable content: raw, qcow2, provenance, profile (0444)
//! STORE/versions/<role>/<n>.json  the version record (status, digests, parent, changes, ...)
//! STORE/archives/<hex>.skarc      encrypted archives (see `archive`)
//! STORE/.lock                     flock held by every change
//! ```
//!
//! A record is never deleted: destroyed and discarded versions keep their record (and their
//! provenance and profile), marked with when, why and what was removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::build::{PROFILE_NAME, PROVENANCE_NAME, QCOW2_NAME, RAW_NAME};
use crate::debian::{sha256_of_file, InstalledPackage};
use crate::error::{fsx, Error, Result};
use crate::provenance::{self, Signer, Statement, TrustPolicy};

// The allowlist's format is shared with the secure component and the TTP, which check
// launches and key releases against it (docs/PROTOCOL.md "Trusted launch").
pub use protocol::image::{AllowList, AllowListEntry, ALLOWLIST_KIND, ALLOWLIST_PAYLOAD_TYPE};

/// Where a version stands in its life cycle (docs/IMAGE-PIPELINE.md, "Stage 2: management" and
/// "Stage 3: archival and destruction"). Being archived is not a status: it is the `archive` field
/// of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Built, verified, stored; not yet approved.
    Built,
    /// Approved for use: exported in the signed allowlist.
    Promoted,
    /// Refused by `verify`: images removed, record kept with the reason.
    Discarded,
    /// Crypto-shredded: archive domain deleted at the TTP, every copy removed.
    Destroyed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Built => "built",
            Status::Promoted => "promoted",
            Status::Discarded => "discarded",
            Status::Destroyed => "destroyed",
        })
    }
}

/// Where a version's encrypted archive is and which TTP domain holds its key; set by `archive`,
/// used by `restore` and `destroy`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchiveRef {
    /// File name under `STORE/archives/`: `ROLE-N.skarc`.
    pub file: String,
    /// Hex sha256 of the whole `.skarc` file (header sector and ciphertext).
    pub archive_sha256: String,
    /// The TTP domain created for this archive alone.
    pub domain_id: String,
    /// The domain's header record (descriptor + TTP registration), base64 of its encoding.
    pub header: String,
    /// When the archive was written, RFC 3339 UTC.
    pub archived_at: String,
    /// Which key source holds the key, e.g. `ttp https://...` (from
    /// [`KeySource::describe`](crate::archive::KeySource::describe)).
    pub ttp: String,
}

/// What `destroy` did, kept in the destroyed version's record so the destruction itself is
/// traceable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Destruction {
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The deleted archive domain and the TTP it was deleted at; `None` when the version was never
    /// archived (then only plaintext blobs were removed).
    pub domain_deleted: Option<String>,
    /// What was removed: the archive file with its sha256 and each image blob.
    pub removed: Vec<String>,
    /// What stayed and why: provenance and profile (the record of what existed), and image blobs
    /// that another live version shares.
    pub kept: Vec<String>,
}

/// One version of a role, stored as `STORE/versions/ROLE/N.json`. Records are never deleted;
/// discarded and destroyed versions keep theirs with the reason. The signed provenance is the
/// authority: the store's digests are checked against it on `verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionRecord {
    /// The role (from the signed record).
    pub role: String,
    /// Version number within the role, from 1; `ROLE@N` names it.
    pub version: u64,
    /// When the version was stored, RFC 3339 UTC.
    pub created: String,
    /// Life-cycle state; decides which operations are allowed ([`Error::InvalidState`] otherwise).
    pub status: Status,
    /// Hex sha256 of `image.raw`: its blob name and its identity in the allowlist.
    pub raw_sha256: String,
    /// Hex sha256 of `image.qcow2`.
    pub qcow2_sha256: String,
    /// Hex sha256 of the provenance envelope blob.
    pub provenance_sha256: String,
    /// Hex sha256 of the profile blob (equal to `profileSha256` in the provenance); `patch`
    /// rebuilds from it.
    pub profile_sha256: String,
    /// Size of `image.raw` in bytes.
    pub raw_size: u64,
    /// Size of `image.qcow2` in bytes.
    pub qcow2_size: u64,
    /// Number of installed packages.
    pub packages: usize,
    /// Build wall-clock time in seconds.
    pub build_seconds: f64,
    /// `ROLE@N` this version was patched from; `None` for a fresh build.
    pub parent: Option<String>,
    /// What changed against the parent, one line each ("upgraded libssl3 A -> B", "image
    /// bit-identical to ROLE@N"), copied from the signed record.
    pub changes: Vec<String>,
    /// When it was promoted, RFC 3339 UTC.
    pub promoted_at: Option<String>,
    /// Why `verify` refused it, when, and which blobs were removed; set when the version is
    /// discarded.
    pub discarded: Option<String>,
    /// The encrypted archive, once `archive` ran.
    pub archive: Option<ArchiveRef>,
    /// What `destroy` did, once it ran.
    pub destroyed: Option<Destruction>,
}

impl VersionRecord {
    /// `ROLE@N`, the name used in logs, errors, `parent` and the CLI.
    pub fn id(&self) -> String {
        format!("{}@{}", self.role, self.version)
    }
}

/// An image store rooted at a directory (`--store`, `IMAGE_PIPELINE_STORE`); layout in the module
/// docs and docs/IMAGE-PIPELINE.md, "Stage 2: management".
pub struct Store {
    /// The store directory.
    pub root: PathBuf,
}

/// An exclusive lock on the store, released on drop.
pub struct StoreLock(#[allow(dead_code)] std::fs::File);

/// The current time, RFC 3339 UTC: the timestamp format of every record in the store.
pub fn now_rfc3339() -> String {
    provenance::rfc3339(std::time::SystemTime::now())
}

impl Store {
    /// Opens the store at `root`, creating `blobs/sha256`, `versions` and `archives` if missing.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["blobs/sha256", "versions", "archives"] {
            fsx::create_dir_all(&root.join(sub), "image store")?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// Takes the store's exclusive `flock` on `STORE/.lock`, blocking until another process
    /// releases it; every change holds it, so concurrent builds and patches get distinct version
    /// numbers.
    pub fn lock(&self) -> Result<StoreLock> {
        use std::os::fd::AsRawFd;
        let path = self.root.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open store lock", &path, e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock the store", &path, std::io::Error::last_os_error()));
        }
        Ok(StoreLock(file))
    }

    /// Where the blob with this hex sha256 lives (whether or not it exists).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    /// Whether the blob with this hex sha256 is present (it is gone after discard, archive or
    /// destroy).
    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).exists()
    }

    /// Copies `file` in under its digest (checked while copying: the digest must match).
    pub fn put_blob(&self, file: &Path, expected_sha256: Option<&str>) -> Result<String> {
        let sha = sha256_of_file(file)?;
        if let Some(expected) = expected_sha256 {
            if sha != expected {
                return Err(Error::store(
                    &self.root,
                    format!("{} hashes to {sha}, expected {expected}", file.display()),
                ));
            }
        }
        let dest = self.blob_path(&sha);
        if !dest.exists() {
            let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::copy(file, &tmp).map_err(|e| Error::io("copy into the store", &tmp, e))?;
            set_readonly(&tmp)?;
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io("move into the store", &dest, e))?;
        }
        Ok(sha)
    }

    /// Stores `bytes` as a read-only blob under their sha256 (written atomically) and returns the
    /// digest; a blob already present is left as is.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(bytes));
        let dest = self.blob_path(&sha);
        if !dest.exists() {
            fsx::write_atomic(&dest, bytes, "store blob")?;
            set_readonly(&dest)?;
        }
        Ok(sha)
    }

    /// Reads a whole blob; `what` names it in the error.
    pub fn read_blob(&self, sha256: &str, what: &str) -> Result<Vec<u8>> {
        fsx::read(&self.blob_path(sha256), what)
    }

    fn role_dir(&self, role: &str) -> PathBuf {
        self.root.join("versions").join(role)
    }

    /// Roles that have a version directory, sorted.
    pub fn roles(&self) -> Result<Vec<String>> {
        let dir = self.root.join("versions");
        let mut roles: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io("list roles", &dir, e))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string)))
            .collect();
        roles.sort();
        Ok(roles)
    }

    /// All versions of a role, oldest first.
    pub fn versions(&self, role: &str) -> Result<Vec<VersionRecord>> {
        let dir = self.role_dir(role);
        let Ok(read) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for entry in read.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fsx::read(&path, "version record")?;
            let record: VersionRecord = serde_json::from_slice(&bytes)
                .map_err(|e| Error::json(format!("version record {}", path.display()), e))?;
            out.push(record);
        }
        out.sort_by_key(|r| r.version);
        Ok(out)
    }

    /// Every version of every role, roles sorted, oldest version first within each.
    pub fn all_versions(&self) -> Result<Vec<VersionRecord>> {
        let mut all = Vec::new();
        for role in self.roles()? {
            all.extend(self.versions(&role)?);
        }
        Ok(all)
    }

    /// `ROLE@N`, `ROLE` (its newest version) or a digest prefix (8+ hex) of raw/qcow2.
    pub fn resolve(&self, spec: &str) -> Result<VersionRecord> {
        if let Some((role, n)) = spec.split_once('@') {
            let n: u64 = n.parse().map_err(|_| Error::UnknownVersion(spec.into()))?;
            return self
                .versions(role)?
                .into_iter()
                .find(|r| r.version == n)
                .ok_or_else(|| Error::UnknownVersion(spec.into()));
        }
        if spec.len() >= 8 && spec.chars().all(|c| c.is_ascii_hexdigit()) {
            let matches: Vec<VersionRecord> = self
                .all_versions()?
                .into_iter()
                .filter(|r| r.raw_sha256.starts_with(spec) || r.qcow2_sha256.starts_with(spec))
                .collect();
            if matches.len() == 1 {
                return matches.into_iter().next().ok_or_else(|| Error::UnknownVersion(spec.into()));
            }
            if matches.len() > 1 {
                let ids: Vec<String> = matches.iter().map(|r| r.id()).collect();
                return Err(Error::store(
                    &self.root,
                    format!("digest prefix {spec} matches {}: give ROLE@N", ids.join(", ")),
                ));
            }
        }
        self.versions(spec)?.pop().ok_or_else(|| Error::UnknownVersion(spec.into()))
    }

    /// The number the next version of `role` gets: one more than the highest, 1 for a new role.
    /// Take the store lock before using it, or another process may take the same number.
    pub fn next_version(&self, role: &str) -> Result<u64> {
        Ok(self.versions(role)?.last().map(|r| r.version + 1).unwrap_or(1))
    }

    /// Writes a version record atomically to `STORE/versions/ROLE/N.json`, replacing an older state
    /// of it.
    pub fn save(&self, record: &VersionRecord) -> Result<()> {
        let dir = self.role_dir(&record.role);
        fsx::create_dir_all(&dir, "role directory")?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| Error::json("encode version record", e))?;
        fsx::write_atomic(&dir.join(format!("{}.json", record.version)), bytes, "version record")
    }

    /// Adds a signed build (a directory with image.raw, image.qcow2, the provenance and the
    /// profile) as version `version` of its role.
    pub fn add(
        &self,
        build_dir: &Path,
        version: u64,
        build_seconds: f64,
        parent: Option<String>,
        changes: Vec<String>,
    ) -> Result<VersionRecord> {
        let envelope = fsx::read(&build_dir.join(PROVENANCE_NAME), "provenance")?;
        let statement = provenance::statement_unverified(&envelope)?;
        let skydd = &statement.predicate.skydd;
        let digest_of =
            |name: &str| statement.subject.iter().find(|s| s.name == name).and_then(|s| s.sha256()).map(str::to_string);
        let raw_sha256 =
            digest_of(RAW_NAME).ok_or_else(|| Error::store(&self.root, "the provenance names no image.raw"))?;
        let qcow2_sha256 =
            digest_of(QCOW2_NAME).ok_or_else(|| Error::store(&self.root, "the provenance names no image.qcow2"))?;
        self.put_blob(&build_dir.join(RAW_NAME), Some(&raw_sha256))?;
        self.put_blob(&build_dir.join(QCOW2_NAME), Some(&qcow2_sha256))?;
        let provenance_sha256 = self.put_bytes(&envelope)?;
        let profile_sha256 = self.put_blob(
            &build_dir.join(PROFILE_NAME),
            Some(&statement.predicate.build_definition.external_parameters.profile_sha256),
        )?;
        let record = VersionRecord {
            role: skydd.image.role.clone(),
            version,
            created: now_rfc3339(),
            status: Status::Built,
            raw_sha256,
            qcow2_sha256,
            provenance_sha256,
            profile_sha256,
            raw_size: skydd.image.raw_size,
            qcow2_size: skydd.image.qcow2_size,
            packages: skydd.packages.len(),
            build_seconds,
            parent,
            changes,
            promoted_at: None,
            discarded: None,
            archive: None,
            destroyed: None,
        };
        if self.role_dir(&record.role).join(format!("{version}.json")).exists() {
            return Err(Error::store(&self.root, format!("{} exists already", record.id())));
        }
        self.save(&record)?;
        Ok(record)
    }

    /// Decodes a version's statement from its stored provenance, without verifying it (for `show`,
    /// `diff` and `patch`; use [`Store::verify`] for trust).
    pub fn statement(&self, record: &VersionRecord) -> Result<Statement> {
        provenance::statement_unverified(&self.read_blob(&record.provenance_sha256, "provenance")?)
    }

    /// Verifies a stored version (signature, signer, steps, tests, image digests). With
    /// `discard`, a refused version loses its images and is marked discarded with the reason.
    pub fn verify(&self, record: &VersionRecord, policy: &TrustPolicy, discard: bool) -> Result<provenance::Verified> {
        let envelope = self.read_blob(&record.provenance_sha256, "provenance")?;
        let locate = |name: &str| -> Option<PathBuf> {
            let sha = match name {
                RAW_NAME => &record.raw_sha256,
                QCOW2_NAME => &record.qcow2_sha256,
                _ => return None,
            };
            let p = self.blob_path(sha);
            p.exists().then_some(p)
        };
        let result = provenance::verify_with(&envelope, &record.id(), &locate, policy).and_then(|v| {
            let raw =
                v.statement.subject.iter().find(|s| s.name == RAW_NAME).and_then(|s| s.sha256()).unwrap_or_default();
            if raw != record.raw_sha256 {
                return Err(Error::refused(
                    record.id(),
                    format!("the store record names raw {} but the signed provenance names {raw}", record.raw_sha256),
                ));
            }
            Ok(v)
        });
        if let (Err(e), true) = (&result, discard) {
            if matches!(e, Error::VerifyRefused { .. }) && record.status != Status::Destroyed {
                let _lock = self.lock()?;
                let mut r = record.clone();
                let mut removed = Vec::new();
                for sha in [&record.raw_sha256, &record.qcow2_sha256] {
                    if !self.shared_with_live(sha, &record.id())?
                        && fsx::remove_file_if_exists(&self.blob_path(sha), "image blob")?
                    {
                        removed.push(sha.clone());
                    }
                }
                r.status = Status::Discarded;
                r.discarded = Some(format!(
                    "{} at {}; removed blobs: {}",
                    e,
                    now_rfc3339(),
                    if removed.is_empty() { "none".into() } else { removed.join(", ") }
                ));
                self.save(&r)?;
            }
        }
        result
    }

    /// Whether another live (not destroyed/discarded) version uses the same blob.
    pub fn shared_with_live(&self, sha256: &str, except_id: &str) -> Result<bool> {
        Ok(self.all_versions()?.iter().any(|r| {
            r.id() != except_id
                && !matches!(r.status, Status::Destroyed | Status::Discarded)
                && (r.raw_sha256 == sha256 || r.qcow2_sha256 == sha256)
        }))
    }

    /// Marks a verified version approved.
    pub fn promote(&self, spec: &str, policy: &TrustPolicy) -> Result<VersionRecord> {
        let record = self.resolve(spec)?;
        if record.status != Status::Built && record.status != Status::Promoted {
            return Err(Error::InvalidState {
                version: record.id(),
                action: "promoted".into(),
                reason: format!("it is {}", record.status),
            });
        }
        self.verify(&record, policy, true)?;
        let _lock = self.lock()?;
        let mut r = self.resolve(&record.id())?;
        r.status = Status::Promoted;
        r.promoted_at = Some(now_rfc3339());
        self.save(&r)?;
        Ok(r)
    }

    /// The signed allowlist of approved image digests (DSSE, ECDSA P-256).
    pub fn allowlist(&self, signer: &Signer) -> Result<(AllowList, Vec<u8>)> {
        let mut entries = Vec::new();
        for r in self.all_versions()? {
            if r.status == Status::Promoted {
                entries.push(AllowListEntry {
                    role: r.role.clone(),
                    version: r.version,
                    raw_sha256: r.raw_sha256.clone(),
                    qcow2_sha256: r.qcow2_sha256.clone(),
                    provenance_sha256: r.provenance_sha256.clone(),
                    promoted_at: r.promoted_at.clone().unwrap_or_default(),
                });
            }
        }
        let list = AllowList {
            kind: ALLOWLIST_KIND.into(),
            issued_at: now_rfc3339(),
            issuer: signer.identity.name.clone(),
            images: entries,
        };
        let payload = serde_json::to_vec(&list).map_err(|e| Error::json("encode allowlist", e))?;
        let envelope = signer.sign_payload(ALLOWLIST_PAYLOAD_TYPE, &payload);
        let bytes = serde_json::to_vec_pretty(&envelope).map_err(|e| Error::json("encode allowlist envelope", e))?;
        Ok((list, bytes))
    }
}

fn set_readonly(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| Error::io("make read-only", path, e))
}

/// Checks a signed allowlist file and returns its contents.
pub fn verify_allowlist(bytes: &[u8], policy: &TrustPolicy) -> Result<AllowList> {
    protocol::image::verify_allowlist(bytes, policy).map_err(provenance::refusal)
}

/// Differences between two versions, from their signed records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VersionDiff {
    /// Packages in the newer version only, `NAME VERSION`.
    pub added: Vec<String>,
    /// Packages in the older version only, `NAME VERSION`.
    pub removed: Vec<String>,
    /// Packages whose version changed, `NAME OLD -> NEW`.
    pub upgraded: Vec<String>,
    /// Profile digest, updates flag, check inventory (`+`/`-` lines) and hardening action
    /// differences.
    pub hardening: Vec<String>,
}

impl VersionDiff {
    /// True when neither packages nor hardening differ.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.upgraded.is_empty() && self.hardening.is_empty()
    }

    /// One line per change, as a patch record lists them.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.upgraded.iter().map(|l| format!("upgraded {l}")));
        out.extend(self.added.iter().map(|l| format!("added {l}")));
        out.extend(self.removed.iter().map(|l| format!("removed {l}")));
        out.extend(self.hardening.iter().map(|l| format!("hardening: {l}")));
        out
    }
}

/// Compares two package lists by name and version (`a` older, `b` newer) and adds added, removed
/// and upgraded packages to `diff`.
pub fn diff_packages(a: &[InstalledPackage], b: &[InstalledPackage], diff: &mut VersionDiff) {
    let map =
        |v: &[InstalledPackage]| v.iter().map(|p| (p.name.clone(), p.version.clone())).collect::<BTreeMap<_, _>>();
    let (ma, mb) = (map(a), map(b));
    for (name, vb) in &mb {
        match ma.get(name) {
            None => diff.added.push(format!("{name} {vb}")),
            Some(va) if va != vb => diff.upgraded.push(format!("{name} {va} -> {vb}")),
            _ => {}
        }
    }
    for (name, va) in &ma {
        if !mb.contains_key(name) {
            diff.removed.push(format!("{name} {va}"));
        }
    }
}

/// Package and hardening differences between two statements.
pub fn diff_statements(a: &Statement, b: &Statement) -> VersionDiff {
    let mut diff = VersionDiff::default();
    diff_packages(&a.predicate.skydd.packages, &b.predicate.skydd.packages, &mut diff);
    let pa = &a.predicate.build_definition.external_parameters;
    let pb = &b.predicate.build_definition.external_parameters;
    if pa.profile_sha256 != pb.profile_sha256 {
        diff.hardening.push(format!(
            "profile {} -> {}",
            &pa.profile_sha256[..12.min(pa.profile_sha256.len())],
            &pb.profile_sha256[..12.min(pb.profile_sha256.len())]
        ));
    }
    if pa.updates != pb.updates {
        diff.hardening.push(format!("security/updates suites {} -> {}", pa.updates, pb.updates));
    }
    // Inventories the checks recorded (services, sockets, sshd settings, SUID files, ...).
    let findings = |s: &Statement| {
        s.predicate
            .skydd
            .tests
            .checks
            .iter()
            .flat_map(|c| c.findings.iter().map(move |f| format!("{}: {f}", c.name)))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (fa, fb) = (findings(a), findings(b));
    for f in fb.difference(&fa) {
        if !f.starts_with("package allowlist:") {
            diff.hardening.push(format!("+ {f}"));
        }
    }
    for f in fa.difference(&fb) {
        if !f.starts_with("package allowlist:") {
            diff.hardening.push(format!("- {f}"));
        }
    }
    let ha: Vec<_> = a.predicate.skydd.hardening.iter().map(|h| &h.action).collect();
    let hb: Vec<_> = b.predicate.skydd.hardening.iter().map(|h| &h.action).collect();
    if ha != hb {
        diff.hardening.push(format!("hardening actions {ha:?} -> {hb:?}"));
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(n: &str, v: &str) -> InstalledPackage {
        InstalledPackage {
            name: n.into(),
            version: v.into(),
            architecture: "amd64".into(),
            sha256: String::new(),
            filename: String::new(),
        }
    }

    #[test]
    fn package_diff() {
        let mut d = VersionDiff::default();
        diff_packages(
            &[pkg("a", "1"), pkg("b", "1"), pkg("c", "1")],
            &[pkg("a", "1"), pkg("b", "2"), pkg("d", "1")],
            &mut d,
        );
        assert_eq!(d.upgraded, vec!["b 1 -> 2"]);
        assert_eq!(d.added, vec!["d 1"]);
        assert_eq!(d.removed, vec!["c 1"]);
        assert_eq!(d.lines().len(), 3);
    }
}
