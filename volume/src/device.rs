//! A volume's data area as the rest of the host sees it: whole plaintext sectors read,
//! written and flushed. Format 1 is [`PlainDevice`] (AES-XTS only); format 2 is
//! [`IntegrityVolume`](crate::integrity::IntegrityVolume), which also tags every sector and
//! commits the tree's root at each flush. The secure component serves either through the
//! same FUSE file.

use std::sync::Arc;

use crate::io::BlockIo;
use crate::layout::{data_sector_offset, SECTOR_SIZE};
use crate::xts::XtsEngine;
use crate::{Error, Result};

/// Whole-sector access to a volume's plaintext.
pub trait SectorDevice: Send + Sync {
    /// Data sectors (4096 bytes each).
    fn data_sectors(&self) -> u64;
    /// Reads sectors `[first, first + buf.len() / 4096)` as plaintext into `buf`.
    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes the plaintext sectors in `buf` from `first`; `buf` is encrypted in place
    /// (it holds ciphertext afterwards).
    fn write_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()>;
    /// Makes every completed write durable (and, for format 2, commits the new root).
    fn flush(&self) -> Result<()>;
}

/// Checks that `[first, first + len / 4096)` is whole sectors inside `data_sectors`.
pub(crate) fn check_range(data_sectors: u64, first: u64, len: usize) -> Result<u64> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::Layout(format!("a request of {len} bytes is not whole 4096-byte sectors")));
    }
    let count = (len / SECTOR_SIZE) as u64;
    if first.checked_add(count).is_none_or(|end| end > data_sectors) {
        return Err(Error::Layout(format!(
            "sectors {first}..{} lie beyond the data area of {data_sectors} sectors",
            first.saturating_add(count)
        )));
    }
    Ok(count)
}

/// Format 1: the data area encrypted with AES-256-XTS and nothing else.
pub struct PlainDevice {
    io: Arc<dyn BlockIo>,
    xts: XtsEngine,
    data_sectors: u64,
}

impl PlainDevice {
    /// Serves `data_sectors` sectors of the volume behind `io` through `xts`.
    pub fn new(io: Arc<dyn BlockIo>, xts: XtsEngine, data_sectors: u64) -> Self {
        Self { io, xts, data_sectors }
    }
}

impl SectorDevice for PlainDevice {
    fn data_sectors(&self) -> u64 {
        self.data_sectors
    }

    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.data_sectors, first, buf.len())?;
        self.io.read_exact_at(buf, data_sector_offset(first)).map_err(|e| Error::io("reading the data area", e))?;
        self.xts.decrypt_sectors(first, buf)
    }

    fn write_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.data_sectors, first, buf.len())?;
        self.xts.encrypt_sectors(first, buf)?;
        self.io.write_all_at(buf, data_sector_offset(first)).map_err(|e| Error::io("writing the data area", e))
    }

    fn flush(&self) -> Result<()> {
        self.io.sync_data().map_err(|e| Error::io("syncing the volume", e))
    }
}
