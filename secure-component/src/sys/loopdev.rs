//! Loop devices (include/uapi/linux/loop.h): a file made into a block device. Both volume
//! backends use this one implementation: dm-crypt puts a volume file on a loop device to
//! map it (autoclear, so it vanishes when dm-crypt lets go), the userspace backend puts its
//! FUSE plaintext file on one (4096-byte logical blocks, so the kernel never sends
//! sub-sector I/O).

use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::ensure_block_node;

/// Major device number of loop devices.
pub const LOOP_MAJOR: u32 = 7;
/// How often [`attach`] retries when another process takes the free device first.
pub const ATTACH_ATTEMPTS: usize = 16;

const LOOP_CONTROL: &str = "/dev/loop-control";
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
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

/// `struct loop_config` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// How [`attach`] sets up the loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// The device refuses writes (and the backing file is opened read-only).
    pub read_only: bool,
    /// The kernel detaches the device when its last opener closes it.
    pub autoclear: bool,
    /// Logical block size in bytes; `None` keeps the kernel's 512.
    pub block_size: Option<u32>,
}

/// An attached loop device. With [`LoopOptions::autoclear`], `file` must stay open until
/// another holder (a dm table, a mount) has the device, or the kernel detaches it at once.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The open device.
    pub file: File,
}

/// Why [`attach`] failed: what was being done and the OS error, or that every free device
/// was taken by another process first.
#[derive(Debug)]
pub enum LoopError {
    /// A step failed with an OS error.
    Os {
        /// What was being done, e.g. "opening /dev/loop-control".
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// [`ATTACH_ATTEMPTS`] free devices in a row were taken by another process first.
    NoneFree,
}

impl std::fmt::Display for LoopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoopError::Os { context, source } => write!(f, "{context}: {source}"),
            LoopError::NoneFree => write!(
                f,
                "no free loop device after {ATTACH_ATTEMPTS} attempts (each was taken by another process first)"
            ),
        }
    }
}

impl std::error::Error for LoopError {}

fn os(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoopError {
    let context = context.into();
    move |source| LoopError::Os { context, source }
}

fn loop_info(backing: &Path, flags: u32) -> LoopInfo64 {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
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

/// Attaches the file `backing` to a free loop device and returns it.
pub fn attach(backing: &Path, opts: LoopOptions) -> Result<LoopDevice, LoopError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(os(format!("opening {} for the loop device", backing.display())))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(os(format!("opening {LOOP_CONTROL} (is the loop module loaded?)")))?;
    let flags =
        if opts.read_only { LO_FLAGS_READ_ONLY } else { 0 } | if opts.autoclear { LO_FLAGS_AUTOCLEAR } else { 0 };
    // Another process may grab the same free device between GET_FREE and CONFIGURE.
    for _attempt in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(os(format!("LOOP_CTL_GET_FREE on {LOOP_CONTROL}"))(std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        ensure_block_node(&path, LOOP_MAJOR, n as u32, 0o660).map_err(os(format!("creating {}", path.display())))?;
        let lo = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(os(format!("opening {}", path.display())))?;
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: opts.block_size.unwrap_or(0),
            info: loop_info(backing, flags),
            reserved: [0; 8],
        };
        // SAFETY: cfg is a live, correctly laid out struct loop_config (sizes asserted above).
        let rc = unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
        if rc == 0 {
            return Ok(LoopDevice { path, file: lo });
        }
        let err = std::io::Error::last_os_error();
        let attaching = || format!("attaching {} to {}", backing.display(), path.display());
        match err.raw_os_error() {
            Some(libc::EBUSY) => continue,
            // Kernels before 5.8 lack LOOP_CONFIGURE: the three-step way.
            Some(libc::EINVAL) | Some(libc::ENOTTY) => match legacy_attach(&lo, &file, backing, flags, opts.block_size)
            {
                Ok(()) => return Ok(LoopDevice { path, file: lo }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                Err(e) => return Err(os(attaching())(e)),
            },
            _ => return Err(os(attaching())(err)),
        }
    }
    Err(LoopError::NoneFree)
}

/// LOOP_SET_FD, then the flags with LOOP_SET_STATUS64 (which honours only autoclear here;
/// read-only follows from the backing file's open mode), then the block size.
fn legacy_attach(lo: &File, file: &File, backing: &Path, flags: u32, block_size: Option<u32>) -> std::io::Result<()> {
    // SAFETY: plain ioctls with an fd and a pointer to a live loop_info64.
    unsafe {
        if libc::ioctl(lo.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd() as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let info = loop_info(backing, flags);
        if libc::ioctl(lo.as_raw_fd(), LOOP_SET_STATUS64 as _, &info as *const LoopInfo64) != 0 {
            let e = std::io::Error::last_os_error();
            libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0);
            return Err(e);
        }
        if let Some(size) = block_size {
            // Older kernels may not know it either; 512-byte blocks still work (FUSE does RMW).
            libc::ioctl(lo.as_raw_fd(), LOOP_SET_BLOCK_SIZE as _, size as libc::c_ulong);
        }
    }
    Ok(())
}

/// Detaches loop device `dev`; one that is gone or already detached is fine.
pub fn detach(dev: &Path) -> std::io::Result<()> {
    let lo = match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(()); // already detached
        }
        return Err(e);
    }
    Ok(())
}

/// Detaches loop device `dev` only if it is still backed by `backing` (the kernel records the
/// backing file's name): after a restart the device may serve someone else by now.
pub fn detach_if_backed_by(dev: &Path, backing: &Path) -> std::io::Result<()> {
    let sys =
        format!("/sys/block/{}/loop/backing_file", dev.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let Ok(name) = std::fs::read_to_string(&sys) else {
        return Ok(()); // not attached
    };
    let name = name.trim_end();
    if name != backing.to_string_lossy() && !name.starts_with(&*backing.to_string_lossy()) {
        return Ok(());
    }
    detach(dev)
}
