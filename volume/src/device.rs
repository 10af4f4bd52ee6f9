//! A volume's data area as the rest of the host sees it: whole plaintext sectors read,
//! written and flushed. Format 1 is [`PlainDevice`] (AES-XTS only); format 2 is
//! [`IntegrityVolume`](crate::integrity::IntegrityVolume), which also tags every sector and
//! commits the tree's root at each flush. The secure component serves either through the
//! same FUSE file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

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
    /// The format-1 device behind this one, which can change its key online
    /// ([`crate::reencrypt::online`]); `None` for format 2.
    fn as_plain(&self) -> Option<&PlainDevice> {
        None
    }
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

/// Format 1: the data area encrypted with AES-256-XTS and nothing else: under one key, or,
/// while a key rotation moves it online ([`crate::reencrypt::online`]), under two: the new key
/// below the rotation's boundary, the previous key from it on, and the hotzone being moved
/// fenced off (a request that touches it waits until it has crossed).
pub struct PlainDevice {
    io: Arc<dyn BlockIo>,
    data_sectors: u64,
    keys: RwLock<Keys>,
    /// Bumped (under `fence_lock`) each time a fence is lifted; requests waiting for the
    /// hotzone sleep on `fence_lifted` until it changes.
    fence_generation: AtomicU64,
    fence_lock: Mutex<()>,
    fence_lifted: Condvar,
}

/// Which key covers which sectors.
pub(crate) enum Keys {
    /// Every sector under this key.
    One(Arc<XtsEngine>),
    /// A rotation in progress (docs/FORMAT.md "Key rotation").
    Rotating {
        /// The previous key generation's engine: sectors from `boundary` on.
        old: Arc<XtsEngine>,
        /// The new generation's engine: sectors below `boundary`.
        new: Arc<XtsEngine>,
        /// The first sector still under the old key.
        boundary: u64,
        /// The hotzone `[first, end)` being moved: no request may touch it now.
        fence: Option<(u64, u64)>,
    },
    /// An online re-encryption failed half-way: which key covers a sector of its hotzone is
    /// known only from the checksums, so every request is refused with this reason until the
    /// volume is opened again (and the rotation finished from its header).
    Stopped(String),
}

impl Keys {
    /// Whether `[first, first + count)` touches the fenced hotzone.
    fn fenced(&self, first: u64, count: u64) -> bool {
        match self {
            Keys::Rotating { fence: Some((start, end)), .. } => first < *end && first + count > *start,
            _ => false,
        }
    }

    /// Runs `crypt(engine, first_sector, part)` over `buf` (sectors from `first`), each part
    /// with the engine of the key it lies under.
    fn crypt(
        &self,
        first: u64,
        buf: &mut [u8],
        crypt: impl Fn(&XtsEngine, u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        match self {
            Keys::One(engine) => crypt(engine, first, buf),
            Keys::Rotating { old, new, boundary, .. } => {
                let below = (boundary.saturating_sub(first) as usize).min(buf.len() / SECTOR_SIZE);
                let (under_new, under_old) = buf.split_at_mut(below * SECTOR_SIZE);
                if !under_new.is_empty() {
                    crypt(new, first, under_new)?;
                }
                if !under_old.is_empty() {
                    crypt(old, first + below as u64, under_old)?;
                }
                Ok(())
            }
            Keys::Stopped(reason) => Err(Error::Rotation(reason.clone())),
        }
    }
}

impl PlainDevice {
    /// Serves `data_sectors` sectors of the volume behind `io` through `xts`.
    pub fn new(io: Arc<dyn BlockIo>, xts: XtsEngine, data_sectors: u64) -> Self {
        Self {
            io,
            data_sectors,
            keys: RwLock::new(Keys::One(Arc::new(xts))),
            fence_generation: AtomicU64::new(0),
            fence_lock: Mutex::new(()),
            fence_lifted: Condvar::new(),
        }
    }

    /// The I/O channel (the re-encryption writes the header and the hotzones through it).
    pub(crate) fn io(&self) -> &dyn BlockIo {
        self.io.as_ref()
    }

    /// The key state, for the re-encryption (`crate::reencrypt::online`).
    pub(crate) fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the key state (waits for the requests in flight), then wakes the requests
    /// waiting for a fence to lift.
    pub(crate) fn change_keys<T>(&self, change: impl FnOnce(&mut Keys) -> T) -> T {
        let changed = change(&mut self.keys.write().unwrap_or_else(|e| e.into_inner()));
        let _guard = self.fence_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.fence_generation.fetch_add(1, Ordering::SeqCst);
        self.fence_lifted.notify_all();
        changed
    }

    /// Runs `io` with the key state once `[first, first + count)` is not fenced.
    fn unfenced<T>(&self, first: u64, count: u64, io: impl FnOnce(&Keys) -> Result<T>) -> Result<T> {
        let keys = loop {
            let generation = self.fence_generation.load(Ordering::SeqCst);
            let keys = self.keys();
            if !keys.fenced(first, count) {
                break keys;
            }
            drop(keys);
            let mut guard = self.fence_lock.lock().unwrap_or_else(|e| e.into_inner());
            while self.fence_generation.load(Ordering::SeqCst) == generation {
                guard = self.fence_lifted.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        };
        io(&keys)
    }
}

impl SectorDevice for PlainDevice {
    fn data_sectors(&self) -> u64 {
        self.data_sectors
    }

    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let count = check_range(self.data_sectors, first, buf.len())?;
        self.unfenced(first, count, |keys| {
            self.io.read_exact_at(buf, data_sector_offset(first)).map_err(|e| Error::io("reading the data area", e))?;
            keys.crypt(first, buf, |engine, first, part| engine.decrypt_sectors(first, part))
        })
    }

    fn write_sectors(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let count = check_range(self.data_sectors, first, buf.len())?;
        self.unfenced(first, count, |keys| {
            keys.crypt(first, buf, |engine, first, part| engine.encrypt_sectors(first, part))?;
            self.io.write_all_at(buf, data_sector_offset(first)).map_err(|e| Error::io("writing the data area", e))
        })
    }

    fn flush(&self) -> Result<()> {
        self.io.sync_data().map_err(|e| Error::io("syncing the volume", e))
    }

    fn as_plain(&self) -> Option<&PlainDevice> {
        Some(self)
    }
}
