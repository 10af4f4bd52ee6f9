//! The pipeline's operations that combine build, signing and the store: `build` (with or
//! without a store) and `patch`.

use std::path::{Path, PathBuf};

use crate::build::{self, BuildOptions, BuildResult, PROVENANCE_NAME};
use crate::error::{fsx, Error, Result};
use crate::profile::LoadedProfile;
use crate::provenance::{ImageIdentity, Signer, Statement};
use crate::store::{self, Store, VersionRecord};

/// What a signed build produced.
#[derive(Debug)]
pub struct Outcome {
    /// The unsigned build: image paths, digests, sizes, steps, hardening and check results.
    pub result: BuildResult,
    /// The in-toto statement that was signed (also for a failed build, see [`build_signed`]).
    pub statement: Statement,
    /// Path of `provenance.dsse.json` in the build's output directory.
    pub provenance: PathBuf,
    /// The store version, when a store was given.
    pub record: Option<VersionRecord>,
}

/// Builds, signs the provenance (also for a build whose security checks failed: the signed
/// record then says so, and `verify` refuses it), and adds a passing build to the store.
pub fn build_signed(
    opts: &BuildOptions,
    signer: &Signer,
    store: Option<&Store>,
    parent: Option<&VersionRecord>,
) -> Result<Outcome> {
    let result = build::build(opts)?;
    let role = opts.profile.profile.image.role.clone();
    let _lock = match store {
        Some(s) => Some(s.lock()?),
        None => None,
    };
    let version = match store {
        Some(s) => Some(s.next_version(&role)?),
        None => None,
    };
    let mut identity = ImageIdentity {
        role: role.clone(),
        version,
        parent: parent.map(|p| p.id()),
        changes: Vec::new(),
        raw_size: result.raw_size,
        qcow2_size: result.qcow2_size,
    };
    let mut statement = build::statement(opts, &result, identity.clone());
    if let (Some(s), Some(p)) = (store, parent) {
        let before = s.statement(p)?;
        let diff = store::diff_statements(&before, &statement);
        identity.changes = if diff.is_empty() {
            vec![format!("no package or hardening change against {}", p.id())]
        } else {
            diff.lines()
        };
        if result.raw_sha256 == p.raw_sha256 {
            identity.changes.push(format!("image bit-identical to {}", p.id()));
        }
        statement = build::statement(opts, &result, identity.clone());
    }
    let envelope = signer.sign(&statement)?;
    let provenance = opts.out_dir.join(PROVENANCE_NAME);
    let bytes = serde_json::to_vec_pretty(&envelope).map_err(|e| Error::json("encode provenance", e))?;
    fsx::write(&provenance, bytes, "provenance")?;
    if !result.tests.passed() {
        let violations = result.tests.violations();
        return Err(Error::ChecksFailed {
            image: format!("{role} (not stored; signed record of the failure at {})", provenance.display()),
            violations: violations.len(),
            summary: violations.join("; "),
        });
    }
    let record = match (store, version) {
        (Some(s), Some(v)) => {
            Some(s.add(&opts.out_dir, v, result.seconds, parent.map(|p| p.id()), identity.changes.clone())?)
        }
        _ => None,
    };
    Ok(Outcome { result, statement, provenance, record })
}

/// `patch ROLE`: rebuilds the newest version of ROLE from the profile it was built with (the
/// stored copy, so only packages can change), with the suite's updates and security
/// archives, as the next version whose record lists what changed.
pub fn patch(store: &Store, role: &str, signer: &Signer, template: &BuildOptions, out_dir: &Path) -> Result<Outcome> {
    let newest = store
        .versions(role)?
        .into_iter()
        .rev()
        .find(|r| !matches!(r.status, store::Status::Destroyed | store::Status::Discarded))
        .ok_or_else(|| {
            Error::store(&store.root, format!("role {role} has no live version to patch; build one first"))
        })?;
    let profile_bytes = store.read_blob(&newest.profile_sha256, "stored profile")?;
    let profile = LoadedProfile::from_bytes(role, &format!("store:{}", newest.id()), profile_bytes)?;
    let mut opts = template.clone();
    opts.profile = profile;
    opts.updates = true;
    opts.out_dir = out_dir.to_path_buf();
    build_signed(&opts, signer, Some(store), Some(&newest))
}
