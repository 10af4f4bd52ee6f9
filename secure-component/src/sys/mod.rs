//! A thin typed layer over the Linux interfaces the volume backends drive, in the style of
//! devicemapper-rs's `core`: each kernel structure is a `#[repr(C)]` type checked against
//! the uapi header's size, each ioctl one function, and every `unsafe` block sits here.
//!
//! - [`dm`]: device-mapper ioctls on /dev/mapper/control (include/uapi/linux/dm-ioctl.h);
//! - [`loopdev`]: loop devices, one implementation for both backends
//!   (include/uapi/linux/loop.h);
//! - [`keyring`]: `logon` keys in the thread keyring for dm-crypt (keyctl(2)).

pub mod dm;
pub mod keyring;
pub mod loopdev;

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// `BLKGETSIZE64` from include/uapi/linux/fs.h: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of the block device open as `file`.
pub fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at a live u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Creates the block device node `path` for `major:minor` if it is missing: containers and
/// hosts without udev often have a static /dev without nodes for new loop or dm devices.
/// A node that appeared meanwhile is fine.
pub fn ensure_block_node(path: &Path, major: u32, minor: u32, mode: libc::mode_t) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod creates a block device node.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | mode, libc::makedev(major, minor)) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    Ok(())
}

/// `(major, minor)` of a device number in the kernel's `huge_encode_dev` layout, as glibc's
/// `major()`/`minor()` split it.
pub fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_split_like_glibc() {
        assert_eq!(split_dev(libc::makedev(254, 3)), (254, 3));
        assert_eq!(split_dev(libc::makedev(7, 300)), (7, 300));
    }
}
