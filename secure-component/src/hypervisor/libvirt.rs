//! The `libvirt` hypervisor driver: the plaintext block device is hot-plugged into the
//! running libvirt domain named like the VM id, as a virtio disk:
//!
//! ```xml
//! <disk type='block' device='disk'>
//!   <driver name='qemu' type='raw' cache='none' io='native'/>
//!   <source dev='/dev/loop3'/>
//!   <target dev='vdb' bus='virtio'/>
//!   <readonly/>            <!-- ro attachments only -->
//!   <serial>skydd-...</serial>
//! </disk>
//! ```
//!
//! with `virsh [-c URI] attach-device <vm> <file> --live`; detach runs `detach-device` with
//! the same XML. The guest sees a block device (it owns the file system). The target is the
//! first of vdb..vdz the domain does not use (`virsh domblklist`).
//!
//! A vhost-user socket ([`crate::volume::vhost_user`], docs/VHOST-USER.md) is attached as
//!
//! ```xml
//! <disk type='vhostuser' device='disk'>
//!   <driver name='qemu' type='raw'/>
//!   <source type='unix' path='/run/skydd/vhost-user/skydd-....sock'><reconnect enabled='no'/></source>
//!   <target dev='vdb' bus='virtio'/>
//! </disk>
//! ```
//!
//! (read-only and the serial come from the backend itself), after handing the socket to the
//! user and group the domain's qemu runs as (its live DAC `<seclabel>`). The domain needs
//! shared memory: `<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`.
//!
//! Before any hot-plug the driver reads the live domain XML and refuses an x86 domain
//! without `<features><acpi/></features>`: the guest would eject all its PCI devices
//! ([`hotplug_hazard`], docs/VHOST-USER.md "Hot-plug needs ACPI").
//!
//! Unit-tested against a fake `virsh`; tests/vhost_user_qemu.rs runs it against a real
//! libvirtd with a TCG domain.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::{HypervisorDriver, Placement};
use crate::error::{Error, Result};
use crate::volume::OpenMode;

const DRIVER: &str = "libvirt";

fn hv(detail: impl Into<String>) -> Error {
    Error::Hypervisor { driver: DRIVER, detail: detail.into() }
}

/// Runs virsh with arguments and returns its standard output (an error carries stderr).
pub trait Virsh: Send + Sync {
    /// Runs `virsh` with `args` (without the `-c URI`, which the implementation adds); a
    /// non-zero exit is an [`Error::Hypervisor`] carrying virsh's stderr.
    fn run(&self, args: &[String]) -> Result<String>;
}

/// The real `virsh` binary, optionally with a connection URI (`-c qemu:///system`).
pub struct VirshCommand {
    /// The virsh executable; "virsh" from PATH unless configured.
    pub program: PathBuf,
    /// The libvirt connection URI passed as `-c`; libvirt's default when `None`.
    pub uri: Option<String>,
}

