//! The userspace volume backend: the data area of a volume (docs/FORMAT.md) decrypted by
//! our own AES-XTS engine ([`crate::xts`]) and served as ONE plaintext file over FUSE,
//! which is then attached to a loop device so the rest of the host sees a block device,
//! exactly like a dm-crypt mapping.
//!
//! Per mapping: a FUSE mount at `<state_dir>/<name>.mnt` holding the file `data`, a loop
//! device over that file (4096-byte logical blocks, read-only for ro), and
//! `<state_dir>/<name>.json` describing it (never the key). The FUSE server runs on a
//! thread of this process, so after a restart of the process every mapping it had is
//! gone; `list` reports such leftovers as stale and `cleanup_stale` removes them.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};
use protocol::format::{DATA_OFFSET, SECTOR_SIZE};
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use super::{OpenMode, OpenVolume, VolumeBackend};
use crate::error::{Error, Result};
use crate::xts::XtsEngine;

/// Default state directory (tmpfs on a host: mappings do not survive a reboot either).
pub const DEFAULT_STATE_DIR: &str = "/run/skydd/userspace";
/// Name of the plaintext file inside each FUSE mount.
pub const DATA_FILE: &str = "data";

const ROOT_INO: INodeNo = INodeNo(1);
const DATA_INO: INodeNo = INodeNo(2);
// The file never changes size or owner behind the kernel's back: cache attributes long.
const TTL: Duration = Duration::from_secs(3600);
const SECTOR: u64 = SECTOR_SIZE as u64;

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
    // Dropping the session unmounts the FUSE file system and drops the engine (whose
    // OpenSSL contexts are wiped when freed).
    session: fuser::BackgroundSession,
}

/// The userspace backend. One per process; mappings live as long as it does.
pub struct UserspaceBackend {
    state_dir: PathBuf,
    live: Mutex<HashMap<String, Live>>,
}

impl UserspaceBackend {
    /// A backend keeping its records in `state_dir` (created if missing).
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self> {
        let state_dir = state_dir.into();
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| Error::io(format!("creating state directory {}", state_dir.display()), e))?;
        Ok(Self { state_dir, live: Mutex::new(HashMap::new()) })
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
            let _ = detach_loop(&r.device, &r.mountpoint.join(DATA_FILE));
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
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(volume)
            .map_err(|e| Error::io(format!("opening volume {}", volume.display()), e))?;
        let len = file.metadata().map_err(|e| Error::io(format!("stat of volume {}", volume.display()), e))?.len();
        let len = if len == 0 { block_device_size(&file).unwrap_or(0) } else { len };
        let sectors = protocol::format::data_sectors(len);
        if sectors == 0 {
            return Err(Error::Volume(format!(
                "volume {} is {len} bytes: no data area after the {DATA_OFFSET}-byte header area",
                volume.display()
            )));
        }
        let engine = XtsEngine::new(key)?;

        let mountpoint = self.state_dir.join(format!("{name}.mnt"));
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| Error::io(format!("creating mount point {}", mountpoint.display()), e))?;
        let fs = PlainFile::new(file, engine, sectors * SECTOR, read_only);
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
        // Config::default(): one event-loop thread, access for the mounting user only
        // (SessionACL::Owner), as with fuser 0.15's spawn_mount2.
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(|e| Error::io(format!("mounting FUSE at {}", mountpoint.display()), e))?;

        let data_path = mountpoint.join(DATA_FILE);
        let device = match attach_loop(&data_path, read_only) {
            Ok(d) => d,
            Err(e) => {
                drop(session);
                let _ = std::fs::remove_dir(&mountpoint);
                return Err(e);
            }
        };
        let record = MappingRecord {
            name: name.to_string(),
            volume: volume.to_path_buf(),
            device: device.clone(),
            mountpoint: mountpoint.clone(),
            read_only,
            pid: std::process::id(),
        };
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::Volume(format!("encoding mapping record for {name}: {e}")))?;
        if let Err(e) = std::fs::write(self.record_path(name), json) {
            let _ = detach_loop(&device, &data_path);
            drop(session);
            let _ = std::fs::remove_dir(&mountpoint);
            return Err(Error::io(format!("writing {}", self.record_path(name).display()), e));
        }
        tracing::info!(name, device = %device.display(), ?mode, "userspace volume opened");
        live.insert(name.to_string(), Live { record, session });
        Ok(OpenVolume { name: name.to_string(), device, mode })
    }

    fn close(&self, name: &str) -> Result<()> {
        let mut live = self.lock()?;
        let Some(mapping) = live.remove(name) else {
            return Err(Error::Volume(format!("userspace mapping {name} is not open in this process")));
        };
        let r = &mapping.record;
        if let Err(e) = detach_loop(&r.device, &r.mountpoint.join(DATA_FILE)) {
            // Still in use (e.g. mounted): keep the mapping so the caller can retry.
            let err = Error::Volume(format!("closing {name}: detaching {} failed: {e}", r.device.display()));
            live.insert(name.to_string(), mapping);
            return Err(err);
        }
        let mountpoint = r.mountpoint.clone();
        // Unmounts FUSE, joins the server thread and frees the engine (keys wiped by OpenSSL).
        drop(mapping.session);
        let _ = std::fs::remove_dir(&mountpoint);
        let _ = std::fs::remove_file(self.record_path(name));
        tracing::info!(name, "userspace volume closed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<OpenVolume>> {
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
        for name in names {
            if let Err(e) = self.close(&name) {
                tracing::warn!(%name, error = %e, "closing userspace mapping on shutdown failed");
            }
        }
    }
}

