//! The volume backend in use (dm-crypt, the userspace engine, or that engine over vhost-user) as the agent sees it: which
//! mapping a domain gets on a VM, whether that mapping is live, stale or gone, and how to
//! tear it down in whatever state it is.

use crate::error::Result;
use crate::volume::dmcrypt::DmCryptBackend;
use crate::volume::userspace::UserspaceBackend;
use crate::volume::vhost_user::VhostUserBlkBackend;
use crate::volume::VolumeBackend;

/// The volume backend in use.
pub enum Backend {
    /// The kernel's dm-crypt: mappings survive an agent restart.
    DmCrypt(DmCryptBackend),
    /// The userspace engine: mappings live only as long as this process.
    Userspace(UserspaceBackend),
    /// The userspace engine served to a qemu guest as a vhost-user-blk disk: mappings live
    /// only as long as this process and its frontend's connection.
    VhostUser(VhostUserBlkBackend),
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
    pub(super) fn get(&self) -> &dyn VolumeBackend {
        match self {
            Backend::DmCrypt(b) => b,
            Backend::Userspace(b) => b,
            Backend::VhostUser(b) => b,
        }
    }

    /// "dm-crypt", "userspace" or "vhost-user": what `/v1/health` and the attachment records report.
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
            Backend::VhostUser(b) => Ok(match b.list_detailed()?.into_iter().find(|s| s.name == name) {
                None => MappingState::Absent,
                Some(s) => match s.stale {
                    None => MappingState::Live,
                    Some(reason) => MappingState::Stale(reason),
                },
            }),
        }
    }

    /// Tears down a mapping in whatever state it is.
    pub(super) fn remove(&self, name: &str) -> Result<()> {
        match self.state(name)? {
            MappingState::Live => self.get().close(name),
            MappingState::Stale(_) => match self {
                // Removes every stale leftover (loop device, dead FUSE mount, record); the
                // others are dead too, and their own detach finds nothing left to do.
                Backend::Userspace(b) => b.cleanup_stale().map(|_| ()),
                Backend::DmCrypt(b) => b.close(name),
                // A mapping whose frontend hung up: closing wipes its key and socket.
                Backend::VhostUser(b) => b.close(name),
            },
            MappingState::Absent => Ok(()),
        }
    }
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
}
