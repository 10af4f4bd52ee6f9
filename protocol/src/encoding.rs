//! The canonical binary encoding used for everything that is signed or hashed
//! (docs/PROTOCOL.md, "Canonical encoding"): a fixed magic, then fields in a fixed order,
//! each variable-length field as a big-endian u32 length followed by its bytes, integers
//! as big-endian u64. Decoding is strict: every byte must be consumed, lengths are bounded.

use crate::error::{Error, Result};

/// Builds a canonical encoding: the magic, then fields appended in call order. Every signed
/// or hashed object of Skydd is written with it.
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    /// Starts an encoding with `magic`, the fixed bytes that name the object and its version
    /// (e.g. `SKYDD-DESCRIPTOR\x01`).
    pub fn new(magic: &[u8]) -> Self {
        Self { out: magic.to_vec() }
    }

    /// Appends `lp(field)`: a u32 big-endian length, then the bytes.
    pub fn bytes(&mut self, field: &[u8]) -> &mut Self {
        // Fields are bounded far below 4 GiB by the readers' limits.
        self.out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        self.out.extend_from_slice(field);
        self
    }

    /// Appends a string as `lp(UTF-8 bytes)`.
    pub fn str(&mut self, field: &str) -> &mut Self {
        self.bytes(field.as_bytes())
    }

    /// Appends an optional string: the byte 0 if absent, else the byte 1 and `lp(UTF-8 bytes)`,
    /// so an absent field and an empty one encode differently.
    pub fn optional_str(&mut self, field: Option<&str>) -> &mut Self {
        match field {
            None => self.out.push(0),
            Some(value) => {
                self.out.push(1);
                self.str(value);
            }
        }
        self
    }

    /// Appends 8 bytes big-endian.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.out.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Takes the encoded bytes, leaving the writer empty.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

/// Strict decoder of the canonical encoding: reads fields in the order they were written and
/// refuses, naming the field, anything that does not match exactly.
pub struct Reader<'a> {
    what: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `input`, which must begin with `magic`.
    pub fn new(what: &'static str, input: &'a [u8], magic: &[u8]) -> Result<Self> {
        match input.strip_prefix(magic) {
            Some(rest) => Ok(Self { what, rest }),
            None => Err(Error::malformed(what, "wrong magic or format version")),
        }
    }

    /// Reads one `lp(field)`; a length above `limit` is `Error::TooLarge` before any copy, a
    /// short input is `Error::Malformed`.
    pub fn bytes(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8]> {
        if self.rest.len() < 4 {
            return Err(Error::malformed(self.what, format!("truncated before the length of {field}")));
        }
        let (len_bytes, rest) = self.rest.split_at(4);
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if len > limit {
            return Err(Error::TooLarge { what: field, size: len, limit });
        }
        if rest.len() < len {
            return Err(Error::malformed(
                self.what,
                format!("{field} claims {len} bytes but only {} remain", rest.len()),
            ));
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(value)
    }

    /// Reads one `lp(field)` as UTF-8 text, at most `limit` bytes.
    pub fn str(&mut self, field: &'static str, limit: usize) -> Result<&'a str> {
        let raw = self.bytes(field, limit)?;
        std::str::from_utf8(raw).map_err(|_| Error::malformed(self.what, format!("{field} is not UTF-8")))
    }

    /// Reads one `lp(field)` of exactly `N` bytes (hashes, nonces).
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let raw = self.bytes(field, N)?;
        raw.try_into().map_err(|_| Error::malformed(self.what, format!("{field} must be {N} bytes, got {}", raw.len())))
    }

    /// Reads an 8-byte big-endian integer.
    pub fn u64(&mut self, field: &'static str) -> Result<u64> {
        if self.rest.len() < 8 {
            return Err(Error::malformed(self.what, format!("truncated in {field}")));
        }
        let (value, rest) = self.rest.split_at(8);
        self.rest = rest;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(value);
        Ok(u64::from_be_bytes(raw))
    }

    /// Whether every byte has been read (for a trailing field that older encodings lack).
    pub fn is_at_end(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends decoding; trailing bytes are an error (two encodings must never mean the same).
    pub fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::malformed(self.what, format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let encoded = Writer::new(b"T1").str("abc").u64(7).bytes(&[1, 2]).finish();
        let mut reader = Reader::new("test", &encoded, b"T1").unwrap();
        assert_eq!(reader.str("s", 10).unwrap(), "abc");
        assert_eq!(reader.u64("n").unwrap(), 7);
        assert_eq!(reader.bytes("b", 2).unwrap(), &[1, 2]);
        reader.finish().unwrap();

        let mut trailing = encoded.clone();
        trailing.push(0);
        let mut reader = Reader::new("test", &trailing, b"T1").unwrap();
        reader.str("s", 10).unwrap();
        reader.u64("n").unwrap();
        reader.bytes("b", 2).unwrap();
        assert!(reader.finish().is_err());

        let mut reader = Reader::new("test", &encoded, b"T1").unwrap();
        assert!(matches!(reader.str("s", 2), Err(Error::TooLarge { .. })));
        assert!(Reader::new("test", &encoded, b"T2").is_err());
        let mut reader = Reader::new("test", &encoded[..5], b"T1").unwrap();
        assert!(reader.str("s", 10).is_err());
    }
}
