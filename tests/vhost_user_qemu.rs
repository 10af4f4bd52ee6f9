//! The VM data path for real: the secure component's `vhost-user` backend serves a volume
//! to a running qemu (TCG) guest, hot-plugged and unplugged by the `qemu` (QMP) driver and,
//! in a libvirt domain, by the `libvirt` driver (docs/VHOST-USER.md). ONE guest per driver
//! (tests/qemu/mod.rs); each driver's scenarios run in order inside one test so its guest is
//! always killed at the end.
//!
//! The libvirt guest runs the direct story, then the whole flow through the cloud platform
//! with the secure component's libvirt driver (rw, then ro; no latency rounds).
//! The qemu driver's guest serves two stories: the backend and driver called directly, then
//! the whole flow through the real parties ([`attach_through_the_cloud`]: domain manager,
//! cloud platform, TTP, the secure component's attach with its swtpm), which also measures
//! attach latency into the guest (docs/PERFORMANCE.md "Attach into a running guest"; print
//! it with `--nocapture`). Trusted launch is off there: this guest boots from a kernel and
//! initramfs, not an allowlisted image.
//!
//! `SKYDD_VHOST_BENCH=1` adds the fio benchmark (docs/PERFORMANCE.md "fio inside a guest"):
//! the encrypted vhost-user-blk disk against a plain virtio-blk disk on an unencrypted raw
//! file, same guest, same run; then the same disk's fio during an online key rotation
//! against before it (docs/PERFORMANCE.md "fio during an online rotation").

mod qemu;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager};
use protocol::domain::{AccessMode, VolumeFormat};
use protocol::secret::SecretBytes;
use qemu::{Vm, VmOptions};
use secure_component::config::{AgentConfig, BackendChoice, HypervisorChoice};
use secure_component::hypervisor::libvirt::LibvirtDriver;
use secure_component::hypervisor::qemu::QemuDriver;
use secure_component::hypervisor::{HypervisorDriver, Placement};
use secure_component::service::{mapping_name, AttachTimings};
use secure_component::volume::vhost_user::VhostUserBlkBackend;
use secure_component::volume::{OpenMode, VolumeBackend};
use serde_json::json;
use skydd::cloud::{AllInOne, Layout};
use skydd_volume::layout::DATA_OFFSET;
use skydd_volume::xts::XtsEngine;

const MIB: u64 = 1024 * 1024;
const VM_ID: &str = "vm-a";
/// The compute host of the lab whose secure component plugs disks into the test guest.
const HOST_ID: &str = "compute-1";
/// Attach + detach cycles measured through the cloud platform (p99 of 20 is their maximum).
const CYCLES: usize = 20;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    openssl::rand::rand_bytes(&mut b).expect("rand");
    b
}

fn secret(key: &[u8; 64]) -> SecretBytes {
    let mut k = *key;
    SecretBytes::from_slice_wiping(&mut k)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else { return true };
    haystack
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == first)
        .any(|(i, _)| haystack.get(i..i + needle.len()) == Some(needle))
}

/// The host side of one attachment: backend mapping + driver placement.
struct Host {
    backend: VhostUserBlkBackend,
    driver: Box<dyn HypervisorDriver>,
    vm_id: String,
}

/// One attachment made by the test: what detach needs, and how long it took.
struct Attached {
    name: String,
    placement: Placement,
    location: String,
    /// `vdX` in the guest.
    disk: String,
}

impl Host {
    fn attach(&self, vm: &mut Vm, domain: &str, volume: &Path, key: &[u8; 64], mode: OpenMode) -> Attached {
        let name = mapping_name(domain, &self.vm_id);
        let t0 = Instant::now();
        let opened = self.backend.open(&name, volume, &secret(key), mode).expect("vhost-user open");
        let open = t0.elapsed();
        let placement =
            Placement { vm_id: self.vm_id.clone(), domain_id: domain.into(), device: opened.device.clone(), mode };
        let t1 = Instant::now();
        let location = self.driver.attach(&placement).expect("driver attach");
        let plug = t1.elapsed();
        let t2 = Instant::now();
        let disk = find_disk(vm, &name, Duration::from_millis(200));
        let probe = t2.elapsed();
        assert_eq!(self.driver.check(&placement, &location).expect("check"), None);
        eprintln!(
            "{}: attached {name} ({mode:?}) as /dev/{disk}: open {open:.1?}, hot-plug {plug:.1?}, guest probe {probe:.1?}",
            self.driver.kind()
        );
        Attached { name, placement, location, disk }
    }

