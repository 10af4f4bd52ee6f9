//! The dm-crypt backend: maps the data area (from 1 MiB) of a volume through the kernel's
//! dm-crypt target with device-mapper ioctls, exactly as docs/DMCRYPT.md describes.
//!
//! Why raw `libc` ioctls and not the `devicemapper` crate: that crate needs libdevmapper-dev
//! and libclang to build, and it logs table strings at trace level. The ioctl surface used
//! here is small (version, create, load, suspend/resume, message, remove, list, status), the
//! structures are fixed by the kernel ABI (include/uapi/linux/dm-ioctl.h, version 4), and
//! owning the buffers lets us set DM_SECURE_DATA_FLAG on every call that carries a table.
//!
//! The key never appears in a table string: it is added as a `logon` key (payload never
//! readable from userspace) to this thread's keyring, referenced as
//! `:64:logon:skydd:<name>`, and invalidated as soon as the table is live.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use protocol::secret::SecretBytes;

use super::{OpenMode, OpenVolume, VolumeBackend};
use crate::error::{Error, Result};

/// Every mapping this backend creates has a name starting with this prefix.
pub const NAME_PREFIX: &str = "skydd-";
/// The header area in front of the data area, in bytes.
pub const DATA_OFFSET: u64 = 1024 * 1024;
const SECTOR: u64 = 512;
const CRYPT_SECTOR: u64 = 4096;
const KEY_LEN: usize = 64;
const CONTROL: &str = "/dev/mapper/control";

// ---- include/uapi/linux/dm-ioctl.h -------------------------------------------------------
const DM_IOCTL_SIZE: usize = 312; // sizeof(struct dm_ioctl)
const DM_NAME_LEN: usize = 128;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_OPEN_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const DM_TARGET_SPEC_SIZE: usize = 40; // sizeof(struct dm_target_spec)

const DM_VERSION_CMD: u64 = 0;
const DM_LIST_DEVICES_CMD: u64 = 2;
const DM_DEV_CREATE_CMD: u64 = 3;
const DM_DEV_REMOVE_CMD: u64 = 4;
const DM_DEV_SUSPEND_CMD: u64 = 6;
const DM_DEV_STATUS_CMD: u64 = 7;
const DM_TABLE_LOAD_CMD: u64 = 9;
const DM_TABLE_STATUS_CMD: u64 = 12;
const DM_TARGET_MSG_CMD: u64 = 14;

const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_SUSPEND_FLAG: u32 = 1 << 1;
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_SECURE_DATA_FLAG: u32 = 1 << 15;

