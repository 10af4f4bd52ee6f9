//! Online re-encryption (docs/FORMAT.md "Key rotation", "Online"): the volume moves to the
//! new key while the [`PlainDevice`] serving it keeps reading and writing for its VM.
//!
//! The device holds both keys for the duration: sectors below the boundary are under the
//! new key, the rest under the previous one ([`PlainDevice`] splits each request there).
//! For each hotzone:
//!
//! 1. **fence** `[b, b + n)`: requests touching it wait; the ones in flight finish first;
//! 2. read and re-encrypt it in memory, then `fdatasync`, so the old ciphertext just read
//!    (a write the VM had not flushed yet included) is what the disk holds: the old checksums
//!    recorded next are then true after any crash;
//! 3. record boundary `b`, the hotzone and both checksum lists durably in the header;
//! 4. write the new ciphertext, `fdatasync`;
//! 5. record boundary `b + n` without a hotzone durably, **before** the fence lifts: a VM
//!    write into the moved hotzone (now under the new key) must never meet a header that
//!    still names that hotzone, or recovery would take it for a torn sector;
//! 6. lift the fence with the boundary at `b + n`.
//!
//! A crash at any point (of the secure component, kill -9 included) leaves the header of
//! step 3 or 5, exactly what [`super::finish_rotation`] settles at the next read-write attach.
//! An error half-way (an I/O error of the volume) stops the device: it refuses every request
//! from then on rather than guess which key a hotzone sector is under, and the next
//! read-write attach settles the hotzone from its checksums and finishes the rotation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::messages::HeaderRecord;
use protocol::secret::SecretBytes;

use super::{prepare, rotation_err, rotation_to_finish, update_header, Engines, RotationOptions, RotationReport, Run};
use crate::device::{Keys, PlainDevice, SectorDevice};
use crate::layout::SECTOR_SIZE;
use crate::xts::XtsEngine;
use crate::{Error, Result};

/// Whether `a` and `b` are the same XTS key: the same sector encrypts to the same bytes.
fn same_key(a: &XtsEngine, b: &XtsEngine) -> Result<bool> {
    let (mut under_a, mut under_b) = (vec![0u8; SECTOR_SIZE], vec![0u8; SECTOR_SIZE]);
    a.encrypt_sectors(0, &mut under_a)?;
    b.encrypt_sectors(0, &mut under_b)?;
    Ok(under_a == under_b)
}

