//! Volume backends on a compute host: one trait over dm-crypt (kernel) and the userspace
//! engine (FUSE + loop). Both read the on-disk format of docs/FORMAT.md byte for byte; its
//! data-area geometry and the AES-XTS engine live in the `skydd_volume` crate, the kernel
//! interfaces they drive in [`crate::sys`].

pub mod dmcrypt;
mod engine;
pub mod filesystem;
pub mod userspace;
pub mod vhost_user;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::refusal::Refusal;
use protocol::secret::SecretBytes;
use skydd_volume::integrity::{Anchor, Authority};

use crate::error::{Error, Result};
use crate::sys::loopdev::LoopError;

/// How a volume is opened; read-only mappings refuse writes at the block layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Writes are refused at the block layer (dm-crypt read-only table, FUSE file opened
    /// read-only).
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

/// An opened volume: a plaintext block device the hypervisor driver can attach.
#[derive(Debug, Clone)]
pub struct OpenVolume {
    /// Stable name of the mapping (e.g. `skydd-<domain id>`), used to find it again after
    /// a restart.
    pub name: String,
    /// The plaintext block device (/dev/dm-N or /dev/loopN).
    pub device: PathBuf,
    /// Whether the mapping was opened read-only or read-write.
    pub mode: OpenMode,
}

/// A way to turn an encrypted volume plus its key into a plaintext block device
/// ([`dmcrypt::DmCryptBackend`], [`userspace::UserspaceBackend`]).
pub trait VolumeBackend: Send + Sync {
    /// Short name for logs and errors ("dm-crypt", "userspace").
    fn kind(&self) -> &'static str;
    /// Opens the data area (from 1 MiB) of the volume file or device at `volume` with the
    /// 64-byte AES-256-XTS `key`. The backend must not keep the key after this returns
    /// except inside the kernel or its own locked buffer.
    fn open(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume>;
    /// Opens a format-2 volume (docs/FORMAT.md "Version 2"): sectors verified against their
    /// tags and the tree against `integrity.anchor`, each flush committed to the TTP. A
    /// backend that cannot keep that refuses (`integrity_unsupported`) rather than serve the
    /// volume without it.
    fn open_authenticated(
        &self,
        name: &str,
        volume: &Path,
        key: &SecretBytes,
        integrity: IntegrityOpen,
        mode: OpenMode,
    ) -> Result<OpenVolume> {
        let _ = (name, volume, key, integrity, mode);
        Err(Error::Integrity {
            refusal: Refusal::IntegrityUnsupported,
            message: format!(
                "the {} backend cannot keep a format-2 volume's sector tags and hash tree, so it refuses the volume \
                 instead of serving it without integrity; use backend = \"userspace\"",
                self.kind()
            ),
        })
    }
    /// The plaintext sector device this process serves mapping `name` from, for a
    /// re-encryption under the live mapping (docs/PROTOCOL.md "Online re-encryption"). A
    /// backend whose mapping lives in the kernel (dm-crypt: one key per table) refuses.
    fn live_device(&self, name: &str) -> Result<Arc<dyn skydd_volume::device::SectorDevice>> {
        let _ = name;
        Err(Error::Volume(format!(
            "the {} backend cannot re-encrypt a volume under a live mapping (the kernel's table holds one key); \
             the rotation finishes at the next read-write attach",
            self.kind()
        )))
    }
    /// Closes the mapping and wipes the key everywhere the backend put it.
    fn close(&self, name: &str) -> Result<()>;
    /// The mappings this backend has open now (after a restart too).
    fn list(&self) -> Result<Vec<OpenVolume>>;
}

/// Closes the mappings `names` of a backend that serves them from this process (userspace,
/// vhost-user) as it is dropped; what cannot be closed is logged, not fatal.
fn close_at_shutdown(backend: &dyn VolumeBackend, names: Vec<String>) {
    for name in names {
        if let Err(e) = backend.close(&name) {
            tracing::warn!(%name, kind = backend.kind(), error = %e, "closing a mapping on shutdown failed");
        }
    }
}

/// What opening a format-2 volume needs beyond the XTS key.
pub struct IntegrityOpen {
    /// The 32-byte sector-tag key `K_mac` the TTP released with the volume key.
    pub mac_key: SecretBytes,
    /// The domain (bound into every tag and the root).
    pub domain_id: String,
    /// The newest committed state the TTP returned; `None` before the first commit.
    pub anchor: Option<Anchor>,
    /// Where roots are committed and violations reported (the TTP).
    pub authority: Arc<dyn Authority>,
}

impl IntegrityOpen {
    /// Opens the format-2 volume in `file` with the XTS `key` and these keys and anchor (the
    /// one construction both backends use).
    pub fn open_volume(
        self,
        file: std::fs::File,
        key: &SecretBytes,
        read_only: bool,
    ) -> Result<(skydd_volume::integrity::IntegrityVolume, skydd_volume::integrity::Opened)> {
        let tagger = skydd_volume::integrity::tag::Tagger::new(&self.mac_key, &self.domain_id)?;
        let xts = skydd_volume::xts::XtsEngine::new(key)?;
        Ok(skydd_volume::integrity::IntegrityVolume::open(
            Arc::new(file),
            xts,
            tagger,
            self.anchor,
            read_only,
            self.authority,
        )?)
    }
}

/// The engine's refusals keep their message ("AES-XTS engine: ...") and answer
/// `volume_failed` like every other volume error.
impl From<skydd_volume::Error> for Error {
    fn from(e: skydd_volume::Error) -> Self {
        use skydd_volume::ViolationKind;
        match e {
            skydd_volume::Error::Xts(detail) => Error::Xts(detail),
            e @ skydd_volume::Error::Integrity { kind: ViolationKind::Rollback, .. } => {
                Error::Integrity { refusal: Refusal::IntegrityRollback, message: e.to_string() }
            }
            e @ skydd_volume::Error::Integrity { .. } => {
                Error::Integrity { refusal: Refusal::IntegrityViolation, message: e.to_string() }
            }
            e @ skydd_volume::Error::Unsupported(_) => {
                Error::Integrity { refusal: Refusal::IntegrityUnsupported, message: e.to_string() }
            }
            skydd_volume::Error::Io { context, source } => Error::io(context, source),
            e
            @ (skydd_volume::Error::Layout(_) | skydd_volume::Error::Commit(_) | skydd_volume::Error::Rotation(_)) => {
                Error::Volume(e.to_string())
            }
        }
    }
}

/// A loop device that could not be set up: the OS error with what was being done
/// (`io_failed`), or no free device after every retry (`volume_failed`).
impl From<LoopError> for Error {
    fn from(e: LoopError) -> Self {
        match e {
            LoopError::Os { context, source } => Error::io(context, source),
            LoopError::NoneFree => Error::Volume(LoopError::NoneFree.to_string()),
        }
    }
}
