//! Volume files: `data_dir/volumes/<domain_id>.vol`, a sparse file of the 1 MiB header area
//! plus the data area (docs/FORMAT.md). The CP writes only the header area; the data area
//! is ciphertext written by secure components, and the CP never holds a key.
//!
//! - **create**: the header (slot 0, sequence 1) goes into `<id>.vol.tmp`, which is sized
//!   with `set_len` (a hole, no blocks allocated), fsynced and renamed into place; the
//!   directory is fsynced.
//! - **update**: the new header goes into the slot that is NOT in force, with the next
//!   sequence number, then fsync. A write torn by a crash leaves that slot with a bad
//!   checksum and the previous header still wins.
//! - **destroy**: both slots (the whole 1 MiB header area) are overwritten with zeros and
//!   fsynced, then the file is removed. This is crypto-shredding: the header holds the
//!   nonce `r`, and without `r` the TTP cannot derive the key again (the TTP's tombstone
//!   refuses it anyway). The overwrite is belt and braces; it is not relied on for the
//!   data area, whose ciphertext stays useless without the key, and not on storage that
//!   remaps writes (SSDs, copy-on-write filesystems, snapshots).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use protocol::format::{self, ActiveHeader, DATA_OFFSET, HEADER_AREA_SIZE, SECTOR_SIZE};
use protocol::messages::HeaderRecord;
use protocol::refusal::Refusal;

use crate::error::{Error, Result};

/// Where the volume files live.
#[derive(Debug, Clone)]
pub struct Volumes {
    dir: PathBuf,
    max_bytes: u64,
}

/// The header in force on a volume and which slot holds it.
#[derive(Debug, Clone)]
pub struct VolumeHeader {
    /// The header record in force (descriptor, owner signature, TTP registration).
    pub record: HeaderRecord,
    /// The slot holding it: 0 or 1 (docs/FORMAT.md, "Header area").
    pub slot: usize,
    /// Its sequence number; the next update writes the other slot with `seq + 1`.
    pub seq: u64,
    /// The other slot, if it was not usable, and why (never written, torn, damaged).
    pub skipped: Option<String>,
}

fn io_err(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> Error {
    Error::Volume(format!("{what} {}: {e}", path.display()))
}

impl Volumes {
    /// `dir` is created if missing and made absolute (secure components get absolute paths).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let dir = dir.canonicalize().map_err(|e| io_err("resolve", dir, e))?;
        Ok(Self { dir, max_bytes })
    }

    /// The absolute directory of the volume files (`data_dir/volumes`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The volume file of `domain_id` (validated as 32 lowercase hex characters by the
    /// descriptor decoder before it gets here; checked again so no path can escape).
    pub fn path_of(&self, domain_id: &str) -> Result<PathBuf> {
        if domain_id.len() != 32 || !domain_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::BadRequest(format!("domain id {domain_id:?} is not 32 lowercase hex characters")));
        }
        Ok(self.dir.join(format!("{domain_id}.vol")))
    }

    /// Checks a requested data-area size: positive, a multiple of the 4096-byte sector,
    /// at most the configured limit.
    pub fn check_size(&self, size_bytes: u64) -> Result<()> {
        let sector = SECTOR_SIZE as u64;
        if size_bytes == 0 {
            return Err(Error::InvalidSize("size_bytes is 0: a volume needs at least one 4096-byte sector".into()));
        }
        if !size_bytes.is_multiple_of(sector) {
            let down = size_bytes / sector * sector;
            let up = down + sector;
            return Err(Error::InvalidSize(format!(
                "size_bytes {size_bytes} is not a multiple of the 4096-byte sector size (try {} or {up})",
                if down == 0 { up } else { down }
            )));
        }
        if size_bytes > self.max_bytes {
            return Err(Error::InvalidSize(format!(
                "size_bytes {size_bytes} exceeds this cloud's limit of {} bytes per volume",
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Creates the volume of `domain_id`: header `record` in slot 0 (sequence 1) and a hole
    /// of `size_bytes` after the header area. Refuses to replace an existing volume.
    pub fn create(&self, domain_id: &str, size_bytes: u64, record: &HeaderRecord) -> Result<PathBuf> {
        self.check_size(size_bytes)?;
        let path = self.path_of(domain_id)?;
        if path.exists() {
            return Err(Error::Conflict {
                code: Refusal::DomainExists,
                message: format!("a volume for domain {domain_id} already exists"),
            });
        }
        let tmp = self.dir.join(format!("{domain_id}.vol.tmp"));
        let slot =
            format::encode_slot(1, &record.encode()).map_err(|e| Error::BadRequest(format!("volume header: {e}")))?;
        let result = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io_err("create", &tmp, e))?;
            file.set_len(DATA_OFFSET + size_bytes).map_err(|e| io_err("size", &tmp, e))?;
            file.write_all_at(&slot, format::slot_offset(0)).map_err(|e| io_err("write header to", &tmp, e))?;
            file.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io_err("rename into place", &path, e))?;
            sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }

    /// The header in force on the volume at `path` (the newer valid slot).
    pub fn read_header(&self, path: &Path) -> Result<VolumeHeader> {
        let active = read_active(path)?;
        let record = HeaderRecord::decode(&active.payload)
            .map_err(|e| Error::Volume(format!("header of {} (slot {}): {e}", path.display(), active.slot)))?;
        Ok(VolumeHeader {
            record,
            slot: active.slot,
            seq: active.seq,
            skipped: active.skipped.map(|(slot, why)| format!("slot {slot}: {why}")),
        })
    }

    /// Writes `change(record in force)` into the slot that is not in force, with the next
    /// sequence number, and fsyncs, all under the volume's header lock. Returns the new
    /// header's slot, sequence number and record.
    pub fn update_header(
        &self,
        path: &Path,
        change: impl FnOnce(&HeaderRecord) -> Result<HeaderRecord>,
    ) -> Result<(usize, u64, HeaderRecord)> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_err("open", path, e))?;
        // The header lock (an exclusive flock, released when `file` closes): a secure
        // component re-encrypting this volume online records its progress under it, and
        // the record read here must be the one in force when the next one is written.
        file.lock().map_err(|e| io_err("lock the header of", path, e))?;
        let mut area = vec![0u8; HEADER_AREA_SIZE];
        file.read_exact_at(&mut area, 0).map_err(|e| io_err("read the header area of", path, e))?;
        let active =
            format::decode_header_area(&area).map_err(|e| Error::Volume(format!("{}: {e}", path.display())))?;
        let on_volume = HeaderRecord::decode(&active.payload)
            .map_err(|e| Error::Volume(format!("the header record of {}: {e}", path.display())))?;
        let record = change(&on_volume)?;
        let (slot, seq) = format::next_slot_for_update(Some(&active)).map_err(|e| Error::Volume(e.to_string()))?;
        let bytes =
            format::encode_slot(seq, &record.encode()).map_err(|e| Error::BadRequest(format!("volume header: {e}")))?;
        file.write_all_at(&bytes, format::slot_offset(slot)).map_err(|e| io_err("write header to", path, e))?;
        file.sync_all().map_err(|e| io_err("fsync", path, e))?;
        Ok((slot, seq, record))
    }

    /// Crypto-shreds the volume at `path`: zeros over the whole header area (both slots),
    /// fsync, then remove the file and fsync the directory. A missing file is not an error
    /// (a retried deletion).
    pub fn destroy(&self, path: &Path) -> Result<()> {
        let file = match OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("open", path, e)),
        };
        let len = file.metadata().map_err(|e| io_err("stat", path, e))?.len();
        let zeros = vec![0u8; HEADER_AREA_SIZE.min(len as usize)];
        file.write_all_at(&zeros, 0).map_err(|e| io_err("overwrite the header area of", path, e))?;
        file.sync_all().map_err(|e| io_err("fsync", path, e))?;
        drop(file);
        std::fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
        sync_dir(&self.dir)
    }
}

