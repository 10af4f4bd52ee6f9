//! The `local` hypervisor driver: the "VM" is a directory. The domain's ext4 file system is
//! mounted at `<vm_root>/<vm_id>/<domain_id>`:
//!
//! - read-write: `mkfs.ext4` first if the device has no file system yet (first use of a new
//!   domain), then `mount -o noinit_itable,nosuid,nodev` (mkfs with lazy init, see volume::filesystem);
//! - read-only: never formats; `mount -o ro,noload,nosuid,nodev`. `noload` skips the journal:
//!   a read-write user on another host (or VM) leaves the journal marked for recovery while
//!   it is mounted, and replaying it needs write access the read-only device does not give.
//!   Writes under the directory fail with EROFS.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{vm_directory, HypervisorDriver, Placement};
use crate::error::{Error, Result};
use crate::volume::{filesystem, OpenMode};

const DRIVER: &str = "local";

/// The `local` driver: mounts each domain's file system at
/// `<vm_root>/<vm_id>/<domain_id>`.
pub struct LocalDriver {
    vm_root: PathBuf,
}

impl LocalDriver {
    /// A driver mounting under `vm_root` (created if missing).
    pub fn new(vm_root: impl Into<PathBuf>) -> Result<Self> {
        let vm_root = vm_root.into();
        std::fs::create_dir_all(&vm_root)
            .map_err(|e| Error::io(format!("creating the VM root {}", vm_root.display()), e))?;
        Ok(Self { vm_root })
    }

    /// The directory under which VM directories are created.
    pub fn vm_root(&self) -> &Path {
        &self.vm_root
    }

    fn directory(&self, placement: &Placement) -> Result<PathBuf> {
        for (what, name) in [("VM id", &placement.vm_id), ("domain id", &placement.domain_id)] {
            if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
                return Err(hv(format!("{what} {name:?} cannot be used as a directory name")));
            }
        }
        Ok(vm_directory(&self.vm_root, &placement.vm_id, &placement.domain_id))
    }
}

fn hv(detail: impl Into<String>) -> Error {
    Error::Hypervisor { driver: DRIVER, detail: detail.into() }
}

impl HypervisorDriver for LocalDriver {
    fn kind(&self) -> &'static str {
        DRIVER
    }

    fn attach(&self, placement: &Placement) -> Result<String> {
        let dir = self.directory(placement)?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        if let Some(existing) = mount_at(&dir)? {
            return Err(hv(format!(
                "{} is already a mount point (of {}): detach the earlier attachment first",
                dir.display(),
                existing.source
            )));
        }
        match placement.mode {
            OpenMode::ReadWrite => {
                if filesystem::ensure_ext4(&placement.device)? {
                    tracing::info!(device = %placement.device.display(), domain = %placement.domain_id, "created ext4 on first read-write use");
                }
            }
            OpenMode::ReadOnly => {
                if !filesystem::has_ext4(&placement.device)? {
                    return Err(hv(format!(
                        "domain {} has no file system yet; attach it read-write once first (a read-only attach never formats)",
                        placement.domain_id
                    )));
                }
            }
        }
        mount_ext4(&placement.device, &dir, placement.mode)?;
        Ok(dir.to_string_lossy().into_owned())
    }

    fn detach(&self, placement: &Placement, location: &str) -> Result<()> {
        let dir = PathBuf::from(location);
        if !dir.starts_with(&self.vm_root) {
            return Err(hv(format!("{location} is not under the VM root {}", self.vm_root.display())));
        }
        if mount_at(&dir)?.is_some() {
            unmount(&dir)?;
        }
        // The directories are ours; a VM directory with other domains stays.
        let _ = std::fs::remove_dir(&dir);
        if let Some(vm_dir) = dir.parent() {
            let _ = std::fs::remove_dir(vm_dir);
        }
        tracing::debug!(vm = %placement.vm_id, domain = %placement.domain_id, dir = %dir.display(), "local detach done");
        Ok(())
    }

    fn check(&self, placement: &Placement, location: &str) -> Result<Option<String>> {
        let dir = PathBuf::from(location);
        Ok(match mount_at(&dir)? {
            None => Some(format!("nothing is mounted at {location}")),
            Some(m) if Path::new(&m.source) != placement.device => {
                Some(format!("{location} holds {} instead of {}", m.source, placement.device.display()))
            }
            Some(m) if m.fstype != "ext4" => Some(format!("{location} holds a {} file system, not ext4", m.fstype)),
            Some(_) => None,
        })
    }
}

