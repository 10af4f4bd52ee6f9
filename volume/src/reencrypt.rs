//! Re-encryption in place after a key rotation (docs/FORMAT.md "Key rotation"): the data
//! area moves from the previous key generation's key to the new one, a hotzone at a time,
//! behind a boundary recorded in the volume header.
//!
//! For each hotzone (up to [`MAX_HOTZONE_SECTORS`], 8 MiB): read its ciphertext, compute
//! the new ciphertext in memory, **durably** record the boundary, the hotzone and the
//! BLAKE3 of every sector's old and new ciphertext in the header (RWF_DSYNC), write the new
//! ciphertext, `fdatasync`, advance. A crash at any point leaves a header whose hotzone
//! names exactly the sectors that may be half-way; [`finish_rotation`] settles each by its
//! checksum (new → done, old → re-encrypt it again) and goes on. At the end the header is
//! rewritten with only the new registration: the old key is never needed again.
//!
//! Sectors whose ciphertext is all zero (never written: the volume file is sparse) are left
//! as they are, so a rotation does not allocate a volume's holes.
//!
//! A format-2 volume's tags and tree are keyed too (`K_mac`): [`format2::finish_rotation`]
//! moves its data area the same way, then its integrity area.

use protocol::domain::{Descriptor, VolumeFormat};
use protocol::format::{self, ActiveHeader, HEADER_AREA_SIZE, MAX_PAYLOAD_LEN};
use protocol::messages::{HeaderRecord, Hotzone, RotationState, MAX_HOTZONE_SECTORS};
use protocol::secret::SecretBytes;
use rayon::prelude::*;
use zeroize::Zeroize;

use crate::io::{BlockIo, HeaderLock};
use crate::layout::{data_sector_offset, SECTOR_SIZE};
use crate::xts::XtsEngine;
use crate::{Error, Result};

/// What one finished re-encryption did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Data sectors of the volume.
    pub data_sectors: u64,
    /// Sectors whose ciphertext was rewritten under the new key (written ones only).
    pub rewritten: u64,
    /// Hotzone sectors found half-way after a crash and settled (re-encrypted again or kept).
    pub settled: u64,
    /// Hotzones re-encrypted by this run.
    pub hotzones: u64,
}

/// How a run is cut (tests make it small; the secure component uses the defaults).
#[derive(Debug, Clone, Copy)]
pub struct RotationOptions {
    /// Sectors per hotzone, at most [`MAX_HOTZONE_SECTORS`] (less if the header cannot hold
    /// its checksums).
    pub hotzone_sectors: usize,
    /// Online only ([`online::reencrypt_online`]): at most this many bytes re-encrypted per
    /// second on average, so the VM keeps more of the host; `None` runs flat out. An
    /// offline run (before a VM sees the volume) always runs flat out.
    pub online_bytes_per_second: Option<u64>,
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self { hotzone_sectors: MAX_HOTZONE_SECTORS, online_bytes_per_second: None }
    }
}

fn rotation_err(detail: impl Into<String>) -> Error {
    Error::Rotation(detail.into())
}

/// The header in force on the volume behind `io`, decoded.
pub fn read_header(io: &dyn BlockIo) -> Result<(ActiveHeader, HeaderRecord)> {
    let mut area = vec![0u8; HEADER_AREA_SIZE];
    io.read_exact_at(&mut area, 0).map_err(|e| Error::io("reading the header area", e))?;
    let active = format::decode_header_area(&area).map_err(|e| rotation_err(format!("the volume header: {e}")))?;
    let record =
        HeaderRecord::decode(&active.payload).map_err(|e| rotation_err(format!("the volume's header record: {e}")))?;
    Ok((active, record))
}

/// Writes `record` into the slot not in force with the next sequence number, durably.
fn write_header(io: &dyn BlockIo, current: &ActiveHeader, record: &HeaderRecord) -> Result<()> {
    let payload = record.encode();
    let (slot, seq) =
        format::next_slot_for_update(Some(current)).map_err(|e| rotation_err(format!("the next header slot: {e}")))?;
    let bytes = format::encode_slot(seq, &payload).map_err(|e| rotation_err(format!("the header record: {e}")))?;
    io.write_durable_at(&bytes, format::slot_offset(slot)).map_err(|e| Error::io("writing the volume header", e))
}