/// Re-encrypts the format-1 volume `device` serves, from `previous_key` (the key it was opened
/// with) to `new_key` (its header's registration), while it keeps serving; see the module
/// documentation. `progress(done, total)` is called after each hotzone. Returns when the
/// header holds only the new registration and the device serves under the new key alone.
///
/// `cancel` set (the mapping is being closed) stops it between two hotzones, with the header
/// at a clean boundary and the device still serving correctly under both keys: the next
/// read-write attach finishes the rotation. It returns [`Error::Rotation`] then.
pub fn reencrypt_online(
    device: &PlainDevice,
    previous_key: &SecretBytes,
    new_key: &SecretBytes,
    options: RotationOptions,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<RotationReport> {
    let io = device.io();
    let (record, rotation, data_sectors) = rotation_to_finish(io)?;
    if data_sectors != device.data_sectors() {
        return Err(rotation_err(format!(
            "the volume has {data_sectors} data sectors but the device serves {}",
            device.data_sectors()
        )));
    }
    let previous = XtsEngine::new(previous_key)?;
    let old = match &*device.keys() {
        Keys::One(current) if same_key(current, &previous)? => current.clone(),
        Keys::One(_) => {
            return Err(rotation_err(
                "the previous key released for this rotation is not the key this mapping was opened with",
            ))
        }
        Keys::Rotating { .. } => return Err(rotation_err("a re-encryption is already running on this mapping")),
        Keys::Stopped(reason) => return Err(rotation_err(reason.clone())),
    };
    drop(previous);
    let new = Arc::new(XtsEngine::new(new_key)?);
    let engines = Engines { old: &old, new: &new };
    let mut run =
        Run { io, data_sectors, record, report: RotationReport { data_sectors, ..RotationReport::default() } };

    // A hotzone a crash left (only if the volume was opened without finishing it first).
    let mut boundary = rotation.boundary;
    let hotzone = rotation.hotzone.clone();
    let fence = hotzone.as_ref().map(|h| (h.first, h.first.saturating_add(h.sectors())));
    device.change_keys(|keys| *keys = Keys::Rotating { old: old.clone(), new: new.clone(), boundary, fence });
    if let Some(hotzone) = &hotzone {
        let settled = run.settle(engines, hotzone).and_then(|()| {
            let end = hotzone.first + hotzone.sectors();
            run.record_progress(end, None).map(|()| end)
        });
        match settled {
            Ok(end) => boundary = end,
            Err(e) => return Err(stop(device, e)),
        }
        device.change_keys(|keys| set_boundary(keys, boundary));
    }

    let hotzone_sectors = run.hotzone_limit(options.hotzone_sectors);
    let mut buf = Vec::with_capacity(hotzone_sectors * SECTOR_SIZE);
    let (started, first) = (Instant::now(), boundary);
    while boundary < data_sectors {
        pace(options.online_bytes_per_second, started, (boundary - first) * SECTOR_SIZE as u64, cancel);
        if cancel.load(Ordering::SeqCst) {
            return Err(rotation_err(format!(
                "stopped at data sector {boundary} of {data_sectors} because the mapping is being closed; \
                 the next read-write attach finishes the rotation"
            )));
        }
        let count = hotzone_sectors.min((data_sectors - boundary) as usize);
        let end = boundary + count as u64;
        device.change_keys(|keys| {
            if let Keys::Rotating { fence, .. } = keys {
                *fence = Some((boundary, end));
            }
        });
        let moved = prepare(io, engines, boundary, count, std::mem::take(&mut buf))
            .and_then(|prepared| {
                io.sync_data().map_err(|e| Error::io("syncing the volume before recording the hotzone", e))?;
                run.commit(prepared)
            })
            .and_then(|spare| run.record_progress(end, None).map(|()| spare));
        match moved {
            Ok(spare) => buf = spare,
            Err(e) => return Err(stop(device, e)),
        }
        boundary = end;
        device.change_keys(|keys| set_boundary(keys, boundary));
        progress(boundary, data_sectors);
    }
    update_header(io, |on_volume| Ok(HeaderRecord { rotation: None, ..on_volume })).map_err(|e| stop(device, e))?;
    // The old key's engine is wiped when its last holder drops: the device's, then `old`.
    device.change_keys(|keys| *keys = Keys::One(new.clone()));
    drop(old);
    Ok(run.report)
}

/// Waits until `moved` bytes since `started` are within `rate` bytes per second (the
/// hotzone just moved is paid for before the next one starts), waking for `cancel`.
fn pace(rate: Option<u64>, started: Instant, moved: u64, cancel: &AtomicBool) {
    let Some(rate) = rate.filter(|&r| r > 0) else { return };
    let due = Duration::from_secs_f64(moved as f64 / rate as f64);
    while let Some(left) = due.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) {
        if cancel.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Moves the boundary to `boundary` and lifts the fence.
fn set_boundary(keys: &mut Keys, to: u64) {
    if let Keys::Rotating { boundary, fence, .. } = keys {
        *boundary = to;
        *fence = None;
    }
}

/// After a failure half-way: the device refuses every request from now on (see the module
/// documentation), and the requests waiting at the fence wake up to that refusal.
fn stop(device: &PlainDevice, error: Error) -> Error {
    let reason = format!(
        "the online re-encryption of this volume failed ({error}); the mapping serves nothing more: \
         detach it and attach it read-write again, which finishes the rotation from the header"
    );
    device.change_keys(|keys| *keys = Keys::Stopped(reason));
    error
}
