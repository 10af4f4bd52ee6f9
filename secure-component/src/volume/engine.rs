//! The plaintext sector device of a volume (docs/FORMAT.md), built the same way for every
//! backend that serves it from this process: [`super::userspace`] (FUSE + loop) and
//! [`super::vhost_user`] (vhost-user-blk to a qemu guest). Format 1 is a
//! [`PlainDevice`] (AES-XTS); format 2 an [`IntegrityVolume`] (XTS + sector tags + hash tree
//! committed to the TTP at each flush).

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use protocol::secret::SecretBytes;
use skydd_volume::device::{PlainDevice, SectorDevice};
use skydd_volume::integrity::Opened;
use skydd_volume::layout::{data_sectors, DATA_OFFSET};
use skydd_volume::xts::XtsEngine;

use super::{IntegrityOpen, OpenMode};
use crate::error::{Error, Result};

/// Opens `volume` (a file or a block device) for `mode` and returns it with its length.
fn open_volume_file(volume: &Path, mode: OpenMode) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(mode == OpenMode::ReadWrite)
        .open(volume)
        .map_err(|e| Error::io(format!("opening volume {}", volume.display()), e))?;
    let len = file.metadata().map_err(|e| Error::io(format!("stat of volume {}", volume.display()), e))?.len();
    let len = if len == 0 { crate::sys::block_device_size(&file).unwrap_or(0) } else { len };
    Ok((file, len))
}

/// The plaintext sectors of `volume` with the 64-byte XTS `key`: format 1 when `integrity`
/// is `None`, format 2 (verified against the TTP's anchor, flushes committed) otherwise.
/// The key lives on only inside the engine's OpenSSL contexts, wiped when the device drops.
pub(crate) fn open_sector_device(
    name: &str,
    volume: &Path,
    key: &SecretBytes,
    integrity: Option<IntegrityOpen>,
    mode: OpenMode,
) -> Result<Arc<dyn SectorDevice>> {
    let (file, len) = open_volume_file(volume, mode)?;
    let Some(integrity) = integrity else {
        let sectors = data_sectors(len);
        if sectors == 0 {
            return Err(Error::Volume(format!(
                "volume {} is {len} bytes: no data area after the {DATA_OFFSET}-byte header area",
                volume.display()
            )));
        }
        return Ok(Arc::new(PlainDevice::new(Arc::new(file), XtsEngine::new(key)?, sectors)));
    };
    let (device, opened) = integrity.open_volume(file, key, mode == OpenMode::ReadOnly)?;
    match opened {
        Opened::Clean { epoch } => tracing::info!(name, epoch, "format-2 volume verified against the TTP's anchor"),
        Opened::Initialised { tagged, unwritten } => {
            tracing::info!(name, tagged, unwritten, "format-2 volume initialised: tree built, epoch 1 committed")
        }
        Opened::Recovered { zones, kept_new, kept_committed, reset, epoch } => tracing::warn!(
            name,
            zones,
            kept_new,
            kept_committed,
            reset,
            epoch,
            "format-2 volume had writes after its last commit (a crash): settled"
        ),
    }
    Ok(Arc::new(device))
}
