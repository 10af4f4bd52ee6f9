//! The file system on an opened volume: ext4, created on first use, found by its superblock,
//! unmounted with umount(2). Works on any plaintext block device (dm-crypt or the userspace
//! backend); mounting it is the local driver's (`crate::hypervisor::local::mount_ext4`).

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// ext4 superblock magic 0xEF53, little-endian at byte 1080 (superblock at 1024 + 0x38).
const EXT4_MAGIC_OFFSET: u64 = 1080;
const EXT4_MAGIC: [u8; 2] = [0x53, 0xEF];

/// Whether `device` carries an ext2/3/4 superblock.
pub fn has_ext4(device: &Path) -> Result<bool> {
    let f = File::open(device).map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
    let mut magic = [0u8; 2];
    match f.read_exact_at(&mut magic, EXT4_MAGIC_OFFSET) {
        Ok(()) => Ok(magic == EXT4_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(format!("reading the superblock of {}", device.display()), e)),
    }
}

/// Creates ext4 on `device` unless it already has one. Returns true if it formatted.
pub fn ensure_ext4(device: &Path) -> Result<bool> {
    if has_ext4(device)? {
        return Ok(false);
    }
    // -b 4096 matches the volume sector size; -F because the target is not a partition.
    // Lazy inode-table and journal init, and `noinit_itable` at mount: mkfs writes only the
    // metadata it needs, not every inode table (a 128 GiB volume made mkfs write 3 GiB of the
    // provider's disk in 10 s). Safe with ext4's default metadata_csum: block groups whose
    // inode table was never zeroed are flagged so, and unused inodes are never read.
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(device)
        .output()
        .map_err(|e| Error::io("running mkfs.ext4 (is e2fsprogs installed?)", e))?;
    if !out.status.success() {
        return Err(Error::Volume(format!(
            "mkfs.ext4 on {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(true)
}

/// Unmounts `dir` (flushing the file system).
pub fn unmount(dir: &Path) -> Result<()> {
    let target = cstr(dir)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(Error::io(format!("unmounting {}", dir.display()), std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Volume(format!("path {} contains a NUL byte", p.display())))
}
