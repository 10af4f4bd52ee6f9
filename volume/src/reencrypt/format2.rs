//! Key rotation of a format-2 volume (docs/FORMAT.md "Key rotation of a format-2 volume"):
//! the data area moves to the new key as a format-1 volume's does, then the tags, tree and
//! superblock follow it ([`crate::integrity::rekey`]), and the TTP's anchor moves to the new
//! key generation. Offline only: the secure component finishes it at the next read-write
//! attach, before the VM sees the volume.
//!
//! The stages, each resumable after `kill -9` (the header in force and the TTP's anchor say
//! where it stands):
//!
//! 1. **Settle** (boundary 0, no hotzone): open the volume under the previous generation's
//!    keys against the anchor, so that writes a crash left uncommitted are settled and
//!    committed as usual; every tag then covers the data as it is.
//! 2. **Data area**: hotzone by hotzone with checksums in the header, as in format 1. The
//!    committed tree stays under the previous key meanwhile.
//! 3. **Integrity area** (boundary at the end): every written sector checked through the
//!    previous key's tree and tagged under the new `K_mac`; the new root committed as the
//!    next epoch under the new generation.
//! 4. **Done**: the header without the rotation. A release whose anchor is already of the new
//!    generation (the commit was accepted, the header not yet written) goes straight here.

use std::sync::Arc;

use protocol::domain::VolumeFormat;
use protocol::messages::HeaderRecord;
use protocol::secret::SecretBytes;

use super::{recorded_rotation, reencrypt_data_area, rotation_err, update_header, RotationOptions, RotationReport};
use crate::integrity::rekey::{self, GenerationKeys};
use crate::integrity::tag::Tagger;
use crate::integrity::{Anchor, Authority, IntegrityVolume};
use crate::io::BlockIo;
use crate::xts::XtsEngine;
use crate::{Error, Result};

/// One key generation as a format-2 rotation needs it: its released keys and the TTP that
/// commits roots tagged under them.
pub struct Generation<'a> {
    /// The key generation (the registration's).
    pub number: u64,
    /// The 64-byte XTS key.
    pub xts_key: &'a SecretBytes,
    /// The 32-byte `K_mac`.
    pub mac_key: &'a SecretBytes,
    /// Commits roots tagged under this generation (and reports what does not verify).
    pub authority: Arc<dyn Authority>,
}

/// The TTP's newest anchor of the domain and the key generation its tags are under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationAnchor {
    /// The committed epoch and root.
    pub anchor: Anchor,
    /// The key generation whose `K_mac` tagged it.
    pub generation: u64,
}

/// Finishes the key rotation recorded in the header of the format-2 volume of `domain_id`
/// behind `io`, from `previous` to `new` (see the module documentation), and returns what it
/// did and the anchor the volume now has (under `new`; `None` for a domain that never
/// committed a root, whose tree its next read-write open builds). `progress(done, total)` is
/// called after each hotzone and each block of tags (data sectors).
pub fn finish_rotation(
    io: Arc<dyn BlockIo>,
    domain_id: &str,
    previous: &Generation<'_>,
    new: &Generation<'_>,
    anchor: Option<GenerationAnchor>,
    options: RotationOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(RotationReport, Option<Anchor>)> {
    if new.number != previous.number + 1 {
        return Err(rotation_err(format!(
            "a rotation moves from one key generation to the next, not from {} to {}",
            previous.number, new.number
        )));
    }
    let (old_tagger, new_tagger) = (Tagger::new(previous.mac_key, domain_id)?, Tagger::new(new.mac_key, domain_id)?);
    let len = io.len().map_err(|e| Error::io("reading the volume's length", e))?;
    let data_sectors = match (rekey::data_sectors_under(io.as_ref(), &old_tagger)?, &anchor) {
        (Some(sectors), _) => sectors,
        // Never committed: no integrity area yet, the data area is all there is.
        (None, None) => crate::layout::data_sectors(len),
        (None, Some(_)) => match rekey::data_sectors_under(io.as_ref(), &new_tagger)? {
            Some(sectors) => sectors,
            None => {
                return Err(Error::Integrity {
                    kind: crate::ViolationKind::Truncated,
                    sector: None,
                    detail: format!(
                        "the volume ({len} bytes) has no integrity superblock under either key generation, but the TTP anchors a root: it was cut or replaced"
                    ),
                })
            }
        },
    };
    let (record, rotation, data_sectors) = recorded_rotation(io.as_ref(), VolumeFormat::V2, data_sectors)?;
    let mut anchor = match anchor {
        None => None,
        Some(GenerationAnchor { anchor, generation }) if generation == new.number => {
            // Stage 3 was committed; only its superblock and the header may be missing.
            rekey::ensure_superblock(io.as_ref(), data_sectors, &new_tagger, anchor)?;
            finish_header(io.as_ref())?;
            let report = RotationReport { data_sectors, ..RotationReport::default() };
            return Ok((report, Some(anchor)));
        }
        Some(GenerationAnchor { anchor, generation }) if generation == previous.number => Some(anchor),
        Some(GenerationAnchor { generation, .. }) => {
            return Err(rotation_err(format!(
                "the TTP anchors domain {domain_id}'s root under key generation {generation}, but the rotation is from {} to {}",
                previous.number, new.number
            )))
        }
    };

    if let Some(committed) = anchor.filter(|_| rotation.boundary == 0 && rotation.hotzone.is_none()) {
        let (volume, _) = IntegrityVolume::open(
            io.clone(),
            XtsEngine::new(previous.xts_key)?,
            Tagger::new(previous.mac_key, domain_id)?,
            Some(committed),
            false,
            previous.authority.clone(),
        )?;
        anchor = Some(volume.committed()?);
    }

    let report = reencrypt_data_area(
        io.as_ref(),
        record,
        &rotation,
        data_sectors,
        previous.xts_key,
        new.xts_key,
        options,
        progress,
    )?;

    let anchor = match anchor {
        Some(committed) => {
            let (old_xts, new_xts) = (XtsEngine::new(previous.xts_key)?, XtsEngine::new(new.xts_key)?);
            let old_keys = GenerationKeys { xts: &old_xts, tagger: &old_tagger };
            let new_keys = GenerationKeys { xts: &new_xts, tagger: &new_tagger };
            Some(rekey::rekey(io.as_ref(), old_keys, new_keys, committed, new.authority.as_ref(), progress)?)
        }
        None => None,
    };
    finish_header(io.as_ref())?;
    Ok((report, anchor))
}

/// The header without the rotation: the previous `r` leaves the volume.
fn finish_header(io: &dyn BlockIo) -> Result<()> {
    update_header(io, |on_volume| Ok(HeaderRecord { rotation: None, ..on_volume }))?;
    Ok(())
}
