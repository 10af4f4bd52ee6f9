//! OpenStack ids of Skydd objects. Domain and attachment ids are 32 lowercase hex characters;
//! OpenStack clients expect UUIDs (python-cinderclient looks a volume up by id only when the
//! argument is one), so the gateway writes them as 8-4-4-4-12 and reads either form.

/// `0123...` (32 hex) as `01234567-89ab-cdef-0123-456789abcdef`; any other text unchanged.
pub fn to_uuid(hex32: &str) -> String {
    if !is_hex32(hex32) {
        return hex32.to_string();
    }
    format!("{}-{}-{}-{}-{}", &hex32[..8], &hex32[8..12], &hex32[12..16], &hex32[16..20], &hex32[20..])
}

/// The 32-hex id of a UUID or 32-hex text (hyphens dropped, lowercased); `None` otherwise.
pub fn from_uuid(text: &str) -> Option<String> {
    let hyphens = text.bytes().filter(|&b| b == b'-').count();
    if hyphens != 0 && (hyphens != 4 || text.len() != 36) {
        return None;
    }
    let hex: String = text.chars().filter(|&c| c != '-').collect::<String>().to_ascii_lowercase();
    is_hex32(&hex).then_some(hex)
}

fn is_hex32(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Unix seconds as OpenStack writes times: `2026-11-30T08:17:03.000000`.
pub fn timestamp(unix_seconds: u64) -> String {
    let Ok(time) = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_seconds).unwrap_or(0)) else {
        return "1970-01-01T00:00:00.000000".into();
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.000000",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let id = "00112233445566778899aabbccddeeff";
        let uuid = to_uuid(id);
        assert_eq!(uuid, "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(from_uuid(&uuid).as_deref(), Some(id));
        assert_eq!(from_uuid(id).as_deref(), Some(id));
        assert_eq!(from_uuid(&uuid.to_uppercase()).as_deref(), Some(id));
        assert_eq!(from_uuid("records"), None);
        assert_eq!(from_uuid("0011-2233445566778899aabbccddeeff"), None);
        assert_eq!(to_uuid("records"), "records");
    }

    #[test]
    fn timestamps_are_iso() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000000");
        assert_eq!(timestamp(1_700_000_000), "2023-11-14T22:13:20.000000");
    }
}
