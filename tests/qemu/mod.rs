//! A qemu (TCG) VM running Debian's own kernel, for tests that need kernel features this
//! host kernel lacks (device-mapper, dm-crypt). See docs/DMCRYPT.md for the recipe.
//!
//! - kernel: `apt-get download` of the versioned package `linux-image-amd64` depends on,
//!   unpacked with `dpkg-deb -x` into target/qemu-cache/kernel-<version>/;
//! - initramfs: busybox-static, the needed .ko files (dependencies from each module's
//!   `.modinfo depends=`, i.e. what `depmod` writes to modules.dep), mkfs.ext4 and the
//!   guest agent (`skydd-guest-agent`, the real dm-crypt backend) with their `ldd` libraries,
//!   written as a newc cpio cached under a hash of every input;
//! - VM: `qemu-system-x86_64 -M q35 -cpu max` under TCG, an swtpm TPM 2.0 on tpm-tis, disks
//!   on virtio-blk, and JSON lines to the agent over a virtio-serial port on a unix socket.
//!   No network device at all.
//!
//! Everything is killed on Drop; every wait is bounded.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Modules the guest loads, in this order (dependencies are inserted before each).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "loop",
    "dm_mod",
    "ecb",
    "xts",
    "aesni_intel",
    "dm_crypt",
    "dm_verity",
    "crc32c_generic",
    "crc32c_intel",
    "ext4",
    "fuse",
];

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cache_dir() -> PathBuf {
    let d = workspace_root().join("target/qemu-cache");
    fs::create_dir_all(&d).expect("create target/qemu-cache");
    d
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn require(prog: &str, package: &str) -> PathBuf {
    which(prog).unwrap_or_else(|| {
        panic!("{prog} is missing: install it with `apt-get install {package}` (the dm-crypt tests need it; they do not skip)")
    })
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's kernel: (vmlinuz, /lib/modules/<version> directory).
pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn kernel() -> Kernel {
    let cache = cache_dir();
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).expect("create debs dir");
    // Which versioned image does linux-image-amd64 point at?
    let package = Command::new("apt-cache").args(["depends", "linux-image-amd64"]).output().ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_string)
    });
    let cached_debs = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            fs::read_dir(&debs).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        v.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("linux-image-")));
        v.sort();
        v
    };
    let deb = match &package {
        Some(pkg) => {
            let prefix = format!("{pkg}_");
            let found = cached_debs()
                .into_iter()
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)));
            match found {
                Some(d) => d,
                None => {
                    require("apt-get", "apt");
                    run(Command::new("apt-get").arg("download").arg(pkg).current_dir(&debs), &format!("apt-get download {pkg}"));
                    cached_debs()
                        .into_iter()
                        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
                        .unwrap_or_else(|| panic!("apt-get download {pkg} left no .deb in {}", debs.display()))
                }
            }
        }
        None => cached_debs().pop().unwrap_or_else(|| {
            panic!("cannot resolve linux-image-amd64 (apt-cache depends) and no kernel .deb is cached in {}: run `apt-get update`", debs.display())
        }),
    };
    let stem = deb.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let root = cache.join(format!("kernel-{stem}"));
    if !root.join(".unpacked").exists() {
        require("dpkg-deb", "dpkg");
        let _ = fs::remove_dir_all(&root);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), "dpkg-deb -x");
        fs::write(root.join(".unpacked"), b"ok").expect("mark unpacked");
    }
    let moddir = fs::read_dir(root.join("lib/modules"))
        .expect("kernel package has lib/modules")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("a lib/modules/<version> directory");
    let version = moddir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    assert!(vmlinuz.exists(), "{} missing in the kernel package", vmlinuz.display());
    Kernel { version, vmlinuz, modules: moddir }
}

/// Module name (underscores) -> .ko path, for every module of the kernel.
fn module_index(moddir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![moddir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                out.insert(n.replace('-', "_"), p);
            }
        }
    }
    out
}