/// Rewrites the header in force under the volume's header lock ([`HeaderLock`]): `change`
/// gets the record on the volume now and returns the one written into the other slot. Read
/// under the lock, so a descriptor update the cloud platform wrote meanwhile is kept.
pub fn update_header(
    io: &dyn BlockIo,
    change: impl FnOnce(HeaderRecord) -> Result<HeaderRecord>,
) -> Result<HeaderRecord> {
    let _lock = HeaderLock::take(io).map_err(|e| Error::io("taking the volume's header lock", e))?;
    let (active, on_volume) = read_header(io)?;
    let record = change(on_volume)?;
    write_header(io, &active, &record)?;
    Ok(record)
}

/// The rotation the header of the format-1 volume behind `io` records, checked (see
/// [`recorded_rotation`]). Returns the header record, that rotation and the data sectors.
fn rotation_to_finish(io: &dyn BlockIo) -> Result<(HeaderRecord, RotationState, u64)> {
    let volume_len = io.len().map_err(|e| Error::io("reading the volume's length", e))?;
    recorded_rotation(io, VolumeFormat::V1, format::data_sectors(volume_len))
}

/// The rotation the header of the volume behind `io` records, checked: the descriptor's
/// format is `expected`, the boundary inside the `data_sectors` of the data area.
fn recorded_rotation(
    io: &dyn BlockIo,
    expected: VolumeFormat,
    data_sectors: u64,
) -> Result<(HeaderRecord, RotationState, u64)> {
    let (_, record) = read_header(io)?;
    let Some(rotation) = record.rotation.clone() else {
        return Err(rotation_err("the volume header records no key rotation"));
    };
    let descriptor = Descriptor::decode(&record.descriptor.message)
        .map_err(|e| rotation_err(format!("the header's descriptor: {e}")))?;
    if descriptor.volume_format != expected {
        return Err(Error::Unsupported(match expected {
            VolumeFormat::V1 => "this re-encryption moves a format-1 volume, but the volume is format 2: its tags and tree move with it at its next read-write attach (reencrypt::format2)".into(),
            VolumeFormat::V2 => "this re-encryption moves a format-2 volume's tags and tree too, but the volume is format 1".into(),
        }));
    }
    if rotation.boundary > data_sectors {
        return Err(rotation_err(format!(
            "the rotation boundary {} lies beyond the data area of {data_sectors} sectors",
            rotation.boundary
        )));
    }
    Ok((record, rotation, data_sectors))
}

/// Whether the header holds a key rotation that is not finished.
pub fn rotation_pending(io: &dyn BlockIo) -> Result<bool> {
    Ok(read_header(io)?.1.rotation.is_some())
}

/// The two engines of a re-encryption: the previous key generation's and the new one's.
#[derive(Clone, Copy)]
struct Engines<'a> {
    old: &'a XtsEngine,
    new: &'a XtsEngine,
}

/// One hotzone computed in memory, not yet written: its new ciphertext, both checksum lists
/// and which sectors change (all but the never-written ones).
struct Prepared {
    first: u64,
    count: usize,
    buf: Vec<u8>,
    old_sums: Vec<u8>,
    new_sums: Vec<u8>,
    changed: Vec<bool>,
}

/// Reads `[first, first + count)` into `buf` and re-encrypts it in memory, sector by
/// sector in parallel (the checksums cost as much as the cipher).
fn prepare(io: &dyn BlockIo, engines: Engines<'_>, first: u64, count: usize, mut buf: Vec<u8>) -> Result<Prepared> {
    buf.resize(count * SECTOR_SIZE, 0);
    io.read_exact_at(&mut buf, data_sector_offset(first)).map_err(|e| Error::io("reading the data area", e))?;
    let sums: Vec<([u8; 32], [u8; 32], bool)> = buf
        .par_chunks_mut(SECTOR_SIZE)
        .enumerate()
        .map(|(i, sector)| {
            let old_sum = sector_sum(sector);
            if is_zero(sector) {
                return Ok((old_sum, old_sum, false));
            }
            let number = first + i as u64;
            engines.old.decrypt_sectors(number, sector)?;
            engines.new.encrypt_sectors(number, sector)?;
            Ok((old_sum, sector_sum(sector), true))
        })
        .collect::<Result<_>>()?;
    let mut prepared = Prepared {
        first,
        count,
        buf,
        old_sums: Vec::with_capacity(count * 32),
        new_sums: Vec::with_capacity(count * 32),
        changed: Vec::with_capacity(count),
    };
    for (old_sum, new_sum, changed) in &sums {
        prepared.old_sums.extend_from_slice(old_sum);
        prepared.new_sums.extend_from_slice(new_sum);
        prepared.changed.push(*changed);
    }
    Ok(prepared)
}

