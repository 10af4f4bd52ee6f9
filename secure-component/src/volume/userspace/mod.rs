//! The userspace volume backend: the data area of a volume (docs/FORMAT.md) decrypted by
//! our own AES-XTS engine ([`skydd_volume::xts`]) and served as ONE plaintext file over
//! FUSE (`plain_file.rs`), which is then attached to a loop device ([`crate::sys::loopdev`])
//! so the rest of the host sees a block device, exactly like a dm-crypt mapping.
//!
//! Per mapping: a FUSE mount at `<state_dir>/<name>.mnt` holding the file `data`, a loop
//! device over that file (4096-byte logical blocks, read-only for ro), and
//! `<state_dir>/<name>.json` describing it (never the key). The FUSE server runs on a
//! thread of this process, so after a restart of the process every mapping it had is
//! gone; `list` reports such leftovers as stale and `cleanup_stale` removes them.

mod plain_file;

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::MountOption;
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use skydd_volume::device::SectorDevice;
use skydd_volume::layout::SECTOR_SIZE;

use super::engine::open_sector_device;
use super::{IntegrityOpen, OpenMode, OpenVolume, VolumeBackend};
use crate::error::{Error, Result};
use crate::sys::loopdev::{self, LoopOptions};
use plain_file::PlainFile;

/// Default state directory (tmpfs on a host: mappings do not survive a reboot either).
pub const DEFAULT_STATE_DIR: &str = "/run/skydd/userspace";
/// Name of the plaintext file inside each FUSE mount.
pub const DATA_FILE: &str = "data";

/// What `<state_dir>/<name>.json` holds: enough to find and tear down a mapping, no key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MappingRecord {
    /// The mapping name, also the record's file name (`<name>.json`).
    pub name: String,
    /// The encrypted volume file the engine reads and writes.
    pub volume: PathBuf,
    /// The loop device over the plaintext file: what the hypervisor driver attaches.
    pub device: PathBuf,
    /// The FUSE mount point holding the plaintext file [`DATA_FILE`].
    pub mountpoint: PathBuf,
    /// Whether the mapping refuses writes.
    pub read_only: bool,
    /// The process serving the FUSE mount.
    pub pid: u32,
}

/// A mapping found in the state directory.
#[derive(Debug, Clone)]
pub struct MappingStatus {
    /// The mapping as recorded on disk.
    pub record: MappingRecord,
    /// `None` if this process serves it; otherwise why it is stale.
    pub stale: Option<String>,
}

struct Live {
    record: MappingRecord,
    // Flushed (format 2: the final root committed) at close, before the session goes.
    device: Arc<dyn SectorDevice>,
    // Dropping the session unmounts the FUSE file system and drops the engine (whose
    // OpenSSL contexts are wiped when freed).
    session: fuser::BackgroundSession,
}

/// The userspace backend. One per process; mappings live as long as it does.
pub struct UserspaceBackend {
    state_dir: PathBuf,
    live: Mutex<HashMap<String, Live>>,
    fuse_threads: usize,
}

/// FUSE event-loop threads per mapping by default. Several threads let the kernel spread
/// requests over them, each on its own cloned `/dev/fuse` descriptor; on these 2 vCPUs a quiet
/// run measured 4 threads at 1.40/1.04/1.43/1.43× one thread (seq-write, seq-read, rand-write,
/// rand-read; docs/PERFORMANCE.md "fio on the userspace backend").
/// [`UserspaceBackend::with_fuse_threads`] sets another count.
pub const DEFAULT_FUSE_THREADS: usize = 4;

