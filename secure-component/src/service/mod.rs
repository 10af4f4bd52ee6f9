//! The secure component agent (docs/CLOUD-API.md, "Secure component agent"): the cloud
//! platform asks it over mutual TLS to attach a domain to a VM on this host, to detach it,
//! and to list what is attached.
//!
//! Attach runs the mount flow of DESIGN §3: challenge from the TTP, TPM quote, key release,
//! TPM decryption under the PCR policy, then the volume backend opens the volume with the key
//! (dm-crypt or the userspace engine), the key is wiped, the hypervisor driver gives the
//! device to the VM, and a small JSON record (never key material) is written to
//! `<state_dir>/attachments/<attachment id>.json`.
//!
//! Restarts: records are re-read at start-up and listed. dm-crypt mappings live in the
//! kernel and are found again as attached. A userspace mapping is served by this process
//! (FUSE), so it cannot outlive it: on an orderly stop the agent unmounts the VM's file
//! system and closes the mapping itself (nothing is lost), after a crash the kernel aborts
//! the FUSE connection; either way the restarted agent lists the attachment as **stale**
//! with the reason, and `DELETE` tears down whatever is left. It is not re-attached
//! automatically: that needs a fresh key release, hence a fresh grant from a domain manager.

pub mod http;
pub mod records;

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use net::{Role, TlsFiles};
use protocol::cloud::{AgentAttachRequest, AgentAttachment, AgentAttachmentList};
use protocol::domain::AccessMode;

use protocol::secret::SecretBytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, BackendChoice, HypervisorChoice};
use crate::error::{Error, Result};
use crate::host::{AttestedHost, EnrollmentResult, TpmWorker};
use crate::hypervisor::libvirt::LibvirtDriver;
use crate::hypervisor::local::LocalDriver;
use crate::hypervisor::{HypervisorDriver, Placement};
use crate::key_release::KeyRequest;
use crate::volume::dmcrypt::DmCryptBackend;
use crate::volume::userspace::UserspaceBackend;
use crate::volume::{OpenMode, VolumeBackend};
use records::{AttachmentRecord, RecordStore};

/// How many recent attach timings [`AttachmentService::recent_timings`] keeps.
const TIMINGS_KEPT: usize = 1000;

/// The volume backend in use.
pub enum Backend {
    /// The kernel's dm-crypt: mappings survive an agent restart.
    DmCrypt(DmCryptBackend),
    /// The userspace engine: mappings live only as long as this process.
    Userspace(UserspaceBackend),
}

/// What the backend knows about a mapping name now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingState {
    /// Open and serving data.
    Live,
    /// The backend has leftovers of it that no longer serve data.
    Stale(String),
    /// Nothing of it exists: never opened, or already torn down.
    Absent,
}

impl Backend {
    fn get(&self) -> &dyn VolumeBackend {
        match self {
            Backend::DmCrypt(b) => b,
            Backend::Userspace(b) => b,
        }
    }

    /// "dm-crypt" or "userspace": what `/v1/health` and the attachment records report.
    pub fn kind(&self) -> &'static str {
        self.get().kind()
    }

    /// Whether the mapping `name` is live, stale or gone; used at listing and detach time to
    /// report `stale` attachments and to tear down what is left.
    pub fn state(&self, name: &str) -> Result<MappingState> {
        match self {
            Backend::DmCrypt(b) => {
                Ok(if b.list()?.iter().any(|v| v.name == name) { MappingState::Live } else { MappingState::Absent })
            }
            Backend::Userspace(b) => Ok(match b.list_detailed()?.into_iter().find(|s| s.record.name == name) {
                None => MappingState::Absent,
                Some(s) => match s.stale {
                    None => MappingState::Live,
                    Some(reason) => MappingState::Stale(reason),
                },
            }),
        }
    }

    /// Tears down a mapping in whatever state it is.
    fn remove(&self, name: &str) -> Result<()> {
        match self.state(name)? {
            MappingState::Live => self.get().close(name),
            MappingState::Stale(_) => match self {
                // Removes every stale leftover (loop device, dead FUSE mount, record); the
                // others are dead too, and their own detach finds nothing left to do.
                Backend::Userspace(b) => b.cleanup_stale().map(|_| ()),
                Backend::DmCrypt(b) => b.close(name),
            },
            MappingState::Absent => Ok(()),
        }
    }
}