/// The `depends=` field of a module's .modinfo section (what depmod puts in modules.dep).
fn module_depends(ko: &Path) -> Vec<String> {
    let data = fs::read(ko).unwrap_or_default();
    let needle = b"\0depends=";
    let Some(pos) = data.windows(needle.len()).position(|w| w == needle) else { return vec![] };
    let rest = &data[pos + needle.len()..];
    let end = rest.iter().position(|&c| c == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect()
}

/// `wanted` plus their dependencies, dependencies first.
pub fn resolve_modules(moddir: &Path, wanted: &[&str]) -> Vec<(String, PathBuf)> {
    let index = module_index(moddir);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        // Built into the kernel (=y) when there is no .ko: nothing to load.
        let Some(path) = index.get(name) else { return };
        for dep in module_depends(path) {
            visit(&dep, index, seen, order);
        }
        order.push((name.to_string(), path.clone()));
    }
    for w in wanted {
        visit(w, &index, &mut seen, &mut order);
    }
    order
}

/// Shared libraries of an ELF binary as `ldd` lists them (path inside the guest == host path).
fn ldd(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = if let Some((_, rhs)) = line.split_once("=> ") {
            rhs.split_whitespace().next()
        } else {
            line.split_whitespace().next().filter(|p| p.starts_with('/'))
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

/// Builds (or reuses) the guest agent from this workspace.
pub fn guest_agent() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    // What cargo set for this test binary (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) must not
    // reach the nested build: ring's build script reruns when they change, and the next
    // `cargo test` then rebuilds ring and all above it again (~30 s each way).
    for (name, _) in std::env::vars_os() {
        let per_crate =
            ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"];
        if per_crate.iter().any(|p| name.to_string_lossy().starts_with(p)) {
            build.env_remove(&name);
        }
    }
    let status = build
        .args(["build", "-p", "skydd-testkit", "--bin", "skydd-guest-agent"])
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .status()
        .expect("run cargo build for skydd-guest-agent");
    assert!(status.success(), "cargo build -p skydd-testkit --bin skydd-guest-agent failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let p = target.join("debug/skydd-guest-agent");
    assert!(p.exists(), "{} was not built", p.display());
    p
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s
mount -t tmpfs -o size=600m tmp /tmp
for m in $(cat /etc/skydd-modules); do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "skydd-init: insmod $m failed"
done
echo 1 > /proc/sys/kernel/printk
port=""
for i in $(seq 1 100); do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = skydd ] && port=/dev/$(basename $p)
  done
  [ -n "$port" ] && [ -e "$port" ] && break
  sleep 0.1
done
echo "skydd-init: agent on $port"
/bin/skydd-guest-agent $port
echo "skydd-init: agent exited $?"
poweroff -f
"#;

/// An in-memory initramfs: guest path -> (mode, content).
struct Cpio {
    entries: BTreeMap<String, (u32, Vec<u8>)>,
}

impl Cpio {
    fn new() -> Self {
        Self { entries: BTreeMap::new() }
    }
    fn dirs_for(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert((0o040755, Vec::new()));
        }
    }
    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.dirs_for(path);
        self.entries.insert(path.trim_start_matches('/').to_string(), (0o100000 | mode, data));
    }
    fn copy(&mut self, guest: &str, host: &Path, mode: u32) {
        let data = fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        self.file(guest, mode, data);
    }
    fn hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, (mode, data)) in &self.entries {
            h.update(name.as_bytes());
            h.update(mode.to_le_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        }
        hex::encode(&h.finalize()[..12])
    }
    /// newc format, uncompressed (the kernel unpacks it directly).
    fn write(&self, out: &Path) {
        let mut buf = Vec::new();
        let mut ino = 1u32;
        let mut entry = |buf: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
            let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
            let hdr = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                ino,
                mode,
                0,
                0,
                nlink,
                0,
                data.len(),
                0,
                0,
                0,
                0,
                name.len() + 1,
                0
            );
            ino += 1;
            buf.extend_from_slice(hdr.as_bytes());
            buf.extend_from_slice(name.as_bytes());
            buf.push(0);
            while !buf.len().is_multiple_of(4) {
                buf.push(0);
            }
            buf.extend_from_slice(data);
            while !buf.len().is_multiple_of(4) {
                buf.push(0);
            }
        };
        for (name, (mode, data)) in &self.entries {
            entry(&mut buf, name, *mode, data);
        }
        entry(&mut buf, "TRAILER!!!", 0, &[]);
        // Written beside `out` under a name of its own, then renamed: a parallel test may be
        // writing the same image.
        let dir = out.parent().expect("the initramfs lies in the cache directory");
        let mut tmp = tempfile::NamedTempFile::new_in(dir).expect("a temporary initramfs file");
        tmp.write_all(&buf).expect("write initramfs");
        // World-readable like any file written here (the temporary file starts at 0600).
        let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        tmp.as_file().set_permissions(readable).expect("chmod initramfs");
        tmp.persist(out).expect("rename initramfs");
    }
}