const fn dm_ioctl_nr(cmd: u64) -> u64 {
    // _IOWR(0xfd, cmd, struct dm_ioctl)
    (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | cmd
}

// ---- include/uapi/linux/loop.h --------------------------------------------------------
const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_INFO64_SIZE: usize = 232;
const LOOP_MAJOR: u32 = 7;
const BLKGETSIZE64: u64 = 0x8008_1272;

// ---- keyrings --------------------------------------------------------------------------
const KEY_SPEC_THREAD_KEYRING: libc::c_long = -1;
const KEYCTL_UNLINK: libc::c_long = 9;
const KEYCTL_INVALIDATE: libc::c_long = 21;

/// dm-crypt through the kernel's device-mapper.
pub struct DmCryptBackend {
    control: File,
    /// "4.x.y" as reported by DM_VERSION.
    version: String,
}

impl DmCryptBackend {
    /// Opens /dev/mapper/control and checks the ioctl interface answers DM_VERSION.
    pub fn new() -> Result<Self> {
        let unavailable = |what: String| {
            Error::DeviceMapperUnavailable(format!(
                "{what}: this kernel has no device-mapper; use the userspace backend"
            ))
        };
        let control = match OpenOptions::new().read(true).write(true).open(CONTROL) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unavailable(format!("{CONTROL} missing")))
            }
            Err(e) => return Err(unavailable(format!("{CONTROL} cannot be opened ({e})"))),
        };
        let mut backend = Self { control, version: String::new() };
        let buf = backend
            .dm_ioctl(DM_VERSION_CMD, "", 0, &[], 0)
            .map_err(|e| unavailable(format!("DM_VERSION on {CONTROL} failed ({e})")))?;
        backend.version = format!("{}.{}.{}", get_u32(&buf, 0), get_u32(&buf, 4), get_u32(&buf, 8));
        Ok(backend)
    }

    /// The device-mapper ioctl interface version the kernel reports.
    pub fn dm_version(&self) -> &str {
        &self.version
    }

    /// The live table of mapping `name`, e.g.
    /// `0 2048 crypt aes-xts-plain64 :64:logon:skydd:skydd-x 0 7:0 2048 ...`. With a keyring
    /// key the key itself is never part of it.
    pub fn table(&self, name: &str) -> Result<String> {
        check_name(name)?;
        let buf = self
            .dm_ioctl(DM_TABLE_STATUS_CMD, name, DM_STATUS_TABLE_FLAG, &[], 4096)
            .map_err(|e| Error::Volume(format!("reading the table of mapping {name} failed: {e}")))?;
        let start = get_u32(&buf, OFF_DATA_START) as usize;
        let mut lines = Vec::new();
        let mut spec = start;
        for _ in 0..get_u32(&buf, OFF_TARGET_COUNT) {
            if spec + DM_TARGET_SPEC_SIZE > buf.len() {
                break;
            }
            let sector_start = get_u64(&buf, spec);
            let length = get_u64(&buf, spec + 8);
            let next = get_u32(&buf, spec + 20) as usize;
            let ttype = cstr_at(&buf, spec + 24, 16);
            let params = cstr_at(&buf, spec + DM_TARGET_SPEC_SIZE, buf.len() - spec - DM_TARGET_SPEC_SIZE);
            lines.push(format!("{sector_start} {length} {ttype} {params}"));
            if next == 0 {
                break;
            }
            // In output buffers `next` counts from the start of the data area.
            spec = start + next;
        }
        Ok(lines.join("\n"))
    }

    /// One DM ioctl: header + `payload` (already laid out), `extra` bytes of output room.
    fn dm_ioctl(&self, cmd: u64, name: &str, flags: u32, payload: &[u8], extra: usize) -> std::io::Result<Vec<u8>> {
        let mut room = extra;
        loop {
            let size = DM_IOCTL_SIZE + payload.len().max(room);
            let mut buf = vec![0u8; size];
            put_u32(&mut buf, 0, 4);
            put_u32(&mut buf, OFF_DATA_SIZE, size as u32);
            put_u32(&mut buf, OFF_DATA_START, DM_IOCTL_SIZE as u32);
            put_u32(&mut buf, OFF_FLAGS, flags);
            let n = name.len().min(DM_NAME_LEN - 1);
            buf[OFF_NAME..OFF_NAME + n].copy_from_slice(&name.as_bytes()[..n]);
            if !payload.is_empty() {
                put_u32(&mut buf, OFF_TARGET_COUNT, 1);
                buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
            }
            // SAFETY: buf is a live, writable buffer of data_size bytes laid out as the
            // kernel's struct dm_ioctl followed by its data area.
            let rc = unsafe { libc::ioctl(self.control.as_raw_fd(), dm_ioctl_nr(cmd) as _, buf.as_mut_ptr()) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if get_u32(&buf, OFF_FLAGS) & DM_BUFFER_FULL_FLAG != 0 && room < (1 << 20) {
                room = (room.max(4096)) * 4;
                continue;
            }
            return Ok(buf);
        }
    }

    fn status(&self, name: &str) -> std::io::Result<(u32, i32, u64)> {
        let buf = self.dm_ioctl(DM_DEV_STATUS_CMD, name, 0, &[], 0)?;
        Ok((get_u32(&buf, OFF_FLAGS), get_u32(&buf, OFF_OPEN_COUNT) as i32, get_u64(&buf, OFF_DEV)))
    }

    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.dm_ioctl(DM_DEV_REMOVE_CMD, name, 0, &[], 0).map(|_| ())
    }

    fn load_table(&self, name: &str, sectors: u64, params: &str, flags: u32) -> std::io::Result<()> {
        let mut payload = vec![0u8; DM_TARGET_SPEC_SIZE];
        put_u64(&mut payload, 0, 0);
        put_u64(&mut payload, 8, sectors);
        payload[24..29].copy_from_slice(b"crypt");
        payload.extend_from_slice(params.as_bytes());
        payload.push(0);
        while !payload.len().is_multiple_of(8) {
            payload.push(0);
        }
        self.dm_ioctl(DM_TABLE_LOAD_CMD, name, flags | DM_SECURE_DATA_FLAG, &payload, 0).map(|_| ())
    }

    fn message(&self, name: &str, msg: &str) -> std::io::Result<()> {
        let mut payload = vec![0u8; 8]; // struct dm_target_msg { __u64 sector; char message[]; }
        payload.extend_from_slice(msg.as_bytes());
        payload.push(0);
        while !payload.len().is_multiple_of(8) {
            payload.push(0);
        }
        // target_count is ignored by DM_TARGET_MSG; the header helper sets it harmlessly.
        self.dm_ioctl(DM_TARGET_MSG_CMD, name, DM_SECURE_DATA_FLAG, &payload, 0).map(|_| ())
    }

    fn open_inner(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume> {
        let ro = mode == OpenMode::ReadOnly;
        let (backing, _loop_guard) = backing_device(volume, ro)?;
        let size = block_size_of(&backing)?;
        if size < DATA_OFFSET + CRYPT_SECTOR {
            return Err(Error::Volume(format!(
                "{} is {size} bytes: too small for a 1 MiB header plus one 4096-byte data sector",
                volume.display()
            )));
        }
        // Whole 4096-byte sectors only, counted in 512-byte sectors.
        let sectors = (size - DATA_OFFSET) / CRYPT_SECTOR * (CRYPT_SECTOR / SECTOR);
        let dev =
            std::fs::metadata(&backing.path).map_err(|e| Error::io(format!("stat {}", backing.path.display()), e))?;
        use std::os::unix::fs::MetadataExt;
        let (maj, min) = split_dev(dev.rdev());
        let dm_flags = if ro { DM_READONLY_FLAG } else { 0 };

        self.dm_ioctl(DM_DEV_CREATE_CMD, name, dm_flags, &[], 0).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::Volume(format!("a device-mapper mapping named {name} already exists")),
            _ => Error::Volume(format!("DM_DEV_CREATE {name} failed: {e}")),
        })?;
        let result = (|| {
            let key_guard = LogonKey::add(&format!("skydd:{name}"), key)?;
            let base = format!("aes-xts-plain64 :{KEY_LEN}:logon:skydd:{name} 0 {maj}:{min} {} ", DATA_OFFSET / SECTOR);
            let fast = format!("{base}4 sector_size:4096 iv_large_sectors no_read_workqueue no_write_workqueue");
            let plain = format!("{base}2 sector_size:4096 iv_large_sectors");
            // no_read/write_workqueue arrived in dm-crypt 1.22 (Linux 5.9); older kernels
            // reject the unknown feature with EINVAL, so fall back to the plain table.
            if let Err(e) = self.load_table(name, sectors, &fast, dm_flags) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(Error::Volume(format!("DM_TABLE_LOAD {name} failed: {e}")));
                }
                tracing::debug!(mapping = name, "dm-crypt refused the workqueue flags; loading without them");
                self.load_table(name, sectors, &plain, dm_flags).map_err(|e| {
                    Error::Volume(format!(
                        "DM_TABLE_LOAD {name} failed: {e} (is dm-crypt loaded and does the kernel know aes-xts-plain64 and logon keys?)"
                    ))
                })?;
            }
            // Resume = DM_DEV_SUSPEND without DM_SUSPEND_FLAG: the loaded table goes live.
            self.dm_ioctl(DM_DEV_SUSPEND_CMD, name, dm_flags, &[], 0)
                .map_err(|e| Error::Volume(format!("resuming mapping {name} failed: {e}")))?;
            key_guard.invalidate()?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.remove(name);
            return Err(e);
        }
        let (_, _, devnum) = self
            .status(name)
            .map_err(|e| Error::Volume(format!("DM_DEV_STATUS {name} after creating it failed: {e}")))?;
        let device = dm_node(devnum)?;
        tracing::info!(mapping = name, device = %device.display(), read_only = ro, "dm-crypt mapping opened");
        Ok(OpenVolume { name: name.to_string(), device, mode })
    }
}