    fn detach(&self, vm: &mut Vm, a: Attached) {
        let t = Instant::now();
        self.driver.detach(&a.placement, &a.location).expect("driver detach");
        self.backend.close(&a.name).expect("vhost-user close");
        eprintln!("detached {} in {:.1?}", a.name, t.elapsed());
        assert!(!a.placement.device.exists(), "the socket {} must be gone", a.placement.device.display());
        assert!(self.backend.list().expect("list").is_empty());
        assert!(
            self.driver.check(&a.placement, &a.location).expect("check").is_some(),
            "qemu still has {}",
            a.location
        );
        let left = vm.sh(&format!("[ -e /sys/block/{} ] && echo present; true", a.disk));
        assert!(left.trim().is_empty(), "the guest still has /dev/{} after detach", a.disk);
    }
}

/// The guest's `vdX` whose serial is the first 20 characters of `mapping` (what the backend
/// answers to `VIRTIO_BLK_T_GET_ID`), asking the guest every `pause` until it has one
/// (bounded at 120 s).
fn find_disk(vm: &mut Vm, mapping: &str, pause: Duration) -> String {
    let started = Instant::now();
    let serial: String = mapping.chars().take(20).collect();
    // "$d" quoted: with no disk yet, $d is the pattern itself, which must not match a disk
    // that appears between the loop and the cat.
    let script = format!(
        "for d in /sys/block/vd*; do [ \"$(cat \"$d/serial\" 2>/dev/null)\" = {serial} ] && echo ${{d##*/}}; done; true"
    );
    loop {
        let answer = vm.try_call(json!({"op": "run", "argv": ["/bin/sh", "-c", script]}), Duration::from_secs(30));
        let found = match answer {
            Ok(v) => v["stdout"].as_str().unwrap_or_default().to_string(),
            Err(e) => panic!("the guest stopped answering after the hot-plug: {e}\n{}", vm.console_tail()),
        };
        if let Some(d) = found.split_whitespace().next() {
            return d.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the guest never saw disk {serial}\n{}",
            vm.console_tail()
        );
        std::thread::sleep(pause);
    }
}

fn qmp_dir(dir: &Path) -> PathBuf {
    dir.join("qmp")
}

#[test]
fn vhost_user_disk_in_a_running_guest() {
    let bench = std::env::var_os("SKYDD_VHOST_BENCH").is_some();
    let image = if bench { qemu::boot_image_with_tools(&["fio"]) } else { qemu::boot_image() };
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(qmp_dir(dir.path())).expect("qmp dir");
    let peer = dir.path().join("plain.raw");
    let mut disks: Vec<&Path> = Vec::new();
    if bench {
        fs::File::create(&peer).and_then(|f| f.set_len(256 * MIB)).expect("peer raw file");
        disks.push(&peer);
    }
    let options = VmOptions {
        shared_memory: true,
        qmp: Some(qmp_dir(dir.path()).join(format!("{VM_ID}.qmp"))),
        hotplug_ports: 2,
        writeback_disks: true,
    };
    let mut vm = Vm::boot_with(&image, &disks, &options);
    eprintln!("guest agent answered {:.1?} after qemu started", vm.boot_time);
    let host = Host {
        backend: VhostUserBlkBackend::new(dir.path().join("sockets")).expect("backend"),
        driver: Box::new(QemuDriver::new(qmp_dir(dir.path()))),
        vm_id: VM_ID.into(),
    };
    let (domain, volume, key) = write_read_detach_reattach_ro(&mut vm, &host, dir.path());
    attach_through_the_cloud(&mut vm, &qmp_dir(dir.path()));
    if bench {
        benchmark(&mut vm, &host, &domain, &volume, &key);
        rotation_benchmark(&mut vm, &host, dir.path());
    }
    vm.shutdown();
}

