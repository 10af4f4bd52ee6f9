//! Signed protocol objects and the JSON wire messages between the parties
//! (docs/PROTOCOL.md, "Messages" and "Message sequences").

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attest::QuoteEvidence;
use crate::domain::{validate_name, AccessMode, Descriptor};
use crate::encoding::{Reader, Writer};
use crate::error::{Error, Result};
use crate::kdf::NONCE_BYTES;
use crate::signing::{SignatureContext, SignedEnvelope};

const REGISTRATION_MAGIC: &[u8] = b"SKYDD-REGISTRATION\x01";
/// Version 2 of the registration: version 1's fields, then `u64 key_generation`; used exactly
/// when the key generation is 2 or more (docs/PROTOCOL.md "Registration").
const REGISTRATION_MAGIC_V2: &[u8] = b"SKYDD-REGISTRATION\x02";
const KEY_ROTATION_MAGIC: &[u8] = b"SKYDD-KEY-ROTATION\x01";
/// Version 2 of the header record: a rotation in progress (docs/PROTOCOL.md "Header record").
const HEADER_RECORD_MAGIC_V2: &[u8] = b"SKYDD-HEADER-RECORD\x02";
const GRANT_MAGIC: &[u8] = b"SKYDD-MOUNT-GRANT\x01";
/// Version 2 of the grant: version 1's fields, then `lp(purpose) lp(reason)`; used exactly
/// when a purpose is given (docs/PROTOCOL.md "Mount grant").
const GRANT_MAGIC_V2: &[u8] = b"SKYDD-MOUNT-GRANT\x02";
const DELETION_MAGIC: &[u8] = b"SKYDD-DELETION\x01";
const HEADER_RECORD_MAGIC: &[u8] = b"SKYDD-HEADER-RECORD\x01";
const PLACEMENT_MAGIC: &[u8] = b"SKYDD-PLACEMENT\x01";

/// The TTP's registration of one descriptor version, signed by the TTP. It carries the
/// nonce `r` of the key derivation; `r` is not secret (K_TTP is), but without it the key
/// cannot be derived again, so destroying every header crypto-shreds the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The registered domain (32 lowercase hex characters).
    pub domain_id: String,
    /// The descriptor version this registration is for; the TTP releases keys only for the
    /// newest registered version.
    pub version: u64,
    /// SHA-256 of the canonical descriptor encoding: ties the registration to exactly one
    /// owner-signed descriptor (`registration_mismatch` at key release otherwise).
    pub descriptor_hash: [u8; 32],
    /// `H(meta)`: SHA-256 of the descriptor's metadata encoding, an input of the key derivation
    /// (docs/PROTOCOL.md "Key derivation").
    pub metadata_hash: [u8; 32],
    /// The nonce `r`, HKDF salt of the domain key: drawn by the TTP at version 1 and carried
    /// over to every later version. The TTP never stores it.
    pub nonce_r: [u8; NONCE_BYTES],
    /// Unix seconds.
    pub registered_at: u64,
    /// The key generation this registration's `r` belongs to: 1 for the key drawn at
    /// version 1, one more at each key rotation (docs/PROTOCOL.md "Key rotation"). The TTP
    /// releases keys only for a domain's newest generation (and, during a rotation, the one
    /// before it).
    pub key_generation: u64,
}

impl Registration {
    /// The canonical encoding the TTP signs (docs/PROTOCOL.md "Registration"): version 1 for
    /// key generation 1 (byte for byte as before rotation existed), version 2 otherwise.
    pub fn encode(&self) -> Vec<u8> {
        let rotated = self.key_generation != 1;
        let mut writer = Writer::new(if rotated { REGISTRATION_MAGIC_V2 } else { REGISTRATION_MAGIC });
        writer
            .str(&self.domain_id)
            .u64(self.version)
            .bytes(&self.descriptor_hash)
            .bytes(&self.metadata_hash)
            .bytes(&self.nonce_r)
            .u64(self.registered_at);
        if rotated {
            writer.u64(self.key_generation);
        }
        writer.finish()
    }

    /// Strict decoding of [`Registration::encode`]'s output, version 1 or 2 (no signature
    /// check). A version-2 encoding must name a key generation of 2 or more, so no
    /// registration has two encodings.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let rotated = encoded.starts_with(REGISTRATION_MAGIC_V2);
        let magic = if rotated { REGISTRATION_MAGIC_V2 } else { REGISTRATION_MAGIC };
        let mut reader = Reader::new("registration", encoded, magic)?;
        let mut registration = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            version: reader.u64("version")?,
            descriptor_hash: reader.array("descriptor hash")?,
            metadata_hash: reader.array("metadata hash")?,
            nonce_r: reader.array("nonce r")?,
            registered_at: reader.u64("registration time")?,
            key_generation: 1,
        };
        if rotated {
            registration.key_generation = reader.u64("key generation")?;
            if registration.key_generation < 2 {
                return Err(Error::malformed(
                    "registration",
                    format!(
                        "a version-2 registration names key generation {}, not 2 or more",
                        registration.key_generation
                    ),
                ));
            }
        }
        reader.finish()?;
        Ok(registration)
    }
}

/// The owner's signed request for a new key of a domain (docs/PROTOCOL.md "Key rotation"):
/// the TTP registers key generation `from_generation + 1` with a fresh `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotation {
    /// The domain whose key is replaced; its owner must sign.
    pub domain_id: String,
    /// The key generation in force when the owner asked (the volume header's); the new key
    /// is generation `from_generation + 1`.
    pub from_generation: u64,
    /// When the owner asked, unix seconds.
    pub requested_at: u64,
}