/// Where the time of one attach went (request received until the file system is usable).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AttachTimings {
    /// TTP: POST /v1/challenges.
    pub challenge: Duration,
    /// TPM: quote over the challenge.
    pub quote: Duration,
    /// TTP: POST /v1/key-releases (all its checks, the derivation, the audit record).
    pub release: Duration,
    /// TPM: RSA-OAEP decryption of the wrapped key under the PCR policy session.
    pub decrypt: Duration,
    /// Backend: open (userspace: FUSE mount + loop device; dm-crypt: table load).
    pub open: Duration,
    /// Hypervisor driver: mkfs (first rw use only) and mount, or virsh attach-device.
    pub attach: Duration,
    /// Writing the attachment record.
    pub record: Duration,
    /// The whole attach, from request received until the file system is usable.
    pub total: Duration,
    /// Whether this attach created the file system.
    pub formatted: bool,
}

/// The agent: the host's TPM and TTP client, a volume backend, a hypervisor driver and the
/// attachment records.
pub struct AttachmentService {
    config: AgentConfig,
    host: AttestedHost,
    backend: Backend,
    driver: Box<dyn HypervisorDriver>,
    records: RecordStore,
    /// Attachment ids and mapping names with an attach or detach in progress.
    busy: Mutex<HashSet<String>>,
    timings: Mutex<VecDeque<AttachTimings>>,
}

/// Builds the agent from its configuration: TLS identity (role secure-component), TTP
/// client, TPM worker, backend, hypervisor driver, records. Returns the service and the
/// server TLS configuration accepting only the cloud platform.
pub fn build(config: &AgentConfig) -> Result<(Arc<AttachmentService>, net::ServerTls)> {
    let tls_files =
        TlsFiles { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone(), crl: config.crl.clone() };
    let material = tls_files.load().map_err(|e| Error::Config(format!("TLS files: {e}")))?;
    let identity =
        material.identity().map_err(|e| Error::Config(format!("own certificate {}: {e}", config.cert.display())))?;
    if identity.role != Role::SecureComponent {
        return Err(Error::Config(format!(
            "{} has role {}; the secure component needs a secure-component certificate (cloud-platform ca issue --role secure-component)",
            config.cert.display(),
            identity.role
        )));
    }
    match &config.volume_root {
        Some(root) if !root.is_dir() => {
            return Err(Error::Config(format!("volume_root {} is not a directory", root.display())));
        }
        Some(_) => {}
        None => tracing::warn!("no volume_root configured: this host opens any volume path the cloud platform names"),
    }
    let host_id = match &config.host_id {
        None => identity.name.clone(),
        Some(id) if *id == identity.name => id.clone(),
        Some(id) => {
            return Err(Error::Config(format!(
                "host_id is {id:?} but the certificate {} names {:?}; the TTP knows a host by its certificate name",
                config.cert.display(),
                identity.name
            )))
        }
    };
    let server_tls = tls_files.server_tls(&[Role::CloudPlatform]).map_err(|e| Error::Config(format!("TLS: {e}")))?;
    // Follows the TLS files: a revoked TTP certificate is refused within 2 s, without a restart.
    let ttp = net::Client::from_files(&config.ttp_url, &tls_files, Role::Ttp, std::time::Duration::from_secs(30))
        .map_err(|e| Error::Config(format!("TTP client for {}: {e}", config.ttp_url)))?;

    let backend = match config.backend {
        BackendChoice::DmCrypt => Backend::DmCrypt(DmCryptBackend::new()?),
        BackendChoice::Userspace => Backend::Userspace(UserspaceBackend::new(config.userspace_dir())?),
        BackendChoice::Auto => match DmCryptBackend::new() {
            Ok(b) => Backend::DmCrypt(b),
            Err(Error::DeviceMapperUnavailable(why)) => {
                tracing::info!(%why, "backend auto: using the userspace engine");
                Backend::Userspace(UserspaceBackend::new(config.userspace_dir())?)
            }
            Err(e) => return Err(e),
        },
    };
    let driver: Box<dyn HypervisorDriver> = match config.hypervisor {
        HypervisorChoice::Local => Box::new(LocalDriver::new(&config.vm_root)?),
        HypervisorChoice::Libvirt => Box::new(LibvirtDriver::with_virsh(
            config.libvirt.virsh.clone(),
            config.libvirt.uri.clone(),
            config.libvirt_dir(),
        )?),
    };
    let records = RecordStore::open(config.records_dir())?;
    let tpm = TpmWorker::start(&config.tcti, config.tpm_state_dir())?;
    let service = AttachmentService {
        config: config.clone(),
        host: AttestedHost { host_id, tpm, ttp },
        backend,
        driver,
        records,
        busy: Mutex::new(HashSet::new()),
        timings: Mutex::new(VecDeque::new()),
    };
    service.report_startup();
    Ok((Arc::new(service), server_tls))
}

