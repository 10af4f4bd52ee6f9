//! The dm-crypt backend: maps the data area (from 1 MiB) of a volume through the kernel's
//! dm-crypt target with device-mapper ioctls ([`crate::sys::dm`]), exactly as
//! docs/DMCRYPT.md describes.
//!
//! The key never appears in a table string: it is added as a `logon` key (payload never
//! readable from userspace, [`crate::sys::keyring`]) to this thread's keyring, referenced as
//! `:64:logon:skydd:<name>`, and invalidated as soon as the table is live.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use protocol::refusal::Refusal;
use protocol::secret::SecretBytes;
use skydd_volume::integrity::verity::VerityTree;
use skydd_volume::integrity::Opened;
use skydd_volume::layout::{data_kernel_sectors, DATA_OFFSET, DATA_OFFSET_KERNEL_SECTORS, SECTOR_SIZE};
use skydd_volume::xts::KEY_LEN;

use super::{IntegrityOpen, OpenMode, OpenVolume, VolumeBackend};
use crate::error::{Error, Result};
use crate::sys::dm::{DmControl, DmFlags, Target, CONTROL};
use crate::sys::keyring::LogonKey;
use crate::sys::loopdev::{self, LoopDevice, LoopOptions, LOOP_MAJOR};
use crate::sys::{block_device_size, ensure_block_node, split_dev};

/// Every mapping this backend creates has a name starting with this prefix.
pub const NAME_PREFIX: &str = "skydd-";

/// dm-crypt through the kernel's device-mapper.
pub struct DmCryptBackend {
    control: DmControl,
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
        let control = match DmControl::open() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unavailable(format!("{CONTROL} missing")))
            }
            Err(e) => return Err(unavailable(format!("{CONTROL} cannot be opened ({e})"))),
        };
        let [major, minor, patch] =
            control.version().map_err(|e| unavailable(format!("DM_VERSION on {CONTROL} failed ({e})")))?;
        Ok(Self { control, version: format!("{major}.{minor}.{patch}") })
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
        let targets = self
            .control
            .table(name)
            .map_err(|e| Error::Volume(format!("reading the table of mapping {name} failed: {e}")))?;
        Ok(targets.iter().map(Target::to_string).collect::<Vec<_>>().join("\n"))
    }

    fn open_inner(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume> {
        let ro = mode == OpenMode::ReadOnly;
        let (backing, _loop_guard) = backing_device(volume, ro)?;
        let size = block_size_of(&backing)?;
        if size < DATA_OFFSET + SECTOR_SIZE as u64 {
            return Err(Error::Volume(format!(
                "{} is {size} bytes: too small for a 1 MiB header plus one 4096-byte data sector",
                volume.display()
            )));
        }
        // Whole 4096-byte sectors only, counted in 512-byte sectors.
        self.map_crypt(name, &backing, DATA_OFFSET_KERNEL_SECTORS, data_kernel_sectors(size), key, mode)
    }

    /// The dm-crypt mapping `name` over `sectors` 512-byte sectors of `backing` from `offset`.
    fn map_crypt(
        &self,
        name: &str,
        backing: &Path,
        offset: u64,
        sectors: u64,
        key: &SecretBytes,
        mode: OpenMode,
    ) -> Result<OpenVolume> {
        let ro = mode == OpenMode::ReadOnly;
        let (maj, min) = device_numbers(backing)?;
        let dm_flags = if ro { DmFlags::READONLY } else { DmFlags::NONE };

        self.control.create(name, dm_flags).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::Volume(format!("a device-mapper mapping named {name} already exists")),
            _ => Error::Volume(format!("DM_DEV_CREATE {name} failed: {e}")),
        })?;
        let result = (|| {
            let description = format!("skydd:{name}");
            let key_guard = LogonKey::add(&description, key).map_err(|e| {
                Error::Volume(format!("adding logon key {description} to the thread keyring failed: {e}"))
            })?;
            let base = format!("aes-xts-plain64 :{KEY_LEN}:logon:skydd:{name} 0 {maj}:{min} {offset} ");
            let crypt = |params: String| Target { start: 0, length: sectors, target_type: "crypt".into(), params };
            let fast = crypt(format!("{base}4 sector_size:4096 iv_large_sectors no_read_workqueue no_write_workqueue"));
            let plain = crypt(format!("{base}2 sector_size:4096 iv_large_sectors"));
            // no_read/write_workqueue arrived in dm-crypt 1.22 (Linux 5.9); older kernels
            // reject the unknown feature with EINVAL, so fall back to the plain table.
            if let Err(e) = self.control.load_table(name, &fast, dm_flags) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(Error::Volume(format!("DM_TABLE_LOAD {name} failed: {e}")));
                }
                tracing::debug!(mapping = name, "dm-crypt refused the workqueue flags; loading without them");
                self.control.load_table(name, &plain, dm_flags).map_err(|e| {
                    Error::Volume(format!(
                        "DM_TABLE_LOAD {name} failed: {e} (is dm-crypt loaded and does the kernel know aes-xts-plain64 and logon keys?)"
                    ))
                })?;
            }
            self.control
                .resume(name, dm_flags)
                .map_err(|e| Error::Volume(format!("resuming mapping {name} failed: {e}")))?;
            let id = key_guard.id();
            key_guard.invalidate().map_err(|e| Error::Volume(format!("invalidating logon key {id} failed: {e}")))?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = self.control.remove(name);
            return Err(e);
        }
        let status = self
            .control
            .status(name)
            .map_err(|e| Error::Volume(format!("DM_DEV_STATUS {name} after creating it failed: {e}")))?;
        let device = dm_node(status.dev)?;
        tracing::info!(mapping = name, device = %device.display(), read_only = ro, "dm-crypt mapping opened");
        Ok(OpenVolume { name: name.to_string(), device, mode })
    }
}

