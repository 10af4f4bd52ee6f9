//! Trusted launch (docs/PROTOCOL.md "Trusted launch"): the secure component starts a VM only
//! from an image on the signed allowlist that `image-pipeline allowlist` writes, and reports
//! that image in every key release for the VM, bound to the TPM quote
//! ([`protocol::image::quote_qualifying_data`]). The TTP checks it against its own copy of
//! the list, so a VM this host did not launch from an approved image gets no domain key.
//!
//! A launch:
//! 1. opens the image read-only and refuses it unless it is a regular file that only its
//!    owner (root or this service's user) can write, so it cannot change after the check;
//! 2. hashes that open file and finds the digest on the allowlist (raw or qcow2 entry);
//! 3. starts qemu on **the same open descriptor** (`-add-fd` / `/dev/fdset`), with
//!    `snapshot=on` so the guest's writes never reach the image, shared memory for
//!    vhost-user disks, free PCIe root ports for hot-plug, no network, its QMP monitor at
//!    `<qmp_dir>/<vm_id>.qmp`, where the `qemu` driver ([`crate::hypervisor::qemu`]) finds it,
//!    and its first serial port at `<qmp_dir>/<vm_id>.serial` (the channel of a guest agent
//!    such as the QEMU guest agent of the `demo-vm` image; only this service's user reaches
//!    it, like the monitor), under the `[launch] firmware` when one is set (OVMF for UEFI).
//!
//! After every launch attempt, started or refused, the host reports it to its TTP
//! ([`report_to_ttp`], `POST /v1/launches`), which appends a `launch` audit record: a refused
//! (tampered, unlisted) image is then on the TTP's record, not only in this host's log. A
//! report that does not reach the TTP is a warning in this log and changes nothing: a refusal
//! stays a refusal, a started VM is not stopped.
//!
//! The VMs are this service's children: they stop when it stops (a VM that outlived its
//! secure component would have no launch record, and get no key).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::image::{AllowList, LaunchReport, LaunchReportResponse, LaunchedImage, LAUNCH_OK};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{AgentConfig, HypervisorChoice, LaunchConfig};
use crate::error::{Error, Result};
use crate::hypervisor::qemu::{qmp_socket, Qmp};

/// How long qemu may take to open its QMP monitor after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM may take to exit after `quit`.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// PCIe root ports each VM gets for hot-plugged vhost-user-blk disks.
const HOTPLUG_PORTS: u32 = 4;
/// The descriptor number the image has in qemu (`-add-fd fd=3`).
const IMAGE_FD: i32 = 3;
/// How long a launch report may take before the launch is answered without it.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /v1/vms`: launch `vm_id` from the image file `image` (a path on this host).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// The VM's id, as placements and attachments name it.
    pub vm_id: String,
    /// The image file (raw or qcow2, as the allowlist entry says).
    pub image: PathBuf,
    /// Guest memory in MiB (default 512; 64-65536).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Virtual CPUs (default 1; 1-64).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
}

fn default_memory_mib() -> u32 {
    512
}

fn default_cpus() -> u32 {
    1
}

/// A VM this host launched: what `POST`/`GET /v1/vms` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchedVm {
    /// The VM's id.
    pub vm_id: String,
    /// The allowlisted image it was launched from (reported at each key release).
    pub image: LaunchedImage,
    /// The qemu process.
    pub pid: u32,
    /// Its QMP monitor.
    pub qmp: PathBuf,
    /// Its first serial port (a unix socket qemu listens on).
    #[serde(default)]
    pub serial: PathBuf,
}

struct Running {
    vm: LaunchedVm,
    child: Child,
}

/// Launches and stops VMs from allowlisted images (see the module documentation).
pub struct Launcher {
    allowlist: AllowList,
    config: LaunchConfig,
    qmp_dir: PathBuf,
    /// qemu's own output per VM (`<vm_id>.log`).
    log_dir: PathBuf,
    running: Mutex<BTreeMap<String, Running>>,
}

impl Launcher {
    /// The launcher of an agent configuration with a `[launch]` table (`None` without one):
    /// reads the allowlist and checks its signature under the agent's CAs and CRLs (its
    /// loaded TLS `material`). Needs `hypervisor = "qemu"`, whose driver attaches volumes to
    /// the launched VMs.
    pub fn from_config(config: &AgentConfig, material: &net::TlsMaterial) -> Result<Option<Self>> {
        let Some(launch) = &config.launch else { return Ok(None) };
        if config.hypervisor != HypervisorChoice::Qemu {
            return Err(Error::Config(format!(
                "[launch] needs hypervisor = \"qemu\" (the driver that attaches volumes to the VMs it launches), not {:?}",
                config.hypervisor
            )));
        }
        let trust = material.signer_trust(&launch.signer);
        let bytes = std::fs::read(&launch.allowlist)
            .map_err(|e| Error::io(format!("reading the image allowlist {}", launch.allowlist.display()), e))?;
        let allowlist = protocol::image::verify_allowlist(&bytes, &trust)
            .map_err(|e| Error::Config(format!("image allowlist {}: {e}", launch.allowlist.display())))?;
        Ok(Some(Self::new(allowlist, launch.clone(), config.qmp_dir(), config.state_dir.join("launched"))?))
    }

