//! The volume header parser (docs/FORMAT.md): one slot, then a whole 1 MiB header area
//! built from two slot images, then the header record in the winning slot's payload.
//! Input: 2 bytes (little-endian split point) || slot 0 image || slot 1 image.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::format::{self, HEADER_AREA_SIZE, SLOT_HEADER_LEN, SLOT_SIZE};
use protocol::messages::HeaderRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(slot) = format::decode_slot(data) {
        // A slot that verifies is exactly what encode_slot writes (up to the zero tail).
        let encoded = format::encode_slot(slot.seq, &slot.payload).expect("a decoded slot re-encodes");
        let end = SLOT_HEADER_LEN + slot.payload.len();
        assert_eq!(&encoded[..end], &data[..end]);
    }
    if data.len() < 2 {
        return;
    }
    let rest = &data[2..];
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) % (rest.len() + 1);
    let (slot0, slot1) = rest.split_at(split);
    let mut area = vec![0u8; HEADER_AREA_SIZE];
    area[..slot0.len().min(SLOT_SIZE)].copy_from_slice(&slot0[..slot0.len().min(SLOT_SIZE)]);
    area[SLOT_SIZE..SLOT_SIZE + slot1.len().min(SLOT_SIZE)].copy_from_slice(&slot1[..slot1.len().min(SLOT_SIZE)]);
    // A truncated area is refused, never read past.
    assert!(format::decode_header_area(&area[..HEADER_AREA_SIZE - 1]).is_err());
    if let Ok(active) = format::decode_header_area(&area) {
        assert!(active.slot < format::SLOT_COUNT && active.seq >= 1);
        let _ = format::next_slot_for_update(Some(&active));
        let _ = active.skipped.as_ref().map(|(_, e)| e.to_string());
        if let Ok(record) = HeaderRecord::decode(&active.payload) {
            let _ = record.unverified_contents();
        }
    } else if let Err(e) = format::decode_header_area(&area) {
        let _ = e.to_string();
    }
});