impl KeyRotation {
    /// The canonical encoding the owner signs (context `key-rotation`).
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(KEY_ROTATION_MAGIC).str(&self.domain_id).u64(self.from_generation).u64(self.requested_at).finish()
    }

    /// Strict decoding of [`KeyRotation::encode`]'s output (no signature check).
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("key rotation", encoded, KEY_ROTATION_MAGIC)?;
        let rotation = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            from_generation: reader.u64("from generation")?,
            requested_at: reader.u64("time")?,
        };
        reader.finish()?;
        Ok(rotation)
    }
}

/// The longest a mount grant may be valid, in seconds from the moment the TTP sees it. A
/// grant is made for one attach and used within seconds; the TTP refuses a longer one
/// (`grant_too_long`), so every grant and its single-use mark expire (docs/PROTOCOL.md,
/// "Mount grant").
pub const MAX_GRANT_VALIDITY_SECS: u64 = 3600;

/// The purpose of use that makes a key release a break-glass release: the TTP refuses it
/// without a reason (`break_glass_reason_missing`) and audits it as `break_glass_release`.
pub const PURPOSE_EMERGENCY: &str = "emergency";
/// Longest purpose of use in bytes (32).
pub const MAX_PURPOSE_BYTES: usize = 32;
/// Longest reason in a mount grant in bytes (1024).
pub const MAX_REASON_BYTES: usize = 1024;

/// Checks a grant's purpose of use: empty (none given), or 1 to [`MAX_PURPOSE_BYTES`]
/// characters of `a-z 0-9 _ -` (e.g. `treatment`, `research`, `emergency`).
pub fn validate_purpose(purpose: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-');
    if purpose.len() > MAX_PURPOSE_BYTES || !purpose.chars().all(ok) {
        return Err(Error::malformed(
            "purpose",
            format!("{purpose:?} must be at most {MAX_PURPOSE_BYTES} characters of a-z 0-9 _ -"),
        ));
    }
    Ok(())
}

/// Checks a grant's reason: at most [`MAX_REASON_BYTES`], no control characters (it is
/// printed in the owner's viewing history).
pub fn validate_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Error::TooLarge { what: "reason", size: reason.len(), limit: MAX_REASON_BYTES });
    }
    if reason.chars().any(char::is_control) {
        return Err(Error::malformed("reason", "the reason contains a control character"));
    }
    Ok(())
}

/// A domain manager's signed permission for one VM to mount one domain: the paper's
/// "credential that proves v has access".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountGrant {
    /// The domain the VM may mount.
    pub domain_id: String,
    /// The VM allowed to mount it; must match the key release request's VM and be in the ACL.
    pub vm_id: String,
    /// The mode granted; the request's mode must be covered by it (`grant_mismatch` otherwise).
    pub mode: AccessMode,
    /// Unix seconds after which the grant is refused.
    pub expires_at: u64,
    /// Makes every grant unique (and traceable in the audit log).
    pub nonce: [u8; 16],
    /// The signing domain manager's name (must match its certificate).
    pub issuer: String,
    /// The purpose of use the signer states (`treatment`, `research`, [`PURPOSE_EMERGENCY`],
    /// ...), empty if none: the access policy's `context.purpose`.
    pub purpose: String,
    /// Why, in the signer's words (may be empty; required for [`PURPOSE_EMERGENCY`]): the
    /// policy's `context.reason`, and written to the audit record of a break-glass release.
    pub reason: String,
}

impl MountGrant {
    /// The canonical encoding the issuer signs (docs/PROTOCOL.md "Mount grant").
    /// A grant without a purpose (and so without a reason) is version 1, as before.
    pub fn encode(&self) -> Vec<u8> {
        let with_purpose = !self.purpose.is_empty() || !self.reason.is_empty();
        let mut writer = Writer::new(if with_purpose { GRANT_MAGIC_V2 } else { GRANT_MAGIC });
        writer
            .str(&self.domain_id)
            .str(&self.vm_id)
            .str(self.mode.as_str())
            .u64(self.expires_at)
            .bytes(&self.nonce)
            .str(&self.issuer);
        if with_purpose {
            writer.str(&self.purpose).str(&self.reason);
        }
        writer.finish()
    }

    /// Strict decoding of [`MountGrant::encode`]'s output (version 1 or 2); also checks the
    /// VM id and issuer are valid names, and the purpose and reason. A version-2 grant must
    /// name a purpose (without one it is version 1). No signature check.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let with_purpose = encoded.starts_with(GRANT_MAGIC_V2);
        let magic = if with_purpose { GRANT_MAGIC_V2 } else { GRANT_MAGIC };
        let mut reader = Reader::new("mount grant", encoded, magic)?;
        let mut grant = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            vm_id: reader.str("vm id", 64)?.to_string(),
            mode: reader.str("mode", 2)?.parse()?,
            expires_at: reader.u64("expiry")?,
            nonce: reader.array("grant nonce")?,
            issuer: reader.str("issuer", 64)?.to_string(),
            purpose: String::new(),
            reason: String::new(),
        };
        if with_purpose {
            grant.purpose = reader.str("purpose", MAX_PURPOSE_BYTES)?.to_string();
            grant.reason = reader.str("reason", MAX_REASON_BYTES)?.to_string();
            if grant.purpose.is_empty() {
                return Err(Error::malformed("mount grant", "a version-2 grant must name a purpose"));
            }
        }
        reader.finish()?;
        validate_name("vm id", &grant.vm_id)?;
        validate_name("issuer", &grant.issuer)?;
        validate_purpose(&grant.purpose)?;
        validate_reason(&grant.reason)?;
        Ok(grant)
    }
}

