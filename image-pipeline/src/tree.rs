//! Helpers over an unpacked root tree: a sorted walk, systemd unit lookups, timestamps.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One entry of the tree: its path inside the image ("/usr/bin/su") and metadata.
pub struct Entry {
    /// Absolute path as seen inside the image, e.g. `/usr/bin/su`; what checks report and records
    /// list.
    pub image_path: String,
    /// The same file on the build host (under the unpacked root).
    pub host_path: PathBuf,
    /// `lstat` metadata (symlinks are not followed): mode, owner, times.
    pub meta: std::fs::Metadata,
}

/// Every entry under `root` (not following symlinks), sorted by path.
pub fn walk(root: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let read = std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        for entry in read {
            let entry = entry.map_err(|e| Error::io("read directory entry", &dir, e))?;
            let host_path = entry.path();
            let meta = std::fs::symlink_metadata(&host_path).map_err(|e| Error::io("stat", &host_path, e))?;
            if meta.is_dir() {
                stack.push(host_path.clone());
            }
            let image_path = format!("/{}", host_path.strip_prefix(root).unwrap_or(&host_path).display());
            out.push(Entry { image_path, host_path, meta });
        }
    }
    out.sort_by(|a, b| a.image_path.cmp(&b.image_path));
    Ok(out)
}

/// `image_path` ("/etc/ssh/sshd_config") inside `root`.
pub fn at(root: &Path, image_path: &str) -> PathBuf {
    root.join(image_path.trim_start_matches('/'))
}

/// Sets atime and mtime of every entry newer than `epoch` to `epoch` (symlinks themselves,
/// not their targets), like mmdebstrap and dpkg do with SOURCE_DATE_EPOCH.
pub fn clamp_mtimes(root: &Path, epoch: u64) -> Result<usize> {
    let mut changed = 0;
    let mut entries = walk(root)?;
    entries.push(Entry {
        image_path: "/".into(),
        host_path: root.to_path_buf(),
        meta: std::fs::symlink_metadata(root).map_err(|e| Error::io("stat", root, e))?,
    });
    for entry in entries {
        if entry.meta.mtime() as u64 > epoch || entry.meta.atime() as u64 != epoch {
            set_times(&entry.host_path, epoch)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// Sets atime and mtime of `path` (the link itself for a symlink) to `epoch` seconds since 1970, so
/// files the pipeline writes get the same timestamps on every build.
pub fn set_times(path: &Path, epoch: u64) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::parse(path.display().to_string(), "path has a NUL byte"))?;
    let t = libc::timespec { tv_sec: epoch as libc::time_t, tv_nsec: 0 };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array, as utimensat requires.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(Error::io("set timestamps", path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Directories systemd reads unit files from, in an image.
pub const UNIT_DIRS: &[&str] = &["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];

/// The unit file of `unit` in the image, if a package ships it.
pub fn find_unit(root: &Path, unit: &str) -> Option<(String, PathBuf)> {
    UNIT_DIRS.iter().find_map(|dir| {
        let image_path = format!("{dir}/{unit}");
        let host = at(root, &image_path);
        std::fs::symlink_metadata(&host)
            .ok()
            .filter(|m| !m.file_type().is_symlink() || host.exists())
            .map(|_| (image_path, host))
    })
}

/// Units enabled by a link in a `*.wants` / `*.requires` directory of /etc/systemd/system:
/// (unit, the directory that wants it).
pub fn enabled_units(root: &Path) -> Result<Vec<(String, String)>> {
    let base = at(root, "/etc/systemd/system");
    let mut out = Vec::new();
    let Ok(read) = std::fs::read_dir(&base) else { return Ok(out) };
    let mut dirs: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".wants") || n.ends_with(".requires"))
        })
        .collect();
    dirs.sort();
    for dir in dirs {
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let mut links: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io("read systemd wants directory", &dir, e))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string)))
            .collect();
        links.sort();
        for link in links {
            out.push((link, dir_name.clone()));
        }
    }
    Ok(out)
}

/// Whether `unit` is masked (a link to /dev/null in /etc/systemd/system).
pub fn is_masked(root: &Path, unit: &str) -> bool {
    std::fs::read_link(at(root, &format!("/etc/systemd/system/{unit}")))
        .map(|t| t == Path::new("/dev/null"))
        .unwrap_or(false)
}

/// Values of `key=` lines in a unit file's body (all sections).
pub fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}