impl VolumeBackend for DmCryptBackend {
    fn kind(&self) -> &'static str {
        "dm-crypt"
    }

    fn open(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume> {
        check_name(name)?;
        if key.len() != KEY_LEN {
            return Err(Error::Volume(format!(
                "the key for {name} is {} bytes; AES-256-XTS needs {KEY_LEN}",
                key.len()
            )));
        }
        self.open_inner(name, volume, key, mode)
    }

    fn close(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let (_, open_count, _) = self.status(name).map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => Error::Volume(format!("no device-mapper mapping named {name} is open")),
            _ => Error::Volume(format!("DM_DEV_STATUS {name} failed: {e}")),
        })?;
        if open_count > 0 {
            return Err(Error::Volume(format!(
                "mapping {name} is still in use (open count {open_count}); unmount or detach it first"
            )));
        }
        // Which loop device (if any) backs it, to release it after the removal.
        let backing = self.table(name).ok().and_then(|t| backing_of_table(&t));
        self.dm_ioctl(DM_DEV_SUSPEND_CMD, name, DM_SUSPEND_FLAG, &[], 0)
            .map_err(|e| Error::Volume(format!("suspending mapping {name} failed: {e}")))?;
        if let Err(e) = self.message(name, "key wipe") {
            tracing::warn!(mapping = name, error = %e, "dm-crypt key wipe failed; removing the mapping anyway");
        }
        self.remove(name).map_err(|e| Error::Volume(format!("DM_DEV_REMOVE {name} failed: {e}")))?;
        if let Some((LOOP_MAJOR, minor)) = backing {
            // Autoclear normally detaches it on the last close; this covers the rest.
            if let Ok(f) = OpenOptions::new().read(true).open(format!("/dev/loop{minor}")) {
                // SAFETY: plain ioctl without argument on an open loop device.
                unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
            }
        }
        tracing::info!(mapping = name, "dm-crypt mapping closed, key wiped");
        Ok(())
    }

    fn list(&self) -> Result<Vec<OpenVolume>> {
        let buf = self
            .dm_ioctl(DM_LIST_DEVICES_CMD, "", 0, &[], 16 * 1024)
            .map_err(|e| Error::Volume(format!("DM_LIST_DEVICES failed: {e}")))?;
        let mut names = Vec::new();
        let mut at = get_u32(&buf, OFF_DATA_START) as usize;
        // struct dm_name_list { __u64 dev; __u32 next; char name[]; }
        while at + 12 < buf.len() && get_u64(&buf, at) != 0 {
            names.push(cstr_at(&buf, at + 12, buf.len() - at - 12));
            let next = get_u32(&buf, at + 8) as usize;
            if next == 0 {
                break;
            }
            at += next;
        }
        let mut out = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(NAME_PREFIX)) {
            let (flags, _, devnum) = match self.status(&name) {
                Ok(s) => s,
                Err(_) => continue, // removed meanwhile
            };
            let mode = if flags & DM_READONLY_FLAG != 0 { OpenMode::ReadOnly } else { OpenMode::ReadWrite };
            out.push(OpenVolume { device: dm_node(devnum)?, name, mode });
        }
        Ok(out)
    }
}