/// The digest that names one mount grant: SHA-256 of its signed message. The TTP marks it
/// used at the key release; a [`Placement`] carries it to be good for that grant only.
pub fn grant_digest(grant: &SignedEnvelope) -> [u8; 32] {
    Sha256::digest(&grant.message).into()
}

/// How long a [`Placement`] is accepted after the cloud platform signed it. An attach uses
/// its placement within seconds; the bound keeps a placement that was intercepted and held
/// back from naming a host the VM has since left.
pub const MAX_PLACEMENT_AGE_SECS: u64 = 300;

/// How far ahead of the TTP's clock a placement's time may be (clock skew between hosts).
pub const PLACEMENT_CLOCK_SKEW_SECS: u64 = 60;

/// The cloud platform's signed statement that a VM runs on a compute host, made for one
/// attach: the TTP releases a key only to the host the operator placed the VM on
/// (docs/PROTOCOL.md, "Placement"). A tenant cannot make one (it needs a cloud-platform
/// certificate), and a host cannot reuse one made for another host, VM or grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The VM being attached; must be the key release's VM.
    pub vm_id: String,
    /// The compute host the VM runs on; must be the host that attests and asks for the key.
    pub host_id: String,
    /// [`grant_digest`] of the mount grant of this attach: the placement is good for that
    /// grant, which is itself single-use.
    pub grant_digest: [u8; 32],
    /// When the cloud platform signed it, unix seconds ([`MAX_PLACEMENT_AGE_SECS`]).
    pub placed_at: u64,
}

impl Placement {
    /// The canonical encoding the cloud platform signs (docs/PROTOCOL.md "Placement").
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(PLACEMENT_MAGIC)
            .str(&self.vm_id)
            .str(&self.host_id)
            .bytes(&self.grant_digest)
            .u64(self.placed_at)
            .finish()
    }

    /// Strict decoding of [`Placement::encode`]'s output; also checks the VM and host ids
    /// are valid names. No signature check.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("placement", encoded, PLACEMENT_MAGIC)?;
        let placement = Self {
            vm_id: reader.str("vm id", 64)?.to_string(),
            host_id: reader.str("host id", 64)?.to_string(),
            grant_digest: reader.array("grant digest")?,
            placed_at: reader.u64("placement time")?,
        };
        reader.finish()?;
        validate_name("vm id", &placement.vm_id)?;
        validate_name("host id", &placement.host_id)?;
        Ok(placement)
    }
}

/// The owner's signed request to delete (crypto-shred) a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// The domain to delete; its owner must sign, or the TTP refuses with `owner_mismatch`.
    pub domain_id: String,
    /// When the owner asked for the deletion, unix seconds.
    pub requested_at: u64,
}

impl Deletion {
    /// The canonical encoding the owner signs (docs/PROTOCOL.md "Deletion").
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(DELETION_MAGIC).str(&self.domain_id).u64(self.requested_at).finish()
    }

    /// Strict decoding of [`Deletion::encode`]'s output (no signature check).
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("deletion", encoded, DELETION_MAGIC)?;
        let deletion = Self { domain_id: reader.str("domain id", 64)?.to_string(), requested_at: reader.u64("time")? };
        reader.finish()?;
        Ok(deletion)
    }
}

/// The most data sectors one hotzone of a re-encryption covers: 2048 × 4096 bytes = 8 MiB
/// (docs/FORMAT.md "Key rotation").
pub const MAX_HOTZONE_SECTORS: usize = 2048;

/// The sectors being re-encrypted right now, recorded durably in the header before any of
/// them is overwritten (docs/FORMAT.md "Key rotation"): after a crash each is settled by
/// comparing its ciphertext with these checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hotzone {
    /// The first data sector of the hotzone; equals the rotation's boundary.
    pub first: u64,
    /// BLAKE3-256 of each sector's ciphertext under the previous key, 32 bytes per sector.
    #[serde(with = "crate::b64")]
    pub old_sums: Vec<u8>,
    /// BLAKE3-256 of each sector's ciphertext under the new key, 32 bytes per sector.
    #[serde(with = "crate::b64")]
    pub new_sums: Vec<u8>,
}

impl Hotzone {
    /// How many sectors the hotzone covers.
    pub fn sectors(&self) -> u64 {
        (self.old_sums.len() / 32) as u64
    }
}

/// A key rotation in progress on a volume: the data sectors below `boundary` are under the
/// new key (the header record's registration), those at and above it under the previous key
/// (`previous_registration`), and the hotzone, if any, is being moved across.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationState {
    /// The TTP's registration of the previous key generation (its `r`).
    pub previous_registration: SignedEnvelope,
    /// Data sectors `[0, boundary)` are encrypted with the new key.
    pub boundary: u64,
    /// The sectors from `boundary` being re-encrypted now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotzone: Option<Hotzone>,
}

/// What a volume header slot holds (its payload, docs/FORMAT.md): the owner-signed
/// descriptor and the TTP-signed registration of that very descriptor, and during a key
/// rotation the previous key generation's registration and the re-encryption's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRecord {
    /// The descriptor, signed by its owner (context `descriptor`).
    pub descriptor: SignedEnvelope,
    /// The TTP's registration of that descriptor, signed by the TTP (context `registration`).
    pub registration: SignedEnvelope,
    /// A key rotation in progress (header record version 2), `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationState>,
}

