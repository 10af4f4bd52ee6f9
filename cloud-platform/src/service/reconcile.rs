//! Reconciliation: the header in force enforced on every open attachment (start-up), and
//! the CP's records settled with what each compute host actually holds (start-up, then every
//! `reconcile_interval_secs`).

use std::collections::HashMap;
use std::time::Duration;

use protocol::cloud::{AgentAttachment, AgentAttachmentList, Attachment, AttachmentStatus, ComputeHost, MappingStatus};

use super::attachments::allows;
use super::CloudPlatform;
use crate::error::Result;
use crate::store::{AttachmentFilter, Page};

/// What one reconciliation with the compute hosts did ([`CloudPlatform::reconcile_hosts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostReconciliation {
    /// Mappings of attaches the CP never heard back about, now recorded as attached.
    pub adopted: usize,
    /// Mappings detached on their host: orphans, `detaching` ones, ones no longer allowed.
    pub detached: usize,
    /// Records of mappings the host does not have (any more), marked detached.
    pub marked_detached: usize,
    /// Hosts whose list of mappings could not be read; they are tried again next round.
    pub hosts_unreachable: usize,
}

impl HostReconciliation {
    /// Whether the round adopted, detached or marked anything (worth logging).
    pub fn changed_anything(&self) -> bool {
        self.adopted + self.detached + self.marked_detached > 0
    }
}

/// How long the reconciliation waits for a host's list of mappings.
const HOST_LIST_TIMEOUT: Duration = Duration::from_secs(10);

impl CloudPlatform {
    /// Enforces the header in force on every open attachment, as at start-up: a cloud
    /// platform killed after writing a revoking (or narrowing) header but before detaching
    /// would otherwise leave a VM attached that has lost its access. Returns how many
    /// attachments were detached (or marked `detaching` when their host is unreachable).
    pub async fn reconcile_attachments(&self) -> Result<usize> {
        let mut open: HashMap<String, Vec<Attachment>> = HashMap::new();
        for attachment in self.open_attachments().await? {
            open.entry(attachment.domain_id.clone()).or_default().push(attachment);
        }
        let mut detached = 0;
        for (domain_id, attachments) in open {
            let lock = self.lock_of(&domain_id);
            let _guard = lock.lock().await;
            let id = domain_id.clone();
            let record = self.store(move |s| s.domain(&id)).await?;
            let allowed = match &record {
                Some(record) => match self.descriptor_in_force(record).await {
                    Ok(descriptor) => Some(descriptor),
                    Err(e) => {
                        tracing::error!(domain = %domain_id, error = %e, "cannot read the header in force; detaching every VM of the domain");
                        None
                    }
                },
                None => None,
            };
            let lost: Vec<Attachment> =
                attachments.into_iter().filter(|a| !allowed.as_ref().is_some_and(|d| allows(d, a))).collect();
            detached += lost.len();
            self.detach_all(lost, "reconciled at start-up: the header in force no longer allows it").await?;
        }
        Ok(detached)
    }