    /// A launcher for images on `allowlist` (already verified), putting QMP sockets in
    /// `qmp_dir` and qemu's output in `log_dir`.
    pub fn new(allowlist: AllowList, config: LaunchConfig, qmp_dir: PathBuf, log_dir: PathBuf) -> Result<Self> {
        for dir in [&qmp_dir, &log_dir] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        Ok(Self { allowlist, config, qmp_dir, log_dir, running: Mutex::new(BTreeMap::new()) })
    }

    /// The image `vm_id` was launched from, while it runs.
    pub fn image_of(&self, vm_id: &str) -> Option<LaunchedImage> {
        let mut running = self.lock();
        let alive = running.get_mut(vm_id).is_some_and(|r| matches!(r.child.try_wait(), Ok(None)));
        if !alive {
            // A VM that exited is no longer one this host launched.
            running.remove(vm_id);
            return None;
        }
        running.get(vm_id).map(|r| r.vm.image.clone())
    }

    /// The running VMs.
    pub fn list(&self) -> Vec<LaunchedVm> {
        let mut running = self.lock();
        running.retain(|_, r| matches!(r.child.try_wait(), Ok(None)));
        running.values().map(|r| r.vm.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks the image and starts the VM (see the module documentation); refuses an image
    /// that is not allowed with [`Error::ImageNotAllowed`], before anything is started.
    pub fn launch(&self, request: &LaunchRequest) -> Result<LaunchedVm> {
        self.launch_reported(request).0
    }

    /// [`Launcher::launch`], and the report of it for the TTP ([`report_to_ttp`]): the
    /// outcome (`ok` or the refusal's code) and message, the image's file name, and its
    /// digest when the file was hashed (a refusal before that has none). No report for a VM
    /// id that is not a name (the TTP could not record it).
    pub fn launch_reported(&self, request: &LaunchRequest) -> (Result<LaunchedVm>, Option<LaunchReport>) {
        let mut hashed = None;
        let outcome = self.try_launch(request, &mut hashed);
        if protocol::domain::validate_name("vm id", &request.vm_id).is_err() {
            return (outcome, None);
        }
        let (code, message) = match &outcome {
            Ok(vm) => (
                LAUNCH_OK,
                format!("launched from {}@{} on the allowlist (qemu pid {})", vm.image.role, vm.image.version, vm.pid),
            ),
            Err(error) => (error.refusal().code(), error.to_string()),
        };
        let name = request.image.file_name().map(|name| name.to_string_lossy());
        let report = LaunchReport::new(&request.vm_id, hashed, name.as_deref(), code, &message);
        (outcome, Some(report))
    }

    /// The launch; sets `hashed` to the image's hex SHA-256 as soon as the file is hashed.
    fn try_launch(&self, request: &LaunchRequest, hashed: &mut Option<String>) -> Result<LaunchedVm> {
        let qmp = qmp_socket(&self.qmp_dir, &request.vm_id)?;
        if !(64..=65536).contains(&request.memory_mib) || !(1..=64).contains(&request.cpus) {
            return Err(Error::BadRequest(format!(
                "memory_mib must be 64-65536 and cpus 1-64 (got {} MiB, {} CPUs)",
                request.memory_mib, request.cpus
            )));
        }
        if self.image_of(&request.vm_id).is_some() {
            return Err(Error::AttachmentConflict(format!("VM {} is already running on this host", request.vm_id)));
        }
        let (image_file, entry) = self.checked_image(&request.image, hashed)?;
        let format = if entry.qcow2_sha256 == entry.digest { "qcow2" } else { "raw" };
        let image = LaunchedImage { sha256: entry.digest, role: entry.role, version: entry.version };

        let serial = qmp.with_extension("serial");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&serial);
        let log_path = self.log_dir.join(format!("{}.log", request.vm_id));
        let log = File::create(&log_path).map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let log_err = log.try_clone().map_err(|e| Error::io("cloning the VM log descriptor", e))?;
        let mut command = Command::new(&self.config.qemu);
        command
            .args(["-name", &request.vm_id, "-machine", &format!("q35,accel={}", self.config.accel)])
            .args(["-m", &request.memory_mib.to_string(), "-smp", &request.cpus.to_string()])
            // vhost-user disks need the guest memory shared with the backend.
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={}M,share=on", request.memory_mib)])
            .args(["-numa", "node,memdev=mem"])
            .args(["-add-fd", &format!("fd={IMAGE_FD},set=1,opaque=image")])
            .args(["-drive", &format!("file=/dev/fdset/1,format={format},if=virtio,snapshot=on")])
            .args(["-nic", "none", "-display", "none", "-no-user-config"])
            .args(["-serial", &format!("unix:{},server=on,wait=off", serial.display())])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())]);
        if let Some(firmware) = &self.config.firmware {
            command.arg("-bios").arg(firmware);
        }
        for port in 1..=HOTPLUG_PORTS {
            command.args(["-device", &format!("pcie-root-port,id=skydd-rp{port},chassis={port}")]);
        }
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        crate::tpm::close_inherited_fds_on_exec(&mut command);
        pass_image_descriptor(&mut command, image_file.as_raw_fd());
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("starting {} for VM {}", self.config.qemu.display(), request.vm_id), e))?;
        // qemu holds its own copy now.
        drop(image_file);
        let vm = LaunchedVm { vm_id: request.vm_id.clone(), image, pid: child.id(), qmp, serial };
        let mut running = Running { vm, child };
        if let Err(e) = wait_for_monitor(&mut running, &log_path) {
            let _ = running.child.kill();
            let _ = running.child.wait();
            return Err(e);
        }
        tracing::info!(
            vm_id = %request.vm_id,
            image = %format!("{}@{}", running.vm.image.role, running.vm.image.version),
            sha256 = %running.vm.image.sha256,
            pid = running.vm.pid,
            "launched VM from an allowlisted image"
        );
        let vm = running.vm.clone();
        self.lock().insert(request.vm_id.clone(), running);
        Ok(vm)
    }

    /// Opens the image and checks it: a regular file only its owner can write, owned by root
    /// or this service's user, whose SHA-256 (put in `hashed`) is on the allowlist.
    fn checked_image(&self, path: &Path, hashed: &mut Option<String>) -> Result<(File, MatchedEntry)> {
        let refuse = |why: String| Error::ImageNotAllowed(format!("{}: {why}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| refuse(format!("cannot be opened ({e}; symbolic links are not followed)")))?;
        let meta = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        if !meta.file_type().is_file() {
            return Err(refuse("not a regular file".into()));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        if meta.uid() != 0 && meta.uid() != own_uid {
            return Err(refuse(format!("owned by uid {}, not root or this service (uid {own_uid})", meta.uid())));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "mode {:o} lets others write it, so it could change after its check (chmod go-w)",
                meta.mode() & 0o7777
            )));
        }
        let digest = hex::encode(crate::measure::sha256_open_file(&mut file, path)?);
        *hashed = Some(digest.clone());
        let entry = self.allowlist.find(&digest).ok_or_else(|| {
            refuse(format!(
                "sha256 {digest} is not on the allowlist issued {} by {} ({} approved images)",
                self.allowlist.issued_at,
                self.allowlist.issuer,
                self.allowlist.images.len()
            ))
        })?;
        let matched = MatchedEntry {
            role: entry.role.clone(),
            version: entry.version,
            qcow2_sha256: entry.qcow2_sha256.clone(),
            digest,
        };
        Ok((file, matched))
    }

    /// Stops `vm_id` (QMP `quit`, then SIGKILL if it does not exit in time).
    pub fn stop(&self, vm_id: &str) -> Result<()> {
        let Some(mut running) = self.lock().remove(vm_id) else {
            return Err(Error::AttachmentUnknown(format!("VM {vm_id} was not launched by this host")));
        };
        if let Ok(mut qmp) = Qmp::connect(&running.vm.qmp) {
            let _ = qmp.execute("quit", json!({}));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = running.child.try_wait() {
                remove_sockets(&running.vm);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = running.child.kill();
        let _ = running.child.wait();
        remove_sockets(&running.vm);
        Ok(())
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        for (_, mut running) in std::mem::take(&mut *self.lock()) {
            let _ = running.child.kill();
            let _ = running.child.wait();
            remove_sockets(&running.vm);
        }
    }
}

/// Reports a launch attempt to the TTP (`POST /v1/launches`, docs/PROTOCOL.md "Trusted
/// launch"), which audits it as a `launch` record naming this host (its certificate name);
/// returns that record's seq. A report that does not reach the TTP within
/// 10 s, or that it refuses, is logged as a warning and `None`: the launch's
/// outcome stands either way.
pub async fn report_to_ttp(ttp: &net::Client, report: &LaunchReport) -> Option<u64> {
    let sent = ttp.post_json::<_, LaunchReportResponse>("/v1/launches", report);
    let failure = match tokio::time::timeout(REPORT_TIMEOUT, sent).await {
        Ok(Ok(answer)) => {
            tracing::info!(vm_id = %report.vm_id, outcome = %report.outcome, audit_seq = answer.audit_seq, "launch reported to the TTP");
            return Some(answer.audit_seq);
        }
        Ok(Err(error)) => crate::host::ttp_error("launch report", error).to_string(),
        Err(_) => format!("no answer within {REPORT_TIMEOUT:?}"),
    };
    tracing::warn!(
        vm_id = %report.vm_id,
        outcome = %report.outcome,
        error = %failure,
        "the TTP did not record this launch attempt; its outcome stands"
    );
    None
}

fn remove_sockets(vm: &LaunchedVm) {
    let _ = std::fs::remove_file(&vm.qmp);
    let _ = std::fs::remove_file(&vm.serial);
}

/// The allowlist entry a checked image matched.
struct MatchedEntry {
    role: String,
    version: u64,
    qcow2_sha256: String,
    /// The image's hex SHA-256.
    digest: String,
}

/// Gives the child the open image as descriptor [`IMAGE_FD`], whatever number it has here.
fn pass_image_descriptor(command: &mut Command, fd: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec, after close_inherited_fds_on_exec's hook
    // (hooks run in order); dup2 is async-signal-safe, and the duplicate it makes does not
    // have close-on-exec, so qemu inherits exactly this one descriptor beyond stdio. When
    // `fd` already is IMAGE_FD, dup2 does nothing, so its flag is cleared by hand.
    unsafe {
        command.pre_exec(move || {
            if fd == IMAGE_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, IMAGE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits until the VM's QMP monitor answers; a qemu that exits first fails with its output.
fn wait_for_monitor(running: &mut Running, log_path: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            let output = std::fs::read_to_string(log_path).unwrap_or_default();
            return Err(Error::Hypervisor {
                driver: "qemu",
                detail: format!("qemu for VM {} exited ({status}) at start: {}", running.vm.vm_id, output.trim()),
            });
        }
        if let Ok(mut qmp) = Qmp::connect(&running.vm.qmp) {
            qmp.execute("query-status", json!({}))?;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Hypervisor {
                driver: "qemu",
                detail: format!("qemu for VM {} opened no QMP monitor within {START_TIMEOUT:?}", running.vm.vm_id),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use sha2::{Digest, Sha256};

    use super::*;

    fn launcher(dir: &Path) -> Launcher {
        let allowlist = AllowList {
            kind: protocol::image::ALLOWLIST_KIND.into(),
            issued_at: "2026-11-30T12:00:00Z".into(),
            issuer: "image-pipeline".into(),
            images: Vec::new(),
        };
        let config = LaunchConfig {
            allowlist: dir.join("allowlist.dsse"),
            signer: "image-pipeline".into(),
            qemu: "/nonexistent/qemu".into(),
            accel: "tcg".into(),
            firmware: None,
        };
        Launcher::new(allowlist, config, dir.join("qmp"), dir.join("logs")).unwrap()
    }

    fn request(vm_id: &str, image: &Path) -> LaunchRequest {
        LaunchRequest { vm_id: vm_id.into(), image: image.to_path_buf(), memory_mib: 512, cpus: 1 }
    }

    /// The report of a refused launch says what the TTP is to record: the refusal's code and
    /// text, the file name without its directory, and the digest once the file was hashed.
    #[test]
    fn a_refused_launch_is_reported_with_its_code_name_and_digest() {
        let dir = std::env::temp_dir().join(format!("skydd-launch-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let launcher = launcher(&dir);
        let image = dir.join("tampered.raw");
        std::fs::write(&image, b"not an approved image").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();

        let (outcome, report) = launcher.launch_reported(&request("vm-x", &image));
        assert!(matches!(outcome, Err(Error::ImageNotAllowed(_))), "{outcome:?}");
        let report = report.expect("a report");
        report.validate().unwrap();
        assert_eq!(report.outcome, "image_not_allowed");
        assert_eq!(report.image_name.as_deref(), Some("tampered.raw"));
        let digest = hex::encode(Sha256::digest(b"not an approved image"));
        assert_eq!(report.image_digest.as_deref(), Some(digest.as_str()));
        assert!(report.message.contains("is not on the allowlist"), "{}", report.message);

        // Refused before it was hashed (others may write it): no digest, the same code.
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (outcome, report) = launcher.launch_reported(&request("vm-x", &image));
        assert!(matches!(outcome, Err(Error::ImageNotAllowed(_))), "{outcome:?}");
        let report = report.expect("a report");
        assert_eq!((report.outcome.as_str(), report.image_digest.as_deref()), ("image_not_allowed", None));
        assert!(report.message.contains("lets others write it"), "{}", report.message);

        // A VM id the TTP could not record is not reported.
        let (outcome, report) = launcher.launch_reported(&request("vm x", &image));
        assert!(outcome.is_err() && report.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