impl UserspaceBackend {
    /// A backend keeping its records in `state_dir` (created if missing).
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self> {
        let state_dir = state_dir.into();
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| Error::io(format!("creating state directory {}", state_dir.display()), e))?;
        Ok(Self { state_dir, live: Mutex::new(HashMap::new()), fuse_threads: DEFAULT_FUSE_THREADS })
    }

    /// Serves each mapping with `threads` FUSE event-loop threads (at least 1).
    pub fn with_fuse_threads(mut self, threads: usize) -> Self {
        self.fuse_threads = threads.max(1);
        self
    }

    /// Where the mapping records and FUSE mount points live.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Every mapping in the state directory, live or stale.
    pub fn list_detailed(&self) -> Result<Vec<MappingStatus>> {
        let live = self.lock()?;
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(&self.state_dir) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(format!("reading {}", self.state_dir.display()), e)),
        };
        for entry in dir {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", self.state_dir.display()), e))?;
            let path = entry.path();
            if path.extension() != Some(OsStr::new("json")) {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let record: MappingRecord = serde_json::from_str(&text)
                .map_err(|e| Error::Volume(format!("userspace mapping record {} is not valid: {e}", path.display())))?;
            let stale = if live.contains_key(&record.name) {
                None
            } else if record.pid != std::process::id() {
                Some(format!(
                    "its FUSE server (pid {}) is gone: the process that opened it has exited or restarted; \
                     {} and the mount at {} no longer serve data",
                    record.pid,
                    record.device.display(),
                    record.mountpoint.display()
                ))
            } else {
                Some("this process has no session for it (it was closed without removing its record)".into())
            };
            out.push(MappingStatus { record, stale });
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// Tears down what stale mappings left behind (loop device, dead FUSE mount, record).
    /// Returns the names cleaned.
    pub fn cleanup_stale(&self) -> Result<Vec<String>> {
        let mut cleaned = Vec::new();
        for status in self.list_detailed()? {
            if status.stale.is_none() {
                continue;
            }
            let r = &status.record;
            // Best effort: each piece may already be gone.
            let _ = loopdev::detach_if_backed_by(&r.device, &r.mountpoint.join(DATA_FILE));
            let _ = lazy_unmount(&r.mountpoint);
            let _ = std::fs::remove_dir(&r.mountpoint);
            let _ = std::fs::remove_file(self.record_path(&r.name));
            cleaned.push(r.name.clone());
        }
        Ok(cleaned)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.json"))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Live>>> {
        self.live.lock().map_err(|_| Error::Volume("userspace backend state lock poisoned".into()))
    }
}

impl VolumeBackend for UserspaceBackend {
    fn kind(&self) -> &'static str {
        "userspace"
    }

    fn open(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume> {
        self.serve(name, volume, mode, || open_sector_device(name, volume, key, None, mode))
    }

    fn open_authenticated(
        &self,
        name: &str,
        volume: &Path,
        key: &SecretBytes,
        integrity: IntegrityOpen,
        mode: OpenMode,
    ) -> Result<OpenVolume> {
        self.serve(name, volume, mode, || open_sector_device(name, volume, key, Some(integrity), mode))
    }

    fn live_device(&self, name: &str) -> Result<Arc<dyn SectorDevice>> {
        let live = self.lock()?;
        let served =
            live.get(name).ok_or_else(|| Error::Volume(format!("mapping {name} is not open in this process")))?;
        Ok(served.device.clone())
    }

    fn close(&self, name: &str) -> Result<()> {
        self.close_mapping(name)
    }

    fn list(&self) -> Result<Vec<OpenVolume>> {
        self.list_open()
    }
}

impl UserspaceBackend {
    /// Builds the sector device of `volume` with `device` and serves it over FUSE + loop.
    fn serve(
        &self,
        name: &str,
        volume: &Path,
        mode: OpenMode,
        device: impl FnOnce() -> Result<Arc<dyn SectorDevice>>,
    ) -> Result<OpenVolume> {
        validate_name(name)?;
        let mut live = self.lock()?;
        if live.contains_key(name) {
            return Err(Error::Volume(format!("userspace mapping {name} is already open")));
        }
        if self.record_path(name).exists() {
            return Err(Error::Volume(format!(
                "userspace mapping {name} has a stale record {} (from an earlier process); run cleanup_stale first",
                self.record_path(name).display()
            )));
        }
        let read_only = mode == OpenMode::ReadOnly;
        let sector_device = device()?;

        let mountpoint = self.state_dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| Error::io(format!("creating mount point {}", mountpoint.display()), e))?;
        let fs = PlainFile::new(sector_device.clone(), read_only);
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("skydd-{name}")),
            MountOption::Subtype("skydd".into()),
            MountOption::DefaultPermissions,
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        config.mount_options.push(if read_only { MountOption::RO } else { MountOption::RW });
        // Access for the mounting user only (SessionACL::Owner, the default); several
        // event-loop threads, each reading its own clone of the /dev/fuse descriptor.
        config.n_threads = Some(self.fuse_threads);
        config.clone_fd = true;
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(|e| Error::io(format!("mounting FUSE at {}", mountpoint.display()), e))?;

        let data_path = mountpoint.join(DATA_FILE);
        // 4096-byte logical blocks: the kernel never sends sub-sector I/O.
        let options = LoopOptions { read_only, autoclear: false, block_size: Some(SECTOR_SIZE as u32) };
        let loop_device = match loopdev::attach(&data_path, options) {
            Ok(lo) => lo.path,
            Err(e) => {
                drop(session);
                let _ = std::fs::remove_dir(&mountpoint);
                return Err(e.into());
            }
        };
        let record = MappingRecord {
            name: name.to_string(),
            volume: volume.to_path_buf(),
            device: loop_device.clone(),
            mountpoint: mountpoint.clone(),
            read_only,
            pid: std::process::id(),
        };
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::Volume(format!("encoding mapping record for {name}: {e}")))?;
        if let Err(e) = std::fs::write(self.record_path(name), json) {
            let _ = loopdev::detach_if_backed_by(&loop_device, &data_path);
            drop(session);
            let _ = std::fs::remove_dir(&mountpoint);
            return Err(Error::io(format!("writing {}", self.record_path(name).display()), e));
        }
        tracing::info!(name, device = %loop_device.display(), ?mode, "userspace volume opened");
        live.insert(name.to_string(), Live { record, device: sector_device, session });
        Ok(OpenVolume { name: name.to_string(), device: loop_device, mode })
    }

    fn close_mapping(&self, name: &str) -> Result<()> {
        let mut live = self.lock()?;
        let Some(mapping) = live.remove(name) else {
            return Err(Error::Volume(format!("userspace mapping {name} is not open in this process")));
        };
        let r = &mapping.record;
        if let Err(e) = loopdev::detach_if_backed_by(&r.device, &r.mountpoint.join(DATA_FILE)) {
            // Still in use (e.g. mounted): keep the mapping so the caller can retry.
            let err = Error::Volume(format!("closing {name}: detaching {} failed: {e}", r.device.display()));
            live.insert(name.to_string(), mapping);
            return Err(err);
        }
        let mountpoint = r.mountpoint.clone();
        // The loop device wrote back and flushed; this commits whatever is still open (format 2:
        // the root at detach). A failure loses nothing: the writes are on disk and announced in
        // the dirty map, so the next open settles them.
        if let Err(e) = mapping.device.flush() {
            tracing::warn!(name, error = %e, "final flush at close failed; the next open recovers these writes");
        }
        // Unmounts FUSE, joins the server thread and frees the engine (keys wiped by OpenSSL).
        drop(mapping.session);
        let _ = std::fs::remove_dir(&mountpoint);
        let _ = std::fs::remove_file(self.record_path(name));
        tracing::info!(name, "userspace volume closed");
        Ok(())
    }

    fn list_open(&self) -> Result<Vec<OpenVolume>> {
        let mut out = Vec::new();
        for s in self.list_detailed()? {
            let mode = if s.record.read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite };
            match s.stale {
                None => out.push(OpenVolume { name: s.record.name, device: s.record.device, mode }),
                Some(reason) => {
                    tracing::warn!(name = %s.record.name, device = %s.record.device.display(), %reason,
                        "stale userspace mapping (not served; call cleanup_stale)")
                }
            }
        }
        Ok(out)
    }
}

impl Drop for UserspaceBackend {
    fn drop(&mut self) {
        let names: Vec<String> = match self.live.lock() {
            Ok(l) => l.keys().cloned().collect(),
            Err(_) => return,
        };
        super::close_at_shutdown(self, names);
    }
}

pub(super) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Volume(format!(
            "mapping name {name:?} is invalid (1-100 characters of A-Z a-z 0-9 - _ . not starting with '.')"
        )))
    }
}

fn lazy_unmount(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("skydd-dom1_a.b").is_ok());
        for bad in ["", ".x", "a/b", "a b", "../x"] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("is invalid"), "{e}");
        }
    }
}