/// mount(2) of ext4 with the options described in the module documentation.
pub fn mount_ext4(device: &Path, dir: &Path, mode: OpenMode) -> Result<()> {
    let src = cstr(device)?;
    let target = cstr(dir)?;
    let fstype = CString::new("ext4").expect("static string");
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    let data = if mode == OpenMode::ReadOnly {
        flags |= libc::MS_RDONLY;
        Some(CString::new("noload").expect("static string"))
    } else {
        // No background thread zeroing the inode tables mkfs left uninitialised
        // (volume::filesystem::ensure_ext4): it would write every group's table to the
        // provider's disk after all.
        Some(CString::new("noinit_itable").expect("static string"))
    };
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr() as *const libc::c_void);
    // SAFETY: valid C strings; `data` outlives the call.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) };
    if rc != 0 {
        let options =
            if mode == OpenMode::ReadOnly { "ro,noload,nosuid,nodev" } else { "rw,noinit_itable,nosuid,nodev" };
        return Err(Error::io(
            format!("mounting {} (ext4, {options}) at {}", device.display(), dir.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// How long an unmount waits out a busy file system before it reports it: a holder may be
/// fleeting (a child forked by another thread holds the parent's open files until its exec).
const UNMOUNT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Unmounts `dir`; a file system still in use after 3 s (`UNMOUNT_BUSY_WAIT`) is reported, not
/// torn away.
pub fn unmount(dir: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match filesystem::unmount(dir) {
            Ok(()) => return Ok(()),
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => return Ok(()), // not mounted
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                if started.elapsed() < UNMOUNT_BUSY_WAIT {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                return Err(hv(format!(
                    "{} is still in use (a process has files open under it); stop using it and detach again",
                    dir.display()
                )));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where the file system is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// File system type, e.g. "ext4" or "fuse".
    pub fstype: String,
    /// The mounted device or source, e.g. /dev/loop3.
    pub source: String,
    /// Per-mount options, e.g. "ro,nosuid,nodev"; the read-only check looks here.
    pub options: String,
}

/// The mount at exactly `dir` (the topmost one if several are stacked).
pub fn mount_at(dir: &Path) -> Result<Option<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text).into_iter().rev().find(|m| m.mount_point == dir))
}

/// Parses mountinfo (proc(5)): `id parent maj:min root mount_point options [optional...] -
/// fstype source super_options`, with octal escapes (`\040` for a space).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < 6 || fields.len() < sep + 3 {
            continue;
        }
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(fields[4])),
            options: fields[5].to_string(),
            fstype: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| hv(format!("path {} contains a NUL byte", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed() {
        let text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /var/lib/skydd/vms/vm\\040a/d1 ro,nosuid,nodev shared:5 - ext4 /dev/loop3 ro,norecovery\n\
                    garbage line\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].mount_point, PathBuf::from("/var/lib/skydd/vms/vm a/d1"));
        assert_eq!(entries[1].fstype, "ext4");
        assert_eq!(entries[1].source, "/dev/loop3");
        assert_eq!(entries[1].options, "ro,nosuid,nodev");
    }

    #[test]
    fn directories_refuse_path_tricks() {
        let driver = LocalDriver { vm_root: PathBuf::from("/nonexistent/vms") };
        for (vm, domain) in [("../x", "d"), ("vm", ".."), ("a/b", "d"), ("", "d")] {
            let p = Placement {
                vm_id: vm.into(),
                domain_id: domain.into(),
                device: "/dev/loop0".into(),
                mode: OpenMode::ReadOnly,
            };
            assert!(driver.directory(&p).is_err(), "{vm:?}/{domain:?} must be refused");
        }
        let ok = Placement {
            vm_id: "vm-a".into(),
            domain_id: "0f".into(),
            device: "/dev/loop0".into(),
            mode: OpenMode::ReadOnly,
        };
        assert_eq!(driver.directory(&ok).unwrap(), PathBuf::from("/nonexistent/vms/vm-a/0f"));
    }
}