impl HeaderRecord {
    /// The slot payload: `"SKYDD-HEADER-RECORD\x01" lp(descriptor envelope) lp(registration
    /// envelope)`, or with a rotation in progress version 2, which adds `lp(previous
    /// registration envelope) u64 boundary u64 hotzone_first lp(old sums) lp(new sums)`
    /// (docs/PROTOCOL.md "Header record").
    pub fn encode(&self) -> Vec<u8> {
        let Some(rotation) = &self.rotation else {
            return Writer::new(HEADER_RECORD_MAGIC)
                .bytes(&self.descriptor.encode())
                .bytes(&self.registration.encode())
                .finish();
        };
        let empty = Hotzone { first: 0, old_sums: Vec::new(), new_sums: Vec::new() };
        let hotzone = rotation.hotzone.as_ref().unwrap_or(&empty);
        Writer::new(HEADER_RECORD_MAGIC_V2)
            .bytes(&self.descriptor.encode())
            .bytes(&self.registration.encode())
            .bytes(&rotation.previous_registration.encode())
            .u64(rotation.boundary)
            .u64(hotzone.first)
            .bytes(&hotzone.old_sums)
            .bytes(&hotzone.new_sums)
            .finish()
    }

    /// Strict decoding of a slot payload (version 1 or 2); the descriptor envelope may be up
    /// to 300 KiB, each registration envelope up to 32 KiB, each checksum list
    /// [`MAX_HOTZONE_SECTORS`] × 32 bytes. Signatures are not checked here.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let rotating = encoded.starts_with(HEADER_RECORD_MAGIC_V2);
        let magic = if rotating { HEADER_RECORD_MAGIC_V2 } else { HEADER_RECORD_MAGIC };
        let mut reader = Reader::new("header record", encoded, magic)?;
        let descriptor = SignedEnvelope::decode(reader.bytes("signed descriptor", 300 * 1024)?)?;
        let registration = SignedEnvelope::decode(reader.bytes("signed registration", 32 * 1024)?)?;
        let rotation = if rotating {
            let previous_registration =
                SignedEnvelope::decode(reader.bytes("signed previous registration", 32 * 1024)?)?;
            let boundary = reader.u64("rotation boundary")?;
            let first = reader.u64("hotzone first sector")?;
            let old_sums = reader.bytes("hotzone old checksums", MAX_HOTZONE_SECTORS * 32)?.to_vec();
            let new_sums = reader.bytes("hotzone new checksums", MAX_HOTZONE_SECTORS * 32)?.to_vec();
            if old_sums.len() != new_sums.len() || !old_sums.len().is_multiple_of(32) {
                return Err(Error::malformed(
                    "header record",
                    "the hotzone's checksum lists differ in length or are not whole 32-byte sums",
                ));
            }
            let hotzone = if old_sums.is_empty() {
                if first != 0 {
                    return Err(Error::malformed("header record", "an empty hotzone must start at 0"));
                }
                None
            } else {
                if first != boundary {
                    return Err(Error::malformed(
                        "header record",
                        format!("the hotzone starts at sector {first}, not at the boundary {boundary}"),
                    ));
                }
                Some(Hotzone { first, old_sums, new_sums })
            };
            Some(RotationState { previous_registration, boundary, hotzone })
        } else {
            None
        };
        reader.finish()?;
        Ok(Self { descriptor, registration, rotation })
    }

    /// Decodes the descriptor and registration without checking any signature (the TTP
    /// checks them; the CP and SC only read ids and versions for routing).
    pub fn unverified_contents(&self) -> Result<(Descriptor, Registration)> {
        Ok((Descriptor::decode(&self.descriptor.message)?, Registration::decode(&self.registration.message)?))
    }
}

// ---- JSON wire messages ------------------------------------------------------------------

/// CP → TTP: register version 1 (no previous registration) or a newer version of a domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterDomainRequest {
    /// The descriptor to register, signed by its owner; the TTP checks the signature and the
    /// owner's certificate (`descriptor_signature_invalid`).
    pub descriptor: SignedEnvelope,
    /// The registration of the version being replaced; the TTP carries its `r` over.
    pub previous_registration: Option<SignedEnvelope>,
}

/// CP → TTP `POST /v1/domains/{id}/rotations`: register a new key generation
/// (docs/PROTOCOL.md "Key rotation").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateKeyRequest {
    /// The owner-signed [`KeyRotation`] (context `key-rotation`).
    pub rotation: SignedEnvelope,
    /// The registration in the volume header now: the newest version, of the generation
    /// the rotation starts from. The new registration keeps its version and descriptor.
    pub current_registration: SignedEnvelope,
}

/// TTP → CP: the answer to a [`RegisterDomainRequest`] or a [`RotateKeyRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterDomainResponse {
    /// The new registration, signed by the TTP; the CP writes it with the descriptor into the
    /// volume header.
    pub registration: SignedEnvelope,
}

/// SC → TTP: a fresh single-use nonce to quote over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// Id to name in the [`KeyReleaseRequest`] that uses this nonce.
    pub challenge_id: String,
    /// The nonce (32 random bytes) the SC quotes over (TPM2_Quote qualifying data).
    #[serde(with = "crate::b64")]
    pub nonce: Vec<u8>,
    /// Unix seconds; the challenge is refused after this (60 s after issue) or after one use.
    pub expires_at: u64,
}

