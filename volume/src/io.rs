//! The I/O channel under a volume: positional reads and writes on the volume file, a
//! durable write for the few records whose order matters, and `fdatasync`. The secure
//! component hands a [`std::fs::File`]; tests and benchmarks hand a [`MemoryIo`], and a
//! crash simulation can wrap either.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::RwLock;

/// Where the bytes of a volume live.
pub trait BlockIo: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (durable only after [`BlockIo::sync_data`]).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset` and returns once it is durable (`RWF_DSYNC`): a record that
    /// must reach the disk before the writes it announces.
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the volume is empty (never true for a usable one).
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Grows (or shrinks) the volume to `len` bytes; new bytes read as zeros.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Waits for and takes the volume's header lock: whoever rewrites the header (the cloud
    /// platform at an update, a re-encryption recording its progress) reads the slot in
    /// force and writes the next one under it, so neither overwrites the other's record
    /// (docs/FORMAT.md "Key rotation"). A file takes an exclusive `flock`; memory has no
    /// other writer.
    fn lock_header(&self) -> io::Result<()> {
        Ok(())
    }
    /// Releases what [`BlockIo::lock_header`] took.
    fn unlock_header(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The header lock of a volume, released when dropped.
pub struct HeaderLock<'a>(&'a dyn BlockIo);

impl<'a> HeaderLock<'a> {
    /// Waits for the header lock of the volume behind `io`.
    pub fn take(io: &'a dyn BlockIo) -> io::Result<Self> {
        io.lock_header()?;
        Ok(Self(io))
    }
}

impl Drop for HeaderLock<'_> {
    fn drop(&mut self) {
        // Closing the descriptor would release it too; a failure here leaves it to that.
        let _ = self.0.unlock_header();
    }
}

impl BlockIo for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: one valid iovec over `buf`, which outlives the call.
        let written = unsafe { libc::pwritev2(self.as_raw_fd(), &iov, 1, offset, libc::RWF_DSYNC) };
        match written {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize == buf.len() => Ok(()),
            // A short durable write of a 4 KiB record: finish it and sync the whole file.
            n => {
                FileExt::write_all_at(self, &buf[n as usize..], offset as u64 + n as u64)?;
                self.sync_data()
            }
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let metadata = self.metadata()?;
        if !metadata.file_type().is_block_device() {
            return Ok(metadata.len());
        }
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        if unsafe { libc::ioctl(self.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    /// `flock(LOCK_EX)` (std's `File::lock`): the same lock the cloud platform takes
    /// (`cloud_platform::volumes`) on its own descriptor of the file.
    fn lock_header(&self) -> io::Result<()> {
        File::lock(self)
    }

    fn unlock_header(&self) -> io::Result<()> {
        File::unlock(self)
    }
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A volume held in memory: for tests, crash simulations and the engine benchmark (which
/// measures the crypto, not a disk).
#[derive(Debug, Default)]
pub struct MemoryIo {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryIo {
    /// A zero-filled volume of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self { bytes: RwLock::new(vec![0; len as usize]) }
    }

    /// A copy of every byte (to tamper with, or to restore later as a rollback).
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces every byte.
    pub fn restore(&self, bytes: Vec<u8>) {
        *self.bytes.write().unwrap_or_else(|e| e.into_inner()) = bytes;
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the in-memory volume")
}

impl BlockIo for MemoryIo {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = bytes.get(start..start + buf.len()).ok_or_else(out_of_range)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        if bytes.len() < start + buf.len() {
            bytes.resize(start + buf.len(), 0);
        }
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.write().unwrap_or_else(|e| e.into_inner()).resize(len as usize, 0);
        Ok(())
    }
}
