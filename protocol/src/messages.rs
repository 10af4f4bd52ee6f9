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
const GRANT_MAGIC: &[u8] = b"SKYDD-MOUNT-GRANT\x01";
const DELETION_MAGIC: &[u8] = b"SKYDD-DELETION\x01";
const HEADER_RECORD_MAGIC: &[u8] = b"SKYDD-HEADER-RECORD\x01";

/// The TTP's registration of one descriptor version, signed by the TTP. It carries the
/// nonce `r` of the key derivation; `r` is not secret (K_TTP is), but without it the key
/// cannot be derived again, so destroying every header crypto-shreds the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub domain_id: String,
    pub version: u64,
    pub descriptor_hash: [u8; 32],
    pub metadata_hash: [u8; 32],
    pub nonce_r: [u8; NONCE_BYTES],
    /// Unix seconds.
    pub registered_at: u64,
}

impl Registration {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(REGISTRATION_MAGIC)
            .str(&self.domain_id)
            .u64(self.version)
            .bytes(&self.descriptor_hash)
            .bytes(&self.metadata_hash)
            .bytes(&self.nonce_r)
            .u64(self.registered_at)
            .finish()
    }

    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("registration", encoded, REGISTRATION_MAGIC)?;
        let registration = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            version: reader.u64("version")?,
            descriptor_hash: reader.array("descriptor hash")?,
            metadata_hash: reader.array("metadata hash")?,
            nonce_r: reader.array("nonce r")?,
            registered_at: reader.u64("registration time")?,
        };
        reader.finish()?;
        Ok(registration)
    }
}

/// A domain manager's signed permission for one VM to mount one domain: the paper's
/// "credential that proves v has access".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountGrant {
    pub domain_id: String,
    pub vm_id: String,
    pub mode: AccessMode,
    /// Unix seconds after which the grant is refused.
    pub expires_at: u64,
    /// Makes every grant unique (and traceable in the audit log).
    pub nonce: [u8; 16],
    /// The signing domain manager's name (must match its certificate).
    pub issuer: String,
}

impl MountGrant {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(GRANT_MAGIC)
            .str(&self.domain_id)
            .str(&self.vm_id)
            .str(self.mode.as_str())
            .u64(self.expires_at)
            .bytes(&self.nonce)
            .str(&self.issuer)
            .finish()
    }

    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("mount grant", encoded, GRANT_MAGIC)?;
        let grant = Self {
            domain_id: reader.str("domain id", 64)?.to_string(),
            vm_id: reader.str("vm id", 64)?.to_string(),
            mode: reader.str("mode", 2)?.parse()?,
            expires_at: reader.u64("expiry")?,
            nonce: reader.array("grant nonce")?,
            issuer: reader.str("issuer", 64)?.to_string(),
        };
        reader.finish()?;
        validate_name("vm id", &grant.vm_id)?;
        validate_name("issuer", &grant.issuer)?;
        Ok(grant)
    }
}

/// The owner's signed request to delete (crypto-shred) a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub domain_id: String,
    pub requested_at: u64,
}

impl Deletion {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(DELETION_MAGIC).str(&self.domain_id).u64(self.requested_at).finish()
    }

    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("deletion", encoded, DELETION_MAGIC)?;
        let deletion = Self { domain_id: reader.str("domain id", 64)?.to_string(), requested_at: reader.u64("time")? };
        reader.finish()?;
        Ok(deletion)
    }
}

/// What a volume header slot holds (its payload, docs/FORMAT.md): the owner-signed
/// descriptor and the TTP-signed registration of that very descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRecord {
    pub descriptor: SignedEnvelope,
    pub registration: SignedEnvelope,
}

impl HeaderRecord {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(HEADER_RECORD_MAGIC)
            .bytes(&self.descriptor.encode())
            .bytes(&self.registration.encode())
            .finish()
    }

    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let mut reader = Reader::new("header record", encoded, HEADER_RECORD_MAGIC)?;
        let descriptor = SignedEnvelope::decode(reader.bytes("signed descriptor", 300 * 1024)?)?;
        let registration = SignedEnvelope::decode(reader.bytes("signed registration", 32 * 1024)?)?;
        reader.finish()?;
        Ok(Self { descriptor, registration })
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
    pub descriptor: SignedEnvelope,
    /// The registration of the version being replaced; the TTP carries its `r` over.
    pub previous_registration: Option<SignedEnvelope>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterDomainResponse {
    pub registration: SignedEnvelope,
}

/// SC → TTP: a fresh single-use nonce to quote over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChallengeResponse {
    pub challenge_id: String,
    #[serde(with = "crate::b64")]
    pub nonce: Vec<u8>,
    pub expires_at: u64,
}

/// SC → TTP: release the key of the domain in `header` for `vm_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyReleaseRequest {
    pub host_id: String,
    pub vm_id: String,
    pub mode: AccessMode,
    pub header: HeaderRecord,
    pub grant: SignedEnvelope,
    pub challenge_id: String,
    pub quote: QuoteEvidence,
}

/// TTP → SC: the domain key, encrypted (RSA-OAEP) to the host's PCR-bound binding key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyReleaseResponse {
    pub domain_id: String,
    pub version: u64,
    #[serde(with = "crate::b64")]
    pub wrapped_key: Vec<u8>,
    pub audit_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteDomainRequest {
    pub deletion: SignedEnvelope,
}

/// One record of the hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// "key_release", "register", "delete", "enroll".
    pub event: String,
    /// "ok" or the refusal's error code.
    pub outcome: String,
    pub message: String,
    pub domain_id: Option<String>,
    pub host_id: Option<String>,
    pub vm_id: Option<String>,
    /// The authenticated caller (certificate name).
    pub actor: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// SHA-256 over the previous hash and every field but `hash`, canonically encoded.
    pub fn compute_hash(&self) -> String {
        let mut writer = Writer::new(b"SKYDD-AUDIT\x01");
        writer
            .u64(self.seq)
            .u64(self.at)
            .str(&self.event)
            .str(&self.outcome)
            .str(&self.message)
            .str(self.domain_id.as_deref().unwrap_or(""))
            .str(self.host_id.as_deref().unwrap_or(""))
            .str(self.vm_id.as_deref().unwrap_or(""))
            .str(&self.actor)
            .str(&self.prev_hash);
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
        if record.compute_hash() != record.hash {
            return Err(bad(format!("record {} was edited (its hash does not match its contents)", record.seq)));
        }
        match previous {
            Some(prev) => {
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub domain_id: String,
    pub records: Vec<AuditRecord>,
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
        };
        r.hash = r.compute_hash();
        r
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

    #[test]
    fn grant_and_registration_round_trip() {
        let grant = MountGrant {
            domain_id: "00112233445566778899aabbccddeeff".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Ro,
            expires_at: 42,
            nonce: [7; 16],
            issuer: "dm-alice".into(),
        };
        assert_eq!(MountGrant::decode(&grant.encode()).unwrap(), grant);
        let reg = Registration {
            domain_id: grant.domain_id.clone(),
            version: 3,
            descriptor_hash: [1; 32],
            metadata_hash: [2; 32],
            nonce_r: [3; 32],
            registered_at: 9,
        };
        assert_eq!(Registration::decode(&reg.encode()).unwrap(), reg);
        let mut truncated = reg.encode();
        truncated.pop();
        assert!(Registration::decode(&truncated).is_err());
    }
}