/// Reads the header area of `path` and picks the slot in force.
pub fn read_active(path: &Path) -> Result<ActiveHeader> {
    let mut file = File::open(path).map_err(|e| io_err("open", path, e))?;
    let mut area = Vec::with_capacity(HEADER_AREA_SIZE);
    (&mut file)
        .take(HEADER_AREA_SIZE as u64)
        .read_to_end(&mut area)
        .map_err(|e| io_err("read the header area of", path, e))?;
    format::decode_header_area(&area).map_err(|e| Error::Volume(format!("{}: {e}", path.display())))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::signing::SignedEnvelope;

    fn record(tag: u8) -> HeaderRecord {
        let env =
            |m: Vec<u8>| SignedEnvelope { message: m, signature: vec![tag; 70], signer_certificate: vec![tag; 300] };
        HeaderRecord { descriptor: env(vec![tag; 500]), registration: env(vec![tag; 120]), rotation: None }
    }

    const ID: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::open(dir.path(), 1 << 30).unwrap();
        assert!(v.check_size(4096).is_ok());
        assert!(v.check_size(1 << 30).is_ok());
        let e = v.check_size(0).unwrap_err();
        assert_eq!(e.code(), "invalid_size");
        let e = v.check_size(10_000).unwrap_err().to_string();
        assert!(e.contains("not a multiple of the 4096-byte sector size (try 8192 or 12288)"), "{e}");
        let e = v.check_size(100).unwrap_err().to_string();
        assert!(e.contains("try 4096"), "{e}");
        let e = v.check_size((1 << 30) + 4096).unwrap_err().to_string();
        assert!(e.contains("exceeds this cloud's limit of 1073741824 bytes"), "{e}");
        assert!(v.path_of("../etc/passwd").is_err());
    }

    #[test]
    fn create_update_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::open(dir.path(), 1 << 40).unwrap();
        let path = v.create(ID, 1 << 30, &record(1)).unwrap();
        assert!(path.is_absolute());
        assert!(!dir.path().join(format!("{ID}.vol.tmp")).exists());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), DATA_OFFSET + (1 << 30));
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 2 * DATA_OFFSET, "sparse");
        let h = v.read_header(&path).unwrap();
        assert_eq!((h.slot, h.seq, h.record.clone()), (0, 1, record(1)));
        assert_eq!(v.create(ID, 4096, &record(1)).unwrap_err().code(), "domain_exists");

        assert_eq!(v.update_header(&path, |_| Ok(record(2))).unwrap(), (1, 2, record(2)));
        assert_eq!(v.update_header(&path, |_| Ok(record(3))).unwrap(), (0, 3, record(3)));
        let h = v.read_header(&path).unwrap();
        assert_eq!((h.slot, h.seq, h.record), (0, 3, record(3)));

        v.destroy(&path).unwrap();
        assert!(!path.exists());
        v.destroy(&path).unwrap();
    }
}