/// A `logon` key in this thread's keyring, invalidated when dropped (also on error paths).
/// dm-crypt looks it up with request_key() in the context of the thread that issues
/// DM_TABLE_LOAD, which searches the thread, process and session keyrings.
struct LogonKey(libc::c_long);

impl LogonKey {
    fn add(description: &str, key: &SecretBytes) -> Result<Self> {
        let ktype = CString::new("logon").map_err(|_| Error::Volume("key type".into()))?;
        let desc = CString::new(description)
            .map_err(|_| Error::Volume(format!("key description {description:?} contains a NUL byte")))?;
        let payload = key.expose();
        // SAFETY: valid NUL-terminated strings and a payload pointer/length from a live slice.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                ktype.as_ptr(),
                desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                KEY_SPEC_THREAD_KEYRING,
            )
        };
        if id < 0 {
            return Err(Error::Volume(format!(
                "adding logon key {description} to the thread keyring failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self(id))
    }

    fn invalidate(self) -> Result<()> {
        let id = self.0;
        std::mem::forget(self);
        drop_key(id).map_err(|e| Error::Volume(format!("invalidating logon key {id} failed: {e}")))
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        let _ = drop_key(self.0);
    }
}

fn drop_key(id: libc::c_long) -> std::io::Result<()> {
    // SAFETY: keyctl with integer arguments only.
    if unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, id) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_UNLINK, id, KEY_SPEC_THREAD_KEYRING) } == 0 {
        return Ok(());
    }
    Err(err)
}