/// Serves the agent API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<AttachmentService>,
    tls: net::ServerTls,
    shutdown: CancellationToken,
) -> Result<()> {
    net::serve_with(listener, tls, http::router(service), net::ServeOptions::default(), shutdown)
        .await
        .map_err(|e| Error::Config(format!("serve: {e}")))
}

/// The mapping name of `domain_id` for `vm_id`: `skydd-<domain>-<vm>`, or with a hash of
/// the VM id when it has characters mapping names do not allow or is too long.
pub fn mapping_name(domain_id: &str, vm_id: &str) -> String {
    let plain = format!("skydd-{domain_id}-{vm_id}");
    let ok = plain.len() <= 100 && plain.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        plain
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(vm_id.as_bytes());
        format!("skydd-{domain_id}-h{}", hex::encode(&digest[..8]))
    }
}

fn mode_of(mode: AccessMode) -> OpenMode {
    match mode {
        AccessMode::Ro => OpenMode::ReadOnly,
        AccessMode::Rw => OpenMode::ReadWrite,
    }
}

fn check_attachment_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "attachment id {id:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ . not starting with '.'"
        )))
    }
}

/// The header in force on the volume at `path` must be `expected` (an encoded header record).
fn check_volume_header(path: &Path, volume_root: Option<&Path>, expected: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let shown = path.display();
    // One answer for "absent", "outside the volume root", "unreadable" and "not a volume":
    // the caller learns nothing about which files exist on this host (the reason is logged).
    let not_a_volume = |reason: String| {
        tracing::warn!(volume = %shown, %reason, "attach refused: not a volume this host may open");
        Error::BadRequest(format!("volume {shown} is not a Skydd volume this host may open"))
    };
    let resolved = path.canonicalize().map_err(|e| not_a_volume(format!("cannot be resolved: {e}")))?;
    if let Some(root) = volume_root {
        let root = root
            .canonicalize()
            .map_err(|e| not_a_volume(format!("volume_root {} cannot be resolved: {e}", root.display())))?;
        if !resolved.starts_with(&root) {
            return Err(not_a_volume(format!("{} is outside volume_root {}", resolved.display(), root.display())));
        }
    }
    let file = std::fs::File::open(&resolved).map_err(|e| not_a_volume(format!("cannot be opened: {e}")))?;
    let metadata = file.metadata().map_err(|e| not_a_volume(format!("no metadata: {e}")))?;
    if !metadata.is_file() {
        return Err(not_a_volume("not a regular file".into()));
    }
    let mut area = vec![0u8; protocol::format::HEADER_AREA_SIZE];
    file.read_exact_at(&mut area, 0).map_err(|e| not_a_volume(format!("its 1 MiB header area cannot be read: {e}")))?;
    let active = protocol::format::decode_header_area(&area).map_err(|e| not_a_volume(e.to_string()))?;
    if active.payload != expected {
        return Err(Error::BadRequest(format!(
            "volume {shown} does not hold the header of this attach request (its header in force is in slot {}, sequence {}); \
             the cloud platform must send the header that is on the volume",
            active.slot, active.seq
        )));
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Holds ids in `busy` until dropped.
struct Reservation<'a> {
    busy: &'a Mutex<HashSet<String>>,
    keys: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            for k in &self.keys {
                busy.remove(k);
            }
        }
    }
}