/// Where the dm-verity hash trees of read-only format-2 mappings are kept (tmpfs on a host).
pub const VERITY_DIR: &str = "/run/skydd/verity";

impl DmCryptBackend {
    /// A read-only format-2 mapping (docs/DMCRYPT.md "Format 2, read-only"): every sector is
    /// verified in userspace against its tag and the TTP-anchored tree, a dm-verity tree is
    /// built over the verified ciphertext, and the kernel stacks
    /// `linear (data area) → verity → crypt`, so a block changed after this check reads as
    /// EIO in the guest kernel.
    fn open_verified(
        &self,
        name: &str,
        volume: &Path,
        key: &SecretBytes,
        integrity: IntegrityOpen,
    ) -> Result<OpenVolume> {
        let file = File::open(volume).map_err(|e| Error::io(format!("opening volume {}", volume.display()), e))?;
        let (checked, opened) = integrity.open_volume(file, key, true)?;
        if let Opened::Recovered { kept_new, reset, .. } = opened {
            if kept_new + reset > 0 {
                return Err(Error::Integrity {
                    refusal: Refusal::IntegrityUnsupported,
                    message: format!(
                        "volume {} holds writes from a crash that are not committed yet; attach it read-write once \
                         (userspace backend) to settle them before a kernel read-only mapping",
                        volume.display()
                    ),
                });
            }
        }
        let mut salt = [0u8; 32];
        // SAFETY: getrandom fills the 32-byte buffer it is given.
        if unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) } != salt.len() as isize {
            return Err(Error::io("drawing the dm-verity salt", std::io::Error::last_os_error()));
        }
        let tree = VerityTree::build(&checked.verity_leaves(&salt)?, &salt);
        let sectors = tree.data_blocks * (SECTOR_SIZE as u64 / 512);
        drop(checked);

        std::fs::create_dir_all(VERITY_DIR).map_err(|e| Error::io(format!("creating {VERITY_DIR}"), e))?;
        let hash_path = verity_hash_path(name);
        std::fs::write(&hash_path, &tree.hash_device)
            .map_err(|e| Error::io(format!("writing {}", hash_path.display()), e))?;
        let (backing, _backing_guard) = backing_device(volume, true)?;
        let (hash_dev, _hash_guard) = backing_device(&hash_path, true)?;
        let (data_name, verity_name) = helper_names(name);
        let stack = || -> Result<OpenVolume> {
            let (maj, min) = device_numbers(&backing)?;
            let linear = format!("{maj}:{min} {DATA_OFFSET_KERNEL_SECTORS}");
            let data = self.create_mapping(&data_name, "linear", sectors, linear)?;
            let (hmaj, hmin) = device_numbers(&hash_dev)?;
            let (dmaj, dmin) = device_numbers(&data)?;
            let verity = format!("1 {dmaj}:{dmin} {hmaj}:{hmin} {}", tree.table_tail(&salt));
            let verified = self.create_mapping(&verity_name, "verity", sectors, verity)?;
            self.map_crypt(name, &verified, 0, sectors, key, OpenMode::ReadOnly)
        };
        match stack() {
            Ok(opened) => {
                tracing::info!(
                    mapping = name,
                    blocks = tree.data_blocks,
                    "format-2 volume verified; dm-verity pins it"
                );
                Ok(opened)
            }
            Err(e) => {
                self.remove_helpers(name);
                Err(e)
            }
        }
    }

    /// A read-only mapping `name` of one `target_type` target; returns its /dev/dm-N.
    fn create_mapping(&self, name: &str, target_type: &str, sectors: u64, params: String) -> Result<PathBuf> {
        let flags = DmFlags::READONLY;
        let target = Target { start: 0, length: sectors, target_type: target_type.into(), params };
        self.control.create(name, flags).map_err(|e| Error::Volume(format!("DM_DEV_CREATE {name} failed: {e}")))?;
        let loaded = self
            .control
            .load_table(name, &target, flags)
            .and_then(|()| self.control.resume(name, flags))
            .and_then(|()| self.control.status(name));
        match loaded {
            Ok(status) => dm_node(status.dev),
            Err(e) => {
                let _ = self.control.remove(name);
                Err(Error::Volume(format!(
                    "loading the {target_type} table of {name} failed: {e} (is dm-{target_type} available in this kernel?)"
                )))
            }
        }
    }

    /// Removes the dm-verity and linear mappings under a format-2 read-only mapping, if any.
    fn remove_helpers(&self, name: &str) {
        let (data_name, verity_name) = helper_names(name);
        for helper in [verity_name, data_name] {
            if self.control.status(&helper).is_ok() {
                if let Err(e) = self.control.remove(&helper) {
                    tracing::warn!(mapping = %helper, error = %e, "removing a dm-verity helper mapping failed");
                }
            }
        }
        let _ = std::fs::remove_file(verity_hash_path(name));
    }
}