/// The block device a volume is read through; a regular file goes on a fresh loop device
/// (read-only for ro, autoclear so it vanishes when dm-crypt lets go). The returned File
/// must stay open until the table is live, or autoclear detaches the loop too early.
struct Backing {
    path: PathBuf,
}

fn backing_device(volume: &Path, ro: bool) -> Result<(Backing, Option<File>)> {
    let meta = std::fs::metadata(volume).map_err(|e| Error::io(format!("volume {}", volume.display()), e))?;
    if meta.file_type().is_block_device() {
        return Ok((Backing { path: volume.to_path_buf() }, None));
    }
    if !meta.is_file() {
        return Err(Error::Volume(format!("volume {} is neither a regular file nor a block device", volume.display())));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!ro)
        .custom_flags(libc::O_CLOEXEC)
        .open(volume)
        .map_err(|e| Error::io(format!("opening volume {}", volume.display()), e))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| Error::io("opening /dev/loop-control (is the loop module loaded?)", e))?;
    let mut last_err = None;
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(Error::io("LOOP_CTL_GET_FREE", std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        if !path.exists() {
            let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Volume("loop path".into()))?;
            // SAFETY: valid path; creates the node devtmpfs/udev did not.
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(LOOP_MAJOR, n as u32)) };
        }
        let lo = OpenOptions::new()
            .read(true)
            .write(!ro)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let flags = LO_FLAGS_AUTOCLEAR | if ro { LO_FLAGS_READ_ONLY } else { 0 };
        match attach_loop(&lo, &file, flags) {
            Ok(()) => return Ok((Backing { path }, Some(lo))),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e), // raced; next one
            Err(e) => return Err(Error::io(format!("attaching {} to {}", volume.display(), path.display()), e)),
        }
    }
    Err(Error::io(
        format!("no free loop device for {}", volume.display()),
        last_err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

fn attach_loop(lo: &File, file: &File, flags: u32) -> std::io::Result<()> {
    // struct loop_config { __u32 fd; __u32 block_size; struct loop_info64 info; __u64 __reserved[8]; }
    let mut cfg = vec![0u8; 8 + LOOP_INFO64_SIZE + 64];
    put_u32(&mut cfg, 0, file.as_raw_fd() as u32);
    put_u32(&mut cfg, 8 + 52, flags); // loop_info64.lo_flags
                                      // SAFETY: cfg is a live buffer laid out as struct loop_config.
    if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE as _, cfg.as_ptr()) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(err);
    }
    // Kernels before 5.8: LOOP_SET_FD, then the flags with LOOP_SET_STATUS64.
    // SAFETY: integer fd argument.
    if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut info = vec![0u8; LOOP_INFO64_SIZE];
    put_u32(&mut info, 52, flags & LO_FLAGS_AUTOCLEAR);
    // SAFETY: info is laid out as struct loop_info64.
    if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_SET_STATUS64 as _, info.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: no argument.
        unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        return Err(e);
    }
    Ok(())
}