/// Kernel + initramfs ready to boot, and how long preparing them took.
pub struct BootImage {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
    pub modules: Vec<String>,
    pub reused: bool,
    /// Total preparation time, including `agent_build_time`.
    pub prepare_time: Duration,
    /// The nested `cargo build` of the agent (mostly waiting for the build-dir lock when
    /// other builds run).
    pub agent_build_time: Duration,
}

pub fn boot_image() -> BootImage {
    boot_image_with_tools(&[])
}

/// [`boot_image`] plus host programs (e.g. `fio`) copied into the guest's /usr/bin with
/// their libraries.
pub fn boot_image_with_tools(tools: &[&str]) -> BootImage {
    let t0 = Instant::now();
    require("qemu-system-x86_64", "qemu-system-x86");
    require("swtpm", "swtpm swtpm-tools");
    let mkfs = require("mkfs.ext4", "e2fsprogs");
    let busybox = PathBuf::from("/bin/busybox");
    // A static binary has no ELF interpreter: `ldd` lists nothing for it.
    let static_ok = busybox.exists() && ldd(&busybox).is_empty();
    assert!(static_ok, "/bin/busybox missing or not static: install it with `apt-get install busybox-static`");
    let kernel = kernel();
    let t_agent = Instant::now();
    let agent = guest_agent();
    let agent_build_time = t_agent.elapsed();

    let mut cpio = Cpio::new();
    cpio.file("init", 0o755, INIT.as_bytes().to_vec());
    cpio.copy("bin/busybox", &busybox, 0o755);
    // The debug build carries ~100 MB of debug info; the guest unpacks the initramfs under
    // TCG, so strip it (binutils) when strip is there.
    // A file of its own per caller: the tests of one binary prepare their images in parallel.
    let stripped = tempfile::Builder::new()
        .prefix("skydd-guest-agent.stripped.")
        .tempfile_in(cache_dir())
        .expect("a temporary file for the stripped agent");
    let agent_in_guest = match which("strip") {
        Some(strip)
            if Command::new(&strip)
                .arg("--strip-debug")
                .arg("-o")
                .arg(stripped.path())
                .arg(&agent)
                .status()
                .is_ok_and(|s| s.success()) =>
        {
            stripped.path().to_path_buf()
        }
        _ => agent.clone(),
    };
    cpio.copy("bin/skydd-guest-agent", &agent_in_guest, 0o755);
    cpio.copy("sbin/mkfs.ext4", &mkfs, 0o755);
    let mut libs = BTreeSet::new();
    for bin in [&agent, &mkfs] {
        libs.extend(ldd(bin));
    }
    for tool in tools {
        let path = require(tool, tool);
        cpio.copy(&format!("usr/bin/{tool}"), &path, 0o755);
        libs.extend(ldd(&path));
    }
    // libtss2-tctildr dlopen()s the device TCTI; ldd cannot see that.
    let extra = "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0";
    let p = PathBuf::from(extra);
    assert!(p.exists(), "{extra} missing: apt-get install libtss2-tcti-device0");
    libs.extend(ldd(&p));
    libs.insert(p);
    for lib in libs {
        let real = fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
        cpio.copy(&lib.to_string_lossy(), &real, 0o755);
    }
    let mods = resolve_modules(&kernel.modules, MODULES);
    let mut names = Vec::new();
    for (name, path) in &mods {
        cpio.copy(&format!("lib/modules/{name}.ko"), path, 0o644);
        names.push(name.clone());
    }
    cpio.file("etc/skydd-modules", 0o644, (names.join("\n") + "\n").into_bytes());
    // Name the kernel in the hash too (a kernel update changes the modules anyway).
    cpio.file("etc/skydd-kernel", 0o644, kernel.version.clone().into_bytes());
    let hash = cpio.hash();
    let initramfs = cache_dir().join(format!("initramfs-{hash}.cpio"));
    let reused = initramfs.exists();
    if !reused {
        cpio.write(&initramfs);
    }
    BootImage { kernel, initramfs, modules: names, reused, prepare_time: t0.elapsed(), agent_build_time }
}

