//! What the agent reports about its attachments: each record cross-checked with the
//! backend and the hypervisor driver (attached or stale, and why), at listing time and once
//! at start-up.

use protocol::cloud::{AgentAttachment, AgentAttachmentList};

use super::attach::mode_of;
use super::backend::MappingState;
use super::clouds::Cloud;
use super::records::AttachmentRecord;
use super::AttachmentService;
use crate::error::Result;
use crate::hypervisor::Placement;

impl AttachmentService {
    /// Every attachment this host has a record of, each with its current status.
    pub fn list(&self) -> Result<AgentAttachmentList> {
        let mut attachments = Vec::new();
        for record in self.records.list()? {
            attachments.push(self.view(&record)?);
        }
        Ok(AgentAttachmentList { attachments })
    }

    /// [`AttachmentService::list`] for the cloud platform of `cloud`: only the attachments
    /// it made (the others are another cloud's business).
    pub fn list_for(&self, cloud: &Cloud) -> Result<AgentAttachmentList> {
        let mut attachments = Vec::new();
        for record in self.records.list()? {
            if Cloud::of_record(record.partner.as_deref()) == *cloud {
                attachments.push(self.view(&record)?);
            }
        }
        Ok(AgentAttachmentList { attachments })
    }

    pub(super) fn placement(&self, record: &AttachmentRecord) -> Placement {
        Placement {
            vm_id: record.vm_id.clone(),
            domain_id: record.domain_id.clone(),
            device: record.device.clone(),
            mode: mode_of(record.mode),
        }
    }

    pub(super) fn attached_view(&self, r: &AttachmentRecord) -> AgentAttachment {
        AgentAttachment {
            attachment_id: r.attachment_id.clone(),
            domain_id: r.domain_id.clone(),
            vm_id: r.vm_id.clone(),
            mode: r.mode,
            version: r.version,
            device: r.device.to_string_lossy().into_owned(),
            mount_path: r.location.clone(),
            backend: r.backend.clone(),
            status: protocol::cloud::MappingStatus::Attached,
            stale_reason: None,
        }
    }

    /// The record cross-checked with the backend and the driver.
    pub(super) fn view(&self, record: &AttachmentRecord) -> Result<AgentAttachment> {
        let mut view = self.attached_view(record);
        if let Some(reason) = self.staleness(record)? {
            view.status = protocol::cloud::MappingStatus::Stale;
            view.stale_reason = Some(reason);
        }
        Ok(view)
    }

    pub(super) fn staleness(&self, record: &AttachmentRecord) -> Result<Option<String>> {
        if let Some(why) = &record.interrupted {
            return Ok(Some(why.clone()));
        }
        if self.backend.of_kind(&record.backend).is_none() {
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

    pub(super) fn report_startup(&self) {
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
        let names = self.backend.mapping_names()?;
        let mut out = Vec::new();
        for name in names {
            if name.starts_with("skydd-") && !records.iter().any(|r| r.mapping == name) {
                let state = self.backend.state(&name)?;
                out.push((name, state));
            }
        }
        Ok(out)
    }
}