/// SC → TTP: release the key of the domain in `header` for `vm_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyReleaseRequest {
    /// The requesting host; must equal the CN of the caller's certificate (`forbidden`) and be
    /// enrolled (`host_unknown`).
    pub host_id: String,
    /// The VM that will get the volume; checked against the ACL and the grant.
    pub vm_id: String,
    /// Requested mode; the ACL entry and the grant must both cover it.
    pub mode: AccessMode,
    /// The header record read from the volume: owner-signed descriptor plus its registration.
    pub header: HeaderRecord,
    /// The mount grant, signed by the owner or a shared manager; used up by this release.
    pub grant: SignedEnvelope,
    /// The cloud platform's signed [`Placement`] of `vm_id` on `host_id` for this grant
    /// (`placement_invalid` / `placement_mismatch` otherwise).
    pub placement: SignedEnvelope,
    /// The `challenge_id` of a [`ChallengeResponse`] issued to this host, unused and unexpired.
    pub challenge_id: String,
    /// The TPM quote over the challenge nonce (with a launched image: over
    /// [`quote_qualifying_data`](crate::image::quote_qualifying_data)) and the host's PCR
    /// selection; its PCR digest must equal the host's reference state (`pcr_mismatch`
    /// otherwise).
    pub quote: QuoteEvidence,
    /// The allowlisted image the secure component launched `vm_id` from, bound to the quote
    /// (docs/PROTOCOL.md "Trusted launch"); absent for a VM it did not launch. A TTP with an
    /// image allowlist refuses a release without one (`image_not_allowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_image: Option<crate::image::LaunchedImage>,
}

/// TTP → SC: the domain key, encrypted (RSA-OAEP) to the host's PCR-bound binding key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyReleaseResponse {
    /// The domain whose key this is.
    pub domain_id: String,
    /// The descriptor version the key was released for.
    pub version: u64,
    /// The released keys, [`RELEASED_KEYS_BYTES`](crate::kdf::RELEASED_KEYS_BYTES) = the 64-byte
    /// domain key followed by the 32-byte sector-tag key `K_mac` (docs/PROTOCOL.md "Key
    /// derivation"), RSA-OAEP-encrypted to the host's binding key (256 bytes, label
    /// [`BINDING_OAEP_LABEL`](crate::attest::BINDING_OAEP_LABEL)); only the host's TPM, in the
    /// enrolled PCR state, can decrypt it.
    #[serde(with = "crate::b64")]
    pub wrapped_key: Vec<u8>,
    /// Sequence number of the audit record of this release.
    pub audit_seq: u64,
    /// The newest [`IntegrityAnchor`](crate::integrity::IntegrityAnchor) of a format-2
    /// domain, signed by the TTP; `None` before its first commit (and for format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity_anchor: Option<SignedEnvelope>,
    /// During a key rotation (a header with a [`RotationState`]): the previous key
    /// generation's keys, wrapped like `wrapped_key`, so the read-write host can re-encrypt
    /// (docs/PROTOCOL.md "Key rotation"). `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::b64::option")]
    pub previous_wrapped_key: Option<Vec<u8>>,
}

/// CP → TTP `POST /v1/domains/{id}/delete`: tombstone a domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteDomainRequest {
    /// The owner-signed [`Deletion`].
    pub deletion: SignedEnvelope,
}

/// One record of the hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// "key_release", "register", "delete", "enroll", "launch"... (docs/PROTOCOL.md "Audit records").
    pub event: String,
    /// "ok" or the refusal's error code.
    pub outcome: String,
    /// Detail for a person: what was done or why it was refused.
    pub message: String,
    /// The domain concerned, if any (enrollment records have none).
    pub domain_id: Option<String>,
    /// The compute host concerned, if any.
    pub host_id: Option<String>,
    /// The VM concerned, if any (key releases).
    pub vm_id: Option<String>,
    /// The authenticated caller (certificate name).
    pub actor: String,
    /// `hash` of the previous record (64 hex characters), or [`AUDIT_GENESIS_HASH`] for record 1.
    pub prev_hash: String,
    /// [`AuditRecord::compute_hash`] of this record, lowercase hex; editing any field breaks it.
    pub hash: String,
    /// The hashed encoding's version: [`AUDIT_FORMAT_TAGGED`] for records written now,
    /// [`AUDIT_FORMAT_LEGACY`] (also when absent in JSON) for records written before optional
    /// fields were tagged; those still verify (docs/PROTOCOL.md "Audit records").
    #[serde(default = "legacy_audit_format")]
    pub format: u8,
}

/// Audit records written before version 2: `None` and `Some("")` hashed alike.
pub const AUDIT_FORMAT_LEGACY: u8 = 1;
/// Audit records with a presence tag before every optional field (absent ≠ empty).
pub const AUDIT_FORMAT_TAGGED: u8 = 2;

fn legacy_audit_format() -> u8 {
    AUDIT_FORMAT_LEGACY
}

