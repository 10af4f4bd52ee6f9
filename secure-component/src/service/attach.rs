//! Attach: the mount flow for one VM (see the module documentation of [`crate::service`]),
//! from the request to the attachment record, and where its time went.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::cloud::{AgentAttachRequest, AgentAttachment};
use protocol::domain::{AccessMode, VolumeFormat};
use protocol::secret::SecretBytes;
use serde::Serialize;

use super::backend::{mapping_name, MappingState};
use super::clouds::Cloud;
use super::integrity;
use super::records::AttachmentRecord;
use super::{check_attachment_id, unix_now, AttachmentService, TIMINGS_KEPT};
use crate::error::{Error, Result};
use crate::hypervisor::Placement;
use crate::key_release::KeyRequest;
use crate::volume::{IntegrityOpen, OpenMode};
use skydd_volume::reencrypt::format2::GenerationAnchor;

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

pub(super) fn mode_of(mode: AccessMode) -> OpenMode {
    match mode {
        AccessMode::Ro => OpenMode::ReadOnly,
        AccessMode::Rw => OpenMode::ReadWrite,
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

/// The volume file at `path`, opened read-write for a re-encryption.
fn open_to_reencrypt(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Volume(format!("opening {} to re-encrypt it: {e}", path.display())))
}

/// Re-encrypts the volume at `path` from `previous` to `key` (both 64-byte XTS keys) as its
/// header's rotation records, logging progress every 10 %; a crash is recovered by the next
/// attach (`skydd_volume::reencrypt`).
fn finish_rotation(path: &Path, domain_id: &str, previous: &SecretBytes, key: &SecretBytes) -> Result<()> {
    let file = open_to_reencrypt(path)?;
    let started = Instant::now();
    let mut progress = super::rotate::progress_every_tenth(domain_id, "re-encrypting after a key rotation");
    let options = skydd_volume::reencrypt::RotationOptions::default();
    let report = skydd_volume::reencrypt::finish_rotation(&file, previous, key, options, &mut progress)
        .map_err(|e| Error::Volume(format!("re-encrypting domain {domain_id} after its key rotation: {e}")))?;
    tracing::info!(domain = %domain_id, rewritten = report.rewritten, settled = report.settled,
        seconds = started.elapsed().as_secs_f64(), "key rotation finished; the previous key reads nothing on this volume any more");
    Ok(())
}

/// The previous key generation's keys, released to the read-write host during a rotation.
struct PreviousKeys {
    xts: SecretBytes,
    /// `K_mac` of the previous generation (every release carries it).
    mac: Option<SecretBytes>,
    generation: u64,
}

/// A format-2 open, with what a rotation of it needs: the anchor's key generation and the
/// TTP as the previous generation's roots are committed.
struct RotatingIntegrity {
    open: IntegrityOpen,
    anchor: Option<GenerationAnchor>,
    previous_authority: Option<Arc<dyn skydd_volume::integrity::Authority>>,
}

/// Finishes the rotation recorded in the header of the format-2 volume at `path`: data area,
/// then tags and tree under the new `K_mac` (generation `generation`), committed to the TTP
/// (`skydd_volume::reencrypt::format2`). Returns the open of the rotated volume, against
/// the anchor it now has.
fn finish_rotation_v2(
    path: &Path,
    previous: &PreviousKeys,
    key: &SecretBytes,
    generation: u64,
    integrity: RotatingIntegrity,
) -> Result<IntegrityOpen> {
    use skydd_volume::reencrypt::format2::{self, Generation};
    let RotatingIntegrity { mut open, anchor, previous_authority } = integrity;
    let domain_id = open.domain_id.clone();
    let (Some(previous_mac), Some(previous_authority)) = (&previous.mac, previous_authority) else {
        return Err(Error::Volume(format!(
            "domain {domain_id} is format 2, but the TTP released no sector-tag key of key generation {}",
            previous.generation
        )));
    };
    let file = open_to_reencrypt(path)?;
    let started = Instant::now();
    let mut progress =
        super::rotate::progress_every_tenth(&domain_id, "re-encrypting after a key rotation, tags included");
    let old = Generation {
        number: previous.generation,
        xts_key: &previous.xts,
        mac_key: previous_mac,
        authority: previous_authority,
    };
    let new =
        Generation { number: generation, xts_key: key, mac_key: &open.mac_key, authority: open.authority.clone() };
    let options = skydd_volume::reencrypt::RotationOptions::default();
    let (report, rotated) =
        format2::finish_rotation(Arc::new(file), &domain_id, &old, &new, anchor, options, &mut progress).map_err(
            |e| match e {
                e @ skydd_volume::Error::Integrity { .. } => Error::from(e),
                e => Error::Volume(format!("re-encrypting format-2 domain {domain_id} after its key rotation: {e}")),
            },
        )?;
    tracing::info!(domain = %domain_id, rewritten = report.rewritten, settled = report.settled, generation,
        seconds = started.elapsed().as_secs_f64(),
        "key rotation finished, tags and tree included; the previous key reads nothing on this volume any more");
    open.anchor = rotated;
    Ok(open)
}

impl AttachmentService {
    /// The volume at `path`, under the cloud's `volume_root`, must hold `header` in force:
    /// checked before any key is asked for (an attach's and an online rotation's).
    pub(super) async fn require_header_in_force(
        &self,
        cloud: &Cloud,
        path: PathBuf,
        header: &protocol::messages::HeaderRecord,
    ) -> Result<()> {
        let expected = header.encode();
        let volume_root = self.volume_root_for(cloud)?.map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || check_volume_header(&path, volume_root.as_deref(), &expected))
            .await
            .map_err(|e| Error::Volume(format!("volume header check failed: {e}")))?
    }

    /// The mount flow for one VM (see the module documentation of [`crate::service`]).
    pub async fn attach(self: &Arc<Self>, request: AgentAttachRequest) -> Result<AgentAttachment> {
        self.attach_timed(request).await.map(|(a, _)| a)
    }

    /// [`AttachmentService::attach`] for the cloud platform of `cloud` (its TTP releases the
    /// key, its `volume_root` holds the volume; docs/PKI.md "A partner cloud's host").
    pub async fn attach_for(self: &Arc<Self>, cloud: &Cloud, request: AgentAttachRequest) -> Result<AgentAttachment> {
        self.attach_timed_for(cloud, request).await.map(|(a, _)| a)
    }

    /// [`AttachmentService::attach`] that also returns where the time went (docs/PERFORMANCE.md,
    /// "Attach latency").
    pub async fn attach_timed(
        self: &Arc<Self>,
        request: AgentAttachRequest,
    ) -> Result<(AgentAttachment, AttachTimings)> {
        self.attach_timed_for(&Cloud::Home, request).await
    }

    /// [`AttachmentService::attach_timed`] for the cloud platform of `cloud`.
    pub async fn attach_timed_for(
        self: &Arc<Self>,
        cloud: &Cloud,
        request: AgentAttachRequest,
    ) -> Result<(AgentAttachment, AttachTimings)> {
        let started = Instant::now();
        let host = self.host_for(cloud)?;
        check_attachment_id(&request.attachment_id)?;
        protocol::domain::validate_name("VM id", &request.vm_id).map_err(|e| Error::BadRequest(e.to_string()))?;
        let (descriptor, _) = request
            .header
            .unverified_contents()
            .map_err(|e| Error::BadRequest(format!("the header does not decode: {e}")))?;
        // The TTP checks this descriptor is the registered, owner-signed one before it
        // releases a key, so its format is the owner's choice, not the provider's.
        let volume_format = descriptor.volume_format;
        let domain_id = descriptor.domain_id;
        let name = mapping_name(&domain_id, &request.vm_id);
        let _reservation =
            self.reserve(vec![format!("attachment {}", request.attachment_id), format!("mapping {name}")])?;

        // Idempotent for a retry of the same request; a conflict otherwise.
        if let Some(existing) = self.records.load(&request.attachment_id)? {
            if existing.vm_id == request.vm_id && existing.domain_id == domain_id && existing.mode == request.mode {
                let view = self.view(&existing)?;
                if view.status == protocol::cloud::MappingStatus::Attached {
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

        // The volume must hold this very header in force (docs/CLOUD-API.md, "Message sequence: attach": the SC reads the header),
        // checked before any key is asked for: otherwise a cloud platform could have the key
        // of a domain released and the volume opened (and formatted) at any path on this host.
        self.require_header_in_force(cloud, PathBuf::from(&request.volume_path), &request.header).await?;

        // The image this host launched the VM from, if it did: the TTP may require it.
        let launched_image = self.launcher.as_ref().and_then(|l| l.image_of(&request.vm_id));
        let obtained = host
            .obtain_key(&KeyRequest {
                header: &request.header,
                grant: &request.grant,
                placement: &request.placement,
                vm_id: &request.vm_id,
                mode: request.mode,
                launched_image: launched_image.as_ref(),
            })
            .await?;
        let (key, previous_key, release, steps) =
            (obtained.key, obtained.previous_key, obtained.response, obtained.times);
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

        let (xts_key, mac_key) = integrity::split_released_keys(&key)?;
        drop(key);
        let generation = integrity::generation_of(&request.header.registration)?;
        // A header with a rotation in progress: the volume is re-encrypted from the previous
        // key to this one before anyone sees it (docs/FORMAT.md "Key rotation").
        let previous = match (&request.header.rotation, previous_key) {
            (None, _) => None,
            (Some(rotation), Some(previous)) => {
                let (xts, mac) = integrity::split_released_keys(&previous)?;
                Some(PreviousKeys { xts, mac, generation: integrity::generation_of(&rotation.previous_registration)? })
            }
            (Some(_), None) => {
                return Err(Error::Volume(format!(
                    "the header of domain {domain_id} records a key rotation, but the TTP released no previous key to re-encrypt with"
                )))
            }
        };
        let authority = |key_generation: u64| -> Arc<dyn skydd_volume::integrity::Authority> {
            Arc::new(integrity::TtpAuthority {
                ttp: host.ttp.clone(),
                runtime: tokio::runtime::Handle::current(),
                domain_id: domain_id.clone(),
                host_id: host.host_id.clone(),
                vm_id: request.vm_id.clone(),
                key_generation,
            })
        };
        let integrity = match (volume_format, mac_key) {
            (VolumeFormat::V1, _) => None,
            (VolumeFormat::V2, None) => {
                return Err(Error::Integrity {
                    refusal: protocol::refusal::Refusal::IntegrityUnsupported,
                    message: format!(
                    "domain {domain_id} is format 2 but the TTP released no sector-tag key (a TTP older than format 2)"
                ),
                })
            }
            (VolumeFormat::V2, Some(mac_key)) => {
                let anchor = integrity::anchor_of(&release)?;
                // Outside a rotation the tree must be tagged under this very key generation;
                // during one, the re-encryption below moves it (or finds it moved).
                if let Some(at) = anchor.filter(|a| previous.is_none() && a.generation != generation) {
                    return Err(Error::Integrity {
                        refusal: protocol::refusal::Refusal::IntegrityViolation,
                        message: format!(
                            "the TTP anchors domain {domain_id}'s root under key generation {}, but the header is of generation {generation}",
                            at.generation
                        ),
                    });
                }
                Some(RotatingIntegrity {
                    open: IntegrityOpen {
                        mac_key,
                        domain_id: domain_id.clone(),
                        anchor: anchor.map(|a| a.anchor),
                        authority: authority(generation),
                    },
                    anchor,
                    previous_authority: previous.as_ref().map(|p| authority(p.generation)),
                })
            }
        };

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
            partner: cloud.partner_name().map(str::to_string),
        };
        let (record, timings) = tokio::task::spawn_blocking(move || {
            let opened = match (previous, integrity) {
                (None, integrity) => this.open_and_attach(record, xts_key, integrity.map(|i| i.open), timings),
                (Some(previous), None) => {
                    finish_rotation(&record.volume_path, &record.domain_id, &previous.xts, &xts_key)
                        .and_then(|()| this.open_and_attach(record, xts_key, None, timings))
                }
                (Some(previous), Some(integrity)) => {
                    finish_rotation_v2(&record.volume_path, &previous, &xts_key, generation, integrity)
                        .and_then(|open| this.open_and_attach(record, xts_key, Some(open), timings))
                }
            };
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
        integrity: Option<IntegrityOpen>,
        mut timings: AttachTimings,
    ) -> Result<(AttachmentRecord, AttachTimings)> {
        let mode = mode_of(record.mode);
        let t = Instant::now();
        let backend = self.backend.for_open(integrity.is_some(), mode);
        record.backend = backend.kind().to_string();
        let opened = match integrity {
            None => backend.open(&record.mapping, &record.volume_path, &key, mode),
            Some(integrity) => backend.open_authenticated(&record.mapping, &record.volume_path, &key, integrity, mode),
        };
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
                if let Err(close) = backend.close(&record.mapping) {
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
            let _ = backend.close(&record.mapping);
            return Err(e);
        }
        timings.record = t.elapsed();
        Ok((record, timings))
    }
}
