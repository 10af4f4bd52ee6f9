//! Online re-encryption (docs/PROTOCOL.md "Online re-encryption"): after the owner rotated
//! the key of a domain this host holds read-write, the cloud platform asks for the volume to
//! move to the new key while the VM keeps using it. The keys are released exactly like an
//! attach's (grant, placement, quote; the TTP releases both generations only for a
//! read-write request), then [`skydd_volume::reencrypt::online`] runs under the live mapping
//! in the background.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use protocol::cloud::{AgentRotateRequest, AgentRotation};
use protocol::domain::AccessMode;
use protocol::secret::SecretBytes;
use skydd_volume::device::SectorDevice;
use skydd_volume::reencrypt::RotationOptions;

use super::clouds::Cloud;
use super::integrity;
use super::{check_attachment_id, AttachmentService};
use crate::error::{Error, Result};
use crate::key_release::KeyRequest;

/// An online re-encryption running under a live mapping.
pub(super) struct ReEncryption {
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl AttachmentService {
    /// Stops the online re-encryption under `mapping`, if one runs, and waits for it (at most
    /// one hotzone): a mapping must not close, nor the volume be opened again, while it
    /// still writes. The header is left at a clean boundary; the next read-write attach
    /// finishes the rotation.
    pub(super) fn stop_re_encryption(&self, mapping: &str) {
        let running = self.re_encryptions.lock().ok().and_then(|mut running| running.remove(mapping));
        if let Some(ReEncryption { cancel, thread }) = running {
            cancel.store(true, Ordering::SeqCst);
            if thread.join().is_err() {
                tracing::error!(%mapping, "the re-encryption thread panicked");
            }
        }
    }

    /// `POST /v1/attachments/{id}/rotation` from the cloud platform of `cloud`: releases the
    /// previous and the new key of the attachment's domain and starts re-encrypting its
    /// volume under the live mapping. Answers once it runs; it goes on in the background and
    /// ends with a header that holds only the new registration.
    pub async fn rotate_online_for(
        self: &Arc<Self>,
        cloud: &Cloud,
        attachment_id: &str,
        request: AgentRotateRequest,
    ) -> Result<AgentRotation> {
        check_attachment_id(attachment_id)?;
        // No detach of this attachment while the re-encryption is being set up; once it is
        // registered below, a detach stops it first (`stop_re_encryption`).
        let _reservation = self.reserve(vec![format!("attachment {attachment_id}")])?;
        let host = self.host_for(cloud)?;
        let record = self
            .records
            .load(attachment_id)?
            .filter(|record| Cloud::of_record(record.partner.as_deref()) == *cloud)
            .ok_or_else(|| Error::AttachmentUnknown(attachment_id.to_string()))?;
        if record.mode != AccessMode::Rw {
            return Err(Error::BadRequest(format!(
                "attachment {attachment_id} is read-only; only the read-write attachment of a domain re-encrypts it"
            )));
        }
        let (descriptor, _) = request
            .header
            .unverified_contents()
            .map_err(|e| Error::BadRequest(format!("the header does not decode: {e}")))?;
        if descriptor.domain_id != record.domain_id {
            return Err(Error::BadRequest(format!(
                "the header is domain {}'s, but attachment {attachment_id} is domain {}'s",
                descriptor.domain_id, record.domain_id
            )));
        }
        if request.header.rotation.is_none() {
            return Err(Error::BadRequest("the header records no key rotation: there is nothing to re-encrypt".into()));
        }
        let _mapping = self.reserve(vec![format!("mapping {}", record.mapping)])?;
        let running = |re: &ReEncryption| !re.thread.is_finished();
        if self
            .re_encryptions
            .lock()
            .map_err(|_| Error::Volume("agent state lock poisoned".into()))?
            .get(&record.mapping)
            .is_some_and(running)
        {
            return Err(Error::AttachmentConflict(format!(
                "the volume of attachment {attachment_id} is being re-encrypted already"
            )));
        }
        let backend = self.backend.of_kind(&record.backend).ok_or_else(|| {
            Error::Volume(format!(
                "attachment {attachment_id} was opened by the {} backend, which this agent does not run",
                record.backend
            ))
        })?;
        let live = backend.live_device(&record.mapping)?;
        if live.as_plain().is_none() {
            return Err(Error::BadRequest(format!(
                "domain {} is format 2: its tags and tree move to the new key offline, at its next read-write attach (detach it and attach it again)",
                record.domain_id
            )));
        }
        // The same check as an attach's: the header the TTP is shown is the one in force.
        self.require_header_in_force(cloud, record.volume_path.clone(), &request.header).await?;

        let launched_image = self.launcher.as_ref().and_then(|l| l.image_of(&record.vm_id));
        let obtained = host
            .obtain_key(&KeyRequest {
                header: &request.header,
                grant: &request.grant,
                placement: &request.placement,
                vm_id: &record.vm_id,
                mode: AccessMode::Rw,
                launched_image: launched_image.as_ref(),
            })
            .await?;
        let (new_key, _) = integrity::split_released_keys(&obtained.key)?;
        let Some(previous) = obtained.previous_key else {
            return Err(Error::Volume(format!(
                "the TTP released no previous key of domain {} to re-encrypt with",
                record.domain_id
            )));
        };
        let (previous_key, _) = integrity::split_released_keys(&previous)?;
        drop((obtained.key, previous));

        let answer = AgentRotation {
            attachment_id: record.attachment_id.clone(),
            domain_id: record.domain_id.clone(),
            vm_id: record.vm_id.clone(),
            data_sectors: live.data_sectors(),
        };
        let (domain_id, volume) = (record.domain_id.clone(), record.volume_path.clone());
        let options = RotationOptions {
            online_bytes_per_second: self.config.rotation.online_rate_mib_s.map(|mib| mib.saturating_mul(1 << 20)),
            ..RotationOptions::default()
        };
        tracing::info!(domain = %domain_id, attachment = %attachment_id, vm = %record.vm_id,
            "online re-encryption started; the VM keeps reading and writing");
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name(format!("reencrypt-{}", &domain_id[..8.min(domain_id.len())]))
            .spawn(move || {
                re_encrypt(live, &domain_id, &volume, (previous_key, new_key), options, &stop);
                // This thread held both keys' schedules (crate::scrub).
                skydd_volume::scrub::scrub_this_thread();
            })
            .map_err(|e| Error::io("starting the re-encryption thread", e))?;
        if let Ok(mut running) = self.re_encryptions.lock() {
            running.insert(record.mapping.clone(), ReEncryption { cancel, thread });
        }
        Ok(answer)
    }
}

/// A re-encryption's progress callback (`done`, `total` sectors) that logs `what` each time
/// another 10 % is done: the offline run at attach and the online one log alike.
pub(super) fn progress_every_tenth<'a>(domain_id: &'a str, what: &'static str) -> impl FnMut(u64, u64) + 'a {
    let mut shown = 0;
    move |done, total| {
        let percent = done * 100 / total.max(1);
        if percent >= shown + 10 {
            shown = percent - percent % 10;
            tracing::info!(domain = %domain_id, percent, done, total, "{what}");
        }
    }
}

/// Runs the online re-encryption of `device` to its end, logging progress every 10 %; the
/// keys are wiped when it returns (the device keeps only the new key's engine).
fn re_encrypt(
    device: Arc<dyn SectorDevice>,
    domain_id: &str,
    volume: &Path,
    (previous_key, new_key): (SecretBytes, SecretBytes),
    options: RotationOptions,
    cancel: &AtomicBool,
) {
    let Some(plain) = device.as_plain() else { return };
    let started = Instant::now();
    let mut progress = progress_every_tenth(domain_id, "re-encrypting online after a key rotation");
    match skydd_volume::reencrypt::online::reencrypt_online(
        plain,
        &previous_key,
        &new_key,
        options,
        &mut progress,
        cancel,
    ) {
        Ok(report) => tracing::info!(domain = %domain_id, volume = %volume.display(), rewritten = report.rewritten,
            seconds = started.elapsed().as_secs_f64(),
            "online re-encryption finished; the previous key reads nothing on this volume any more"),
        Err(e) => tracing::error!(domain = %domain_id, volume = %volume.display(), error = %e,
            "online re-encryption stopped; the next read-write attach finishes it from the header"),
    }
}
