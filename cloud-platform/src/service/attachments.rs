//! Attachments (docs/CLOUD-API.md, "Attachments"): attach forwards to the secure component
//! of the instance's host with the header in force and a placement the CP signs; the
//! single-writer rule is checked under the domain's lock; detach asks the host and records
//! what it confirmed.

use net::{Identity, Role};
use protocol::cloud::{
    AgentAttachRequest, AgentAttachment, Attachment, AttachmentList, AttachmentStatus, CreateAttachmentRequest,
};
use protocol::domain::{AccessMode, Descriptor};
use protocol::messages::{grant_digest, Placement};
use protocol::refusal::Refusal;
use protocol::signing::SignatureContext;

use super::{is_refusal, now_unix, require_role, CloudPlatform};
use crate::error::{Error, Result};
use crate::store::{AttachmentFilter, Page};

/// Says, on an attach whose answer never came, how it is settled.
fn settled_later(error: Error, attachment_id: &str) -> Error {
    error.with_note(&format!(
        "; attachment {attachment_id} stays `attaching` until the cloud platform's reconciliation with the host records it as attached or detached (`attachment list` tells)"
    ))
}

/// Whether `descriptor` still lets the attachment's VM mount with the attachment's mode.
pub(super) fn allows(descriptor: &Descriptor, attachment: &Attachment) -> bool {
    descriptor.access_of(&attachment.instance_id).is_some_and(|m| m.covers(attachment.mode))
}

