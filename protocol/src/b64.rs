//! Serde helpers: byte fields travel as standard base64 strings in JSON messages.
//! Use `#[serde(with = "protocol::b64")]` on `Vec<u8>` fields and
//! `#[serde(with = "protocol::b64::option")]` on `Option<Vec<u8>>`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serializer};

/// Serializes bytes as one standard (padded) base64 string.
pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&STANDARD.encode(bytes))
}

/// Deserializes a standard base64 string; invalid base64 is a serde error naming the cause.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    STANDARD.decode(text.as_bytes()).map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
}

/// The same helpers for `Option<Vec<u8>>`: `None` travels as JSON `null`.
pub mod option {
    use super::*;

    /// Serializes `Some(bytes)` as a base64 string and `None` as `null`.
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => serializer.serialize_some(&STANDARD.encode(b)),
            None => serializer.serialize_none(),
        }
    }

    /// Deserializes a base64 string or `null`; invalid base64 is a serde error.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|t| {
            STANDARD.decode(t.as_bytes()).map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
        })
        .transpose()
    }
}

/// The same helpers for `[u8; 32]` (hashes, roots): any other decoded length is refused.
pub mod array32 {
    use super::*;

    /// Serializes the 32 bytes as a base64 string.
    pub fn serialize<S: Serializer>(bytes: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
        super::serialize(bytes, serializer)
    }

    /// Deserializes a base64 string of exactly 32 bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 32], D::Error> {
        let bytes = super::deserialize(deserializer)?;
        let len = bytes.len();
        bytes.try_into().map_err(|_| serde::de::Error::custom(format!("expected 32 bytes, got {len}")))
    }
}

/// Encodes bytes as standard base64 (for messages built by hand, e.g. in errors).
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}