/// The story of one VM: a rw attachment gets a file system and a file, detach, the host sees
/// only ciphertext (and the engine's key finds the file in it), a ro attachment reads the
/// file back and the guest kernel refuses writes, detach. Returns the domain, its volume and
/// key for more.
fn write_read_detach_reattach_ro(vm: &mut Vm, host: &Host, dir: &Path) -> (String, PathBuf, [u8; 64]) {
    let domain = hex::encode(random_bytes::<16>());
    let key = random_bytes::<64>();
    let volume = dir.join("volume.img");
    fs::File::create(&volume).and_then(|f| f.set_len(MIB + 64 * MIB)).expect("volume file");
    let marker = format!("SKYDD-VHOST-PLAINTEXT-{}", hex::encode(random_bytes::<8>()));

    // 1. Read-write: the guest makes a file system, writes a file and reads it back.
    let a = host.attach(vm, &domain, &volume, &key, OpenMode::ReadWrite);
    let disk = a.disk.clone();
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/queue/logical_block_size")).trim(), "4096");
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/ro")).trim(), "0");
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/size")).trim(), (64 * MIB / 512).to_string());
    vm.sh(&format!(
        "mkfs.ext4 -q -F /dev/{disk} && mkdir -p /mnt/d && mount -t ext4 /dev/{disk} /mnt/d && \
         for i in $(seq 1 2000); do echo {marker}-$i; done > /mnt/d/record.txt && sync"
    ));
    let sum = vm.sh("sha256sum /mnt/d/record.txt");
    let written = vm.sh("wc -l < /mnt/d/record.txt");
    assert_eq!(written.trim(), "2000");
    vm.sh("umount /mnt/d");
    host.detach(vm, a);

    // 2. The host sees ciphertext only; the engine's key finds the guest's file in it.
    let raw = fs::read(&volume).expect("read volume");
    assert!(!contains(&raw, marker.as_bytes()), "plaintext of the guest's file is on the host");
    let mut data = raw[DATA_OFFSET as usize..].to_vec();
    XtsEngine::new(&secret(&key)).expect("engine").decrypt_sectors(0, &mut data).expect("decrypt");
    assert!(contains(&data, format!("{marker}-1\n").as_bytes()), "the file is not in the decrypted data area");
    drop(data);
    drop(raw);

    // 3. Read-only: the guest reads the same file; its kernel refuses writes.
    let before_ro = fs::read(&volume).expect("read volume");
    let a = host.attach(vm, &domain, &volume, &key, OpenMode::ReadOnly);
    let disk = a.disk.clone();
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/ro")).trim(), "1");
    vm.sh(&format!("mount -t ext4 -o ro,noload /dev/{disk} /mnt/d"));
    assert_eq!(vm.sh("sha256sum /mnt/d/record.txt"), sum, "the file read back differs");
    let (code, out) = vm.sh_status("echo more >> /mnt/d/record.txt");
    assert_ne!(code, 0, "a write to a read-only attachment succeeded: {out}");
    // A raw write to the device: the guest kernel (or, past it, the backend) must keep it off
    // the volume. busybox dd's exit status is not a verdict (it may report success for a write
    // that only reached the page cache), so the volume's bytes are.
    let (code, out) = vm.sh_status(&format!("dd if=/dev/zero of=/dev/{disk} bs=4096 count=1 conv=fsync"));
    eprintln!("raw write to the read-only disk: exit {code}: {}", out.trim());
    vm.sh("umount /mnt/d");
    host.detach(vm, a);
    let after = fs::read(&volume).expect("read volume");
    assert!(!contains(&after, marker.as_bytes()));
    assert!(after == before_ro, "the volume changed during a read-only attachment");

    (domain, volume, key)
}