/// A libvirtd to talk to at `qemu:///system`: the one running, or one started here (with
/// its virtlogd) without systemd, killed on drop. Needs `libvirt-daemon-system`.
pub struct Libvirtd {
    started: Vec<KillOnDrop>,
    pub uri: String,
}

impl Libvirtd {
    pub fn ensure() -> Libvirtd {
        let uri = "qemu:///system".to_string();
        let answers = || {
            Command::new("virsh")
                .args(["-c", uri.as_str(), "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        require("virsh", "libvirt-clients");
        if answers() {
            return Libvirtd { started: Vec::new(), uri };
        }
        let mut started = Vec::new();
        for daemon in ["virtlogd", "libvirtd"] {
            let path = require(daemon, "libvirt-daemon-system");
            let child = Command::new(path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {daemon}: {e}"));
            started.push(KillOnDrop(Some(child)));
        }
        let t = Instant::now();
        while !answers() {
            assert!(t.elapsed() < Duration::from_secs(30), "libvirtd did not answer at {uri} within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Libvirtd { started, uri }
    }
}

/// What runs the VM: our own qemu child with its swtpm, or a libvirt domain.
enum Runner {
    Qemu {
        qemu: Child,
        /// Killed and reaped by its own Drop, after qemu (killed in Vm's Drop).
        swtpm: secure_component::swtpm::Swtpm,
    },
    Libvirt {
        domain: String,
        uri: String,
    },
}

impl Runner {
    /// Whether the VM has ended.
    fn exited(&mut self) -> bool {
        match self {
            Runner::Qemu { qemu, .. } => matches!(qemu.try_wait(), Ok(Some(_))),
            Runner::Libvirt { domain, uri } => !Command::new("virsh")
                .args(["-c", uri.as_str(), "domstate", domain.as_str()])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("running")),
        }
    }

    fn kill(&mut self) {
        match self {
            Runner::Qemu { qemu, .. } => {
                let _ = qemu.kill();
                let _ = qemu.wait();
            }
            Runner::Libvirt { domain, uri } => {
                let _ = Command::new("virsh")
                    .args(["-c", uri.as_str(), "destroy", domain.as_str()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A running VM (with its swtpm when we started qemu ourselves); killed on drop.
pub struct Vm {
    runner: Runner,
    pub dir: tempfile::TempDir,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    pub boot_time: Duration,
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// What a VM needs beyond the defaults of [`Vm::boot`].
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Guest RAM as a shared memfd (`memory-backend-memfd,share=on` + `-numa node,memdev`):
    /// what a vhost-user backend needs to map the guest's buffers.
    pub shared_memory: bool,
    /// A QMP monitor listening at this path.
    pub qmp: Option<PathBuf>,
    /// Empty `pcie-root-port`s (ids `hp1`, `hp2`, ...) to hot-plug devices into.
    pub hotplug_ports: u8,
    /// `cache=writeback` for `disks` (the host page cache, flushed when the guest flushes),
    /// instead of `writethrough` (every write synced): what a benchmark peer of a backend
    /// that syncs at the guest's flushes needs.
    pub writeback_disks: bool,
}

impl Vm {
    /// Boots the VM with `disks` as virtio-blk drives (/dev/vda, /dev/vdb, ... in order).
    pub fn boot(image: &BootImage, disks: &[&Path]) -> Vm {
        Self::boot_with(image, disks, &VmOptions::default())
    }

    /// [`Vm::boot`] with shared memory, a QMP monitor or hot-plug ports as `options` says.
    pub fn boot_with(image: &BootImage, disks: &[&Path], options: &VmOptions) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        // The project's swtpm launcher: manufactured TPM (EK + EK certificate from a local
        // CA), control channel on a unix socket for qemu's tpm-emulator backend.
        let (swtpm, tpm_sock) = secure_component::swtpm::Swtpm::start_for_qemu(&dir.path().join("tpm"))
            .unwrap_or_else(|e| panic!("starting swtpm for qemu (apt-get install swtpm swtpm-tools): {e}"));
        let agent_sock = dir.path().join("agent.sock");
        let console = dir.path().join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        secure_component::tpm::close_inherited_fds_on_exec(&mut cmd);
        cmd.args(["-M", "q35", "-cpu", "max", "-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio", "-net", "none"])
            .arg("-kernel")
            .arg(&image.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&image.initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", tpm_sock.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"])
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=c0", agent_sock.display()))
            .args(["-device", "virtserialport,chardev=c0,name=skydd"]);
        if options.shared_memory {
            cmd.args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on", "-numa", "node,memdev=mem"]);
        }
        if let Some(qmp) = &options.qmp {
            cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        for port in 1..=options.hotplug_ports {
            cmd.arg("-device").arg(format!("pcie-root-port,id=hp{port},chassis={port},slot={port},bus=pcie.0"));
        }
        let cache = if options.writeback_disks { "writeback" } else { "writethrough" };
        for (i, d) in disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=d{i},cache={cache}", d.display()))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=d{i}"));
        }
        let t0 = Instant::now();
        let qemu = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&console).expect("console log"))
            .stderr(Stdio::from(fs::File::create(dir.path().join("qemu.err")).expect("qemu err")))
            .spawn()
            .expect("start qemu-system-x86_64");
        let mut qemu = KillOnDrop(Some(qemu));
        if !wait_for(&agent_sock, Duration::from_secs(20)) {
            let err = fs::read_to_string(dir.path().join("qemu.err")).unwrap_or_default();
            panic!("qemu did not create {}: {err}", agent_sock.display()); // drops kill both
        }
        let runner = Runner::Qemu { qemu: qemu.0.take().expect("qemu child"), swtpm };
        Self::connect_agent(runner, dir, &agent_sock, t0)
    }

    /// Boots the image as a transient libvirt domain `name` (`<domain type='qemu'>`, q35,
    /// ACPI, memfd shared memory for vhost-user, three empty `pcie-root-port`s, no USB, the agent on a
    /// virtio-serial channel); `virsh destroy` on drop. Without `<acpi/>` libvirt runs qemu
    /// with `-no-acpi` and the first hot-plug makes the guest eject every device of PCI bus 0,
    /// the agent's virtio-serial controller included (docs/VHOST-USER.md).
    pub fn boot_libvirt(image: &BootImage, libvirtd: &Libvirtd, name: &str) -> Vm {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // qemu runs as libvirt-qemu: it must reach the kernel, its sockets and logs here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod tempdir");
        let kernel = dir.path().join("vmlinuz");
        let initrd = dir.path().join("initramfs.cpio");
        fs::copy(&image.kernel.vmlinuz, &kernel).expect("copy kernel");
        fs::copy(&image.initramfs, &initrd).expect("copy initramfs");
        let agent_sock = dir.path().join("agent.sock");
        let console = dir.path().join("console.log");
        let ports: String = std::iter::once("    <controller type='pci' index='0' model='pcie-root'/>\n".to_string())
            // One slot each: libvirt would otherwise pack them as functions of one
            // multifunction slot, and a hot-plug event for the slot reaches all of them.
            .chain((1..=3).map(|i| {
                format!(
                    "    <controller type='pci' index='{i}' model='pcie-root-port'>\
                     <address type='pci' domain='0' bus='0' slot='{}' function='0'/></controller>\n",
                    i + 1
                )
            }))
            .collect();
        let xml = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>1024</memory>\n  <vcpu>1</vcpu>\n  \
             <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n  \
             <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\n  \
             <cmdline>console=ttyS0 quiet panic=-1 rdinit=/init</cmdline></os>\n  \
             <features><acpi/></features>\n  <cpu mode='maximum'/>\n  \
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\n  \
             <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{ports}    \
             <controller type='usb' model='none'/>\n    <controller type='virtio-serial'><address type='pci' domain='0' bus='0' slot='9' function='0'/></controller>\n    <channel type='unix'><source mode='bind' path='{}'/>\
             <target type='virtio' name='skydd'/></channel>\n    <serial type='file'><source path='{}'/>\
             <target port='0'/></serial>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n",
            kernel.display(),
            initrd.display(),
            agent_sock.display(),
            console.display()
        );
        let xml_path = dir.path().join("domain.xml");
        fs::write(&xml_path, xml).expect("write domain xml");
        let t0 = Instant::now();
        let out = Command::new("virsh")
            .args(["-c", libvirtd.uri.as_str(), "create"])
            .arg(&xml_path)
            .output()
            .expect("run virsh create");
        assert!(out.status.success(), "virsh create failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut runner = Runner::Libvirt { domain: name.to_string(), uri: libvirtd.uri.clone() };
        if !wait_for(&agent_sock, Duration::from_secs(30)) {
            runner.kill();
            panic!("libvirt's qemu did not create {}", agent_sock.display());
        }
        Self::connect_agent(runner, dir, &agent_sock, t0)
    }

    /// Connects to the guest agent at `agent_sock` and pings until it answers (bounded).
    fn connect_agent(runner: Runner, dir: tempfile::TempDir, agent_sock: &Path, t0: Instant) -> Vm {
        // The socket file appears at bind(), slightly before listen(): retry (bounded).
        let connect_deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(agent_sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > connect_deadline => {
                    let mut runner = runner;
                    runner.kill();
                    panic!("connect to {}: {e}", agent_sock.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let writer = stream.try_clone().expect("clone stream");
        let mut vm = Vm { runner, dir, reader: BufReader::new(stream), writer, next_id: 1, boot_time: Duration::ZERO };
        // Ping until the agent answers (boot under TCG: seconds; bounded at 180 s).
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if Instant::now() > deadline {
                panic!("the guest agent did not answer within 180 s\n{}", vm.console_tail());
            }
            if vm.runner.exited() {
                panic!("qemu exited during boot\n{}\n{}", vm.console_tail(), vm.qemu_err());
            }
            match vm.try_call(json!({"op": "ping"}), Duration::from_secs(2)) {
                Ok(v) if v["ok"] == json!(true) => break,
                _ => continue,
            }
        }
        vm.boot_time = t0.elapsed();
        vm
    }

    /// The DER certificates (root, issuer) the guest TPM's EK certificate chains to.
    pub fn ek_ca_certificates(&self) -> Vec<Vec<u8>> {
        match &self.runner {
            Runner::Qemu { swtpm, .. } => swtpm.ek_ca_certificates().expect("the swtpm local CA certificates"),
            Runner::Libvirt { .. } => panic!("a libvirt VM of this harness has no TPM"),
        }
    }

    pub fn console_tail(&self) -> String {
        let c = fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        let mut lines: Vec<&str> = c.lines().collect();
        // A looping error would hide what came before it.
        lines.dedup();
        format!("--- guest console (last lines) ---\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
    }

    /// The qemu process (for CPU accounting in benchmarks).
    pub fn qemu_pid(&self) -> u32 {
        match &self.runner {
            Runner::Qemu { qemu, .. } => qemu.id(),
            Runner::Libvirt { domain, .. } => fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0),
        }
    }

    pub fn qemu_err(&self) -> String {
        fs::read_to_string(self.dir.path().join("qemu.err")).unwrap_or_default()
    }

    /// Sends one request; waits up to `timeout` for the response with the same id.
    pub fn try_call(&mut self, mut req: Value, timeout: Duration) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = json!(id);
        let line = format!("{req}\n");
        self.writer.write_all(line.as_bytes()).map_err(|e| format!("write to agent: {e}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer to {} within {timeout:?}", req["op"]));
            }
            self.reader.get_ref().set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let mut buf = String::new();
            match self.reader.read_line(&mut buf) {
                Ok(0) => return Err("agent socket closed".into()),
                Ok(_) => {
                    let v: Value = match serde_json::from_str(buf.trim()) {
                        Ok(v) => v,
                        Err(_) => continue, // noise before the agent started
                    };
                    if v["id"] == json!(id) {
                        return Ok(v);
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(format!("no answer to {} within {timeout:?}", req["op"]))
                }
                Err(e) => return Err(format!("read from agent: {e}")),
            }
        }
    }

    /// A request that must succeed (`"ok": true`) within 300 s.
    pub fn call(&mut self, req: Value) -> Value {
        let op = req["op"].clone();
        match self.try_call(req, Duration::from_secs(300)) {
            Ok(v) if v["ok"] == json!(true) => v,
            Ok(v) => panic!("guest {op} failed: {}\n{}", v["error"], self.console_tail()),
            Err(e) => panic!("guest {op}: {e}\n{}", self.console_tail()),
        }
    }

    /// A request that must fail; returns the error text.
    pub fn call_err(&mut self, req: Value) -> String {
        let op = req["op"].clone();
        match self.try_call(req, Duration::from_secs(300)) {
            Ok(v) if v["ok"] == json!(false) => v["error"].as_str().unwrap_or_default().to_string(),
            Ok(v) => panic!("guest {op} was expected to fail but answered {v}"),
            Err(e) => panic!("guest {op}: {e}\n{}", self.console_tail()),
        }
    }

    /// Runs a command in the guest; panics unless it exits 0. Returns stdout.
    pub fn sh(&mut self, script: &str) -> String {
        let v = self.call(json!({"op": "run", "argv": ["/bin/sh", "-c", script]}));
        if v["code"] != json!(0) {
            panic!("guest `{script}` exited {}: {}{}", v["code"], v["stdout"], v["stderr"]);
        }
        v["stdout"].as_str().unwrap_or_default().to_string()
    }

    /// Runs a command in the guest and returns (exit code, stdout+stderr).
    pub fn sh_status(&mut self, script: &str) -> (i64, String) {
        let v = self.call(json!({"op": "run", "argv": ["/bin/sh", "-c", script]}));
        (
            v["code"].as_i64().unwrap_or(-1),
            format!("{}{}", v["stdout"].as_str().unwrap_or_default(), v["stderr"].as_str().unwrap_or_default()),
        )
    }

    /// Asks the guest to power off and waits (bounded) for qemu to exit.
    pub fn shutdown(mut self) {
        let _ = self.try_call(json!({"op": "poweroff"}), Duration::from_secs(10));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if self.runner.exited() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.runner.kill();
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
