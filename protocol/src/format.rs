//! On-disk volume format v1 (docs/FORMAT.md): the 1 MiB header area with two slots, and
//! the constants of the encrypted data area. Pure encoding and decoding, no I/O.
//!
//! Layout of one slot (all integers little-endian), at `slot_offset(index)`:
//!
//! | offset | size | field                                                   |
//! |--------|------|---------------------------------------------------------|
//! | 0      | 8    | magic `SKYDDVOL`                                        |
//! | 8      | 4    | format version (1)                                      |
//! | 12     | 4    | reserved, must be 0                                     |
//! | 16     | 8    | sequence number (>= 1; higher is newer)                 |
//! | 24     | 4    | payload length                                          |
//! | 28     | 4    | reserved, must be 0                                     |
//! | 32     | 32   | SHA-256 over bytes 0..32 followed by the payload        |
//! | 64     | len  | payload (opaque here)                                   |
//! | 64+len | ..   | zero up to SLOT_SIZE                                    |
//!
//! Updates always write the slot that is NOT active, with seq + 1: a write torn by a
//! crash leaves that slot with a bad checksum and the previous slot still wins.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Magic bytes at the start of every slot.
pub const MAGIC: [u8; 8] = *b"SKYDDVOL";
/// The only format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header area; the encrypted data area starts right after it.
pub const HEADER_AREA_SIZE: usize = 1 << 20;
/// Byte offset of the data area in the volume (1 MiB = 2048 512-byte sectors).
pub const DATA_OFFSET: u64 = HEADER_AREA_SIZE as u64;
/// Encryption sector size of the data area (dm-crypt `sector_size:4096`).
pub const SECTOR_SIZE: usize = 4096;
/// Number of header slots.
pub const SLOT_COUNT: usize = 2;
/// Each slot owns half of the header area.
pub const SLOT_SIZE: usize = HEADER_AREA_SIZE / SLOT_COUNT;
/// Fixed fields before the payload.
pub const SLOT_HEADER_LEN: usize = 64;
const _: () = assert!(MAX_PAYLOAD_LEN + SLOT_HEADER_LEN <= SLOT_SIZE);

/// Largest payload a slot accepts: its half of the header area minus the fixed fields
/// and 64 KiB kept free for fields a later version may add.
pub const MAX_PAYLOAD_LEN: usize = SLOT_SIZE - SLOT_HEADER_LEN - 64 * 1024;

const CHECKED_LEN: usize = 32;

/// Why one slot was not usable. Kept in [`ActiveHeader::skipped`] so an operator can see
/// that a slot was torn or damaged even when the other one still opened the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotError {
    /// The slot is all zero: never written (a fresh volume has only slot 0).
    Empty,
    /// Fewer bytes than a slot header or than the header plus the declared payload.
    Truncated {
        /// Bytes available from the start of the slot.
        have: usize,
        /// Bytes needed: 64 for the fixed fields, or 64 + the declared payload length.
        need: usize,
    },
    /// The first 8 bytes are not `SKYDDVOL`: not a Skydd volume, or the start of a torn write.
    BadMagic {
        /// The 8 bytes found instead.
        found: [u8; 8],
    },
    /// A format version other than [`FORMAT_VERSION`], e.g. written by a newer release.
    UnsupportedVersion {
        /// The version in the slot.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A reserved field (bytes 12..16 or 28..32) is not zero; refused so a later version
    /// can give those bytes a meaning.
    ReservedNotZero {
        /// Byte offset of the field within the slot (12 or 28).
        offset: usize,
        /// The non-zero value found (little-endian u32).
        value: u32,
    },
    /// Sequence 0 is never written (the first header is seq 1).
    ZeroSequence,
    /// The declared payload length is above [`MAX_PAYLOAD_LEN`].
    PayloadTooLarge {
        /// The declared payload length in bytes.
        len: usize,
        /// [`MAX_PAYLOAD_LEN`].
        limit: usize,
    },
    /// The SHA-256 at bytes 32..64 does not match bytes 0..32 plus the payload: a torn write
    /// or damage. Both hashes are kept for the operator.
    ChecksumMismatch {
        /// The hash stored in the slot.
        stored: [u8; 32],
        /// The hash computed over what was read.
        computed: [u8; 32],
    },
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::Empty => write!(f, "empty (all zero, never written)"),
            SlotError::Truncated { have, need } => {
                write!(f, "truncated ({have} bytes, need {need})")
            }
            SlotError::BadMagic { found } => {
                write!(f, "bad magic 0x{} (expected 0x{} \"SKYDDVOL\")", hex::encode(found), hex::encode(MAGIC))
            }
            SlotError::UnsupportedVersion { found, supported } => {
                write!(f, "unsupported format version {found} (this build reads version {supported})")
            }
            SlotError::ReservedNotZero { offset, value } => {
                write!(f, "reserved field at byte {offset} is 0x{value:08x}, must be 0")
            }
            SlotError::ZeroSequence => write!(f, "sequence number 0 is invalid (first header is 1)"),
            SlotError::PayloadTooLarge { len, limit } => {
                write!(f, "payload length {len} exceeds the limit of {limit} bytes")
            }
            SlotError::ChecksumMismatch { stored, computed } => {
                write!(f, "checksum mismatch (stored 0x{}, computed 0x{})", hex::encode(stored), hex::encode(computed))
            }
        }
    }
}

