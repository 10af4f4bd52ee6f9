//! Detach: taking an attachment away from its VM, closing its mapping and removing its
//! record, and the orderly stop that does the same for every userspace mapping.

use std::sync::Arc;

use protocol::cloud::AgentAttachment;

use super::backend::MappingState;
use super::clouds::Cloud;
use super::records::AttachmentRecord;
use super::{check_attachment_id, unix_now, AttachmentService};
use crate::error::{Error, Result};

impl AttachmentService {
    /// Detaches and closes attachment `id`, stale or not, and removes its record.
    pub async fn detach(self: &Arc<Self>, attachment_id: &str) -> Result<AgentAttachment> {
        self.detach_checked(None, attachment_id).await
    }

    /// [`AttachmentService::detach`] asked by the cloud platform of `cloud`: another cloud's
    /// attachment is unknown to it (`attachment_unknown`), so one cloud's reconciliation never
    /// tears down what another cloud attached on this host.
    pub async fn detach_for(self: &Arc<Self>, cloud: &Cloud, attachment_id: &str) -> Result<AgentAttachment> {
        self.detach_checked(Some(cloud), attachment_id).await
    }

    async fn detach_checked(self: &Arc<Self>, cloud: Option<&Cloud>, attachment_id: &str) -> Result<AgentAttachment> {
        check_attachment_id(attachment_id)?;
        let _reservation = self.reserve(vec![format!("attachment {attachment_id}")])?;
        let record = self
            .records
            .load(attachment_id)?
            .filter(|record| cloud.is_none_or(|cloud| Cloud::of_record(record.partner.as_deref()) == *cloud))
            .ok_or_else(|| Error::AttachmentUnknown(attachment_id.to_string()))?;
        let _mapping = self.reserve(vec![format!("mapping {}", record.mapping)])?;
        let this = self.clone();
        let record = tokio::task::spawn_blocking(move || this.detach_blocking(record))
            .await
            .map_err(|e| Error::Volume(format!("detach task failed: {e}")))??;
        let mut view = self.attached_view(&record);
        view.status = protocol::cloud::MappingStatus::Detached;
        Ok(view)
    }

    fn detach_blocking(&self, record: AttachmentRecord) -> Result<AttachmentRecord> {
        let placement = self.placement(&record);
        self.driver.detach(&placement, &record.location)?;
        self.stop_re_encryption(&record.mapping);
        self.backend.remove(&record.mapping)?;
        self.records.remove(&record.attachment_id)?;
        tracing::info!(attachment = %record.attachment_id, domain = %record.domain_id, vm = %record.vm_id, "detached");
        Ok(record)
    }

    /// An orderly stop. The userspace engine (FUSE or vhost-user) runs inside this process, so its mappings end
    /// with it: unmount/detach each from its VM (flushing the file system) and close it, and
    /// mark the record so the next start lists it as stale with this reason. dm-crypt
    /// mappings live in the kernel and are left alone. Called on drop.
    pub fn shutdown(&self) {
        if !self.backend.serves_in_process() {
            return;
        }
        let Ok(records) = self.records.list() else { return };
        for mut record in records {
            // dm-crypt mappings (beside the engine with backend = "auto") stay in the kernel.
            let Some(backend) = self.backend.of_kind(&record.backend).filter(|b| b.kind() != "dm-crypt") else {
                continue;
            };
            if record.interrupted.is_some() || !matches!(self.backend.state(&record.mapping), Ok(MappingState::Live)) {
                continue;
            }
            let placement = self.placement(&record);
            let result = self.driver.detach(&placement, &record.location).and_then(|_| {
                self.stop_re_encryption(&record.mapping);
                backend.close(&record.mapping)
            });
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
