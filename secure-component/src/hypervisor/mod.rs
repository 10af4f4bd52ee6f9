//! Hypervisor drivers: how an opened (plaintext) volume reaches a VM. One trait, three drivers:
//!
//! - [`local::LocalDriver`]: mounts the ext4 file system at `<vm_root>/<vm_id>/<domain_id>`
//!   (read-only with `ro,noload` for ro; `mkfs.ext4` on the first read-write use). The
//!   all-in-one cloud and the tests use it: the "VM" is a directory.
//! - [`libvirt::LibvirtDriver`]: hands the block device to a running libvirt domain with
//!   `virsh attach-device --live` (`<readonly/>` for ro); the guest owns the file system.
//! - [`qemu::QemuDriver`]: hot-plugs the vhost-user-blk socket of a
//!   [`crate::volume::vhost_user`] mapping into a running qemu over QMP (docs/VHOST-USER.md).

pub mod libvirt;
pub mod local;
pub mod qemu;

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::volume::OpenMode;

/// What is being attached: the plaintext device of one domain for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The VM the device is for; the libvirt domain name, or a directory name for `local`.
    pub vm_id: String,
    /// The domain whose volume this is; the last path component of the local mount.
    pub domain_id: String,
    /// The plaintext block device (/dev/loopN or /dev/dm-N), or the vhost-user socket
    /// serving it (the `vhost-user` backend).
    pub device: PathBuf,
    /// Read-only placements are mounted `ro,noload` (local) or attached `<readonly/>` (libvirt).
    pub mode: OpenMode,
}

/// A way to give an opened volume to a VM and take it away again ([`local::LocalDriver`],
/// [`libvirt::LibvirtDriver`]; chosen by `hypervisor` in the configuration).
pub trait HypervisorDriver: Send + Sync {
    /// "local", "libvirt" or "qemu".
    fn kind(&self) -> &'static str;
    /// Gives the device to the VM. Returns where the VM sees it: the mount directory
    /// (local), the libvirt target such as `vdb`, or the qemu device id.
    fn attach(&self, placement: &Placement) -> Result<String>;
    /// Takes the device away from the VM again (`location` as returned by `attach`). Must
    /// succeed when it is already gone (after a crash or a manual cleanup).
    fn detach(&self, placement: &Placement, location: &str) -> Result<()>;
    /// `None` if the VM has the device at `location` now, otherwise why not (in words).
    fn check(&self, placement: &Placement, location: &str) -> Result<Option<String>>;
}

/// `<vm_root>/<vm_id>/<domain_id>`: where the local driver mounts a domain for a VM.
pub fn vm_directory(vm_root: &Path, vm_id: &str, domain_id: &str) -> PathBuf {
    vm_root.join(vm_id).join(domain_id)
}