/// The linear (data area) and verity mappings under mapping `name`; their prefixes differ
/// from [`NAME_PREFIX`], so [`VolumeBackend::list`] never reports them as volumes.
fn helper_names(name: &str) -> (String, String) {
    let rest = name.strip_prefix(NAME_PREFIX).unwrap_or(name);
    (format!("skyddd-{rest}"), format!("skyddv-{rest}"))
}

fn verity_hash_path(name: &str) -> PathBuf {
    Path::new(VERITY_DIR).join(format!("{name}.hash"))
}

/// The major:minor numbers of block device `path`.
fn device_numbers(path: &Path) -> Result<(u32, u32)> {
    let dev = std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(split_dev(dev.rdev()))
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

    fn open_authenticated(
        &self,
        name: &str,
        volume: &Path,
        key: &SecretBytes,
        integrity: IntegrityOpen,
        mode: OpenMode,
    ) -> Result<OpenVolume> {
        check_name(name)?;
        if mode == OpenMode::ReadWrite {
            return Err(Error::Integrity {
                refusal: Refusal::IntegrityUnsupported,
                message: "the dm-crypt backend cannot keep a format-2 volume's tags and tree for writes (no kernel \
                          target commits a root to the TTP), so it refuses a read-write attach rather than drop \
                          integrity; backend = \"auto\" opens read-write format-2 domains with the userspace engine beside dm-crypt \
                          (docs/DMCRYPT.md \"Format 2, read-write\")"
                    .into(),
            });
        }
        self.open_verified(name, volume, key, integrity)
    }

    fn close(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let status = self.control.status(name).map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => Error::Volume(format!("no device-mapper mapping named {name} is open")),
            _ => Error::Volume(format!("DM_DEV_STATUS {name} failed: {e}")),
        })?;
        if status.open_count > 0 {
            return Err(Error::Volume(format!(
                "mapping {name} is still in use (open count {}); unmount or detach it first",
                status.open_count
            )));
        }
        // Which loop device (if any) backs it, to release it after the removal.
        let backing = self.table(name).ok().and_then(|t| backing_of_table(&t));
        self.control.suspend(name).map_err(|e| Error::Volume(format!("suspending mapping {name} failed: {e}")))?;
        if let Err(e) = self.control.message(name, "key wipe") {
            tracing::warn!(mapping = name, error = %e, "dm-crypt key wipe failed; removing the mapping anyway");
        }
        self.control.remove(name).map_err(|e| Error::Volume(format!("DM_DEV_REMOVE {name} failed: {e}")))?;
        if let Some((LOOP_MAJOR, minor)) = backing {
            // Autoclear normally detaches it on the last close; this covers the rest.
            let _ = loopdev::detach(Path::new(&format!("/dev/loop{minor}")));
        }
        // A format-2 read-only mapping sits on dm-verity and a linear map of the data area.
        self.remove_helpers(name);
        tracing::info!(mapping = name, "dm-crypt mapping closed, key wiped");
        Ok(())
    }

    fn list(&self) -> Result<Vec<OpenVolume>> {
        let names = self.control.list().map_err(|e| Error::Volume(format!("DM_LIST_DEVICES failed: {e}")))?;
        let mut out = Vec::new();
        for name in names.into_iter().filter(|n| n.starts_with(NAME_PREFIX)) {
            let Ok(status) = self.control.status(&name) else {
                continue; // removed meanwhile
            };
            let mode = if status.flags.contains(DmFlags::READONLY) { OpenMode::ReadOnly } else { OpenMode::ReadWrite };
            out.push(OpenVolume { device: dm_node(status.dev)?, name, mode });
        }
        Ok(out)
    }
}

