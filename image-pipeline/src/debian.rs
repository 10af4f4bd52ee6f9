//! The trusted source, re-checked by the pipeline itself: Debian's archive chain of trust.
//!
//! apt (inside mmdebstrap) already refuses an InRelease that is not signed by a key in
//! debian-archive-keyring and a .deb whose hash differs from the Packages index. The pipeline
//! does not take that on faith: after the bootstrap it checks the same chain again and writes
//! every link into the provenance record:
//!
//! 1. each InRelease file verifies with `gpgv` against the archive keyring (signer recorded);
//! 2. each Packages index hashes to the SHA256 that its InRelease lists for it;
//! 3. each installed package's .deb hashes to the SHA256 its Packages stanza lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{fsx, Error, Result};

/// The Debian archive keyring (package debian-archive-keyring): the trust anchor mmdebstrap, apt
/// and the pipeline's own `gpgv` check use (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 1).
pub const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Splits a deb822 file (dpkg status, Packages, Release) into stanzas of fields. Continuation
/// lines are appended to the previous field.
pub fn stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut current: BTreeMap<String, String> = BTreeMap::new();
    let mut last_key: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            last_key = None;
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(key) = &last_key {
                if let Some(value) = current.get_mut(key) {
                    value.push('\n');
                    value.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            current.insert(key.to_string(), value.trim().to_string());
            last_key = Some(key.to_string());
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One installed package, as the provenance records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstalledPackage {
    /// Package name (dpkg `Package`).
    pub name: String,
    /// Installed version (dpkg `Version`), e.g. `3.0.11-1~deb12u2`; `diff` and `patch` report
    /// upgrades by comparing these.
    pub version: String,
    /// Debian architecture, e.g. `amd64` or `all`; becomes `arch=` of the package's `pkg:deb` URL.
    pub architecture: String,
    /// SHA256 of the .deb, checked against the Packages index.
    pub sha256: String,
    /// The archive path (Packages `Filename`).
    pub filename: String,
}

/// Installed packages of a root tree (from var/lib/dpkg/status), sorted by name.
pub fn installed_packages(root: &Path) -> Result<Vec<(String, String, String)>> {
    let path = root.join("var/lib/dpkg/status");
    let text = fsx::read_string(&path, "dpkg status")?;
    let mut out = Vec::new();
    for stanza in stanzas(&text) {
        let installed = stanza.get("Status").map(|s| s.ends_with(" installed")).unwrap_or(false);
        if !installed {
            continue;
        }
        let field = |k: &str| {
            stanza.get(k).cloned().ok_or_else(|| {
                Error::parse("dpkg status", format!("an installed package has no {k} field: {stanza:?}"))
            })
        };
        out.push((field("Package")?, field("Version")?, field("Architecture")?));
    }
    out.sort();
    Ok(out)
}

/// An InRelease file as fetched for the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// e.g. `http://deb.debian.org/debian/dists/bookworm/InRelease`
    pub uri: String,
    /// Hex sha256 of the InRelease file as fetched; a `resolvedDependencies` digest in the
    /// provenance.
    pub sha256: String,
    /// The `Suite` field, e.g. `stable` or `stable-security`.
    pub suite: String,
    /// The `Codename` field, e.g. `bookworm`.
    pub codename: String,
    /// The archive snapshot time (InRelease `Date`).
    pub date: String,
    /// gpgv's report of the good signature (key fingerprint and user id).
    pub signed_by: String,
}

/// What the archive check established.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveEvidence {
    /// Hex sha256 of the keyring file that verified the `InRelease` files
    /// (`internalParameters.keyringSha256`).
    pub keyring_sha256: String,
    /// Each `InRelease` that was verified with `gpgv`.
    pub releases: Vec<ReleaseRecord>,
    /// Packages indices: uri → sha256 (each equal to its InRelease entry).
    pub indices: BTreeMap<String, String>,
    /// Every installed package with its `.deb` sha256, sorted by name; `packages` of the `skydd`
    /// record.
    pub packages: Vec<InstalledPackage>,
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("open for hashing", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io("read for hashing", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a file, read in 1 MiB chunks (images of several GiB are not loaded at once). Used
/// for the `.deb` files, the images, the tarball and archive digests.
pub fn sha256_of_file(path: &Path) -> Result<String> {
    sha256_file(path)
}

/// The lists file name apt uses for a URI (`deb.debian.org_debian_dists_bookworm_InRelease`)
/// back to the URI (scheme not kept by apt; http is assumed as in the sources we write).
fn uri_of_list(name: &str) -> String {
    format!("http://{}", name.replace('_', "/"))
}

/// Checks the chain (see the module comment) over the apt lists and .deb cache the bootstrap
/// left, for the packages installed in `root`.
pub fn check_archive_chain(lists_dir: &Path, deb_cache: &Path, root: &Path, keyring: &Path) -> Result<ArchiveEvidence> {
    let keyring_sha256 = sha256_file(keyring)?;
    let mut names: Vec<String> = std::fs::read_dir(lists_dir)
        .map_err(|e| Error::io("list apt lists", lists_dir, e))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string)))
        .collect();
    names.sort();
    let mut releases = Vec::new();
    let mut indices = BTreeMap::new();
    // (package, version, arch) → (sha256, filename) from every verified Packages index.
    let mut available: BTreeMap<(String, String, String), (String, String)> = BTreeMap::new();
    for name in names.iter().filter(|n| n.ends_with("_InRelease")) {
        let path = lists_dir.join(name);
        let signed_by = gpgv(&path, keyring)?;
        let text = fsx::read_string(&path, "InRelease")?;
        let body =
            cleartext_body(&text).ok_or_else(|| Error::parse(name.clone(), "not a clear-signed InRelease file"))?;
        let fields = stanzas(&body).into_iter().next().unwrap_or_default();
        let prefix = name.trim_end_matches("InRelease");
        let listed: BTreeMap<String, String> = fields
            .get("SHA256")
            .map(|s| {
                s.lines()
                    .filter_map(|l| {
                        let parts: Vec<&str> = l.split_whitespace().collect();
                        (parts.len() == 3).then(|| (parts[2].to_string(), parts[0].to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for index in names.iter().filter(|n| n.starts_with(prefix) && n.ends_with("_Packages")) {
            let relative = index[prefix.len()..].replace('_', "/");
            let index_path = lists_dir.join(index);
            let actual = sha256_file(&index_path)?;
            let expected = listed
                .get(&relative)
                .ok_or_else(|| Error::parse(name.clone(), format!("InRelease lists no SHA256 for {relative}")))?;
            if &actual != expected {
                return Err(Error::parse(
                    index.clone(),
                    format!("Packages index hashes to {actual} but {name} says {expected}"),
                ));
            }
            indices.insert(uri_of_list(index), actual);
            let packages_text = fsx::read_string(&index_path, "Packages index")?;
            for stanza in stanzas(&packages_text) {
                if let (Some(p), Some(v), Some(a), Some(h), Some(f)) = (
                    stanza.get("Package"),
                    stanza.get("Version"),
                    stanza.get("Architecture"),
                    stanza.get("SHA256"),
                    stanza.get("Filename"),
                ) {
                    available.insert((p.clone(), v.clone(), a.clone()), (h.clone(), f.clone()));
                }
            }
        }
        releases.push(ReleaseRecord {
            uri: uri_of_list(name),
            sha256: sha256_file(&path)?,
            suite: fields.get("Suite").cloned().unwrap_or_default(),
            codename: fields.get("Codename").cloned().unwrap_or_default(),
            date: fields.get("Date").cloned().unwrap_or_default(),
            signed_by,
        });
    }
    if releases.is_empty() {
        return Err(Error::parse(lists_dir.display().to_string(), "the bootstrap left no InRelease file to check"));
    }
    let mut packages = Vec::new();
    for (name, version, arch) in installed_packages(root)? {
        let (expected, filename) =
            available.get(&(name.clone(), version.clone(), arch.clone())).cloned().ok_or_else(|| {
                Error::PackageHash {
                    package: name.clone(),
                    version: version.clone(),
                    detail: "is installed but no verified Packages index lists this version".into(),
                }
            })?;
        let deb = deb_cache.join(deb_file_name(&name, &version, &arch));
        let actual = sha256_file(&deb).map_err(|e| Error::PackageHash {
            package: name.clone(),
            version: version.clone(),
            detail: format!("its .deb is not in the apt cache to be checked: {e}"),
        })?;
        if actual != expected {
            return Err(Error::PackageHash {
                package: name,
                version,
                detail: format!("{} hashes to {actual}, the Packages index says {expected}", deb.display()),
            });
        }
        packages.push(InstalledPackage { name, version, architecture: arch, sha256: actual, filename });
    }
    Ok(ArchiveEvidence { keyring_sha256, releases, indices, packages })
}

/// apt's cache file name: the epoch colon is written %3a.
pub fn deb_file_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// The signed text of a clear-signed message (dash-escaping undone).
fn cleartext_body(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN PGP SIGNED MESSAGE-----")?;
    let rest = &text[start..];
    let blank = rest.find("\n\n")?;
    let body_and_sig = &rest[blank + 2..];
    let end = body_and_sig.find("-----BEGIN PGP SIGNATURE-----")?;
    Some(body_and_sig[..end].lines().map(|l| l.strip_prefix("- ").unwrap_or(l)).collect::<Vec<_>>().join("\n"))
}

/// Verifies a clear-signed file with gpgv against `keyring`; returns the "Good signature"
/// lines (with the key fingerprint).
pub fn gpgv(path: &Path, keyring: &Path) -> Result<String> {
    let output = Command::new("gpgv")
        .arg("--keyring")
        .arg(keyring)
        .arg(path)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| Error::MissingTool { tool: "gpgv".into(), hint: format!("install the gpgv package ({e})") })?;
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    if !output.status.success() {
        return Err(Error::parse(
            path.display().to_string(),
            format!("signature does not verify against {}: {}", keyring.display(), report.trim()),
        ));
    }
    let good: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("Good signature") || l.contains("using") || l.contains("Primary key fingerprint"))
        .map(str::trim)
        .collect();
    Ok(good.join("; ").replace("gpgv: ", ""))
}

/// Where the archive lists and .deb files of one build are kept (inside the work dir).
pub struct ArchiveDirs {
    /// The apt lists (`InRelease`, `Packages`) synced out of the bootstrap.
    pub lists: PathBuf,
    /// The `.deb` files of the bootstrap (the apt cache).
    pub debs: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stanzas_with_continuations() {
        let s = stanzas("Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["Description"], "x\nmore");
        assert_eq!(s[1]["Package"], "b");
    }

    #[test]
    fn cache_names_escape_epochs() {
        assert_eq!(deb_file_name("openssh-server", "1:9.2p1-2", "amd64"), "openssh-server_1%3a9.2p1-2_amd64.deb");
    }

    #[test]
    fn cleartext_is_extracted() {
        let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\n- -dash\n-----BEGIN PGP SIGNATURE-----\nxx\n";
        assert_eq!(cleartext_body(text).unwrap(), "Origin: Debian\n-dash");
    }
}
