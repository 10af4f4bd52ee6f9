//! Wire types of the cloud API (docs/CLOUD-API.md): the cloud platform's REST resources
//! (OpenStack style: domains like Cinder volumes, instances like Nova servers, attachments
//! like os-volume_attachments) and the secure component's agent API that the CP calls.
//! Shared by the cloud platform, the secure component and the domain-manager CLI.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::{AccessMode, AclEntry};
use crate::error::{Error, Result};
use crate::messages::HeaderRecord;
use crate::signing::SignedEnvelope;

/// Default and largest page size of list endpoints.
pub const DEFAULT_PAGE_LIMIT: usize = 50;
/// Largest page size: a larger `limit` is capped to it (a `limit` of 0 is refused).
pub const MAX_PAGE_LIMIT: usize = 500;

// ---- cloud platform: domains ---------------------------------------------------------------

/// `POST /v1/domains` (caller: the owning domain manager).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateDomainRequest {
    /// Version 1 of the descriptor, signed by its owner (the caller).
    pub descriptor: SignedEnvelope,
    /// Size of the data area in bytes (a multiple of 4096; the volume file is 1 MiB larger).
    pub size_bytes: u64,
}

/// `PUT /v1/domains/{id}/descriptor`: grant, revoke or share = a new owner-signed version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateDomainRequest {
    /// The next version of the descriptor, signed by its owner; the TTP refuses it with
    /// `version_rollback` unless it is newer than the registered version.
    pub descriptor: SignedEnvelope,
}

/// `POST /v1/domains/{id}/rotations`: the owner asks for a new key generation
/// (docs/PROTOCOL.md "Key rotation").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateDomainRequest {
    /// The owner-signed [`KeyRotation`](crate::messages::KeyRotation) (context `key-rotation`).
    pub rotation: SignedEnvelope,
    /// A read-write mount grant for the VM that holds the domain read-write now: with it,
    /// that host's secure component re-encrypts the volume online, while the VM runs
    /// (docs/PROTOCOL.md "Online re-encryption"). Without it, or with no read-write
    /// attachment, the next read-write attach re-encrypts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_grant: Option<SignedEnvelope>,
}

/// `DELETE /v1/domains/{id}` with this body: the owner-signed deletion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteDomainBody {
    /// The deletion (`"SKYDD-DELETION\x01"`, docs/PROTOCOL.md "Deletion"), signed by the
    /// domain's owner; the TTP tombstones the domain before the volume is destroyed.
    pub deletion: SignedEnvelope,
}

/// A domain as the CP shows it (no key, ever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainView {
    /// The domain id: 32 lowercase hex characters.
    pub id: String,
    /// Certificate name of the domain manager that owns the domain and signs its descriptors.
    pub owner: String,
    /// Descriptor version in force (registered with the TTP), starting at 1.
    pub version: u64,
    /// The descriptor's metadata, bound into the domain key (docs/PROTOCOL.md "Key derivation").
    pub metadata: BTreeMap<String, String>,
    /// The access list in force: which VMs may open the volume, and how.
    pub acl: Vec<AclEntry>,
    /// Names of the domain managers the owner shares the domain with (they may sign grants).
    pub shared_with: Vec<String>,
    /// Size of the data area in bytes (the volume file is 1 MiB larger).
    pub size_bytes: u64,
    /// "available", "in-use" (attached somewhere), "deleted".
    pub status: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The volume header as stored (owner-signed descriptor + TTP registration), so a
    /// domain manager can build the next version from exactly what is registered.
    pub header: HeaderRecord,
    /// In the answer to a key rotation: where the volume is being re-encrypted ("online on
    /// host H for VM V"), or why it waits for the next read-write attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re_encryption: Option<String>,
}

/// `GET /v1/domains?limit=N&marker=ID`: the caller's domains (owned or shared with it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainList {
    /// The domains on this page.
    pub domains: Vec<DomainView>,
    /// Pass as `marker` to get the next page; absent on the last page.
    pub next_marker: Option<String>,
}

// ---- cloud platform: instances ---------------------------------------------------------------

/// `POST /v1/instances` (caller: the cloud-platform operator identity only): records that VM
/// `id` runs on compute host `host`. Placement is the operator's; tenants can neither place
/// nor list instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The VM id (1–64 name characters); ACL entries and grants name VMs by it.
    pub id: String,
    /// The compute host's id (its secure component's certificate name).
    pub host: String,
}