/// The block device a volume is read through; a regular file goes on a fresh loop device
/// (read-only for ro, autoclear so it vanishes when dm-crypt lets go). The returned device
/// must stay open until the table is live, or autoclear detaches the loop too early.
fn backing_device(volume: &Path, ro: bool) -> Result<(PathBuf, Option<LoopDevice>)> {
    let meta = std::fs::metadata(volume).map_err(|e| Error::io(format!("volume {}", volume.display()), e))?;
    if meta.file_type().is_block_device() {
        return Ok((volume.to_path_buf(), None));
    }
    if !meta.is_file() {
        return Err(Error::Volume(format!("volume {} is neither a regular file nor a block device", volume.display())));
    }
    let lo = loopdev::attach(volume, LoopOptions { read_only: ro, autoclear: true, block_size: None })?;
    Ok((lo.path.clone(), Some(lo)))
}

fn block_size_of(path: &Path) -> Result<u64> {
    let f = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    block_device_size(&f).map_err(|e| Error::io(format!("BLKGETSIZE64 on {}", path.display()), e))
}

/// /dev/dm-<minor>; without udev nobody may have created it, so mknod it.
fn dm_node(devnum: u64) -> Result<PathBuf> {
    let (maj, min) = split_dev(devnum);
    let path = PathBuf::from(format!("/dev/dm-{min}"));
    ensure_block_node(&path, maj, min, 0o600).map_err(|e| Error::io(format!("mknod {}", path.display()), e))?;
    Ok(path)
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

#[cfg(test)]
mod tests {
    use super::*;

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