impl AuditRecord {
    /// SHA-256 over the previous hash and every field but `hash`, canonically encoded in the
    /// record's `format`: version 2 (`SKYDD-AUDIT\x02`) writes each optional field as a
    /// presence byte (0 absent, 1 present) followed, if present, by the string, so `None` and
    /// `Some("")` hash differently; version 1 (`SKYDD-AUDIT\x01`, legacy) wrote an absent field
    /// as the empty string. An unknown format hashes to a value no record can carry.
    pub fn compute_hash(&self) -> String {
        let mut writer = match self.format {
            AUDIT_FORMAT_LEGACY => Writer::new(b"SKYDD-AUDIT\x01"),
            AUDIT_FORMAT_TAGGED => Writer::new(b"SKYDD-AUDIT\x02"),
            _ => return format!("unknown audit record format {}", self.format),
        };
        writer.u64(self.seq).u64(self.at).str(&self.event).str(&self.outcome).str(&self.message);
        for field in [&self.domain_id, &self.host_id, &self.vm_id] {
            if self.format == AUDIT_FORMAT_LEGACY {
                writer.str(field.as_deref().unwrap_or(""));
            } else {
                writer.optional_str(field.as_deref());
            }
        }
        writer.str(&self.actor).str(&self.prev_hash);
        hex::encode(Sha256::digest(writer.finish()))
    }
}

/// The hash that precedes the first audit record.
pub const AUDIT_GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Checks a contiguous run of the audit chain (sequence numbers consecutive, each record's
/// hash correct, each linked to its predecessor). Returns what is wrong, naming the record.
pub fn verify_audit_chain(records: &[AuditRecord], expected_first_prev: Option<&str>) -> Result<()> {
    let bad = |detail: String| Error::malformed("audit chain", detail);
    let mut previous: Option<&AuditRecord> = None;
    for record in records {
        if record.format != AUDIT_FORMAT_LEGACY && record.format != AUDIT_FORMAT_TAGGED {
            return Err(bad(format!("record {} has unknown format {}", record.seq, record.format)));
        }
        if record.compute_hash() != record.hash {
            return Err(bad(format!("record {} was edited (its hash does not match its contents)", record.seq)));
        }
        match previous {
            Some(prev) => {
                // Once the log writes tagged records, a legacy one after them is a downgrade.
                if record.format < prev.format {
                    return Err(bad(format!(
                        "record {} is in format {} after record {} in format {} (downgraded)",
                        record.seq, record.format, prev.seq, prev.format
                    )));
                }
                if prev.seq.checked_add(1) != Some(record.seq) {
                    return Err(bad(if record.seq > prev.seq {
                        format!("records {} to {} are missing", prev.seq + 1, record.seq - 1)
                    } else {
                        format!("record {} follows record {} (out of order)", record.seq, prev.seq)
                    }));
                }
                if record.prev_hash != prev.hash {
                    return Err(bad(format!("record {} does not link to record {}", record.seq, prev.seq)));
                }
            }
            None => {
                if let Some(expected) = expected_first_prev {
                    if record.prev_hash != expected {
                        return Err(bad(format!("record {} does not link to its predecessor", record.seq)));
                    }
                }
            }
        }
        previous = Some(record);
    }
    Ok(())
}

/// TTP → domain manager `GET /v1/domains/{id}/history`: who had the domain's key released,
/// and every registration, refusal and deletion of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResponse {
    /// The domain asked about.
    pub domain_id: String,
    /// The records that name this domain, in chain order. Not a contiguous run of the chain;
    /// each record's own hash is checked before the TTP answers (`audit_chain_broken`), in
    /// O(this domain's records).
    pub records: Vec<AuditRecord>,
    /// The TTP's newest signed [`AuditCheckpoint`] of the whole chain's head (context
    /// `audit-checkpoint`); a new one is signed once the newest is older than the TTP's
    /// checkpoint interval. `None` only from a TTP without checkpoints.
    #[serde(default)]
    pub checkpoint: Option<SignedEnvelope>,
    /// The record at the sequence number the reader asked about (`?since=SEQ`, the seq of
    /// the last checkpoint it saw), so that it can check that record's hash against that
    /// checkpoint: a log cut short before SEQ has none, a forked log another hash.
    #[serde(default)]
    pub since: Option<AuditRecord>,
}

const CHECKPOINT_MAGIC: &[u8] = b"SKYDD-AUDIT-CHECKPOINT\x01";

/// The head of the TTP's audit chain at an instant, signed by the TTP (context
/// `audit-checkpoint`, docs/PROTOCOL.md "Audit checkpoints"). A reader that keeps the last one
/// it saw detects a log cut short (the next checkpoint's `seq` is lower, or the record at the
/// old `seq` is gone) or forked (that record's hash differs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    /// Sequence number of the chain's newest record.
    pub seq: u64,
    /// That record's hash (hex).
    pub hash: String,
    /// Unix seconds when the TTP signed it.
    pub at: u64,
}

