//! The cloud platform's persistent state behind one small trait, implemented once
//! ([`SqlStore`]) over SQLite (the embedded default) and PostgreSQL (for replicas). It holds routing and bookkeeping only: never a key, and never a volume
//! header (the header holds the nonce `r`; it lives only in the volume file, so destroying
//! the file's header crypto-shreds the domain without a copy left in this database).

use std::path::PathBuf;

use protocol::cloud::{Attachment, AttachmentStatus, ComputeHost, Instance};

use crate::error::Result;

mod page;
mod sql;
#[cfg(test)]
mod tests;

pub use page::Page;
pub use skydd_sql::Database;
pub use sql::SqlStore;

/// What the CP records about a domain (the descriptor itself is in the volume header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRecord {
    /// The domain id: 32 lowercase hex characters, from the descriptor.
    pub id: String,
    /// The owner's certificate name; only the owner may update or delete the domain.
    pub owner: String,
    /// Domain managers the newest version is shared with.
    pub shared_with: Vec<String>,
    /// Newest version whose header was written.
    pub version: u64,
    /// Size of the data area in bytes (the volume file is 1 MiB larger).
    pub size_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The volume file (`data_dir/volumes/<id>.vol`).
    pub volume_path: PathBuf,
    /// Unix seconds of the deletion, if deleted.
    pub deleted_at: Option<u64>,
}

impl DomainRecord {
    /// Whether `name` may act for the domain (owner or shared with).
    pub fn is_manager(&self, name: &str) -> bool {
        self.owner == name || self.shared_with.iter().any(|m| m == name)
    }
}

/// A descriptor update the CP accepted but has not finished (written ahead, before the TTP
/// is asked): kill -9, a lost TTP, or a domain manager gone mid-request leave it here, and
/// the CP finishes it (docs/CLOUD-API.md, "Unfinished updates"). It holds the owner's signed
/// descriptor only; never a registration, which carries `r`. A key rotation is written
/// ahead the same way, with `version` 0 and the owner's signed `KeyRotation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpdate {
    /// The domain being updated.
    pub domain_id: String,
    /// The version of the pending descriptor.
    pub version: u64,
    /// The owner's signed descriptor, as sent in the update.
    pub descriptor: protocol::signing::SignedEnvelope,
    /// Unix seconds.
    pub recorded_at: u64,
}

/// Which attachments to list.
#[derive(Debug, Clone, Default)]
pub struct AttachmentFilter {
    /// Only attachments of domains this domain manager owns or shares.
    pub manager: Option<String>,
    /// Only attachments of this domain (`?domain_id=`).
    pub domain_id: Option<String>,
}

/// The cloud platform's persistent state (see the module documentation); [`SqlStore`]
/// is the implementation. Methods block: callers run them off the async workers.
pub trait CpStore: Send + Sync {
    /// Inserts or replaces a compute host.
    fn put_host(&self, host: &ComputeHost) -> Result<()>;
    /// The host `id`, if registered.
    fn host(&self, id: &str) -> Result<Option<ComputeHost>>;
    /// Every registered host, by id.
    fn hosts(&self) -> Result<Vec<ComputeHost>>;

    /// Inserts or replaces an instance (a VM moved to another host).
    fn put_instance(&self, instance: &Instance) -> Result<()>;
    /// The instance `id`, if registered.
    fn instance(&self, id: &str) -> Result<Option<Instance>>;
    /// Up to `page.limit + 1` instances after the marker, by id.
    fn instances(&self, page: &Page) -> Result<Vec<Instance>>;

    /// Fails with `domain_exists` if the id is taken.
    fn insert_domain(&self, record: &DomainRecord) -> Result<()>;
    /// The domain `id`, deleted or not; `None` if it was never created.
    fn domain(&self, id: &str) -> Result<Option<DomainRecord>>;
    /// Up to `page.limit + 1` live domains `manager` owns or shares, by id.
    fn domains_for(&self, manager: &str, page: &Page) -> Result<Vec<DomainRecord>>;
    /// How many live domains `owner` has and the sum of their declared sizes in bytes
    /// (what the quota counts).
    fn owner_usage(&self, owner: &str) -> Result<(u64, u64)>;
    /// Records a new version written to the header (and its shared-with list), and ends a
    /// pending update of that version or older, in one transaction.
    fn update_domain(&self, id: &str, version: u64, shared_with: &[String]) -> Result<()>;
    /// Marks a domain deleted and drops its pending update.
    fn mark_domain_deleted(&self, id: &str, at: u64) -> Result<()>;

    /// Writes an update ahead of asking the TTP (replaces an older pending one).
    fn record_pending_update(&self, pending: &PendingUpdate) -> Result<()>;
    /// The pending update of `domain_id`, if any.
    fn pending_update(&self, domain_id: &str) -> Result<Option<PendingUpdate>>;
    /// Every pending update, by domain id (start-up).
    fn pending_updates(&self) -> Result<Vec<PendingUpdate>>;
    /// Forgets a pending update the TTP refused.
    fn drop_pending_update(&self, domain_id: &str) -> Result<()>;

    /// Records a new attachment (usually `attaching`, written ahead of asking the host);
    /// `created_at` in Unix seconds.
    fn insert_attachment(&self, attachment: &Attachment, created_at: u64) -> Result<()>;
    /// The attachment `id` in any status, if it exists.
    fn attachment(&self, id: &str) -> Result<Option<Attachment>>;
    /// Up to `page.limit + 1` attachments after the marker, by id.
    fn attachments(&self, filter: &AttachmentFilter, page: &Page) -> Result<Vec<Attachment>>;
    /// Attachments of a domain that are not detached (attached, or detaching).
    fn open_attachments_of_domain(&self, domain_id: &str) -> Result<Vec<Attachment>>;
    /// Sets the status of attachment `id`.
    fn set_attachment_status(&self, id: &str, status: AttachmentStatus) -> Result<()>;
    /// Records what the host made of an `attaching` attachment: device, mount path, version,
    /// and the status `attached`.
    fn complete_attachment(&self, attachment: &Attachment) -> Result<()>;
    /// Forgets an `attaching` attachment the host refused (it never existed).
    fn delete_attachment(&self, id: &str) -> Result<()>;
}