impl CloudPlatform {
    /// `POST /v1/attachments`: forwards to the secure component of the instance's host,
    /// with the header in force on the volume.
    pub async fn attach(&self, caller: &Identity, request: CreateAttachmentRequest) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager], "attach a domain")?;
        let lock = self.lock_of(&request.domain_id);
        let _guard = lock.lock().await;
        let record = self.managed_domain(caller, &request.domain_id).await?;
        let instance_id = request.instance_id.clone();
        let instance = self.store(move |s| s.instance(&instance_id)).await?.ok_or_else(|| Error::NotFound {
            code: Refusal::InstanceUnknown,
            message: format!("instance {} is not registered; register it with POST /v1/instances", request.instance_id),
        })?;
        let host = self.host_of(&instance.host).await?;
        // Every open attachment of the domain, read once under its lock.
        let d = request.domain_id.clone();
        let open = self.store(move |s| s.open_attachments_of_domain(&d)).await?;
        self.check_beside(&open, &request)?;
        // An interrupted update first: the TTP releases keys only for its newest version.
        self.finish_pending_update(&record).await?;
        let header = self.read_header(&record).await?;
        let attachment_id = hex::encode(rand::random::<[u8; 16]>());
        // The operator's word that this VM runs on this host, for this grant: the TTP
        // releases the key to no other host (docs/PROTOCOL.md "Placement").
        let placement = Placement {
            vm_id: instance.id.clone(),
            host_id: host.id.clone(),
            grant_digest: grant_digest(&request.grant),
            placed_at: now_unix(),
        };
        let agent_request = AgentAttachRequest {
            attachment_id: attachment_id.clone(),
            vm_id: instance.id.clone(),
            mode: request.mode,
            header: header.record,
            placement: self.placer.sign_envelope(SignatureContext::Placement, placement.encode()),
            grant: request.grant,
            volume_path: record.volume_path.to_string_lossy().into_owned(),
        };
        // Written ahead: if the answer never comes (the CP stops, the host is slow), the
        // reconciliation with the host finds this record and settles it (adopts the mapping
        // the host made, or marks it detached) instead of leaving an unknown mapping open.
        let mut attachment = Attachment {
            id: attachment_id,
            domain_id: record.id.clone(),
            instance_id: instance.id.clone(),
            host: host.id.clone(),
            mode: request.mode,
            device: String::new(),
            mount_path: String::new(),
            version: 0,
            status: AttachmentStatus::Attaching,
        };
        let client = self.agent_client(&host).await?;
        let stored = attachment.clone();
        self.store(move |s| s.insert_attachment(&stored, now_unix())).await?;
        let attached: AgentAttachment = match client.post_json("/v1/attachments", &agent_request).await {
            Ok(attached) => attached,
            Err(e) => {
                let never_sent = e.never_reached_peer();
                let e = Error::from_peer(e, Refusal::HostUnreachable, Self::agent_error(&host));
                // Any answer of the host is final (it runs an attach to its end before it
                // answers), and so is a request that never reached it; only a request sent
                // without an answer leaves it open.
                if never_sent || matches!(e, Error::Upstream { .. }) || is_refusal(&e) {
                    let id = attachment.id.clone();
                    self.store(move |s| s.delete_attachment(&id)).await?;
                    return Err(e);
                }
                return Err(settled_later(e, &attachment.id));
            }
        };
        attachment.device = attached.device;
        attachment.mount_path = attached.mount_path;
        attachment.version = attached.version;
        attachment.status = AttachmentStatus::Attached;
        let stored = attachment.clone();
        if let Err(e) = self.store(move |s| s.complete_attachment(&stored)).await {
            // Do not leave a mapping open that the CP does not know about.
            let _ = self.detach_on_host(&attachment).await;
            return Err(e);
        }
        tracing::info!(attachment = %attachment.id, domain = %attachment.domain_id, vm = %attachment.instance_id,
            host = %attachment.host, mode = %attachment.mode, backend = %attached.backend, "attached");
        Ok(attachment)
    }

    /// Refuses an attach beside the domain's `open` attachments: the same VM's is
    /// `already_attached`; any other decides the single-writer rule.
    fn check_beside(&self, open: &[Attachment], request: &CreateAttachmentRequest) -> Result<()> {
        if let Some(open) = open.iter().find(|a| a.instance_id == request.instance_id) {
            if open.status == AttachmentStatus::Attaching {
                return Err(Error::Conflict {
                    code: Refusal::AlreadyAttached,
                    message: format!(
                        "an earlier attach of domain {} to {} (attachment {}) got no answer from host {}; the cloud platform settles it with the host within {} s, then attach again or detach",
                        open.domain_id, open.instance_id, open.id, open.host, self.reconcile_interval.as_secs()
                    ),
                });
            }
            return Err(Error::Conflict {
                code: Refusal::AlreadyAttached,
                message: format!(
                    "domain {} is already attached to {} ({}, attachment {}, status {}); detach it first",
                    open.domain_id, open.instance_id, open.mode, open.id, open.status
                ),
            });
        }
        // Single writer (docs/CLOUD-API.md, "Cloud platform behaviour"): ext4 is not a cluster file
        // system, so a second rw mount, or a ro mount beside a rw one, loses or garbles data
        // silently. The caller holds the domain's lock, so two attaches cannot both pass.
        if let Some(other) = open.iter().find(|a| a.mode == AccessMode::Rw || request.mode == AccessMode::Rw) {
            return Err(Error::Conflict {
                code: Refusal::SingleWriter,
                message: format!(
                    "domain {} is attached to {} ({}, attachment {}); a domain has one read-write attachment and nothing beside it, or only read-only ones: detach {} first",
                    other.domain_id, other.instance_id, other.mode, other.id, other.instance_id
                ),
            });
        }
        Ok(())
    }

    /// Asks the host's secure component to detach. An attachment the host does not know
    /// (404) is already gone.
    pub(super) async fn detach_on_host(&self, attachment: &Attachment) -> Result<()> {
        let host = self.host_of(&attachment.host).await?;
        let client = self.agent_client(&host).await?;
        match client.delete_json::<serde_json::Value>(&format!("/v1/attachments/{}", attachment.id)).await {
            Ok(_) => Ok(()),
            Err(net::Error::Api { status: 404, code, message }) => {
                tracing::warn!(attachment = %attachment.id, host = %host.id, %code, %message, "the host no longer has the attachment");
                Ok(())
            }
            Err(e) => Err(Error::from_peer(e, Refusal::HostUnreachable, Self::agent_error(&host))),
        }
    }

    /// Detaches each attachment; one the host cannot confirm is marked `detaching` (a later
    /// `DELETE /v1/attachments/{id}` retries) and does not stop the others.
    pub(super) async fn detach_all(&self, attachments: Vec<Attachment>, why: &str) -> Result<()> {
        for attachment in attachments {
            let status = match self.detach_on_host(&attachment).await {
                Ok(()) => {
                    tracing::info!(attachment = %attachment.id, vm = %attachment.instance_id, host = %attachment.host, %why, "detached");
                    AttachmentStatus::Detached
                }
                Err(e) => {
                    tracing::error!(attachment = %attachment.id, vm = %attachment.instance_id, host = %attachment.host, %why,
                        error = %e, "detach failed; marked detaching");
                    AttachmentStatus::Detaching
                }
            };
            let id = attachment.id.clone();
            self.store(move |s| s.set_attachment_status(&id, status)).await?;
        }
        Ok(())
    }

    pub(super) async fn managed_attachment(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        let id = attachment_id.to_string();
        let attachment = self.store(move |s| s.attachment(&id)).await?.ok_or_else(|| Error::NotFound {
            code: Refusal::AttachmentUnknown,
            message: format!("attachment {attachment_id} does not exist"),
        })?;
        let domain_id = attachment.domain_id.clone();
        let record = self.store(move |s| s.domain(&domain_id)).await?;
        if !record.is_some_and(|r| r.is_manager(&caller.name)) {
            // Not naming the attachment's domain: it belongs to another tenant.
            return Err(Error::Forbidden(format!(
                "{} does not manage the domain of attachment {attachment_id}",
                caller.name
            )));
        }
        Ok(attachment)
    }

    /// `GET /v1/attachments/{id}`: the operator (role cloud-platform) reads any attachment; a
    /// domain manager only one of a domain it owns or shares (otherwise 403 `forbidden`). An
    /// unknown id is 404 `attachment_unknown`.
    pub async fn attachment(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager, Role::CloudPlatform], "read an attachment")?;
        if caller.role == Role::CloudPlatform {
            let id = attachment_id.to_string();
            return self.store(move |s| s.attachment(&id)).await?.ok_or_else(|| Error::NotFound {
                code: Refusal::AttachmentUnknown,
                message: format!("attachment {attachment_id} does not exist"),
            });
        }
        self.managed_attachment(caller, attachment_id).await
    }

    /// `GET /v1/attachments`: a domain manager sees the attachments of its domains; the
    /// operator (cloud-platform role) sees all.
    pub async fn attachments(
        &self,
        caller: &Identity,
        domain_id: Option<String>,
        page: Page,
    ) -> Result<AttachmentList> {
        let manager = (caller.role != Role::CloudPlatform).then(|| caller.name.clone());
        let filter = AttachmentFilter { manager, domain_id };
        let p = page.clone();
        let rows = self.store(move |s| s.attachments(&filter, &p)).await?;
        let (attachments, next_marker) = page.finish(rows, |a| &a.id);
        Ok(AttachmentList { attachments, next_marker })
    }

    /// `DELETE /v1/attachments/{id}`: the host's secure component detaches; retried for an
    /// attachment left `detaching`. Detaching a detached attachment answers it unchanged.
    pub async fn detach(&self, caller: &Identity, attachment_id: &str) -> Result<Attachment> {
        require_role(caller, &[Role::DomainManager], "detach a domain")?;
        let attachment = self.managed_attachment(caller, attachment_id).await?;
        let lock = self.lock_of(&attachment.domain_id);
        let _guard = lock.lock().await;
        let mut attachment = self.managed_attachment(caller, attachment_id).await?;
        if attachment.status == AttachmentStatus::Detached {
            return Ok(attachment);
        }
        self.detach_on_host(&attachment).await?;
        let id = attachment.id.clone();
        self.store(move |s| s.set_attachment_status(&id, AttachmentStatus::Detached)).await?;
        attachment.status = AttachmentStatus::Detached;
        tracing::info!(attachment = %attachment.id, vm = %attachment.instance_id, by = %caller.name, "detached");
        Ok(attachment)
    }
}
