//! One JSON file per attachment in `<state_dir>/attachments/`: what the agent needs to
//! report and undo an attachment after a restart. Never key material.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;

use protocol::domain::AccessMode;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the agent remembers of one attachment, as JSON in
/// `<state_dir>/attachments/<attachment_id>.json`. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRecord {
    /// The cloud platform's attachment id; also the file name.
    pub attachment_id: String,
    /// The domain attached.
    pub domain_id: String,
    /// The VM it is attached to.
    pub vm_id: String,
    /// `ro` or `rw`: the mode the key was released for and the volume opened with.
    pub mode: AccessMode,
    /// Domain version whose key opened it.
    pub version: u64,
    /// The backend's mapping name (`skydd-<domain>-<vm>`).
    pub mapping: String,
    /// The plaintext block device.
    pub device: PathBuf,
    /// Where the driver put it: the mount directory (local) or the libvirt target.
    pub location: String,
    /// "dm-crypt" or "userspace".
    pub backend: String,
    /// "local" or "libvirt".
    pub hypervisor: String,
    /// The encrypted volume file or device that was opened.
    pub volume_path: PathBuf,
    /// Unix seconds.
    pub attached_at: u64,
    /// The agent process that attached it.
    pub pid: u32,
    /// Set when the agent stopped and had to end the mapping (userspace engine): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    /// The partner cloud (`[[partner]]` name) whose cloud platform attached it and whose TTP
    /// released its key; absent for the home cloud. Only that cloud platform lists and
    /// detaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
}

/// The records directory.
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// Opens the directory `dir`, creating it if missing.
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    fn path(&self, attachment_id: &str) -> PathBuf {
        self.dir.join(format!("{attachment_id}.json"))
    }

    /// Writes the record atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, record: &AttachmentRecord) -> Result<()> {
        let path = self.path(&record.attachment_id);
        let tmp = self.dir.join(format!(".{}.tmp", record.attachment_id));
        let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Volume(format!("encoding record: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| Error::io(format!("writing attachment record {}", path.display()), e))
    }

    /// The record of `attachment_id`, `None` if there is none; a record that does not parse
    /// is an error naming the file.
    pub fn load(&self, attachment_id: &str) -> Result<Option<AttachmentRecord>> {
        let path = self.path(attachment_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Volume(format!("attachment record {} is not valid: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Deletes the record of `attachment_id`; a missing record is not an error (detach may be
    /// repeated).
    pub fn remove(&self, attachment_id: &str) -> Result<()> {
        let path = self.path(attachment_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Every record, ordered by attachment id. An unreadable record is an error (it names
    /// the file) rather than silently skipped.
    pub fn list(&self) -> Result<Vec<AttachmentRecord>> {
        let mut out = Vec::new();
        let dir = std::fs::read_dir(&self.dir).map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
        for entry in dir {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
            let path = entry.path();
            let name = entry.file_name();
            if path.extension() != Some(OsStr::new("json")) || name.to_string_lossy().starts_with('.') {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let record: AttachmentRecord = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Volume(format!("attachment record {} is not valid: {e}", path.display())))?;
            out.push(record);
        }
        out.sort_by(|a, b| a.attachment_id.cmp(&b.attachment_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_hold_no_key() {
        let dir = std::env::temp_dir().join(format!("skydd-records-{}", std::process::id()));
        let store = RecordStore::open(dir.clone()).unwrap();
        let record = AttachmentRecord {
            attachment_id: "att-1".into(),
            domain_id: "d1".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            version: 3,
            mapping: "skydd-d1-vm-a".into(),
            device: "/dev/loop3".into(),
            location: "/vms/vm-a/d1".into(),
            backend: "userspace".into(),
            hypervisor: "local".into(),
            volume_path: "/data/d1.img".into(),
            attached_at: 1,
            pid: 42,
            interrupted: None,
            partner: Some("cloud-a".into()),
        };
        store.save(&record).unwrap();
        assert_eq!(store.load("att-1").unwrap(), Some(record.clone()));
        assert_eq!(store.list().unwrap(), vec![record]);
        let text = std::fs::read_to_string(dir.join("att-1.json")).unwrap();
        assert!(!text.contains("key"), "{text}");
        store.remove("att-1").unwrap();
        store.remove("att-1").unwrap();
        assert!(store.list().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
