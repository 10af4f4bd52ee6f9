//! The FUSE file system of a userspace mapping: one directory holding one file, [`DATA_FILE`],
//! whose bytes are the data area of the volume (docs/FORMAT.md, "Data area") served by a
//! [`SectorDevice`]: AES-XTS alone for format 1, AES-XTS with sector tags and the hash tree
//! for format 2 (a sector that does not verify reads as EIO, an fsync commits the new root).
//! Partial sectors are read-modify-write; the kernel sees a plain file it can put a loop
//! device on.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, WriteFlags,
};
use skydd_volume::device::SectorDevice;
use skydd_volume::layout::SECTOR_SIZE;

use super::DATA_FILE;

const ROOT_INO: INodeNo = INodeNo(1);
const DATA_INO: INodeNo = INodeNo(2);
// The file never changes size or owner behind the kernel's back: cache attributes long.
const TTL: Duration = Duration::from_secs(3600);
const SECTOR: u64 = SECTOR_SIZE as u64;

/// The FUSE file system of one mapping: a root directory holding the plaintext file
/// [`DATA_FILE`], whose bytes are the decrypted data area of the volume.
pub(super) struct PlainFile {
    device: Arc<dyn SectorDevice>,
    size: u64,
    read_only: bool,
    /// Scratch buffers reused between requests (no allocation per I/O once warmed up): each
    /// of the FUSE event-loop threads takes one for a request and puts it back.
    scratch: Mutex<Vec<Vec<u8>>>,
    /// A write that covers part of a sector reads, changes and writes the whole sector: it
    /// runs alone (write lock), so two such writes to one sector cannot lose each other's
    /// bytes. Whole-sector writes and reads (all the loop device sends) share the lock.
    partial_writes: RwLock<()>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl PlainFile {
    /// Serves the plaintext of `device` (refusing writes for `read_only`).
    pub(super) fn new(device: Arc<dyn SectorDevice>, read_only: bool) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let size = device.data_sectors() * SECTOR;
        Self {
            device,
            size,
            read_only,
            scratch: Mutex::default(),
            partial_writes: RwLock::new(()),
            uid,
            gid,
            started: SystemTime::now(),
        }
    }

    /// Runs `work` with a scratch buffer of this file system's pool (a new one if all are in
    /// use), returned to the pool after.
    fn with_scratch<T>(&self, work: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let pool = || self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let mut scratch = pool().pop().unwrap_or_default();
        let outcome = work(&mut scratch);
        pool().push(scratch);
        outcome
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
        self.device.read_sectors(first, &mut scratch[..len]).map_err(device_error)
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
        let partial = head != 0 || !end.is_multiple_of(SECTOR);
        // Poisoned only by a panic mid-write; the sectors themselves are then as the device left them.
        let _turn = match partial {
            true => Turn::Alone(self.partial_writes.write().unwrap_or_else(|e| e.into_inner())),
            false => Turn::Shared(self.partial_writes.read().unwrap_or_else(|e| e.into_inner())),
        };
        if partial {
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
        self.device.write_sectors(first, buf).map_err(device_error)?;
        Ok(data.len())
    }

    /// Decrypts one sector into `scratch[at..at + 4096]`.
    fn load_into(&self, scratch: &mut [u8], sector: u64, at: usize) -> std::io::Result<()> {
        self.device.read_sectors(sector, &mut scratch[at..at + SECTOR_SIZE]).map_err(device_error)
    }
}

/// Which share of [`PlainFile::partial_writes`] a write holds.
enum Turn<'a> {
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>),
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>),
}

/// The reader sees EIO for anything the device refuses (a sector that does not verify, a
/// root the TTP did not take), and the OS error for I/O failures; the detail is logged.
fn device_error(e: skydd_volume::Error) -> std::io::Error {
    match e {
        skydd_volume::Error::Io { source, .. } => source,
        other => {
            tracing::error!(error = %other, "userspace volume request refused");
            std::io::Error::from_raw_os_error(libc::EIO)
        }
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
        self.with_scratch(|scratch| {
            let _shared = self.partial_writes.read().unwrap_or_else(|e| e.into_inner());
            match self.read_range(scratch, offset, size as usize) {
                Ok(data) => reply.data(data),
                Err(e) => {
                    tracing::error!(offset, size, error = %e, "userspace volume read failed");
                    reply.error(errno_of(&e))
                }
            }
        })
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
        self.with_scratch(|scratch| match self.write_range(scratch, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                tracing::error!(offset, len = data.len(), error = %e, "userspace volume write failed");
                reply.error(errno_of(&e))
            }
        })
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Format 2: makes the writes durable and commits the new root to the TTP.
        match self.device.flush().map_err(device_error) {
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