impl AuditCheckpoint {
    /// The canonical encoding the TTP signs.
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(CHECKPOINT_MAGIC).u64(self.seq).str(&self.hash).u64(self.at).finish()
    }

    /// Strict decoding of [`AuditCheckpoint::encode`]'s output (no signature check).
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("audit checkpoint", encoded, CHECKPOINT_MAGIC)?;
        let checkpoint =
            Self { seq: reader.u64("seq")?, hash: reader.str("hash", 64)?.to_string(), at: reader.u64("time")? };
        reader.finish()?;
        Ok(checkpoint)
    }

    /// Compares this checkpoint (the reader's last) with a newer read: the newer checkpoint
    /// and the record at this checkpoint's seq that came with it. `Err` says how the log
    /// was cut short or forked.
    pub fn check_successor(&self, newer: &AuditCheckpoint, record_at_seq: Option<&AuditRecord>) -> Result<()> {
        let bad = |detail: String| Err(Error::malformed("audit chain", detail));
        if newer.seq < self.seq {
            return bad(format!(
                "the audit log was cut short: it ends at record {}, but record {} was seen before",
                newer.seq, self.seq
            ));
        }
        match record_at_seq {
            None => bad(format!("the audit log was cut short: record {} seen before is gone", self.seq)),
            Some(record) if record.seq != self.seq || record.hash != self.hash => bad(format!(
                "the audit log was forked: record {} now has hash {}, a checkpoint of {} named {}",
                self.seq, record.hash, self.at, self.hash
            )),
            Some(record) if record.hash != record.compute_hash() => {
                bad(format!("audit record {} does not match its own hash", record.seq))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Binds the signed envelope context to its decoded type, for callers that verify.
pub fn decode_descriptor(envelope: &SignedEnvelope) -> Result<Descriptor> {
    envelope.verify_signature(SignatureContext::Descriptor)?;
    Descriptor::decode(&envelope.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, prev: &str) -> AuditRecord {
        let mut r = AuditRecord {
            seq,
            at: 1_700_000_000 + seq,
            event: "key_release".into(),
            outcome: "ok".into(),
            message: format!("record {seq}"),
            domain_id: Some("d".into()),
            host_id: None,
            vm_id: Some("vm-a".into()),
            actor: "host-1".into(),
            prev_hash: prev.into(),
            hash: String::new(),
            format: AUDIT_FORMAT_TAGGED,
        };
        r.hash = r.compute_hash();
        r
    }

    /// Issue 21: an absent field and an empty one must not hash alike (one meaning per hash),
    /// and records written in the legacy format still verify.
    #[test]
    fn audit_hash_tells_absent_from_empty_and_legacy_records_verify() {
        let absent = record(1, AUDIT_GENESIS_HASH);
        assert_eq!(absent.host_id, None);
        let mut empty = absent.clone();
        empty.host_id = Some(String::new());
        assert_ne!(absent.compute_hash(), empty.compute_hash());

        let mut legacy = absent.clone();
        legacy.format = AUDIT_FORMAT_LEGACY;
        let mut legacy_empty = empty.clone();
        legacy_empty.format = AUDIT_FORMAT_LEGACY;
        assert_eq!(legacy.compute_hash(), legacy_empty.compute_hash(), "the ambiguity the tag removes");
        legacy.hash = legacy.compute_hash();
        let next = record(2, &legacy.hash);
        verify_audit_chain(&[legacy.clone(), next.clone()], Some(AUDIT_GENESIS_HASH)).unwrap();

        // A record without `format` in its JSON is a legacy record.
        let mut json: serde_json::Value = serde_json::to_value(&legacy).unwrap();
        json.as_object_mut().unwrap().remove("format");
        let parsed: AuditRecord = serde_json::from_value(json).unwrap();
        assert_eq!(parsed, legacy);

        // A legacy record after a tagged one is a downgrade.
        let mut downgraded = record(3, &next.hash);
        downgraded.format = AUDIT_FORMAT_LEGACY;
        downgraded.hash = downgraded.compute_hash();
        let err = verify_audit_chain(&[next, downgraded], None).unwrap_err().to_string();
        assert!(err.contains("downgraded"), "{err}");
    }

    #[test]
    fn audit_chain_detects_edit_and_removal() {
        let a = record(1, AUDIT_GENESIS_HASH);
        let b = record(2, &a.hash);
        let c = record(3, &b.hash);
        verify_audit_chain(&[a.clone(), b.clone(), c.clone()], Some(AUDIT_GENESIS_HASH)).unwrap();

        let err = verify_audit_chain(&[a.clone(), c.clone()], None).unwrap_err().to_string();
        assert!(err.contains("records 2 to 2 are missing"), "{err}");

        let mut edited = b.clone();
        edited.outcome = "vm_not_in_acl".into();
        let err = verify_audit_chain(&[a.clone(), edited, c.clone()], None).unwrap_err().to_string();
        assert!(err.contains("record 2 was edited"), "{err}");

        let mut relinked = b.clone();
        relinked.prev_hash = AUDIT_GENESIS_HASH.into();
        relinked.hash = relinked.compute_hash();
        let err = verify_audit_chain(&[a, relinked, c], None).unwrap_err().to_string();
        assert!(err.contains("record 2 does not link"), "{err}");
    }

    /// Fuzzing finding (fuzz target json_messages): a sequence number that goes back (0
    /// after 5) or a predecessor at u64::MAX overflowed the "records a to b are missing"
    /// arithmetic (a panic with overflow checks, a wrong message without).
    #[test]
    fn audit_chain_out_of_order_sequence_is_an_error_not_an_overflow() {
        let a = record(5, AUDIT_GENESIS_HASH);
        let b = record(0, &a.hash);
        let err = verify_audit_chain(&[a, b], None).unwrap_err().to_string();
        assert!(err.contains("record 0 follows record 5 (out of order)"), "{err}");
        let mut a = record(1, AUDIT_GENESIS_HASH);
        a.seq = u64::MAX;
        a.hash = a.compute_hash();
        let b = record(3, &a.hash);
        let err = verify_audit_chain(&[a, b], None).unwrap_err().to_string();
        assert!(err.contains(&format!("record 3 follows record {}", u64::MAX)), "{err}");
    }

    /// A registration of key generation 1 with recognisable fields.
    fn registration() -> Registration {
        Registration {
            domain_id: "00112233445566778899aabbccddeeff".into(),
            version: 3,
            descriptor_hash: [1; 32],
            metadata_hash: [2; 32],
            nonce_r: [3; 32],
            registered_at: 9,
            key_generation: 1,
        }
    }

    #[test]
    fn grant_and_registration_round_trip() {
        let grant = MountGrant {
            domain_id: "00112233445566778899aabbccddeeff".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Ro,
            expires_at: 42,
            nonce: [7; 16],
            issuer: "dm-alice".into(),
            purpose: String::new(),
            reason: String::new(),
        };
        assert_eq!(MountGrant::decode(&grant.encode()).unwrap(), grant);
        assert!(grant.encode().starts_with(GRANT_MAGIC));
        let emergency = MountGrant {
            purpose: PURPOSE_EMERGENCY.into(),
            reason: "patient unconscious, no consent possible".into(),
            ..grant.clone()
        };
        assert!(emergency.encode().starts_with(GRANT_MAGIC_V2));
        assert_eq!(MountGrant::decode(&emergency.encode()).unwrap(), emergency);
        // A reason without a purpose, a purpose with capitals, a reason with an escape: refused.
        let no_purpose = MountGrant { purpose: String::new(), ..emergency.clone() };
        assert!(MountGrant::decode(&no_purpose.encode()).unwrap_err().to_string().contains("must name a purpose"));
        let shouting = MountGrant { purpose: "Treatment".into(), ..emergency.clone() };
        assert!(MountGrant::decode(&shouting.encode()).is_err());
        let escaping = MountGrant { reason: "a\u{1b}[2J".into(), ..emergency.clone() };
        assert!(MountGrant::decode(&escaping.encode()).unwrap_err().to_string().contains("control character"));
        let reg = registration();
        assert_eq!(Registration::decode(&reg.encode()).unwrap(), reg);
        let mut truncated = reg.encode();
        truncated.pop();
        assert!(Registration::decode(&truncated).is_err());
    }

    /// Generation 1 keeps the version-1 bytes; a later generation is version 2, which must
    /// not name generation 1 (one meaning, one encoding).
    #[test]
    fn registration_version_2_carries_the_key_generation() {
        let reg = registration();
        let v1 = reg.encode();
        assert!(v1.starts_with(REGISTRATION_MAGIC));
        let rotated = Registration { key_generation: 2, ..reg.clone() };
        let v2 = rotated.encode();
        assert!(v2.starts_with(REGISTRATION_MAGIC_V2));
        assert_eq!(v2.len(), v1.len() + 8);
        assert_eq!(&v2[REGISTRATION_MAGIC.len()..v1.len()], &v1[REGISTRATION_MAGIC.len()..]);
        assert_eq!(Registration::decode(&v2).unwrap(), rotated);
        let mut ambiguous = v2.clone();
        let at = ambiguous.len() - 8;
        ambiguous[at..].copy_from_slice(&1u64.to_be_bytes());
        assert!(Registration::decode(&ambiguous).unwrap_err().to_string().contains("not 2 or more"));
        let rotation = KeyRotation { domain_id: reg.domain_id.clone(), from_generation: 1, requested_at: 5 };
        assert_eq!(KeyRotation::decode(&rotation.encode()).unwrap(), rotation);
    }

    fn envelope(tag: u8) -> SignedEnvelope {
        SignedEnvelope { message: vec![tag; 40], signature: vec![tag; 70], signer_certificate: vec![tag; 300] }
    }

    /// A header without a rotation is version 1 byte for byte; version 2 round-trips with and
    /// without a hotzone, and a hotzone off the boundary or with uneven sums is refused.
    #[test]
    fn header_record_version_2_round_trips_the_rotation() {
        let plain = HeaderRecord { descriptor: envelope(1), registration: envelope(2), rotation: None };
        assert!(plain.encode().starts_with(HEADER_RECORD_MAGIC));
        assert_eq!(HeaderRecord::decode(&plain.encode()).unwrap(), plain);
        let mut rotating = plain.clone();
        rotating.rotation = Some(RotationState { previous_registration: envelope(3), boundary: 0, hotzone: None });
        assert!(rotating.encode().starts_with(HEADER_RECORD_MAGIC_V2));
        assert_eq!(HeaderRecord::decode(&rotating.encode()).unwrap(), rotating);
        let hotzone = Hotzone { first: 7, old_sums: vec![4; 64], new_sums: vec![5; 64] };
        rotating.rotation =
            Some(RotationState { previous_registration: envelope(3), boundary: 7, hotzone: Some(hotzone.clone()) });
        assert_eq!(HeaderRecord::decode(&rotating.encode()).unwrap(), rotating);
        let json = serde_json::to_string(&rotating).unwrap();
        assert_eq!(serde_json::from_str::<HeaderRecord>(&json).unwrap(), rotating);
        let off = RotationState { previous_registration: envelope(3), boundary: 8, hotzone: Some(hotzone.clone()) };
        let err = HeaderRecord::decode(&HeaderRecord { rotation: Some(off), ..plain.clone() }.encode()).unwrap_err();
        assert!(err.to_string().contains("not at the boundary"), "{err}");
        let uneven = Hotzone { new_sums: vec![5; 32], ..hotzone };
        let bad = RotationState { previous_registration: envelope(3), boundary: 7, hotzone: Some(uneven) };
        assert!(HeaderRecord::decode(&HeaderRecord { rotation: Some(bad), ..plain }.encode()).is_err());
    }
}