/// The whole flow through the real parties, into the guest already running (no second
/// boot): a loopback lab ([`AllInOne`]: CA, TTP with its swtpm, cloud platform, one compute
/// host with its own swtpm) whose secure component runs `backend = "vhost-user"`,
/// `hypervisor = "qemu"` with `[qemu] qmp_dir` where the guest's QMP socket is. dm-alice
/// creates a format-2 domain (vm-a rw) and attaches it through the cloud platform's API;
/// the secure component runs its attach (TTP challenge, TPM quote, key release, TPM decrypt,
/// engine open, vhost-user socket, QMP hot-plug). The guest makes a file system and a file;
/// detach through the cloud platform; the host's volume file has no plaintext; a read-only
/// grant attaches it again, the guest reads the file back and its kernel refuses writes.
/// Then [`CYCLES`] attach + detach cycles are timed from the attach request until the disk
/// is in the guest's `/sys/block`, step by step (docs/PERFORMANCE.md "Attach into a running
/// guest").
///
/// Trusted launch stays off (the TTP has no `[trusted_launch]` table): this guest boots from
/// a kernel and initramfs, not from an image on an allowlist, and the secure component did
/// not launch it.
fn attach_through_the_cloud(vm: &mut Vm, qmp_dir: &Path) {
    let qmp_dir = qmp_dir.to_path_buf();
    let plug_into_qemu = move |_: &str, config: &mut AgentConfig| {
        config.backend = BackendChoice::VhostUser;
        config.hypervisor = HypervisorChoice::Qemu;
        config.qemu.qmp_dir = Some(qmp_dir.clone());
    };
    attach_through_the_cloud_with(vm, VM_ID, "qemu", &plug_into_qemu, CYCLES);
}