impl std::error::Error for SlotError {}

/// A slot that decoded and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSlot {
    /// Sequence number (≥ 1); of two valid slots the higher one is in force.
    pub seq: u64,
    /// The verified payload (a header record, docs/PROTOCOL.md "Header record").
    pub payload: Vec<u8>,
}

/// The header that is in force: the valid slot with the higher sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveHeader {
    /// Index (0 or 1) of the winning slot.
    pub slot: usize,
    /// Its sequence number; the next update writes the other slot with `seq + 1`.
    pub seq: u64,
    /// Its verified payload (a header record, docs/PROTOCOL.md "Header record").
    pub payload: Vec<u8>,
    /// The other slot, if it was not valid, and why (torn write, damage, never written).
    pub skipped: Option<(usize, SlotError)>,
}

/// Byte offset of slot `index` in the volume.
///
/// # Panics
/// If `index >= SLOT_COUNT` (a programming error, never input from outside).
pub fn slot_offset(index: usize) -> u64 {
    assert!(index < SLOT_COUNT, "slot index {index} out of range");
    (index * SLOT_SIZE) as u64
}

/// Encodes one slot as exactly `SLOT_SIZE` bytes (the zero tail overwrites whatever an
/// older, longer payload left behind).
pub fn encode_slot(seq: u64, payload: &[u8]) -> Result<Vec<u8>> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(Error::TooLarge { what: "volume header payload", size: payload.len(), limit: MAX_PAYLOAD_LEN });
    }
    if seq == 0 {
        return Err(Error::malformed("volume header slot", "sequence number 0 is invalid (first header is 1)"));
    }
    let mut slot = vec![0u8; SLOT_SIZE];
    slot[0..8].copy_from_slice(&MAGIC);
    slot[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    slot[16..24].copy_from_slice(&seq.to_le_bytes());
    // MAX_PAYLOAD_LEN < u32::MAX, so the cast is exact.
    slot[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let sum = checksum(&slot[..CHECKED_LEN], payload);
    slot[32..64].copy_from_slice(&sum);
    slot[SLOT_HEADER_LEN..SLOT_HEADER_LEN + payload.len()].copy_from_slice(payload);
    Ok(slot)
}

/// A fresh header area: slot 0 holds `payload` with sequence 1, slot 1 is empty.
pub fn new_header_area(payload: &[u8]) -> Result<Vec<u8>> {
    let mut area = vec![0u8; HEADER_AREA_SIZE];
    let slot = encode_slot(1, payload)?;
    area[..SLOT_SIZE].copy_from_slice(&slot);
    Ok(area)
}

/// Decodes and verifies one slot (`bytes` starts at the slot; it may be longer).
pub fn decode_slot(bytes: &[u8]) -> std::result::Result<DecodedSlot, SlotError> {
    if bytes.len() < SLOT_HEADER_LEN {
        return Err(SlotError::Truncated { have: bytes.len(), need: SLOT_HEADER_LEN });
    }
    let bytes = &bytes[..bytes.len().min(SLOT_SIZE)];
    if bytes.iter().all(|&b| b == 0) {
        return Err(SlotError::Empty);
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[0..8]);
    if magic != MAGIC {
        return Err(SlotError::BadMagic { found: magic });
    }
    let version = le_u32(&bytes[8..12]);
    if version != FORMAT_VERSION {
        return Err(SlotError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
    }
    for offset in [12usize, 28] {
        let value = le_u32(&bytes[offset..offset + 4]);
        if value != 0 {
            return Err(SlotError::ReservedNotZero { offset, value });
        }
    }
    let seq = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    if seq == 0 {
        return Err(SlotError::ZeroSequence);
    }
    let len = le_u32(&bytes[24..28]) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(SlotError::PayloadTooLarge { len, limit: MAX_PAYLOAD_LEN });
    }
    let end = SLOT_HEADER_LEN + len;
    if bytes.len() < end {
        return Err(SlotError::Truncated { have: bytes.len(), need: end });
    }
    let payload = &bytes[SLOT_HEADER_LEN..end];
    let mut stored = [0u8; 32];
    stored.copy_from_slice(&bytes[32..64]);
    let computed = checksum(&bytes[..CHECKED_LEN], payload);
    if stored != computed {
        return Err(SlotError::ChecksumMismatch { stored, computed });
    }
    Ok(DecodedSlot { seq, payload: payload.to_vec() })
}

/// Picks the header in force from the first `HEADER_AREA_SIZE` bytes of a volume: the
/// valid slot with the higher sequence number (slot 0 on a tie, which correct writers
/// never produce). Fails only when neither slot is valid.
pub fn decode_header_area(area: &[u8]) -> Result<ActiveHeader> {
    if area.len() < HEADER_AREA_SIZE {
        return Err(Error::malformed(
            "volume header area",
            format!("truncated: {} bytes, the header area is {HEADER_AREA_SIZE} bytes", area.len()),
        ));
    }
    let slot0 = decode_slot(&area[..SLOT_SIZE]);
    let slot1 = decode_slot(&area[SLOT_SIZE..HEADER_AREA_SIZE]);
    match (slot0, slot1) {
        (Ok(a), Ok(b)) => {
            let (slot, winner) = if b.seq > a.seq { (1, b) } else { (0, a) };
            Ok(ActiveHeader { slot, seq: winner.seq, payload: winner.payload, skipped: None })
        }
        (Ok(a), Err(e)) => Ok(ActiveHeader { slot: 0, seq: a.seq, payload: a.payload, skipped: Some((1, e)) }),
        (Err(e), Ok(b)) => Ok(ActiveHeader { slot: 1, seq: b.seq, payload: b.payload, skipped: Some((0, e)) }),
        (Err(e0), Err(e1)) => Err(Error::NoValidHeader { slot0: Box::new(e0), slot1: Box::new(e1) }),
    }
}

/// Where and with which sequence number the next header update goes: always the slot
/// that is not active, so a torn write never destroys the header in force. `None`
/// means a fresh volume (slot 0, sequence 1).
pub fn next_slot_for_update(current: Option<&ActiveHeader>) -> Result<(usize, u64)> {
    match current {
        None => Ok((0, 1)),
        Some(h) => {
            let seq = h.seq.checked_add(1).ok_or_else(|| {
                Error::malformed("volume header slot", format!("sequence number {} cannot be incremented", h.seq))
            })?;
            Ok((1 - h.slot.min(1), seq))
        }
    }
}

/// Number of 4 KiB data sectors in a volume of `volume_len` bytes (a partial last sector
/// is not usable).
pub fn data_sectors(volume_len: u64) -> u64 {
    volume_len.saturating_sub(DATA_OFFSET) / SECTOR_SIZE as u64
}

fn checksum(fields: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(fields);
    h.update(payload);
    h.finalize().into()
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area_with(slots: &[(usize, u64, &[u8])]) -> Vec<u8> {
        let mut area = vec![0u8; HEADER_AREA_SIZE];
        for &(i, seq, payload) in slots {
            let off = slot_offset(i) as usize;
            area[off..off + SLOT_SIZE].copy_from_slice(&encode_slot(seq, payload).unwrap());
        }
        area
    }

    fn slot_err(area: &[u8], i: usize) -> SlotError {
        decode_slot(&area[slot_offset(i) as usize..][..SLOT_SIZE]).unwrap_err()
    }

    #[test]
    fn layout_constants() {
        assert_eq!(DATA_OFFSET, 1 << 20);
        assert_eq!(DATA_OFFSET / 512, 2048, "dm-crypt table offset in 512-byte sectors");
        assert_eq!(slot_offset(0), 0);
        assert_eq!(slot_offset(1), 512 * 1024);
        assert_eq!(data_sectors(DATA_OFFSET + 3 * 4096 + 100), 3);
        assert_eq!(data_sectors(1000), 0);
    }

    #[test]
    fn roundtrip_fresh_volume() {
        let area = new_header_area(b"descriptor").unwrap();
        let h = decode_header_area(&area).unwrap();
        assert_eq!((h.slot, h.seq, h.payload.as_slice()), (0, 1, &b"descriptor"[..]));
        assert_eq!(h.skipped, Some((1, SlotError::Empty)));
        assert_eq!(next_slot_for_update(Some(&h)).unwrap(), (1, 2));
        assert_eq!(next_slot_for_update(None).unwrap(), (0, 1));
    }

    #[test]
    fn newer_slot_wins_either_way() {
        let h = decode_header_area(&area_with(&[(0, 7, b"old"), (1, 8, b"new")])).unwrap();
        assert_eq!((h.slot, h.seq, h.payload.as_slice(), h.skipped), (1, 8, &b"new"[..], None));
        let h = decode_header_area(&area_with(&[(0, 9, b"new"), (1, 8, b"old")])).unwrap();
        assert_eq!((h.slot, h.seq, h.payload.as_slice()), (0, 9, &b"new"[..]));
        assert_eq!(next_slot_for_update(Some(&h)).unwrap(), (1, 10));
    }

    #[test]
    fn torn_write_keeps_previous_header() {
        // Active slot 0 seq 5; the update goes to slot 1 with seq 6 and is torn halfway.
        let mut area = area_with(&[(0, 5, b"v5 descriptor")]);
        let cur = decode_header_area(&area).unwrap();
        let (slot, seq) = next_slot_for_update(Some(&cur)).unwrap();
        assert_eq!((slot, seq), (1, 6));
        let payload = vec![0x5a; 10_000];
        let new = encode_slot(seq, &payload).unwrap();
        let off = slot_offset(slot) as usize;
        // Only the first 4 KiB block reached the disk.
        area[off..off + 4096].copy_from_slice(&new[..4096]);
        let h = decode_header_area(&area).unwrap();
        assert_eq!((h.slot, h.seq, h.payload.as_slice()), (0, 5, &b"v5 descriptor"[..]));
        match h.skipped {
            Some((1, SlotError::ChecksumMismatch { stored, computed })) => assert_ne!(stored, computed),
            other => panic!("expected a checksum mismatch on slot 1, got {other:?}"),
        }
        // Torn the other way: payload written, fixed header not.
        let mut area2 = area_with(&[(0, 5, b"v5 descriptor")]);
        area2[off + 4096..off + SLOT_SIZE].copy_from_slice(&new[4096..]);
        let h = decode_header_area(&area2).unwrap();
        assert_eq!((h.slot, h.seq), (0, 5));
        assert_eq!(h.skipped, Some((1, SlotError::BadMagic { found: [0; 8] })));
        // The completed write wins.
        area[off..off + SLOT_SIZE].copy_from_slice(&new);
        let h = decode_header_area(&area).unwrap();
        assert_eq!((h.slot, h.seq, h.payload), (1, 6, payload));
    }

    #[test]
    fn rejects_bad_magic() {
        let mut area = area_with(&[(0, 1, b"x")]);
        area[0] = b'X';
        assert_eq!(slot_err(&area, 0), SlotError::BadMagic { found: *b"XKYDDVOL" });
        let err = decode_header_area(&area).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("slot 0: bad magic 0x584b594444564f4c"), "{msg}");
        assert!(msg.contains("slot 1: empty"), "{msg}");
    }

    #[test]
    fn rejects_wrong_version() {
        let mut area = area_with(&[(0, 1, b"x")]);
        area[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(slot_err(&area, 0), SlotError::UnsupportedVersion { found: 2, supported: 1 });
        assert!(decode_header_area(&area).unwrap_err().to_string().contains("unsupported format version 2"));
    }

    #[test]
    fn rejects_reserved_and_zero_seq() {
        let mut area = area_with(&[(0, 1, b"x")]);
        area[28] = 1;
        assert_eq!(slot_err(&area, 0), SlotError::ReservedNotZero { offset: 28, value: 1 });
        let mut area = area_with(&[(0, 1, b"x")]);
        area[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(slot_err(&area, 0), SlotError::ZeroSequence);
        assert!(encode_slot(0, b"x").is_err());
    }

    #[test]
    fn rejects_checksum_mismatch_with_both_values() {
        let mut area = area_with(&[(0, 3, b"payload")]);
        area[SLOT_HEADER_LEN] ^= 1;
        let SlotError::ChecksumMismatch { stored, computed } = slot_err(&area, 0) else { panic!() };
        let msg = decode_header_area(&area).unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "slot 0: checksum mismatch (stored 0x{}, computed 0x{})",
                hex::encode(stored),
                hex::encode(computed)
            )),
            "{msg}"
        );
        // The sequence number is covered by the checksum too.
        let mut area = area_with(&[(0, 3, b"payload")]);
        area[16] = 4;
        assert!(matches!(slot_err(&area, 0), SlotError::ChecksumMismatch { .. }));
    }

    #[test]
    fn rejects_oversized_payload() {
        let big = vec![1u8; MAX_PAYLOAD_LEN + 1];
        assert_eq!(
            encode_slot(1, &big).unwrap_err(),
            Error::TooLarge { what: "volume header payload", size: MAX_PAYLOAD_LEN + 1, limit: MAX_PAYLOAD_LEN }
        );
        assert!(encode_slot(1, &big[..MAX_PAYLOAD_LEN]).is_ok());
        // A length field beyond the limit is refused before any payload is read.
        let mut area = area_with(&[(0, 1, b"x")]);
        area[24..28].copy_from_slice(&(SLOT_SIZE as u32).to_le_bytes());
        assert_eq!(slot_err(&area, 0), SlotError::PayloadTooLarge { len: SLOT_SIZE, limit: MAX_PAYLOAD_LEN });
    }

    #[test]
    fn rejects_truncated() {
        let slot = encode_slot(1, &[7u8; 1000]).unwrap();
        assert_eq!(decode_slot(&slot[..10]).unwrap_err(), SlotError::Truncated { have: 10, need: SLOT_HEADER_LEN });
        assert_eq!(decode_slot(&slot[..500]).unwrap_err(), SlotError::Truncated { have: 500, need: 1064 });
        let area = new_header_area(b"x").unwrap();
        let err = decode_header_area(&area[..HEADER_AREA_SIZE - 1]).unwrap_err();
        assert!(err.to_string().contains("truncated: 1048575 bytes"), "{err}");
    }

    #[test]
    fn both_slots_invalid_reports_both_reasons() {
        let mut area = area_with(&[(0, 1, b"a"), (1, 2, b"b")]);
        area[SLOT_HEADER_LEN] ^= 0xff;
        area[SLOT_SIZE] = 0;
        let msg = decode_header_area(&area).unwrap_err().to_string();
        assert!(msg.contains("slot 0: checksum mismatch") && msg.contains("slot 1: bad magic"), "{msg}");
    }
}