fn validate_name(name: &str) -> Result<()> {
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

// ---- the FUSE file system: one directory with one file ---------------------------------

struct PlainFile {
    file: File,
    engine: XtsEngine,
    size: u64,
    read_only: bool,
    /// Reused between requests: no allocation per I/O once warmed up. fuser (>= 0.17) calls
    /// the file system through `&self`; with one event-loop thread the lock is never contended.
    buf: Mutex<Vec<u8>>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl PlainFile {
    fn new(file: File, engine: XtsEngine, size: u64, read_only: bool) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self { file, engine, size, read_only, buf: Mutex::new(Vec::new()), uid, gid, started: SystemTime::now() }
    }

    /// The scratch buffer; a panic while it was held leaves nothing to repair in it.
    fn buf(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o700, 0, 2),
            DATA_INO => (FileType::RegularFile, if self.read_only { 0o400 } else { 0o600 }, self.size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: SECTOR_SIZE as u32,
            flags: 0,
        })
    }

    /// Reads and decrypts whole sectors [first, first + count) into `scratch[..]`.
    fn load(&self, scratch: &mut Vec<u8>, first: u64, count: usize) -> std::io::Result<()> {
        let len = count * SECTOR_SIZE;
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        let buf = &mut scratch[..len];
        self.file.read_exact_at(buf, DATA_OFFSET + first * SECTOR)?;
        self.engine.decrypt_sectors(first, buf).map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn read_range<'b>(&self, scratch: &'b mut Vec<u8>, offset: u64, size: usize) -> std::io::Result<&'b [u8]> {
        let end = (offset + size as u64).min(self.size);
        if offset >= end {
            return Ok(&[]);
        }
        let first = offset / SECTOR;
        let last = end.div_ceil(SECTOR);
        self.load(scratch, first, (last - first) as usize)?;
        let skip = (offset - first * SECTOR) as usize;
        Ok(&scratch[skip..skip + (end - offset) as usize])
    }

    fn write_range(&self, scratch: &mut Vec<u8>, offset: u64, data: &[u8]) -> std::io::Result<usize> {
        let end = offset + data.len() as u64;
        if end > self.size {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let first = offset / SECTOR;
        let last = end.div_ceil(SECTOR);
        let count = (last - first) as usize;
        let head = (offset - first * SECTOR) as usize;
        let len = count * SECTOR_SIZE;
        if head != 0 || !end.is_multiple_of(SECTOR) {
            // Read-modify-write: only the partial first and last sectors need the old data.
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            if head != 0 {
                self.load_into(scratch, first, 0)?;
            }
            if !end.is_multiple_of(SECTOR) && (last - 1 != first || head == 0) {
                self.load_into(scratch, last - 1, (count - 1) * SECTOR_SIZE)?;
            }
        } else if scratch.len() < len {
            scratch.resize(len, 0);
        }
        let buf = &mut scratch[..len];
        buf[head..head + data.len()].copy_from_slice(data);
        self.engine.encrypt_sectors(first, buf).map_err(|e| std::io::Error::other(e.to_string()))?;
        self.file.write_all_at(buf, DATA_OFFSET + first * SECTOR)?;
        Ok(data.len())
    }

    /// Decrypts one sector into `scratch[at..at + 4096]`.
    fn load_into(&self, scratch: &mut [u8], sector: u64, at: usize) -> std::io::Result<()> {
        let s = &mut scratch[at..at + SECTOR_SIZE];
        self.file.read_exact_at(s, DATA_OFFSET + sector * SECTOR)?;
        self.engine.decrypt_sectors(sector, s).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for PlainFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests amortise the per-request cost; the kernel caps them (1 MiB).
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.as_bytes()) {
            (ROOT_INO, b"data") => match self.attr(DATA_INO) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DATA_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: every request reaches the engine. Without it the kernel would cache
        // the plaintext a second time (loop's page cache above already caches it).
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DATA_INO {
            return reply.error(Errno::EINVAL);
        }
        let mut scratch = self.buf();
        match self.read_range(&mut scratch, offset, size as usize) {
            Ok(data) => reply.data(data),
            Err(e) => {
                tracing::error!(offset, size, error = %e, "userspace volume read failed");
                reply.error(errno_of(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if ino != DATA_INO {
            return reply.error(Errno::EINVAL);
        }
        let mut scratch = self.buf();
        match self.write_range(&mut scratch, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                tracing::error!(offset, len = data.len(), error = %e, "userspace volume write failed");
                reply.error(errno_of(&e))
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = if datasync { self.file.sync_data() } else { self.file.sync_all() };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DATA_INO, FileType::RegularFile, DATA_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(usize::MAX)) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

// ---- loop devices (include/uapi/linux/loop.h) -------------------------------------------

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LOOP_MAJOR: u32 = 7;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn loop_info(read_only: bool, backing: &Path) -> LoopInfo64 {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: if read_only { LO_FLAGS_READ_ONLY } else { 0 },
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let name = backing.as_os_str().as_bytes();
    let n = name.len().min(63);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

/// Attaches `backing` to a free loop device with 4096-byte logical blocks (so the kernel
/// never sends sub-sector I/O) and returns its path.
fn attach_loop(backing: &Path, read_only: bool) -> Result<PathBuf> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(|e| Error::io(format!("opening {} for the loop device", backing.display()), e))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| Error::io("opening /dev/loop-control", e))?;
    // Another process may grab the same free device between GET_FREE and CONFIGURE.
    for _attempt in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(Error::io("LOOP_CTL_GET_FREE on /dev/loop-control", std::io::Error::last_os_error()));
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        ensure_loop_node(&dev, n as u32)?;
        let lo = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&dev)
            .map_err(|e| Error::io(format!("opening {}", dev.display()), e))?;
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: SECTOR_SIZE as u32,
            info: loop_info(read_only, backing),
            reserved: [0; 8],
        };
        // SAFETY: cfg is a live, correctly laid out struct loop_config.
        let rc = unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(dev);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EBUSY) => continue,
            // Kernels before 5.8 lack LOOP_CONFIGURE: the three-step way.
            Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                legacy_attach(&lo, &file, read_only, backing)
                    .map_err(|e| Error::io(format!("attaching {}", dev.display()), e))?;
                return Ok(dev);
            }
            _ => return Err(Error::io(format!("LOOP_CONFIGURE on {} with {}", dev.display(), backing.display()), err)),
        }
    }
    Err(Error::Volume("no free loop device after 16 attempts (each was taken by another process first)".into()))
}