/// [`attach_through_the_cloud`] for the guest `vm_id` with the host's secure component
/// configured by `configure` (its driver must be `driver`), timing `cycles` attaches.
fn attach_through_the_cloud_with(
    vm: &mut Vm,
    vm_id: &str,
    driver: &str,
    configure: &skydd::cloud::HostConfigurer,
    cycles: usize,
) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        // libvirt's qemu (user libvirt-qemu) must reach the sockets below it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    let vms = [vm_id];
    let layout = Layout { hosts: &[(HOST_ID, &vms)], managers: &["dm-alice"] };
    let started = Instant::now();
    let cloud = runtime
        .block_on(AllInOne::start_configured(dir.path(), &layout, configure, &mut |step| eprintln!("lab: {step}")))
        .expect("the lab starts");
    eprintln!("lab: up in {:.1?}", started.elapsed());
    let node = cloud.host(HOST_ID).expect("the compute host");
    assert_eq!(node.service.backend_kind(), "vhost-user");
    assert_eq!(node.service.driver_kind(), driver);
    let alice_config = DmConfig::load(&cloud.manager_config("dm-alice").expect("dm-alice")).expect("dm-alice config");
    let alice = DomainManager::connect(&alice_config).expect("dm-alice connects");
    let metadata = BTreeMap::from([("department".to_string(), "radiology".to_string())]);
    let acl = vec![parse_acl_entry(&format!("{vm_id}:rw")).expect("acl entry")];
    let domain = runtime
        .block_on(alice.create_with_format(metadata, acl, Vec::new(), 64 * MIB, VolumeFormat::V2))
        .expect("dm-alice creates a domain");
    let volume = cloud.dir.join("cloud-platform").join("volumes").join(format!("{}.vol", domain.id));
    let mapping = mapping_name(&domain.id, vm_id);
    let marker = format!("SKYDD-CLOUD-PLAINTEXT-{}", hex::encode(random_bytes::<8>()));
    let attach = |mode: AccessMode| runtime.block_on(alice.attach(&domain.id, vm_id, mode, 300));
    let detach = |id: &str| runtime.block_on(alice.detach_attachment(id));

    // 1. Read-write through the cloud platform: a file system and a file in the guest.
    let attachment = attach(AccessMode::Rw).expect("vm-a attaches rw through the cloud platform");
    assert_eq!(attachment.host, HOST_ID);
    let disk = find_disk(vm, &mapping, Duration::from_millis(50));
    eprintln!("cloud: {} attached rw as /dev/{disk} (qemu device {})", attachment.id, attachment.mount_path);
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/ro")).trim(), "0");
    vm.sh(&format!(
        "mkfs.ext4 -q -F /dev/{disk} && mkdir -p /mnt/c && mount -t ext4 /dev/{disk} /mnt/c && \
         for i in $(seq 1 500); do echo {marker}-$i; done > /mnt/c/scan.txt && sync && umount /mnt/c"
    ));
    detach(&attachment.id).expect("detach through the cloud platform");
    assert!(vm.sh(&format!("[ -e /sys/block/{disk} ] && echo present; true")).trim().is_empty());

    // 2. The host's volume file: ciphertext only.
    let raw = fs::read(&volume).expect("read the volume file");
    assert!(!contains(&raw, marker.as_bytes()), "plaintext of the guest's file is in {}", volume.display());
    drop(raw);

    // 3. A read-only grant: the file reads back, the guest kernel refuses writes.
    let before_ro = fs::read(&volume).expect("read the volume file");
    let attachment = attach(AccessMode::Ro).expect("vm-a attaches ro through the cloud platform");
    let disk = find_disk(vm, &mapping, Duration::from_millis(50));
    assert_eq!(vm.sh(&format!("cat /sys/block/{disk}/ro")).trim(), "1");
    vm.sh(&format!("mount -t ext4 -o ro,noload /dev/{disk} /mnt/c"));
    assert_eq!(vm.sh("wc -l < /mnt/c/scan.txt").trim(), "500");
    assert_eq!(vm.sh("tail -n 1 /mnt/c/scan.txt").trim(), format!("{marker}-500"));
    let (code, out) = vm.sh_status("echo more >> /mnt/c/scan.txt");
    assert_ne!(code, 0, "a write to a read-only attachment succeeded: {out}");
    vm.sh("umount /mnt/c");
    let (code, out) = vm.sh_status(&format!("dd if=/dev/zero of=/dev/{disk} bs=4096 count=1 oflag=direct"));
    eprintln!("cloud: raw write to the read-only disk: exit {code}: {}", out.trim());
    assert!(code != 0 && out.contains("not permitted"), "the guest kernel let a raw write through: {out}");
    detach(&attachment.id).expect("detach through the cloud platform");
    assert!(fs::read(&volume).expect("read the volume file") == before_ro, "the volume changed while read-only");

    if cycles == 0 {
        runtime.block_on(cloud.stop());
        return;
    }
    // 4. Latency: request until the disk is in the guest's /sys/block.
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // What one look into the guest costs (the guest probe's resolution under TCG).
    let mut empty_calls: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            vm.sh("true");
            t.elapsed()
        })
        .collect();
    empty_calls.sort();
    eprintln!("cloud: one guest agent `sh -c true` takes {:.1?} (median of 5)", empty_calls[2]);
    let mut samples = Vec::new();
    for _ in 0..cycles {
        let started = Instant::now();
        let attachment = attach(AccessMode::Rw).expect("attach");
        let answered = started.elapsed();
        let probe_started = Instant::now();
        find_disk(vm, &mapping, Duration::from_millis(10));
        let probe = probe_started.elapsed();
        let total = started.elapsed();
        let agent = *node.service.recent_timings().last().expect("the secure component timed its attach");
        let detach_started = Instant::now();
        detach(&attachment.id).expect("detach");
        samples.push(Sample { agent, answered, probe, total, detach: detach_started.elapsed() });
    }
    let load_after = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    print_latency(&samples, load_before.trim(), load_after.trim());
    assert!(vm.sh("cat /sys/block/vd*/serial 2>/dev/null; true").trim().is_empty(), "a disk is left in the guest");
    runtime.block_on(cloud.stop());
}

/// One timed attach + detach through the cloud platform.
struct Sample {
    /// The secure component's own record of its attach.
    agent: AttachTimings,
    /// Attach request until the cloud platform answered.
    answered: Duration,
    /// The answer until the disk was in the guest's /sys/block.
    probe: Duration,
    /// Attach request until the disk was in the guest.
    total: Duration,
    /// Detach request until the cloud platform answered (the guest released the device).
    detach: Duration,
}

/// One row of the latency table: what it shows of a sample.
type Step = fn(&Sample) -> Duration;

