//! Device-mapper ioctls on /dev/mapper/control (include/uapi/linux/dm-ioctl.h, interface
//! version 4): the kernel structures as `#[repr(C)]` types and one method per command.
//!
//! Why not the `devicemapper` crate: it needs libdevmapper-dev and libclang to build, and
//! it logs table strings at trace level. The surface used here is small (version, create,
//! load, suspend/resume, message, remove, list, status), and owning the buffers lets every
//! call that carries a table or a message set [`DmFlags::SECURE_DATA`] (the kernel wipes
//! the buffer after use).

use std::fs::{File, OpenOptions};
use std::mem::size_of;
use std::ops::BitOr;
use std::os::unix::io::AsRawFd;

/// The control node every device-mapper ioctl goes through.
pub const CONTROL: &str = "/dev/mapper/control";
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;

/// `struct dm_ioctl`: the header of every request and answer; a data area follows it.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`: one table line; its parameter string follows it.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    /// In requests: bytes from this spec to the next; in answers: from the data area start.
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

/// `struct dm_name_list` without its trailing name: one entry of DM_LIST_DEVICES.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmNameList {
    dev: u64,
    next: u32,
}

const HEADER: usize = size_of::<DmIoctl>();
const SPEC: usize = size_of::<DmTargetSpec>();
/// `offsetof(struct dm_name_list, name)`: the name starts right after `next`.
const NAME_LIST_NAME: usize = 12;
const _: () = assert!(HEADER == 312);
const _: () = assert!(SPEC == 40);

/// Device-mapper commands (the `nr` of `_IOWR(0xfd, nr, struct dm_ioctl)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Cmd {
    Version = 0,
    ListDevices = 2,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
    TableStatus = 12,
    TargetMsg = 14,
}

impl Cmd {
    const fn request(self) -> u64 {
        (3 << 30) | ((HEADER as u64) << 16) | (0xfd << 8) | self as u64
    }
}

/// The `flags` field of a request or answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmFlags(u32);

impl DmFlags {
    /// No flags.
    pub const NONE: DmFlags = DmFlags(0);
    /// The device (or the table being loaded) is read-only.
    pub const READONLY: DmFlags = DmFlags(1 << 0);
    /// With DM_DEV_SUSPEND: suspend; without it the command resumes.
    pub const SUSPEND: DmFlags = DmFlags(1 << 1);
    /// With DM_TABLE_STATUS: return the table, not the status.
    pub const STATUS_TABLE: DmFlags = DmFlags(1 << 4);
    /// In answers: the data area was too small.
    pub const BUFFER_FULL: DmFlags = DmFlags(1 << 8);
    /// The kernel wipes the buffer after the call (it carries a key reference).
    pub const SECURE_DATA: DmFlags = DmFlags(1 << 15);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: DmFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for DmFlags {
    type Output = DmFlags;
    fn bitor(self, rhs: DmFlags) -> DmFlags {
        DmFlags(self.0 | rhs.0)
    }
}

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector (512 bytes) of the mapping this line covers.
    pub start: u64,
    /// Length in 512-byte sectors.
    pub length: u64,
    /// Target type, e.g. `crypt`.
    pub target_type: String,
    /// The target's parameters.
    pub params: String,
}

impl std::fmt::Display for Target {
    /// `<start> <length> <type> <params>`, as `dmsetup table` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} {}", self.start, self.length, self.target_type, self.params)
    }
}

/// What DM_DEV_STATUS reports about a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Its flags ([`DmFlags::READONLY`], [`DmFlags::SUSPEND`]).
    pub flags: DmFlags,
    /// How many openers the mapped device has.
    pub open_count: i32,
    /// Its device number (`huge_encode_dev` layout, see [`super::split_dev`]).
    pub dev: u64,
}

/// An open /dev/mapper/control.
#[derive(Debug)]
pub struct DmControl {
    file: File,
}

/// An answer: the header and the whole buffer its offsets point into.
struct Answer {
    header: DmIoctl,
    buf: Vec<u8>,
}

impl Answer {
    /// The `T` at byte `at` of the buffer, if it fits.
    fn read<T: Copy>(&self, at: usize) -> Option<T> {
        if at.checked_add(size_of::<T>())? > self.buf.len() {
            return None;
        }
        // SAFETY: `at .. at + size_of::<T>()` lies inside the buffer (checked above); T is
        // one of this module's plain-old-data kernel structs, valid for any bytes;
        // read_unaligned needs no alignment.
        Some(unsafe { std::ptr::read_unaligned(self.buf.as_ptr().add(at).cast::<T>()) })
    }