/// `GET /v1/instances?limit&marker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceList {
    /// The instances on this page.
    pub instances: Vec<Instance>,
    /// Pass as `marker` to get the next page; absent on the last page.
    pub next_marker: Option<String>,
}

/// `POST /v1/hosts` (operator): where a compute host's secure component listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeHost {
    /// The host id: the CN of its secure component's certificate, matched by the TTP at enrollment
    /// and key release.
    pub id: String,
    /// e.g. "https://127.0.0.1:7600"
    pub agent_url: String,
}

// ---- statuses -----------------------------------------------------------------------------------

/// A status enum whose JSON and `Display` form is one lowercase word per variant, with
/// `as_str` and a `FromStr` that refuses any other word.
macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// The status as it is on the wire (and in the cloud platform's database).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(text: &str) -> Result<Self> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(Error::malformed($what, format!("{other:?} is not one of {}", [$($text),+].join(", ")))),
                }
            }
        }
    };
}

status_enum! {
    /// Where an attachment is in its life, as the cloud platform records it
    /// (docs/CLOUD-API.md "Cloud platform behaviour").
    AttachmentStatus, "attachment status" {
        /// Written ahead before the CP asks the host to attach; `attached` once the host
        /// answered, or settled by the CP's reconciliation with the host if the answer never
        /// came.
        Attaching = "attaching",
        /// The VM has the volume.
        Attached = "attached",
        /// The CP asked the host to detach (revocation, deletion) and the host did not
        /// confirm; `DELETE /v1/attachments/{id}` and the reconciliation with the host retry.
        Detaching = "detaching",
        /// Closed: the host no longer has the mapping, or never attached it.
        Detached = "detached",
    }
}

impl AttachmentStatus {
    /// Whether the attachment may still hold a mapping on its host (anything but `detached`).
    pub fn is_open(self) -> bool {
        self != Self::Detached
    }
}

status_enum! {
    /// What a secure component holds of one mapping ([`AgentAttachment::status`]); the
    /// default, `attached`, is what an older agent's answer without a status means.
    #[derive(Default)]
    MappingStatus, "mapping status" {
        /// The VM has the file system or device now.
        #[default]
        Attached = "attached",
        /// The SC has a record but the mapping or the VM's mount is gone (e.g. a userspace
        /// mapping that ended with the previous SC process); `DELETE` cleans it up, then
        /// attach again.
        Stale = "stale",
        /// In the answer to `DELETE`: the mapping is closed and its record removed.
        Detached = "detached",
    }
}

// ---- cloud platform: attachments ---------------------------------------------------------------

/// `POST /v1/attachments` (caller: a domain manager of the domain).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAttachmentRequest {
    /// The domain to attach.
    pub domain_id: String,
    /// The VM (an [`Instance`] id) that gets the volume; it must be in the domain's ACL.
    pub instance_id: String,
    /// Read-only or read-write; the ACL entry and the grant must both cover it.
    pub mode: AccessMode,
    /// The mount grant signed by the owner or a manager the domain is shared with.
    pub grant: SignedEnvelope,
}

/// One attachment of a domain's volume to a VM, as the cloud platform records it
/// (docs/CLOUD-API.md "Cloud platform behaviour").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Attachment id chosen by the cloud platform; also the id on the secure component.
    pub id: String,
    /// The attached domain.
    pub domain_id: String,
    /// The VM the volume is attached to.
    pub instance_id: String,
    /// The compute host the VM runs on (where the key was released).
    pub host: String,
    /// Mode the volume is open in.
    pub mode: AccessMode,
    /// The plaintext block device on the host (e.g. /dev/loop3 or /dev/dm-0).
    pub device: String,
    /// Where the filesystem is usable by the VM (local driver) or the libvirt target.
    pub mount_path: String,
    /// Domain version whose key opened it.
    pub version: u64,
    /// Where the attachment is in its life ([`AttachmentStatus`]).
    pub status: AttachmentStatus,
}

/// `GET /v1/attachments?limit&marker[&domain_id]`: one page of attachments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachmentList {
    /// The attachments on this page.
    pub attachments: Vec<Attachment>,
    /// Pass as `marker` to get the next page; absent on the last page.
    pub next_marker: Option<String>,
}

