//! The volume backends in use (dm-crypt, the userspace engine, or that engine over vhost-user)
//! as the agent sees them: which backend opens a domain for a VM, whether a mapping is live,
//! stale or gone, and how to tear it down in whatever state it is.
//!
//! With `backend = "auto"` on a host with device-mapper the agent holds two: dm-crypt for
//! every format-1 volume and every read-only format-2 volume (dm-verity pins its verified
//! sectors), and the userspace engine for a format-2 volume opened read-write, whose sector
//! tags and hash tree no kernel target keeps (docs/DMCRYPT.md "Format 2, read-write").

use crate::error::Result;
use crate::volume::dmcrypt::DmCryptBackend;
use crate::volume::userspace::UserspaceBackend;
use crate::volume::vhost_user::VhostUserBlkBackend;
use crate::volume::{OpenMode, VolumeBackend};

/// The volume backend in use.
pub enum Backend {
    /// The kernel's dm-crypt: mappings survive an agent restart.
    DmCrypt(DmCryptBackend),
    /// The userspace engine: mappings live only as long as this process.
    Userspace(UserspaceBackend),
    /// The userspace engine served to a qemu guest as a vhost-user-blk disk: mappings live
    /// only as long as this process and its frontend's connection.
    VhostUser(VhostUserBlkBackend),
    /// `backend = "auto"` where device-mapper works: dm-crypt, and the userspace engine for
    /// read-write format-2 volumes only.
    DmCryptAndEngine {
        /// Opens format-1 volumes and read-only format-2 volumes.
        kernel: DmCryptBackend,
        /// Opens read-write format-2 volumes.
        engine: UserspaceBackend,
    },
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

/// One backend of the agent's (two with [`Backend::DmCryptAndEngine`]).
#[derive(Clone, Copy)]
enum Part<'a> {
    DmCrypt(&'a DmCryptBackend),
    Userspace(&'a UserspaceBackend),
    VhostUser(&'a VhostUserBlkBackend),
}

impl<'a> Part<'a> {
    fn volume_backend(self) -> &'a dyn VolumeBackend {
        match self {
            Part::DmCrypt(b) => b,
            Part::Userspace(b) => b,
            Part::VhostUser(b) => b,
        }
    }

    fn names(self) -> Result<Vec<String>> {
        Ok(match self {
            Part::DmCrypt(b) => b.list()?.into_iter().map(|v| v.name).collect(),
            Part::Userspace(b) => b.list_detailed()?.into_iter().map(|s| s.record.name).collect(),
            Part::VhostUser(b) => b.list_detailed()?.into_iter().map(|s| s.name).collect(),
        })
    }

    fn state(self, name: &str) -> Result<MappingState> {
        match self {
            Part::DmCrypt(b) => {
                Ok(if b.list()?.iter().any(|v| v.name == name) { MappingState::Live } else { MappingState::Absent })
            }
            Part::Userspace(b) => Ok(match b.list_detailed()?.into_iter().find(|s| s.record.name == name) {
                None => MappingState::Absent,
                Some(s) => match s.stale {
                    None => MappingState::Live,
                    Some(reason) => MappingState::Stale(reason),
                },
            }),
            Part::VhostUser(b) => Ok(match b.list_detailed()?.into_iter().find(|s| s.name == name) {
                None => MappingState::Absent,
                Some(s) => match s.stale {
                    None => MappingState::Live,
                    Some(reason) => MappingState::Stale(reason),
                },
            }),
        }
    }

    fn remove(self, name: &str) -> Result<()> {
        match self.state(name)? {
            MappingState::Live => self.volume_backend().close(name),
            MappingState::Stale(_) => match self {
                // Removes every stale leftover (loop device, dead FUSE mount, record); the
                // others are dead too, and their own detach finds nothing left to do.
                Part::Userspace(b) => b.cleanup_stale().map(|_| ()),
                Part::DmCrypt(b) => b.close(name),
                // A mapping whose frontend hung up: closing wipes its key and socket.
                Part::VhostUser(b) => b.close(name),
            },
            MappingState::Absent => Ok(()),
        }
    }
}

impl Backend {
    /// The backend that opens most volumes here (the only one but with `DmCryptAndEngine`).
    fn primary(&self) -> Part<'_> {
        match self {
            Backend::DmCrypt(b) | Backend::DmCryptAndEngine { kernel: b, .. } => Part::DmCrypt(b),
            Backend::Userspace(b) => Part::Userspace(b),
            Backend::VhostUser(b) => Part::VhostUser(b),
        }
    }

    fn parts(&self) -> Vec<Part<'_>> {
        match self {
            Backend::DmCryptAndEngine { engine, .. } => vec![self.primary(), Part::Userspace(engine)],
            _ => vec![self.primary()],
        }
    }

    /// "dm-crypt", "userspace" or "vhost-user": the backend that opens most volumes here
    /// (what `/v1/health` reports; each attachment record names the one that opened it).
    pub fn kind(&self) -> &'static str {
        self.primary().volume_backend().kind()
    }

    /// The backend that opens a volume of this format (`format2`) in `mode`.
    pub(super) fn for_open(&self, format2: bool, mode: OpenMode) -> &dyn VolumeBackend {
        match self {
            Backend::DmCryptAndEngine { engine, .. } if format2 && mode == OpenMode::ReadWrite => engine,
            _ => self.primary().volume_backend(),
        }
    }

    /// The backend of `kind` (as an attachment record names it), if this agent runs it.
    pub(super) fn of_kind(&self, kind: &str) -> Option<&dyn VolumeBackend> {
        self.parts().into_iter().map(Part::volume_backend).find(|b| b.kind() == kind)
    }

    /// Whether some mappings are served from this process (the userspace engine, vhost-user),
    /// and so end with it.
    pub(super) fn serves_in_process(&self) -> bool {
        self.parts().iter().any(|p| !matches!(p, Part::DmCrypt(_)))
    }

    /// The names of every mapping the backends hold now (after a restart too).
    pub(super) fn mapping_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for part in self.parts() {
            names.extend(part.names()?);
        }
        Ok(names)
    }

    /// Whether the mapping `name` is live, stale or gone; used at listing and detach time to
    /// report `stale` attachments and to tear down what is left.
    pub fn state(&self, name: &str) -> Result<MappingState> {
        for part in self.parts() {
            let state = part.state(name)?;
            if state != MappingState::Absent {
                return Ok(state);
            }
        }
        Ok(MappingState::Absent)
    }

    /// Tears down a mapping in whatever state it is, in whichever backend holds it.
    pub(super) fn remove(&self, name: &str) -> Result<()> {
        for part in self.parts() {
            part.remove(name)?;
        }
        Ok(())
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