    /// The NUL-terminated string at byte `at`, at most up to the end of the buffer.
    fn cstr(&self, at: usize) -> String {
        let s = self.buf.get(at..).unwrap_or(&[]);
        let n = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..n]).into_owned()
    }

    fn data_start(&self) -> usize {
        self.header.data_start as usize
    }
}

/// `payload` padded with NULs to a multiple of 8 bytes after a NUL terminator.
fn terminated(mut payload: Vec<u8>) -> Vec<u8> {
    payload.push(0);
    while !payload.len().is_multiple_of(8) {
        payload.push(0);
    }
    payload
}

/// The bytes of a plain-old-data kernel struct.
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<T>()];
    // SAFETY: `out` has exactly size_of::<T>() bytes; write_unaligned needs no alignment.
    unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<T>(), *value) };
    out
}

impl DmControl {
    /// Opens /dev/mapper/control read-write.
    pub fn open() -> std::io::Result<Self> {
        Ok(Self { file: OpenOptions::new().read(true).write(true).open(CONTROL)? })
    }

    /// One request: header + `payload` (already laid out) with `target_count` targets and at
    /// least `extra` bytes of room for the answer, grown while the kernel reports
    /// BUFFER_FULL (up to 1 MiB).
    fn call(
        &self,
        cmd: Cmd,
        name: &str,
        flags: DmFlags,
        target_count: u32,
        payload: &[u8],
        extra: usize,
    ) -> std::io::Result<Answer> {
        let mut room = extra;
        loop {
            let size = HEADER + payload.len().max(room);
            let mut header = DmIoctl {
                version: [4, 0, 0],
                data_size: size as u32,
                data_start: HEADER as u32,
                target_count,
                open_count: 0,
                flags: flags.0,
                event_nr: 0,
                padding: 0,
                dev: 0,
                name: [0; DM_NAME_LEN],
                uuid: [0; DM_UUID_LEN],
                data: [0; 7],
            };
            let n = name.len().min(DM_NAME_LEN - 1);
            header.name[..n].copy_from_slice(&name.as_bytes()[..n]);
            let mut buf = bytes_of(&header);
            buf.resize(size, 0);
            buf[HEADER..HEADER + payload.len()].copy_from_slice(payload);
            // SAFETY: buf is a live, writable buffer of data_size bytes laid out as the
            // kernel's struct dm_ioctl followed by its data area.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd.request() as _, buf.as_mut_ptr()) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let answer = Answer { header: bytes_to_header(&buf), buf };
            if DmFlags(answer.header.flags).contains(DmFlags::BUFFER_FULL) && room < (1 << 20) {
                room = room.max(4096) * 4;
                continue;
            }
            return Ok(answer);
        }
    }

    /// DM_VERSION: the ioctl interface version, e.g. `[4, 48, 0]`.
    pub fn version(&self) -> std::io::Result<[u32; 3]> {
        Ok(self.call(Cmd::Version, "", DmFlags::NONE, 0, &[], 0)?.header.version)
    }

    /// DM_DEV_CREATE: a new mapping `name` without a table.
    pub fn create(&self, name: &str, flags: DmFlags) -> std::io::Result<()> {
        self.call(Cmd::DevCreate, name, flags, 0, &[], 0).map(|_| ())
    }