// ---- secure component agent API (caller: the cloud platform) -----------------------------------

/// CP → SC `POST /v1/attachments`: run the attach flow (docs/CLOUD-API.md "Message sequence: attach") for one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentAttachRequest {
    /// The cloud platform's attachment id; the SC keys its record and its `DELETE` by it.
    pub attachment_id: String,
    /// The VM to attach to; the TTP checks it against the ACL and the grant.
    pub vm_id: String,
    /// Mode to open the volume in; `ro` opens the mapping and the file system read-only.
    pub mode: AccessMode,
    /// The header record the CP read from the volume; the SC refuses unless it is exactly the
    /// header in force in `volume_path`.
    pub header: HeaderRecord,
    /// The mount grant the SC forwards to the TTP in its key release request (single use).
    pub grant: SignedEnvelope,
    /// The cloud platform's signed placement of `vm_id` on this host for this grant
    /// ([`crate::messages::Placement`]), forwarded to the TTP with the grant.
    pub placement: SignedEnvelope,
    /// The volume file or block device holding header + data (shared storage).
    pub volume_path: String,
}

/// CP → SC `POST /v1/attachments/{id}/rotation`: re-encrypt the volume of this read-write
/// attachment online, to the key generation its header now names (docs/PROTOCOL.md "Online
/// re-encryption"). The SC releases both keys like an attach does (grant, placement, quote).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRotateRequest {
    /// The header record with the rotation, as the CP wrote it; the SC refuses unless it is
    /// exactly the header in force on the attachment's volume.
    pub header: HeaderRecord,
    /// A read-write mount grant for the attachment's VM (single use, like an attach's).
    pub grant: SignedEnvelope,
    /// The CP's signed placement of the VM on this host for this grant.
    pub placement: SignedEnvelope,
}

/// SC → CP (202): the re-encryption started; it goes on in the background, and the header
/// holds no rotation any more when it is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRotation {
    /// The attachment whose volume is being re-encrypted.
    pub attachment_id: String,
    /// Its domain.
    pub domain_id: String,
    /// Its VM, which keeps reading and writing meanwhile.
    pub vm_id: String,
    /// Data sectors (4096 bytes) to move.
    pub data_sectors: u64,
}

/// SC → CP: what was attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAttachment {
    /// The CP's attachment id from the request.
    pub attachment_id: String,
    /// The domain whose volume was opened.
    pub domain_id: String,
    /// The VM it was attached to.
    pub vm_id: String,
    /// The mode it was opened in.
    pub mode: AccessMode,
    /// Domain version whose released key opened the volume.
    pub version: u64,
    /// The plaintext block device on the host (e.g. /dev/loop3 or /dev/dm-0).
    pub device: String,
    /// Where the file system is usable by the VM (local driver) or the libvirt target.
    pub mount_path: String,
    /// The backend that opened it: "dm-crypt" or "userspace".
    pub backend: String,
    /// What the host holds of the mapping ([`MappingStatus`]). Absent in answers of older
    /// agents: read as `attached`.
    #[serde(default)]
    pub status: MappingStatus,
    /// Why the attachment is stale, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}

/// SC `GET /v1/attachments`: the mappings open on this host (also after a restart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentAttachmentList {
    /// Every attachment this SC holds a record of, with its status.
    pub attachments: Vec<AgentAttachment>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_the_lowercase_words_on_the_wire() {
        for status in [
            AttachmentStatus::Attaching,
            AttachmentStatus::Attached,
            AttachmentStatus::Detaching,
            AttachmentStatus::Detached,
        ] {
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{status}\""));
            assert_eq!(status.as_str().parse::<AttachmentStatus>().unwrap(), status);
            assert_eq!(serde_json::from_str::<AttachmentStatus>(&json).unwrap(), status);
        }
        for status in [MappingStatus::Attached, MappingStatus::Stale, MappingStatus::Detached] {
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{}\"", status.as_str()));
            assert_eq!(status.to_string().parse::<MappingStatus>().unwrap(), status);
        }
        assert!("stale".parse::<AttachmentStatus>().is_err());
        assert!("Attached".parse::<MappingStatus>().is_err());
    }
}