/// The re-encryption of one volume: the header record last written and what was done.
struct Run<'a> {
    io: &'a dyn BlockIo,
    data_sectors: u64,
    record: HeaderRecord,
    report: RotationReport,
}

/// A sector's checksum in the hotzone record: BLAKE3, because it is computed twice for every
/// sector re-encrypted and SHA-256 (1.3 GB/s per core here, with SHA-NI) made the checksums
/// cost four times the cipher (docs/PERFORMANCE.md "Key rotation").
fn sector_sum(sector: &[u8]) -> [u8; 32] {
    blake3::hash(sector).into()
}

fn is_zero(sector: &[u8]) -> bool {
    sector.iter().all(|&b| b == 0)
}

impl Run<'_> {
    fn rotation(&self) -> &RotationState {
        self.record.rotation.as_ref().expect("a run exists only for a header with a rotation")
    }

    /// Durably records `boundary` and `hotzone` in the header (under its lock, keeping
    /// whatever else the header in force says).
    fn record_progress(&mut self, boundary: u64, hotzone: Option<Hotzone>) -> Result<()> {
        self.record = update_header(self.io, |mut on_volume| {
            let Some(rotation) = on_volume.rotation.as_mut() else {
                return Err(rotation_err(
                    "the volume header no longer records the key rotation being finished (was the header replaced?)",
                ));
            };
            rotation.boundary = boundary;
            rotation.hotzone = hotzone;
            Ok(on_volume)
        })?;
        Ok(())
    }

    /// How many sectors a hotzone may have so that the header still fits a slot.
    fn hotzone_limit(&self, wanted: usize) -> usize {
        let base = HeaderRecord {
            rotation: Some(RotationState { hotzone: None, ..self.rotation().clone() }),
            ..self.record.clone()
        }
        .encode()
        .len();
        let room = MAX_PAYLOAD_LEN.saturating_sub(base) / 64;
        wanted.clamp(1, MAX_HOTZONE_SECTORS).min(room)
    }

    /// Writes the sectors of `buf` (from data sector `first`) whose ciphertext changed.
    fn write_changed(&self, first: u64, buf: &[u8], changed: &[bool]) -> Result<()> {
        let mut index = 0;
        while index < changed.len() {
            if !changed[index] {
                index += 1;
                continue;
            }
            let start = index;
            while index < changed.len() && changed[index] {
                index += 1;
            }
            let bytes = &buf[start * SECTOR_SIZE..index * SECTOR_SIZE];
            self.io
                .write_all_at(bytes, data_sector_offset(first + start as u64))
                .map_err(|e| Error::io("writing re-encrypted sectors", e))?;
        }
        Ok(())
    }

    /// Settles the hotzone a crash left: each sector is under the new key already (its
    /// ciphertext has the new checksum), or still under the old one (re-encrypted now).
    fn settle(&mut self, engines: Engines<'_>, hotzone: &Hotzone) -> Result<()> {
        let count = hotzone.sectors() as usize;
        if hotzone.first.checked_add(count as u64).is_none_or(|end| end > self.data_sectors) {
            return Err(rotation_err(format!(
                "the hotzone (sectors {} + {count}) lies beyond the data area of {} sectors",
                hotzone.first, self.data_sectors
            )));
        }
        let mut buf = vec![0u8; count * SECTOR_SIZE];
        self.io
            .read_exact_at(&mut buf, data_sector_offset(hotzone.first))
            .map_err(|e| Error::io("reading the hotzone", e))?;
        let mut changed = vec![false; count];
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let sum = sector_sum(sector);
            let (old_sum, new_sum) = (&hotzone.old_sums[i * 32..][..32], &hotzone.new_sums[i * 32..][..32]);
            if sum == new_sum {
                continue;
            }
            if sum != old_sum {
                buf.zeroize();
                return Err(rotation_err(format!(
                    "data sector {} of the hotzone matches neither its old nor its new checksum: it was torn or altered, and its content cannot be recovered",
                    hotzone.first + i as u64
                )));
            }
            let sector_number = hotzone.first + i as u64;
            engines.old.decrypt_sectors(sector_number, sector)?;
            engines.new.encrypt_sectors(sector_number, sector)?;
            changed[i] = true;
            self.report.settled += 1;
        }
        let written = self.write_changed(hotzone.first, &buf, &changed);
        buf.zeroize();
        written?;
        self.io.sync_data().map_err(|e| Error::io("syncing the settled hotzone", e))
    }

    /// Moves a prepared hotzone across the boundary: record it durably, write, sync.
    fn commit(&mut self, prepared: Prepared) -> Result<Vec<u8>> {
        let Prepared { first, count, mut buf, old_sums, new_sums, changed } = prepared;
        let rewritten = changed.iter().filter(|&&c| c).count() as u64;
        if rewritten > 0 {
            self.record_progress(first, Some(Hotzone { first, old_sums, new_sums }))?;
            self.write_changed(first, &buf[..count * SECTOR_SIZE], &changed)?;
            self.io.sync_data().map_err(|e| Error::io("syncing the re-encrypted hotzone", e))?;
            self.report.rewritten += rewritten;
        }
        self.report.hotzones += 1;
        buf.zeroize();
        Ok(buf)
    }
}