    /// Every attachment that is not detached, in pages of 500.
    pub(super) async fn open_attachments(&self) -> Result<Vec<Attachment>> {
        let mut open = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = Page { limit: 500, marker: marker.clone() };
            let batch =
                self.store(move |s| s.attachments(&AttachmentFilter { manager: None, domain_id: None }, &page)).await?;
            let full = batch.len() == 500;
            marker = batch.last().map(|a| a.id.clone());
            open.extend(batch.into_iter().filter(|a| a.status.is_open()));
            if !full {
                return Ok(open);
            }
        }
    }

    /// Settles what the CP and its compute hosts disagree on (at start-up, then every
    /// `reconcile_interval_secs`): a mapping the host holds whose attach the CP wrote ahead
    /// but never heard back about is adopted (if the header in force still allows it); a
    /// mapping the CP does not know as open (an orphan) is detached; a record the host does
    /// not have at all (`attaching` that never got there, `detaching` or `attached` that the
    /// host already undid) is marked detached; a `detaching` one the host still has is
    /// detached again. Each step runs under the domain's lock and re-reads
    /// the record, so it never races an attach or detach of this CP. An unreachable host is
    /// skipped until the next round.
    pub async fn reconcile_hosts(&self) -> Result<HostReconciliation> {
        let mut outcome = HostReconciliation::default();
        let open = self.open_attachments().await?;
        for host in self.store(|s| s.hosts()).await? {
            let listed = match self.agent_client(&host).await {
                Ok(client) => match tokio::time::timeout(
                    HOST_LIST_TIMEOUT,
                    client.get_json::<AgentAttachmentList>("/v1/attachments"),
                )
                .await
                {
                    Ok(answer) => answer.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {} s", HOST_LIST_TIMEOUT.as_secs())),
                },
                Err(e) => Err(e.to_string()),
            };
            let mappings = match listed {
                Ok(list) => list.attachments,
                Err(e) => {
                    tracing::warn!(host = %host.id, error = %e, "reconciliation: cannot list the host's attachments; next round");
                    outcome.hosts_unreachable += 1;
                    continue;
                }
            };
            for mapping in mappings.iter().filter(|m| m.status != MappingStatus::Detached) {
                self.settle_mapping(&host, mapping, &mut outcome).await?;
            }
            for record in open.iter().filter(|a| a.host == host.id && !mappings.iter().any(|m| m.attachment_id == a.id))
            {
                let lock = self.lock_of(&record.domain_id);
                let _guard = lock.lock().await;
                let id = record.id.clone();
                let Some(current) = self.store(move |s| s.attachment(&id)).await? else { continue };
                // Only a record unchanged since before the host's list was read: one attached
                // by this CP meanwhile is simply not in that list yet.
                if current.status == record.status {
                    let id = current.id.clone();
                    self.store(move |s| s.set_attachment_status(&id, AttachmentStatus::Detached)).await?;
                    tracing::warn!(attachment = %current.id, vm = %current.instance_id, host = %host.id, was = %current.status,
                        "reconciliation: the host has no such mapping; marked detached");
                    outcome.marked_detached += 1;
                }
            }
        }
        Ok(outcome)
    }

    /// One mapping a host reported, against the CP's record of it (see [`Self::reconcile_hosts`]).
    pub(super) async fn settle_mapping(
        &self,
        host: &ComputeHost,
        mapping: &AgentAttachment,
        outcome: &mut HostReconciliation,
    ) -> Result<()> {
        let lock = self.lock_of(&mapping.domain_id);
        let _guard = lock.lock().await;
        let id = mapping.attachment_id.clone();
        let record = self.store(move |s| s.attachment(&id)).await?;
        let as_known = Attachment {
            id: mapping.attachment_id.clone(),
            domain_id: mapping.domain_id.clone(),
            instance_id: mapping.vm_id.clone(),
            host: host.id.clone(),
            mode: mapping.mode,
            device: mapping.device.clone(),
            mount_path: mapping.mount_path.clone(),
            version: mapping.version,
            status: AttachmentStatus::Attached,
        };
        match record.as_ref().map(|r| r.status) {
            Some(AttachmentStatus::Attached) => {}
            Some(AttachmentStatus::Attaching)
                if mapping.status == MappingStatus::Attached && self.header_allows(&as_known).await =>
            {
                let stored = as_known.clone();
                self.store(move |s| s.complete_attachment(&stored)).await?;
                tracing::warn!(attachment = %as_known.id, vm = %as_known.instance_id, host = %host.id,
                    "reconciliation: the host finished an attach the CP never heard back about; recorded it as attached");
                outcome.adopted += 1;
            }
            status => {
                // An orphan (unknown, or detached here), a `detaching` record, or an attach
                // the host only half holds (stale) or the header in force no longer allows.
                match self.detach_on_host(&as_known).await {
                    Ok(()) => {
                        if record.is_some() {
                            let id = as_known.id.clone();
                            self.store(move |s| s.set_attachment_status(&id, AttachmentStatus::Detached)).await?;
                        }
                        tracing::warn!(attachment = %as_known.id, vm = %as_known.instance_id, host = %host.id,
                            cp_status = status.map_or("unknown", AttachmentStatus::as_str), "reconciliation: detached a mapping the CP does not hold open");
                        outcome.detached += 1;
                    }
                    Err(e) => tracing::error!(attachment = %as_known.id, host = %host.id, error = %e,
                        "reconciliation: detaching a mapping the CP does not hold open failed; next round"),
                }
            }
        }
        Ok(())
    }

    /// Whether the header in force on the domain's volume allows `attachment`'s VM and mode.
    pub(super) async fn header_allows(&self, attachment: &Attachment) -> bool {
        let id = attachment.domain_id.clone();
        let Ok(Some(record)) = self.store(move |s| s.domain(&id)).await else { return false };
        if record.deleted_at.is_some() {
            return false;
        }
        self.descriptor_in_force(&record).await.is_ok_and(|descriptor| allows(&descriptor, attachment))
    }
}