/// Prints the latency table (Markdown) of `samples`: p50 and p99 of each step.
fn print_latency(samples: &[Sample], load_before: &str, load_after: &str) {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let rows: [(&str, Step); 14] = [
        ("TTP challenge (mTLS round trip)", |s| s.agent.challenge),
        ("TPM quote", |s| s.agent.quote),
        ("TTP key release", |s| s.agent.release),
        ("TPM decrypt (PolicyPCR + RSA-OAEP)", |s| s.agent.decrypt),
        ("engine open + vhost-user socket", |s| s.agent.open),
        ("QMP hot-plug (chardev-add, device_add)", |s| s.agent.attach),
        ("attachment record (fsync)", |s| s.agent.record),
        ("rest of the secure component (checks, volume header, reservation)", |s| {
            let a = &s.agent;
            a.total.saturating_sub(a.challenge + a.quote + a.release + a.decrypt + a.open + a.attach + a.record)
        }),
        ("secure component, total", |s| s.agent.total),
        ("cloud platform + domain manager around it", |s| s.answered.saturating_sub(s.agent.total)),
        ("attach request until the cloud platform answers", |s| s.answered),
        ("guest probe (answer until /sys/block/vdX/serial)", |s| s.probe),
        ("**attach request until the disk is in the guest**", |s| s.total),
        ("detach through the cloud platform (device_del until DEVICE_DELETED, close)", |s| s.detach),
    ];
    println!(
        "MEASURED attach into a running guest: {} attach + detach cycles, load average before {load_before}, after {load_after}",
        samples.len()
    );
    println!("| step | p50 | p99 |");
    println!("|---|---|---|");
    for (name, step) in rows {
        let mut values: Vec<Duration> = samples.iter().map(step).collect();
        values.sort();
        let n = values.len();
        let p99 = values[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
        println!("| {name} | {} | {} |", ms(values[n / 2]), ms(p99));
    }
}

/// The same story through the `libvirt` driver against a real libvirtd: a transient TCG
/// domain with ACPI and memfd shared memory, the disk attached as `<disk type='vhostuser'>`
/// on a free `pcie-root-port` (libvirt picks it).
#[test]
fn vhost_user_disk_through_libvirt() {
    let image = qemu::boot_image();
    let libvirtd = qemu::Libvirtd::ensure();
    let vm_id = format!("skydd-vhost-test-{}", std::process::id());
    let mut vm = Vm::boot_libvirt(&image, &libvirtd, &vm_id);
    eprintln!("libvirt guest agent answered {:.1?} after virsh create", vm.boot_time);
    let dir = tempfile::tempdir().expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        // libvirt's qemu (user libvirt-qemu) must reach the socket directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    let host = Host {
        backend: VhostUserBlkBackend::new(dir.path().join("sockets")).expect("backend"),
        driver: Box::new(
            LibvirtDriver::with_virsh(None, Some(libvirtd.uri.clone()), dir.path().join("libvirt")).expect("driver"),
        ),
        vm_id,
    };
    write_read_detach_reattach_ro(&mut vm, &host, dir.path());
    // The whole flow once more, through the cloud platform, with the secure component's
    // libvirt driver (no latency rounds: the qemu driver's test measures those).
    let uri = libvirtd.uri.clone();
    let plug_through_libvirt = move |_: &str, config: &mut AgentConfig| {
        config.backend = BackendChoice::VhostUser;
        config.hypervisor = HypervisorChoice::Libvirt;
        config.libvirt.uri = Some(uri.clone());
    };
    let vm_id = host.vm_id.clone();
    attach_through_the_cloud_with(&mut vm, &vm_id, "libvirt", &plug_through_libvirt, 0);
    vm.shutdown();
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux architecture this runs on (sysconf(_SC_CLK_TCK)).
    ticks / 100.0
}