impl AttachmentService {
    /// The configuration the agent was started with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// This host as the TTP sees it (host id, TPM worker, TTP client).
    pub fn attested_host(&self) -> &AttestedHost {
        &self.host
    }

    /// "dm-crypt" or "userspace", as reported by `/v1/health`.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// "local" or "libvirt", as reported by `/v1/health`.
    pub fn driver_kind(&self) -> &'static str {
        self.driver.kind()
    }

    /// Enrolls this host's TPM with the TTP, binding to the configured PCR selection.
    pub async fn enroll(&self) -> Result<EnrollmentResult> {
        self.host.enroll(&self.config.pcr_selection).await
    }

    /// The timings of the most recent attaches (oldest first), for measurements.
    pub fn recent_timings(&self) -> Vec<AttachTimings> {
        self.timings.lock().map(|t| t.iter().copied().collect()).unwrap_or_default()
    }

    fn reserve(&self, keys: Vec<String>) -> Result<Reservation<'_>> {
        let mut busy = self.busy.lock().map_err(|_| Error::Volume("agent state lock poisoned".into()))?;
        if let Some(k) = keys.iter().find(|k| busy.contains(*k)) {
            return Err(Error::AttachmentConflict(format!(
                "{k} has an attach or detach in progress; try again when it has finished"
            )));
        }
        busy.extend(keys.iter().cloned());
        Ok(Reservation { busy: &self.busy, keys })
    }

    /// The mount flow of DESIGN §3 for one VM (see the module documentation).
    pub async fn attach(self: &Arc<Self>, request: AgentAttachRequest) -> Result<AgentAttachment> {
        self.attach_timed(request).await.map(|(a, _)| a)
    }

    /// [`AttachmentService::attach`] that also returns where the time went (docs/PERFORMANCE.md,
    /// "Attach latency").
    pub async fn attach_timed(
        self: &Arc<Self>,
        request: AgentAttachRequest,
    ) -> Result<(AgentAttachment, AttachTimings)> {
        let started = Instant::now();
        check_attachment_id(&request.attachment_id)?;
        protocol::domain::validate_name("VM id", &request.vm_id).map_err(|e| Error::BadRequest(e.to_string()))?;
        let (descriptor, _) = request
            .header
            .unverified_contents()
            .map_err(|e| Error::BadRequest(format!("the header does not decode: {e}")))?;
        let domain_id = descriptor.domain_id;
        let name = mapping_name(&domain_id, &request.vm_id);
        let _reservation =
            self.reserve(vec![format!("attachment {}", request.attachment_id), format!("mapping {name}")])?;

        // Idempotent for a retry of the same request; a conflict otherwise.
        if let Some(existing) = self.records.load(&request.attachment_id)? {
            if existing.vm_id == request.vm_id && existing.domain_id == domain_id && existing.mode == request.mode {
                let view = self.view(&existing)?;
                if view.status == "attached" {
                    return Ok((view, AttachTimings::default()));
                }
            }
            return Err(Error::AttachmentConflict(format!(
                "attachment {} already exists on this host (domain {} to VM {}, {}); detach it first",
                existing.attachment_id, existing.domain_id, existing.vm_id, existing.mode
            )));
        }
        let records = self.records.list()?;
        if let Some(other) = records.iter().find(|r| r.mapping == name) {
            return Err(Error::AttachmentConflict(format!(
                "domain {domain_id} is already attached to VM {} on this host as attachment {}; detach that first",
                other.vm_id, other.attachment_id
            )));
        }
        // Single writer on this host too (the cloud platform checks it across hosts): no
        // second mapping of a domain beside a read-write one.
        if let Some(other) = records
            .iter()
            .find(|r| r.domain_id == domain_id && (r.mode == AccessMode::Rw || request.mode == AccessMode::Rw))
        {
            return Err(Error::AttachmentConflict(format!(
                "domain {domain_id} is attached to VM {} on this host ({}, attachment {}); a domain is open read-write once and alone, so detach that first",
                other.vm_id, other.mode, other.attachment_id
            )));
        }
        if let MappingState::Stale(reason) = self.backend.state(&name)? {
            tracing::warn!(mapping = %name, %reason, "removing a stale mapping without a record before attaching");
            self.backend.remove(&name)?;
        }

        // The volume must hold this very header in force (DESIGN §3: the SC reads the header),
        // checked before any key is asked for: otherwise a cloud platform could have the key
        // of a domain released and the volume opened (and formatted) at any path on this host.
        let (path, expected) = (PathBuf::from(&request.volume_path), request.header.encode());
        let volume_root = self.config().volume_root.clone();
        tokio::task::spawn_blocking(move || check_volume_header(&path, volume_root.as_deref(), &expected))
            .await
            .map_err(|e| Error::Volume(format!("volume header check failed: {e}")))??;

        let obtained = self
            .host
            .obtain_key(&KeyRequest {
                header: &request.header,
                grant: &request.grant,
                placement: &request.placement,
                vm_id: &request.vm_id,
                mode: request.mode,
            })
            .await?;
        let (key, release, steps) = (obtained.key, obtained.response, obtained.times);
        let timings = AttachTimings {
            challenge: steps.challenge,
            quote: steps.quote,
            release: steps.release,
            decrypt: steps.decrypt,
            ..AttachTimings::default()
        };
        if release.domain_id != domain_id {
            return Err(Error::BadRequest(format!(
                "the TTP released the key of domain {} for a header of domain {domain_id}",
                release.domain_id
            )));
        }

        let this = self.clone();
        let volume = PathBuf::from(&request.volume_path);
        let record = AttachmentRecord {
            attachment_id: request.attachment_id.clone(),
            domain_id: domain_id.clone(),
            vm_id: request.vm_id.clone(),
            mode: request.mode,
            version: release.version,
            mapping: name.clone(),
            device: PathBuf::new(),
            location: String::new(),
            backend: self.backend.kind().to_string(),
            hypervisor: self.driver.kind().to_string(),
            volume_path: volume.clone(),
            attached_at: unix_now(),
            pid: std::process::id(),
            interrupted: None,
        };
        let (record, timings) = tokio::task::spawn_blocking(move || {
            let opened = this.open_and_attach(record, key, timings);
            // This pool thread copied the key into the backend (crate::scrub).
            skydd_volume::scrub::scrub_this_thread();
            opened
        })
        .await
        .map_err(|e| Error::Volume(format!("attach task failed: {e}")))??;
        let mut timings = timings;
        timings.total = started.elapsed();
        tracing::info!(
            attachment = %record.attachment_id, domain = %record.domain_id, vm = %record.vm_id, mode = %record.mode,
            device = %record.device.display(), location = %record.location, ?timings, "attached"
        );
        if let Ok(mut t) = self.timings.lock() {
            if t.len() == TIMINGS_KEPT {
                t.pop_front();
            }
            t.push_back(timings);
        }
        Ok((self.attached_view(&record), timings))
    }

    /// Blocking part of attach: open, wipe the key, driver attach, record; undone on failure.
    fn open_and_attach(
        &self,
        mut record: AttachmentRecord,
        key: SecretBytes,
        mut timings: AttachTimings,
    ) -> Result<(AttachmentRecord, AttachTimings)> {
        let mode = mode_of(record.mode);
        let t = Instant::now();
        let opened = self.backend.get().open(&record.mapping, &record.volume_path, &key, mode);
        drop(key); // wiped (SecretBytes zeroizes on drop); only the backend holds it now
        let opened = opened?;
        timings.open = t.elapsed();
        record.device = opened.device.clone();

        let placement = Placement {
            vm_id: record.vm_id.clone(),
            domain_id: record.domain_id.clone(),
            device: opened.device.clone(),
            mode,
        };
        let t = Instant::now();
        let had_fs = mode == OpenMode::ReadWrite
            && self.driver.kind() == "local"
            && crate::volume::filesystem::has_ext4(&opened.device).unwrap_or(true);
        match self.driver.attach(&placement) {
            Ok(location) => record.location = location,
            Err(e) => {
                if let Err(close) = self.backend.get().close(&record.mapping) {
                    tracing::error!(mapping = %record.mapping, error = %close, "closing after a failed attach failed");
                }
                return Err(e);
            }
        }
        timings.attach = t.elapsed();
        timings.formatted = mode == OpenMode::ReadWrite && self.driver.kind() == "local" && !had_fs;

        let t = Instant::now();
        if let Err(e) = self.records.save(&record) {
            let _ = self.driver.detach(&placement, &record.location);
            let _ = self.backend.get().close(&record.mapping);
            return Err(e);
        }
        timings.record = t.elapsed();
        Ok((record, timings))
    }

    /// Detaches and closes attachment `id`, stale or not, and removes its record.
    pub async fn detach(self: &Arc<Self>, attachment_id: &str) -> Result<AgentAttachment> {
        check_attachment_id(attachment_id)?;
        let _reservation = self.reserve(vec![format!("attachment {attachment_id}")])?;
        let record =
            self.records.load(attachment_id)?.ok_or_else(|| Error::AttachmentUnknown(attachment_id.to_string()))?;
        let _mapping = self.reserve(vec![format!("mapping {}", record.mapping)])?;
        let this = self.clone();
        let record = tokio::task::spawn_blocking(move || this.detach_blocking(record))
            .await
            .map_err(|e| Error::Volume(format!("detach task failed: {e}")))??;
        let mut view = self.attached_view(&record);
        view.status = "detached".into();
        Ok(view)
    }

    fn detach_blocking(&self, record: AttachmentRecord) -> Result<AttachmentRecord> {
        let placement = self.placement(&record);
        self.driver.detach(&placement, &record.location)?;
        self.backend.remove(&record.mapping)?;
        self.records.remove(&record.attachment_id)?;
        tracing::info!(attachment = %record.attachment_id, domain = %record.domain_id, vm = %record.vm_id, "detached");
        Ok(record)
    }

    /// Every attachment this host has a record of, each with its current status.
    pub fn list(&self) -> Result<AgentAttachmentList> {
        let mut attachments = Vec::new();
        for record in self.records.list()? {
            attachments.push(self.view(&record)?);
        }
        Ok(AgentAttachmentList { attachments })
    }

    fn placement(&self, record: &AttachmentRecord) -> Placement {
        Placement {
            vm_id: record.vm_id.clone(),
            domain_id: record.domain_id.clone(),
            device: record.device.clone(),
            mode: mode_of(record.mode),
        }
    }

    fn attached_view(&self, r: &AttachmentRecord) -> AgentAttachment {
        AgentAttachment {
            attachment_id: r.attachment_id.clone(),
            domain_id: r.domain_id.clone(),
            vm_id: r.vm_id.clone(),
            mode: r.mode,
            version: r.version,
            device: r.device.to_string_lossy().into_owned(),
            mount_path: r.location.clone(),
            backend: r.backend.clone(),
            status: "attached".into(),
            stale_reason: None,
        }
    }

    /// The record cross-checked with the backend and the driver.
    fn view(&self, record: &AttachmentRecord) -> Result<AgentAttachment> {
        let mut view = self.attached_view(record);
        if let Some(reason) = self.staleness(record)? {
            view.status = "stale".into();
            view.stale_reason = Some(reason);
        }
        Ok(view)
    }

    fn staleness(&self, record: &AttachmentRecord) -> Result<Option<String>> {
        if let Some(why) = &record.interrupted {
            return Ok(Some(why.clone()));
        }
        if record.backend != self.backend.kind() {
            return Ok(Some(format!(
                "it was opened by the {} backend; this agent runs {}",
                record.backend,
                self.backend.kind()
            )));
        }
        let mapping = match self.backend.state(&record.mapping)? {
            MappingState::Live => None,
            MappingState::Stale(reason) => Some(format!("mapping {}: {reason}", record.mapping)),
            MappingState::Absent => Some(format!("the {} mapping {} is gone", record.backend, record.mapping)),
        };
        let driver = self.driver.check(&self.placement(record), &record.location)?;
        Ok(match (mapping, driver) {
            (None, None) => None,
            (Some(m), None) => Some(m),
            (None, Some(d)) => Some(d),
            (Some(m), Some(d)) => Some(format!("{m}; {d}")),
        })
    }

    fn report_startup(&self) {
        let records = match self.records.list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the attachment records");
                return;
            }
        };
        for record in &records {
            match self.staleness(record) {
                Ok(None) => {
                    tracing::info!(attachment = %record.attachment_id, vm = %record.vm_id, "attachment found again after start")
                }
                Ok(Some(reason)) => {
                    tracing::warn!(attachment = %record.attachment_id, vm = %record.vm_id, %reason, "stale attachment: DELETE it to clean up, then attach again")
                }
                Err(e) => tracing::warn!(attachment = %record.attachment_id, error = %e, "cannot check attachment"),
            }
        }
        match self.orphan_mappings(&records) {
            Ok(orphans) => {
                for (name, state) in orphans {
                    tracing::warn!(mapping = %name, ?state, "mapping without an attachment record (the agent stopped between opening \
                        and recording it); an attach of the same domain for the same VM removes it if stale");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the backend's mappings"),
        }
        tracing::info!(
            host = %self.host.host_id, backend = self.backend.kind(), hypervisor = self.driver.kind(),
            attachments = records.len(), "secure component agent ready"
        );
    }

    /// The backend's `skydd-` mappings that no record refers to.
    pub fn orphan_mappings(&self, records: &[AttachmentRecord]) -> Result<Vec<(String, MappingState)>> {
        let names: Vec<String> = match &self.backend {
            Backend::DmCrypt(b) => b.list()?.into_iter().map(|v| v.name).collect(),
            Backend::Userspace(b) => b.list_detailed()?.into_iter().map(|s| s.record.name).collect(),
        };
        let mut out = Vec::new();
        for name in names {
            if name.starts_with("skydd-") && !records.iter().any(|r| r.mapping == name) {
                let state = self.backend.state(&name)?;
                out.push((name, state));
            }
        }
        Ok(out)
    }

    /// An orderly stop. The userspace engine runs inside this process, so its mappings end
    /// with it: unmount/detach each from its VM (flushing the file system) and close it, and
    /// mark the record so the next start lists it as stale with this reason. dm-crypt
    /// mappings live in the kernel and are left alone. Called on drop.
    pub fn shutdown(&self) {
        let Backend::Userspace(_) = &self.backend else { return };
        let Ok(records) = self.records.list() else { return };
        for mut record in records {
            if record.interrupted.is_some() || !matches!(self.backend.state(&record.mapping), Ok(MappingState::Live)) {
                continue;
            }
            let placement = self.placement(&record);
            let result = self
                .driver
                .detach(&placement, &record.location)
                .and_then(|_| self.backend.get().close(&record.mapping));
            let why = match result {
                Ok(()) => format!(
                    "the secure component process {} stopped at unix time {}: it took the file system away from the VM and \
                     closed the userspace mapping (that engine runs inside the process); DELETE this attachment and attach again",
                    std::process::id(),
                    unix_now()
                ),
                Err(e) => format!("the secure component process {} stopped and could not close the mapping cleanly: {e}", std::process::id()),
            };
            tracing::warn!(attachment = %record.attachment_id, reason = %why, "userspace attachment ends with the process");
            record.interrupted = Some(why);
            if let Err(e) = self.records.save(&record) {
                tracing::error!(attachment = %record.attachment_id, error = %e, "cannot mark the record");
            }
        }
    }
}

impl Drop for AttachmentService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// For callers that only have a path (the CLI).
pub fn load_and_build(config_path: &Path) -> Result<(AgentConfig, Arc<AttachmentService>, net::ServerTls)> {
    let config = AgentConfig::load(config_path)?;
    let (service, tls) = build(&config)?;
    Ok((config, service, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_names() {
        let d = "0123456789abcdef0123456789abcdef";
        assert_eq!(mapping_name(d, "vm-a"), format!("skydd-{d}-vm-a"));
        let odd = mapping_name(d, "vm@host:1");
        assert!(odd.starts_with(&format!("skydd-{d}-h")) && odd.len() == 6 + 32 + 2 + 16, "{odd}");
        assert_ne!(mapping_name(d, "vm@host:1"), mapping_name(d, "vm@host:2"));
        let long = "v".repeat(64);
        assert!(mapping_name(d, &long).len() <= 100);
    }

    #[test]
    fn attachment_ids() {
        assert!(check_attachment_id("att-1_x.y").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(129)] {
            assert!(check_attachment_id(bad).is_err(), "{bad:?}");
        }
    }
}