fn legacy_attach(lo: &File, file: &File, read_only: bool, backing: &Path) -> std::io::Result<()> {
    // SAFETY: plain ioctls with an fd and a pointer to a live loop_info64.
    unsafe {
        if libc::ioctl(lo.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd() as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let info = loop_info(read_only, backing);
        if libc::ioctl(lo.as_raw_fd(), LOOP_SET_STATUS64 as _, &info as *const LoopInfo64) != 0 {
            let e = std::io::Error::last_os_error();
            libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0);
            return Err(e);
        }
        // Older kernels may not know it either; 512-byte blocks still work (FUSE does RMW).
        libc::ioctl(lo.as_raw_fd(), LOOP_SET_BLOCK_SIZE as _, SECTOR_SIZE as libc::c_ulong);
    }
    Ok(())
}

/// Containers often have a static /dev without nodes for new loop devices.
fn ensure_loop_node(dev: &Path, n: u32) -> Result<()> {
    if dev.exists() {
        return Ok(());
    }
    let c = CString::new(dev.as_os_str().as_bytes()).map_err(|_| Error::Volume("loop device path has a NUL".into()))?;
    // SAFETY: valid C string; creates a block device node.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(LOOP_MAJOR, n)) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::AlreadyExists {
            return Err(Error::io(format!("creating {}", dev.display()), e));
        }
    }
    Ok(())
}

/// Detaches loop `dev` if it is still backed by `backing`.
fn detach_loop(dev: &Path, backing: &Path) -> std::io::Result<()> {
    let lo = match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // The kernel records the backing file name; only detach our own.
    let sys =
        format!("/sys/block/{}/loop/backing_file", dev.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    if let Ok(name) = std::fs::read_to_string(&sys) {
        let name = name.trim_end();
        if name != backing.to_string_lossy() && !name.starts_with(&*backing.to_string_lossy()) {
            return Ok(());
        }
    } else {
        return Ok(()); // not attached
    }
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(()); // already detached
        }
        return Err(e);
    }
    Ok(())
}

fn lazy_unmount(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Size in bytes of a block device (volumes may live on one).
pub(crate) fn block_device_size(file: &File) -> Option<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    (rc == 0).then_some(size)
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

    #[test]
    fn loop_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