/// fio in the guest: the vhost-user-blk disk against the plain virtio-blk disk /dev/vda on
/// a raw file, same guest, same run. Prints a Markdown table with, per run, the guest's own
/// CPU share (fio's usr+sys), the qemu process's host CPU (TCG executes the guest) and this
/// process's CPU (the vhost-user backend thread: AES-XTS and the virtqueue).
fn benchmark(vm: &mut Vm, host: &Host, domain: &str, volume: &Path, key: &[u8; 64]) {
    let a = host.attach(vm, domain, volume, key, OpenMode::ReadWrite);
    let jobs = [
        ("seq 1 MiB write", "write", "1M"),
        ("seq 1 MiB read", "read", "1M"),
        ("rand 4 KiB read", "randread", "4k"),
        ("rand 4 KiB write", "randwrite", "4k"),
    ];
    let qemu_pid = vm.qemu_pid().to_string();
    println!(
        "| job | plain virtio-blk (raw file) | vhost-user-blk (encrypted) | ratio | guest fio CPU plain / vhost | \
         qemu host CPU s plain / vhost | backend CPU s (vhost) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, rw, bs) in jobs {
        let mut results = Vec::new();
        for dev in ["vda", a.disk.as_str()] {
            let (q0, s0) = (cpu_seconds(&qemu_pid), cpu_seconds("self"));
            let out = vm.sh(&format!(
                "fio --name=b --filename=/dev/{dev} --rw={rw} --bs={bs} --direct=1 --ioengine=psync \
                 --size=48M --runtime=20 --output-format=json"
            ));
            let (q1, s1) = (cpu_seconds(&qemu_pid), cpu_seconds("self"));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("fio output ({e}): {out}"));
            let job = &v["jobs"][0];
            let kib = job["read"]["bw"].as_f64().unwrap_or(0.0) + job["write"]["bw"].as_f64().unwrap_or(0.0);
            let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
            results.push((kib, cpu, q1 - q0, s1 - s0));
        }
        let (plain, vhost) = (results[0], results[1]);
        println!(
            "| {label} | {:.1} MiB/s | {:.1} MiB/s | {:.2}x | {:.0}% / {:.0}% | {:.1} / {:.1} | {:.1} |",
            plain.0 / 1024.0,
            vhost.0 / 1024.0,
            vhost.0 / plain.0.max(1.0),
            plain.1,
            vhost.1,
            plain.2,
            vhost.2,
            vhost.3
        );
    }
    host.detach(vm, a);
}