    /// DM_DEV_REMOVE.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        self.call(Cmd::DevRemove, name, DmFlags::NONE, 0, &[], 0).map(|_| ())
    }

    /// DM_DEV_SUSPEND with SUSPEND: I/O to the mapping stops.
    pub fn suspend(&self, name: &str) -> std::io::Result<()> {
        self.call(Cmd::DevSuspend, name, DmFlags::SUSPEND, 0, &[], 0).map(|_| ())
    }

    /// DM_DEV_SUSPEND without SUSPEND: the loaded table goes live.
    pub fn resume(&self, name: &str, flags: DmFlags) -> std::io::Result<()> {
        self.call(Cmd::DevSuspend, name, flags, 0, &[], 0).map(|_| ())
    }

    /// DM_DEV_STATUS.
    pub fn status(&self, name: &str) -> std::io::Result<DeviceStatus> {
        let h = self.call(Cmd::DevStatus, name, DmFlags::NONE, 0, &[], 0)?.header;
        Ok(DeviceStatus { flags: DmFlags(h.flags), open_count: h.open_count, dev: h.dev })
    }

    /// DM_TABLE_LOAD of one target, always with SECURE_DATA (the parameters may name a key).
    pub fn load_table(&self, name: &str, target: &Target, flags: DmFlags) -> std::io::Result<()> {
        let mut spec = DmTargetSpec {
            sector_start: target.start,
            length: target.length,
            status: 0,
            next: 0,
            target_type: [0; DM_MAX_TYPE_NAME],
        };
        let t = target.target_type.as_bytes();
        let n = t.len().min(DM_MAX_TYPE_NAME - 1);
        spec.target_type[..n].copy_from_slice(&t[..n]);
        let mut payload = bytes_of(&spec);
        payload.extend_from_slice(target.params.as_bytes());
        let payload = terminated(payload);
        self.call(Cmd::TableLoad, name, flags | DmFlags::SECURE_DATA, 1, &payload, 0).map(|_| ())
    }

    /// DM_TABLE_STATUS with STATUS_TABLE: the live table of `name`.
    pub fn table(&self, name: &str) -> std::io::Result<Vec<Target>> {
        let answer = self.call(Cmd::TableStatus, name, DmFlags::STATUS_TABLE, 0, &[], 4096)?;
        let start = answer.data_start();
        let mut targets = Vec::new();
        let mut at = start;
        for _ in 0..answer.header.target_count {
            let Some(spec) = answer.read::<DmTargetSpec>(at) else { break };
            let type_end = spec.target_type.iter().position(|&c| c == 0).unwrap_or(DM_MAX_TYPE_NAME);
            targets.push(Target {
                start: spec.sector_start,
                length: spec.length,
                target_type: String::from_utf8_lossy(&spec.target_type[..type_end]).into_owned(),
                params: answer.cstr(at + SPEC),
            });
            if spec.next == 0 {
                break;
            }
            // In answers `next` counts from the start of the data area.
            at = start + spec.next as usize;
        }
        Ok(targets)
    }

    /// DM_TARGET_MSG to sector 0 of `name`, with SECURE_DATA (e.g. `key wipe`).
    pub fn message(&self, name: &str, msg: &str) -> std::io::Result<()> {
        // struct dm_target_msg { __u64 sector; char message[]; }
        let mut payload = 0u64.to_ne_bytes().to_vec();
        payload.extend_from_slice(msg.as_bytes());
        let payload = terminated(payload);
        self.call(Cmd::TargetMsg, name, DmFlags::SECURE_DATA, 1, &payload, 0).map(|_| ())
    }

    /// DM_LIST_DEVICES: the names of all mappings.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        let answer = self.call(Cmd::ListDevices, "", DmFlags::NONE, 0, &[], 16 * 1024)?;
        let mut names = Vec::new();
        let mut at = answer.data_start();
        while let Some(entry) = answer.read::<DmNameList>(at) {
            if entry.dev == 0 {
                break; // an empty list has one zeroed entry
            }
            names.push(answer.cstr(at + NAME_LIST_NAME));
            if entry.next == 0 {
                break;
            }
            at += entry.next as usize;
        }
        Ok(names)
    }
}

fn bytes_to_header(buf: &[u8]) -> DmIoctl {
    assert!(buf.len() >= HEADER, "a dm buffer always holds its header");
    // SAFETY: the buffer holds at least HEADER bytes (asserted); DmIoctl is plain old data
    // valid for any bytes; read_unaligned needs no alignment.
    unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<DmIoctl>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(Cmd::Version.request(), 0xc138_fd00);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
    }

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(DmIoctl, data_size), 12);
        assert_eq!(std::mem::offset_of!(DmIoctl, flags), 28);
        assert_eq!(std::mem::offset_of!(DmIoctl, dev), 40);
        assert_eq!(std::mem::offset_of!(DmIoctl, name), 48);
        assert_eq!(std::mem::offset_of!(DmTargetSpec, next), 20);
        assert_eq!(std::mem::offset_of!(DmTargetSpec, target_type), 24);
        assert_eq!(std::mem::offset_of!(DmNameList, next), 8);
    }

    #[test]
    fn answers_are_read_within_bounds() {
        let answer = Answer { header: bytes_to_header(&[0u8; HEADER]), buf: vec![0u8; HEADER + 4] };
        assert!(answer.read::<DmTargetSpec>(HEADER).is_none());
        assert_eq!(answer.cstr(HEADER + 100), "");
    }
}