/// Finishes the key rotation recorded in the header of the format-1 volume behind `io`:
/// settles a hotzone a crash left, re-encrypts from the boundary to the end with
/// `new_key` (the header's registration) what `old_key` (the previous registration)
/// encrypted, then writes a header without the rotation. `progress(done, total)` is called
/// after each hotzone (data sectors). Both keys are the 64-byte XTS keys.
pub fn finish_rotation(
    io: &dyn BlockIo,
    old_key: &SecretBytes,
    new_key: &SecretBytes,
    options: RotationOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RotationReport> {
    let (record, rotation, data_sectors) = rotation_to_finish(io)?;
    let report = reencrypt_data_area(io, record, &rotation, data_sectors, old_key, new_key, options, progress)?;
    update_header(io, |on_volume| Ok(HeaderRecord { rotation: None, ..on_volume }))?;
    Ok(report)
}

/// Moves the boundary of `rotation` (recorded in `record`, the header in force) from where
/// it is to the end of the `data_sectors`: settles the hotzone a crash left, then one
/// hotzone at a time. The header still records the rotation afterwards, at the end.
#[allow(clippy::too_many_arguments)]
fn reencrypt_data_area(
    io: &dyn BlockIo,
    record: HeaderRecord,
    rotation: &RotationState,
    data_sectors: u64,
    old_key: &SecretBytes,
    new_key: &SecretBytes,
    options: RotationOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RotationReport> {
    let (old, new) = (XtsEngine::new(old_key)?, XtsEngine::new(new_key)?);
    let engines = Engines { old: &old, new: &new };
    let mut run =
        Run { io, data_sectors, record, report: RotationReport { data_sectors, ..RotationReport::default() } };
    let mut boundary = rotation.boundary;
    if let Some(hotzone) = &rotation.hotzone {
        run.settle(engines, hotzone)?;
        boundary = hotzone.first + hotzone.sectors();
        run.record_progress(boundary, None)?;
    }
    let hotzone_sectors = run.hotzone_limit(options.hotzone_sectors);
    let count_at = |first: u64| hotzone_sectors.min((data_sectors - first) as usize);
    // Pipelined: while one hotzone is recorded, written and synced, the next one is read and
    // re-encrypted in memory on another thread (it touches only sectors past the first).
    let mut next = (boundary < data_sectors)
        .then(|| prepare(io, engines, boundary, count_at(boundary), Vec::with_capacity(hotzone_sectors * SECTOR_SIZE)))
        .transpose()?;
    let mut spare = Vec::with_capacity(hotzone_sectors * SECTOR_SIZE);
    while let Some(current) = next.take() {
        let following = current.first + current.count as u64;
        let (committed, prepared) = std::thread::scope(|scope| {
            let buf = std::mem::take(&mut spare);
            let ahead = (following < data_sectors).then(|| {
                scope.spawn(move || {
                    let prepared = prepare(io, engines, following, count_at(following), buf);
                    // This thread held key schedules in registers and on its stack.
                    crate::scrub::scrub_this_thread();
                    prepared
                })
            });
            let committed = run.commit(current);
            let prepared = ahead
                .map(|handle| handle.join().unwrap_or_else(|_| Err(rotation_err("the re-encryption thread panicked"))));
            (committed, prepared)
        });
        spare = committed?;
        next = prepared.transpose()?;
        progress(following, data_sectors);
    }
    drop((old, new)); // wipes the engines' key schedules (XtsEngine's Drop)
    Ok(run.report)
}

pub mod format2;
pub mod online;

#[cfg(test)]
mod tests;