/// fio in the guest on an encrypted vhost-user disk before and during online re-encryption
/// (`skydd_volume::reencrypt::online`, as the secure component runs it after a rotation):
/// the same job twice, the second while the host re-encrypts the disk's volume under the
/// live mapping, over and over (one rotation of 256 MiB is shorter than a fio job), and how
/// fast the re-encryption went meanwhile.
fn rotation_benchmark(vm: &mut Vm, host: &Host, dir: &Path) {
    use protocol::domain::{AclEntry, Descriptor};
    use protocol::messages::{HeaderRecord, RotationState};
    use protocol::signing::SignedEnvelope;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const DATA: u64 = 256 * MIB;
    let envelope =
        |message: Vec<u8>| SignedEnvelope { message, signature: vec![7; 64], signer_certificate: vec![9; 128] };
    let domain = hex::encode(random_bytes::<16>());
    let descriptor =
        Descriptor::new("dm-alice", Default::default(), vec![AclEntry { vm_id: VM_ID.into(), mode: AccessMode::Rw }])
            .expect("descriptor");
    let record = HeaderRecord {
        descriptor: envelope(descriptor.encode().expect("descriptor encodes")),
        registration: envelope(b"generation 1".to_vec()),
        rotation: None,
    };
    let volume = dir.join("rotating.vol");
    {
        use std::os::unix::fs::FileExt;
        let file = fs::File::create(&volume).expect("volume");
        file.write_all_at(&protocol::format::new_header_area(&record.encode()).expect("header"), 0).expect("header");
        // Every sector written (random ciphertext), so every rotation moves all of them.
        let chunk: Vec<u8> = (0..8 * MIB).map(|i| (i * 2654435761 % 251) as u8 | 1).collect();
        for offset in (0..DATA).step_by(chunk.len()) {
            file.write_all_at(&chunk, DATA_OFFSET + offset).expect("data");
        }
        file.sync_all().expect("sync");
    }
    let keys: Vec<[u8; 64]> = (0..200).map(|_| random_bytes::<64>()).collect();
    let a = host.attach(vm, &domain, &volume, &keys[0], OpenMode::ReadWrite);
    let device = host.backend.live_device(&a.name).expect("the live device");
    let io = fs::OpenOptions::new().read(true).write(true).open(&volume).expect("volume for the header");
    let jobs = [
        ("seq 1 MiB write", "write", "1M"),
        ("rand 4 KiB read", "randread", "4k"),
        ("rand 4 KiB write", "randwrite", "4k"),
    ];
    println!("| job (fio in the guest, vhost-user disk) | before | during online re-encryption (its pace) | ratio | re-encrypted meanwhile |");
    println!("|---|---|---|---|---|");
    let mut generation = 0usize;
    for (label, rw, bs) in jobs {
        let fio = |vm: &mut Vm| -> f64 {
            let out = vm.sh(&format!(
                "fio --name=b --filename=/dev/{} --rw={rw} --bs={bs} --direct=1 --ioengine=psync \
                 --size=256M --runtime=12 --time_based --output-format=json",
                a.disk
            ));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("fio output ({e}): {out}"));
            v["jobs"][0]["read"]["bw"].as_f64().unwrap_or(0.0) + v["jobs"][0]["write"]["bw"].as_f64().unwrap_or(0.0)
        };
        let before = fio(vm);
        // Flat out, then with the secure component's `[rotation] online_rate_mib_s = 128`.
        for rate in [None, Some(128u64 << 20)] {
            let options = skydd_volume::reencrypt::RotationOptions {
                online_bytes_per_second: rate,
                ..skydd_volume::reencrypt::RotationOptions::default()
            };
            // `stop` ends the loop between rotations; a rotation under way when fio ends is
            // finished (a fraction of a second), so every job starts under one key.
            let (stop, never) = (AtomicBool::new(false), AtomicBool::new(false));
            let (rounds, moved) = (AtomicU64::new(0), AtomicU64::new(0));
            let started = Instant::now();
            let (during, done_rounds, done_sectors, elapsed) = std::thread::scope(|scope| {
                let rotations = scope.spawn(|| {
                    let plain = device.as_plain().expect("format 1");
                    while !stop.load(Ordering::SeqCst) {
                        let (old, new) = (&keys[generation], &keys[generation + 1]);
                        skydd_volume::reencrypt::update_header(&io, |on_volume| {
                            Ok(HeaderRecord {
                                registration: envelope(format!("generation {}", generation + 2).into_bytes()),
                                rotation: Some(RotationState {
                                    previous_registration: on_volume.registration.clone(),
                                    boundary: 0,
                                    hotzone: None,
                                }),
                                ..on_volume
                            })
                        })
                        .expect("start a rotation in the header");
                        let mut progress = |done: u64, _: u64| moved.store(done, Ordering::SeqCst);
                        skydd_volume::reencrypt::online::reencrypt_online(
                            plain,
                            &secret(old),
                            &secret(new),
                            options,
                            &mut progress,
                            &never,
                        )
                        .unwrap_or_else(|e| panic!("online re-encryption failed: {e}"));
                        generation += 1;
                        moved.store(0, Ordering::SeqCst);
                        rounds.fetch_add(1, Ordering::SeqCst);
                        assert!(generation + 1 < keys.len(), "more rotations than keys prepared");
                    }
                });
                let during = fio(vm);
                // What was re-encrypted while fio ran.
                let (done_rounds, done_sectors) = (rounds.load(Ordering::SeqCst), moved.load(Ordering::SeqCst));
                let elapsed = started.elapsed().as_secs_f64();
                stop.store(true, Ordering::SeqCst);
                rotations.join().expect("rotation thread");
                (during, done_rounds, done_sectors, elapsed)
            });
            let sectors = done_rounds as f64 * (DATA / 4096) as f64 + done_sectors as f64;
            println!(
                "| {label} | {:.1} MiB/s | {:.1} MiB/s ({}) | **{:.2}x** | {done_rounds} whole rotations + {:.0} MiB in {elapsed:.0} s ({:.0} MB/s) |",
                before / 1024.0,
                during / 1024.0,
                rate.map_or("flat out".to_string(), |r| format!("at most {} MiB/s", r >> 20)),
                during / before.max(1.0),
                done_sectors as f64 * 4096.0 / MIB as f64,
                sectors * 4096.0 / 1e6 / elapsed
            );
        }
    }
    drop(device);
    host.detach(vm, a);
}