fn block_size_of(b: &Backing) -> Result<u64> {
    let f = File::open(&b.path).map_err(|e| Error::io(format!("opening {}", b.path.display()), e))?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
        return Err(Error::io(format!("BLKGETSIZE64 on {}", b.path.display()), std::io::Error::last_os_error()));
    }
    Ok(size)
}

/// /dev/dm-<minor>; without udev nobody may have created it, so mknod it.
fn dm_node(devnum: u64) -> Result<PathBuf> {
    let (maj, min) = split_dev(devnum);
    let path = PathBuf::from(format!("/dev/dm-{min}"));
    if !path.exists() {
        let c = CString::new(format!("/dev/dm-{min}")).map_err(|_| Error::Volume("dm path".into()))?;
        // SAFETY: valid path string.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(maj, min)) } != 0 {
            return Err(Error::io(format!("mknod {}", path.display()), std::io::Error::last_os_error()));
        }
    }
    Ok(path)
}

/// glibc / kernel huge_encode_dev layout.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// `maj:min` of the backing device in a crypt table line.
fn backing_of_table(table: &str) -> Option<(u32, u32)> {
    let dev = table.split_whitespace().nth(6)?;
    let (a, b) = dev.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn check_name(name: &str) -> Result<()> {
    let ok_chars = name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !name.starts_with(NAME_PREFIX) || name.len() <= NAME_PREFIX.len() || name.len() > 100 || !ok_chars {
        return Err(Error::Volume(format!(
            "mapping name {name:?} is invalid: it must start with {NAME_PREFIX:?}, be at most 100 characters and use only A-Z a-z 0-9 - _ ."
        )));
    }
    Ok(())
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_ne_bytes(a)
    })
}
fn cstr_at(buf: &[u8], at: usize, max: usize) -> String {
    let end = (at + max).min(buf.len());
    let s = buf.get(at..end).unwrap_or(&[]);
    let n = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..n]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(dm_ioctl_nr(DM_VERSION_CMD), 0xc138_fd00);
        assert_eq!(dm_ioctl_nr(DM_TABLE_LOAD_CMD), 0xc138_fd09);
    }

    #[test]
    fn dev_numbers_split_like_glibc() {
        assert_eq!(split_dev(libc::makedev(254, 3)), (254, 3));
        assert_eq!(split_dev(libc::makedev(7, 300)), (7, 300));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("skydd-3f2a").is_ok());
        assert!(check_name("3f2a").is_err());
        assert!(check_name("skydd-a b").is_err());
        assert!(check_name("skydd-").is_err());
    }

    #[test]
    fn table_backing_device_is_parsed() {
        let t = "0 2048 crypt aes-xts-plain64 :64:logon:skydd:skydd-a 0 7:0 2048 2 sector_size:4096 iv_large_sectors";
        assert_eq!(backing_of_table(t), Some((7, 0)));
    }

    #[test]
    fn missing_device_mapper_is_reported_clearly() {
        if Path::new(CONTROL).exists() {
            return; // this kernel has device-mapper; the qemu tests cover it
        }
        let err = DmCryptBackend::new().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("/dev/mapper/control missing"), "{err}");
        assert!(err.contains("use the userspace backend"), "{err}");
    }
}