impl Virsh for VirshCommand {
    fn run(&self, args: &[String]) -> Result<String> {
        let mut cmd = Command::new(&self.program);
        if let Some(uri) = &self.uri {
            cmd.arg("-c").arg(uri);
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| Error::io(format!("running {} (is libvirt-clients installed?)", self.program.display()), e))?;
        if !out.status.success() {
            return Err(hv(format!(
                "virsh {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The `libvirt` driver: hot-plugs the plaintext device into the running libvirt domain
/// named like the VM (see the module documentation for the disk XML).
pub struct LibvirtDriver {
    virsh: Box<dyn Virsh>,
    /// Where the device XML of each attachment is written (virsh reads it from a file).
    xml_dir: PathBuf,
    /// Serialises target choice and attach per host (two attaches to one VM must not pick
    /// the same vdX).
    lock: Mutex<()>,
}

impl LibvirtDriver {
    /// A driver running `virsh` through `virsh` (a fake one in tests) and writing device XML
    /// files to `xml_dir` (created if missing).
    pub fn new(virsh: Box<dyn Virsh>, xml_dir: impl Into<PathBuf>) -> Result<Self> {
        let xml_dir = xml_dir.into();
        std::fs::create_dir_all(&xml_dir).map_err(|e| Error::io(format!("creating {}", xml_dir.display()), e))?;
        Ok(Self { virsh, xml_dir, lock: Mutex::new(()) })
    }

    /// `virsh` from PATH (or `program`) with an optional connection URI.
    pub fn with_virsh(program: Option<PathBuf>, uri: Option<String>, xml_dir: impl Into<PathBuf>) -> Result<Self> {
        Self::new(Box::new(VirshCommand { program: program.unwrap_or_else(|| PathBuf::from("virsh")), uri }), xml_dir)
    }

    fn disks(&self, vm: &str) -> Result<Vec<(String, String)>> {
        Ok(parse_domblklist(&self.virsh.run(&["domblklist".into(), vm.into()])?))
    }

    fn xml_path(&self, vm: &str, target: &str) -> PathBuf {
        self.xml_dir.join(format!("{vm}-{target}.xml"))
    }

    fn write_xml(&self, placement: &Placement, target: &str) -> Result<PathBuf> {
        let xml = if is_socket(&placement.device) {
            vhost_user_disk_xml(&placement.device, target)
        } else {
            disk_xml(&placement.device, target, placement.mode == OpenMode::ReadOnly, &serial(placement))
        };
        let path = self.xml_path(&placement.vm_id, target);
        std::fs::write(&path, xml).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }
}

/// Gives the vhost-user socket to the uid:gid the domain's qemu runs as (libvirt's DAC label
/// of the running domain, `live` is its `virsh dumpxml`), so that qemu, and only it, can
/// connect.
fn hand_socket_to_qemu(live: &str, socket: &Path) -> Result<()> {
    let Some((uid, gid)) = dac_label(live) else {
        // No DAC label: qemu runs as the libvirtd user (root), which can connect already.
        return Ok(());
    };
    std::os::unix::fs::chown(socket, Some(uid), Some(gid))
        .map_err(|e| Error::io(format!("handing {} to qemu's {uid}:{gid}", socket.display()), e))
}

/// Why a hot-plug into the running domain (`live`, its `virsh dumpxml`) would harm the
/// guest, if it would: an x86 domain without `<features><acpi/>` runs qemu with
/// `-no-acpi`, SeaBIOS then installs its own fallback ACPI tables (the i440fx ones, whose
/// PCI hot-plug slots are driven by registers a q35 machine does not have), and the guest
/// answers the hot-plug event by ejecting every device of PCI bus 0: its root ports, the
/// virtio-serial controller, its disks (seen with libvirt 9.0 / qemu 7.2, docs/VHOST-USER.md
/// "Hot-plug needs ACPI"). libvirt writes the element exactly as `<acpi/>`.
pub fn hotplug_hazard(live: &str) -> Option<&'static str> {
    let x86 = live.contains("arch='x86_64'") || live.contains("arch='i686'");
    (x86 && !live.contains("<acpi/>")).then_some(
        "the domain has no <features><acpi/></features>: its qemu runs with -no-acpi and the guest \
         would answer a PCI hot-plug by ejecting every device on PCI bus 0 (its disks included); \
         give the domain <acpi/> (and restart it) before attaching volumes",
    )
}

/// Whether `path` is a unix socket (a vhost-user mapping) rather than a block device.
fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The `+uid:+gid` of a live domain XML's `<seclabel ... model='dac'>` `<label>`.
fn dac_label(domain_xml: &str) -> Option<(u32, u32)> {
    let start = domain_xml.find("model='dac'")?;
    let rest = &domain_xml[start..];
    let label = rest.split("<label>").nth(1)?.split("</label>").next()?;
    let (uid, gid) = label.split_once(':')?;
    Some((uid.trim_start_matches('+').parse().ok()?, gid.trim_start_matches('+').parse().ok()?))
}

/// The `<disk type='vhostuser'>` element for the vhost-user `socket` at `target`.
pub fn vhost_user_disk_xml(socket: &Path, target: &str) -> String {
    format!(
        "<disk type='vhostuser' device='disk'>\n  <driver name='qemu' type='raw'/>\n  \
         <source type='unix' path='{}'>\n    <reconnect enabled='no'/>\n  </source>\n  \
         <target dev='{}' bus='virtio'/>\n</disk>\n",
        escape(&socket.to_string_lossy()),
        escape(target)
    )
}

impl HypervisorDriver for LibvirtDriver {
    fn kind(&self) -> &'static str {
        DRIVER
    }

    fn attach(&self, placement: &Placement) -> Result<String> {
        check_vm_name(&placement.vm_id)?;
        let _guard = self.lock.lock().map_err(|_| hv("driver lock poisoned"))?;
        let disks = self.disks(&placement.vm_id)?;
        let device = placement.device.to_string_lossy();
        if let Some((target, _)) = disks.iter().find(|(_, source)| *source == device) {
            return Err(hv(format!("VM {} already has {device} as {target}", placement.vm_id)));
        }
        let used: Vec<&str> = disks.iter().map(|(t, _)| t.as_str()).collect();
        let target = free_target(&used)
            .ok_or_else(|| hv(format!("VM {} has no free virtio target (vdb..vdz all used)", placement.vm_id)))?;
        let live = self.virsh.run(&["dumpxml".into(), placement.vm_id.clone()])?;
        if let Some(hazard) = hotplug_hazard(&live) {
            return Err(hv(format!("refusing to hot-plug into VM {}: {hazard}", placement.vm_id)));
        }
        let file = self.write_xml(placement, &target)?;
        if is_socket(&placement.device) {
            hand_socket_to_qemu(&live, &placement.device)?;
        }
        self.virsh.run(&[
            "attach-device".into(),
            placement.vm_id.clone(),
            file.to_string_lossy().into_owned(),
            "--live".into(),
        ])?;
        Ok(target)
    }

    fn detach(&self, placement: &Placement, location: &str) -> Result<()> {
        check_vm_name(&placement.vm_id)?;
        let _guard = self.lock.lock().map_err(|_| hv("driver lock poisoned"))?;
        let device = placement.device.to_string_lossy();
        let present = match self.disks(&placement.vm_id) {
            Ok(disks) => disks.iter().any(|(t, s)| t == location && *s == device),
            // The domain itself is gone (shut off and undefined): nothing to detach.
            Err(e) if e.to_string().contains("failed to get domain") => false,
            Err(e) => return Err(e),
        };
        let file = self.xml_path(&placement.vm_id, location);
        if present {
            let file = if file.exists() { file } else { self.write_xml(placement, location)? };
            self.virsh.run(&[
                "detach-device".into(),
                placement.vm_id.clone(),
                file.to_string_lossy().into_owned(),
                "--live".into(),
            ])?;
        }
        let _ = std::fs::remove_file(self.xml_path(&placement.vm_id, location));
        Ok(())
    }

    fn check(&self, placement: &Placement, location: &str) -> Result<Option<String>> {
        let disks = match self.disks(&placement.vm_id) {
            Ok(d) => d,
            Err(e) => return Ok(Some(format!("cannot list the disks of VM {}: {e}", placement.vm_id))),
        };
        let device = placement.device.to_string_lossy();
        Ok(match disks.iter().find(|(t, _)| t == location) {
            None => Some(format!("VM {} has no disk {location}", placement.vm_id)),
            Some((_, s)) if *s != device => {
                Some(format!("disk {location} of VM {} is {s}, not {device}", placement.vm_id))
            }
            Some(_) => None,
        })
    }
}

fn check_vm_name(vm: &str) -> Result<()> {
    if vm.is_empty() || vm.starts_with('-') || vm.contains('/') {
        return Err(hv(format!("VM id {vm:?} cannot be a libvirt domain name")));
    }
    Ok(())
}

/// The disk serial the guest sees (/dev/disk/by-id/virtio-<serial>), at most 20 characters.
fn serial(placement: &Placement) -> String {
    let mut s = format!("skydd-{}", placement.domain_id);
    s.truncate(20);
    s
}

/// The `<disk>` element for `device` at `target`, `<readonly/>` when `read_only`.
pub fn disk_xml(device: &Path, target: &str, read_only: bool, serial: &str) -> String {
    let mut xml = String::new();
    xml.push_str("<disk type='block' device='disk'>\n");
    xml.push_str("  <driver name='qemu' type='raw' cache='none' io='native'/>\n");
    xml.push_str(&format!("  <source dev='{}'/>\n", escape(&device.to_string_lossy())));
    xml.push_str(&format!("  <target dev='{}' bus='virtio'/>\n", escape(target)));
    if read_only {
        xml.push_str("  <readonly/>\n");
    }
    xml.push_str(&format!("  <serial>{}</serial>\n", escape(serial)));
    xml.push_str("</disk>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The first of vdb..vdz not in `used` (vda is the VM's own root disk by convention).
pub fn free_target(used: &[&str]) -> Option<String> {
    (b'b'..=b'z').map(|c| format!("vd{}", c as char)).find(|t| !used.contains(&t.as_str()))
}

/// `virsh domblklist` output → `(target, source)` pairs.
pub fn parse_domblklist(output: &str) -> Vec<(String, String)> {
    let mut lines = output.lines();
    // Header ("Target Source") and a dashed rule come first.
    for line in lines.by_ref() {
        if line.trim_start().starts_with("---") {
            break;
        }
    }
    lines
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let target = parts.next()?;
            let source = parts.collect::<Vec<_>>().join(" ");
            Some((target.to_string(), source))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn readonly_disk_xml() {
        let xml = disk_xml(Path::new("/dev/loop7"), "vdc", true, "skydd-0f1e");
        assert_eq!(
            xml,
            "<disk type='block' device='disk'>\n  <driver name='qemu' type='raw' cache='none' io='native'/>\n  \
             <source dev='/dev/loop7'/>\n  <target dev='vdc' bus='virtio'/>\n  <readonly/>\n  <serial>skydd-0f1e</serial>\n</disk>\n"
        );
        let rw = disk_xml(Path::new("/dev/dm-0"), "vdb", false, "s");
        assert!(!rw.contains("readonly"), "{rw}");
        assert!(rw.contains("<source dev='/dev/dm-0'/>"));
        let odd = disk_xml(Path::new("/dev/a'b&<c>"), "vdb", false, "s");
        assert!(odd.contains("<source dev='/dev/a&apos;b&amp;&lt;c&gt;'/>"), "{odd}");
    }

    #[test]
    fn vhost_user_disk_and_dac_label() {
        let xml = vhost_user_disk_xml(Path::new("/run/skydd/vhost-user/skydd-a-vm.sock"), "vdb");
        assert!(xml.contains("<disk type='vhostuser' device='disk'>"), "{xml}");
        assert!(xml.contains("<source type='unix' path='/run/skydd/vhost-user/skydd-a-vm.sock'>"), "{xml}");
        let live = "<domain><seclabel type='dynamic' model='dac' relabel='yes'>\n<label>+64055:+107</label>\n\
                    <imagelabel>+64055:+107</imagelabel></seclabel></domain>";
        assert_eq!(dac_label(live), Some((64055, 107)));
        assert_eq!(dac_label("<domain/>"), None);
    }

    #[test]
    fn domblklist_and_targets() {
        let out = " Target   Source\n------------------------------------------------\n vda      /var/lib/libvirt/images/a.qcow2\n vdb      /dev/loop3\n sda      -\n\n";
        let disks = parse_domblklist(out);
        assert_eq!(
            disks,
            vec![
                ("vda".into(), "/var/lib/libvirt/images/a.qcow2".into()),
                ("vdb".into(), "/dev/loop3".into()),
                ("sda".into(), "-".into())
            ]
        );
        assert_eq!(free_target(&["vda", "vdb", "sda"]).as_deref(), Some("vdc"));
        assert_eq!(free_target(&[]).as_deref(), Some("vdb"));
        let all: Vec<String> = (b'b'..=b'z').map(|c| format!("vd{}", c as char)).collect();
        let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(free_target(&all), None);
    }

    /// A fake virsh: remembers the calls, keeps a disk table per the attach/detach calls,
    /// answers `dumpxml` with an x86 domain, with `<acpi/>` unless `no_acpi`.
    #[derive(Default)]
    struct FakeVirsh {
        calls: Mutex<Vec<Vec<String>>>,
        disks: Mutex<Vec<(String, String)>>,
        no_acpi: bool,
    }

    impl Virsh for Arc<FakeVirsh> {
        fn run(&self, args: &[String]) -> Result<String> {
            self.calls.lock().unwrap().push(args.to_vec());
            match args[0].as_str() {
                "domblklist" => {
                    let mut out = " Target   Source\n----------------------\n vda      /img/root.qcow2\n".to_string();
                    for (t, s) in self.disks.lock().unwrap().iter() {
                        out.push_str(&format!(" {t}      {s}\n"));
                    }
                    Ok(out)
                }
                "dumpxml" => {
                    let features = if self.no_acpi { "" } else { "<features>\n    <acpi/>\n  </features>\n  " };
                    Ok(format!(
                        "<domain type='qemu' id='1'>\n  <os>\n    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>\n  \
                         </os>\n  {features}<devices/>\n</domain>\n"
                    ))
                }
                "attach-device" | "detach-device" => {
                    let xml = std::fs::read_to_string(&args[2]).unwrap();
                    let source = xml.split("dev='").nth(1).unwrap().split('\'').next().unwrap().to_string();
                    let target = xml.split("<target dev='").nth(1).unwrap().split('\'').next().unwrap().to_string();
                    let mut disks = self.disks.lock().unwrap();
                    if args[0] == "attach-device" {
                        disks.push((target, source));
                    } else {
                        disks.retain(|(t, _)| *t != target);
                    }
                    Ok(String::new())
                }
                other => panic!("unexpected virsh {other}"),
            }
        }
    }

    #[test]
    fn attach_and_detach_through_virsh() {
        let tmp = std::env::temp_dir().join(format!("skydd-libvirt-test-{}", std::process::id()));
        let fake = Arc::new(FakeVirsh::default());
        let driver = LibvirtDriver::new(Box::new(fake.clone()), &tmp).unwrap();
        let ro = Placement {
            vm_id: "vm-b".into(),
            domain_id: "0f1e2d".into(),
            device: "/dev/loop4".into(),
            mode: OpenMode::ReadOnly,
        };
        let target = driver.attach(&ro).unwrap();
        assert_eq!(target, "vdb");
        let xml = std::fs::read_to_string(tmp.join("vm-b-vdb.xml")).unwrap();
        assert!(xml.contains("<readonly/>") && xml.contains("/dev/loop4"), "{xml}");
        assert_eq!(driver.check(&ro, "vdb").unwrap(), None);
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls[1][0], "dumpxml", "the live domain is checked before the hot-plug");
        assert_eq!(calls[2][0], "attach-device");
        assert_eq!(calls[2][1], "vm-b");
        assert_eq!(calls[2][3], "--live");

        let rw = Placement {
            vm_id: "vm-b".into(),
            domain_id: "aa".into(),
            device: "/dev/loop5".into(),
            mode: OpenMode::ReadWrite,
        };
        assert_eq!(driver.attach(&rw).unwrap(), "vdc", "the next free target");
        assert!(driver.attach(&ro).is_err(), "the same device twice is refused");

        driver.detach(&ro, "vdb").unwrap();
        assert!(driver.check(&ro, "vdb").unwrap().unwrap().contains("no disk vdb"));
        assert!(!tmp.join("vm-b-vdb.xml").exists());
        driver.detach(&ro, "vdb").unwrap(); // already gone: fine
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn no_hotplug_into_an_x86_domain_without_acpi() {
        let tmp = std::env::temp_dir().join(format!("skydd-libvirt-noacpi-{}", std::process::id()));
        let fake = Arc::new(FakeVirsh { no_acpi: true, ..FakeVirsh::default() });
        let driver = LibvirtDriver::new(Box::new(fake.clone()), &tmp).unwrap();
        let rw = Placement {
            vm_id: "vm-c".into(),
            domain_id: "bb".into(),
            device: "/dev/loop6".into(),
            mode: OpenMode::ReadWrite,
        };
        let err = driver.attach(&rw).unwrap_err().to_string();
        assert!(err.contains("vm-c") && err.contains("<acpi/>") && err.contains("-no-acpi"), "{err}");
        assert!(
            !fake.calls.lock().unwrap().iter().any(|c| c[0] == "attach-device"),
            "nothing may be plugged into such a domain"
        );
        // Other architectures (aarch64 with a device tree) hot-plug natively without ACPI.
        assert_eq!(hotplug_hazard("<domain><os><type arch='aarch64' machine='virt'>hvm</type></os></domain>"), None);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
