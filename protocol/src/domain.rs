//! The domain descriptor (docs/PROTOCOL.md, "Domain descriptor"): who owns a domain, its
//! metadata, its access list of VMs, the domain managers it is shared with, its version
//! and cipher. The access list is stored as XML, as the paper does, in a canonical form.

use std::collections::BTreeMap;
use std::fmt;

use quick_xml::events::{BytesStart, Event};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::encoding::{Reader, Writer};
use crate::error::{Error, Result};

/// The only cipher format v1 knows: AES-256-XTS, 512-bit key, 4096-byte sectors, IV = the
/// 4 KiB sector index (dm-crypt `sector_size:4096 iv_large_sectors`).
pub const CIPHER_SPEC_V1: &str = "aes-xts-plain64:512:4096";

const DESCRIPTOR_MAGIC: &[u8] = b"SKYDD-DESCRIPTOR\x01";
/// Version 2 of the encoding: version 1's fields, then `lp(policy)` (docs/PROTOCOL.md
/// "Access policy"). Used exactly when the descriptor carries a policy, so each meaning has
/// one encoding and every version-1 descriptor still decodes and hashes the same.
const DESCRIPTOR_MAGIC_V2: &[u8] = b"SKYDD-DESCRIPTOR\x02";
/// Largest access policy (Cedar text) in bytes (64 KiB); a larger one is refused.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest canonical access list XML in bytes (64 KiB); a larger one is refused on decode.
pub const MAX_ACL_XML_BYTES: usize = 64 * 1024;
/// Most VMs one access list may name (1024); more is refused with `Error::TooLarge`.
pub const MAX_ACL_ENTRIES: usize = 1024;
/// Most metadata entries a descriptor may carry (64).
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest name in bytes (64): owner, VM ids, metadata keys, shared-with managers, and the
/// limit on the domain id and cipher spec fields when decoding (docs/PROTOCOL.md
/// "Domain descriptor").
pub const MAX_NAME_BYTES: usize = 64;
/// Longest metadata value in bytes (1024).
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
/// Most domain managers a domain may be shared with (64).
pub const MAX_SHARED_WITH: usize = 64;

/// The access a VM has to a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Read-only: the volume is opened and mounted read-only (`ro` in XML and JSON).
    Ro,
    /// Read-write; covers `ro` as well (`rw` in XML and JSON).
    Rw,
}

impl AccessMode {
    /// Whether holding `self` allows a mount in `requested` mode (rw covers ro).
    pub fn covers(self, requested: AccessMode) -> bool {
        matches!((self, requested), (AccessMode::Rw, _) | (AccessMode::Ro, AccessMode::Ro))
    }

    /// The wire and XML form: `"ro"` or `"rw"` (also the string the mount grant signs).
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::Ro => "ro",
            AccessMode::Rw => "rw",
        }
    }
}

impl std::str::FromStr for AccessMode {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "ro" => Ok(AccessMode::Ro),
            "rw" => Ok(AccessMode::Rw),
            other => Err(Error::malformed("access mode", format!("{other:?} is neither \"ro\" nor \"rw\""))),
        }
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the access list: the VM `vm_id` may open the domain's volume in `mode`
/// (docs/PROTOCOL.md "Access list XML").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    /// The VM's id (a name: 1–64 characters of `A-Z a-z 0-9 . _ - @ :`), unique within the list.
    pub vm_id: String,
    /// The most the VM may get; a request or grant for `rw` needs `rw` here (`vm_not_in_acl` /
    /// `mode_not_permitted` at key release otherwise).
    pub mode: AccessMode,
}

/// A domain descriptor. Build one, then `encode()` it: the encoding is what gets signed,
/// hashed, registered and written to the volume header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// 32 lowercase hex characters (16 random bytes).
    pub domain_id: String,
    /// The owning domain manager (its certificate's subject name).
    pub owner: String,
    /// Metadata bound into the key derivation; it cannot change after version 1.
    pub metadata: BTreeMap<String, String>,
    /// Which VMs may open the volume and in which mode; the TTP checks it at every key release.
    pub acl: Vec<AclEntry>,
    /// Other domain managers that may grant mounts and read the history.
    pub shared_with: Vec<String>,
    /// Starts at 1 and must strictly increase with every registered change; the TTP refuses an
    /// older or equal one with `version_rollback`.
    pub version: u64,
    /// Must be [`CIPHER_SPEC_V1`]; bound into the key derivation (docs/PROTOCOL.md "Key
    /// derivation").
    pub cipher_spec: String,
    /// The on-disk format the owner requires (docs/FORMAT.md): with
    /// [`VolumeFormat::V2`] a secure component serves the volume only with its integrity tree
    /// checked against the root the TTP holds. Owner-signed, so the provider cannot downgrade it.
    #[serde(default)]
    pub volume_format: VolumeFormat,
    /// The owner's access policy in Cedar (docs/PROTOCOL.md "Access policy"), checked by the
    /// TTP at every key release on top of the access list; `None`: the access list alone
    /// decides. Owner-signed and versioned with the rest of the descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Which on-disk volume format a domain uses (docs/FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    /// AES-256-XTS only: confidentiality, no integrity or freshness.
    #[default]
    V1,
    /// AES-256-XTS plus per-sector tags and a hash tree whose root the TTP anchors.
    V2,
}

impl VolumeFormat {
    /// The format number written in docs/FORMAT.md (1 or 2).
    pub fn number(self) -> u8 {
        match self {
            VolumeFormat::V1 => 1,
            VolumeFormat::V2 => 2,
        }
    }
}

impl fmt::Display for VolumeFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.number())
    }
}

/// The trailing field a format-2 descriptor carries; a format-1 descriptor ends before it, so
/// every descriptor signed before format 2 existed still decodes and hashes the same.
const VOLUME_FORMAT_V2_FIELD: &str = "volume-format-2";

impl Descriptor {
    /// Version 1 of a new domain with a fresh random id.
    pub fn new(owner: &str, metadata: BTreeMap<String, String>, acl: Vec<AclEntry>) -> Result<Self> {
        let id: [u8; 16] = rand::random();
        let descriptor = Self {
            domain_id: hex::encode(id),
            owner: owner.to_string(),
            metadata,
            acl,
            shared_with: Vec::new(),
            version: 1,
            cipher_spec: CIPHER_SPEC_V1.to_string(),
            volume_format: VolumeFormat::V1,
            policy: None,
        };
        descriptor.validate()?;
        Ok(descriptor)
    }

    /// The ACL entry of `vm_id`, if any.
    pub fn access_of(&self, vm_id: &str) -> Option<AccessMode> {
        self.acl.iter().find(|e| e.vm_id == vm_id).map(|e| e.mode)
    }

    /// Whether `manager` may act for this domain (owner or shared with).
    pub fn is_manager(&self, manager: &str) -> bool {
        self.owner == manager || self.shared_with.iter().any(|m| m == manager)
    }

    /// The next version with `change` applied (grant, revoke, share).
    pub fn next_version(&self, change: impl FnOnce(&mut Descriptor)) -> Result<Descriptor> {
        let mut next = self.clone();
        change(&mut next);
        next.version = self.version.checked_add(1).ok_or_else(|| Error::malformed("descriptor", "version overflow"))?;
        next.validate()?;
        Ok(next)
    }

    /// Checks every rule the encoding enforces: domain id format, names, version ≥ 1, cipher
    /// spec, the size limits above and no duplicate VM or manager; `Error::Malformed` or
    /// `Error::TooLarge` name the field that breaks one.
    pub fn validate(&self) -> Result<()> {
        if self.domain_id.len() != 32
            || !self.domain_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::malformed(
                "descriptor",
                format!("domain id {:?} is not 32 lowercase hex characters", self.domain_id),
            ));
        }
        validate_name("owner", &self.owner)?;
        if self.version == 0 {
            return Err(Error::malformed("descriptor", "version must start at 1"));
        }
        if self.cipher_spec != CIPHER_SPEC_V1 {
            return Err(Error::malformed(
                "descriptor",
                format!("unsupported cipher spec {:?} (supported: {CIPHER_SPEC_V1})", self.cipher_spec),
            ));
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Error::TooLarge {
                what: "metadata entries",
                size: self.metadata.len(),
                limit: MAX_METADATA_ENTRIES,
            });
        }
        for (key, value) in &self.metadata {
            validate_name("metadata key", key)?;
            if value.len() > MAX_METADATA_VALUE_BYTES {
                return Err(Error::TooLarge {
                    what: "metadata value",
                    size: value.len(),
                    limit: MAX_METADATA_VALUE_BYTES,
                });
            }
        }
        if self.acl.len() > MAX_ACL_ENTRIES {
            return Err(Error::TooLarge { what: "access list entries", size: self.acl.len(), limit: MAX_ACL_ENTRIES });
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.acl {
            validate_name("vm id", &entry.vm_id)?;
            if !seen.insert(entry.vm_id.as_str()) {
                return Err(Error::malformed("access list", format!("vm {} appears twice", entry.vm_id)));
            }
        }
        if self.shared_with.len() > MAX_SHARED_WITH {
            return Err(Error::TooLarge {
                what: "shared-with list",
                size: self.shared_with.len(),
                limit: MAX_SHARED_WITH,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for manager in &self.shared_with {
            validate_name("shared-with name", manager)?;
            if !seen.insert(manager.as_str()) {
                return Err(Error::malformed("shared-with list", format!("{manager} appears twice")));
            }
        }
        if let Some(policy) = &self.policy {
            validate_policy_text(policy)?;
        }
        Ok(())
    }

    /// The canonical encoding (docs/PROTOCOL.md, "Domain descriptor").
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let magic = if self.policy.is_some() { DESCRIPTOR_MAGIC_V2 } else { DESCRIPTOR_MAGIC };
        let mut writer = Writer::new(magic);
        writer.str(&self.domain_id).str(&self.owner).bytes(&self.metadata_encoding());
        writer.bytes(acl_to_xml(&self.acl).as_bytes());
        let mut shared = self.shared_with.clone();
        shared.sort();
        writer.bytes(&encode_list(&shared));
        writer.u64(self.version).str(&self.cipher_spec);
        if let Some(policy) = &self.policy {
            writer.str(policy);
        }
        if self.volume_format == VolumeFormat::V2 {
            writer.str(VOLUME_FORMAT_V2_FIELD);
        }
        Ok(writer.finish())
    }

    /// Strict decoding: any byte string that is not exactly a canonical encoding is refused.
    pub fn decode(encoded: &[u8]) -> Result<Self> {
        let with_policy = encoded.starts_with(DESCRIPTOR_MAGIC_V2);
        let magic = if with_policy { DESCRIPTOR_MAGIC_V2 } else { DESCRIPTOR_MAGIC };
        let mut reader = Reader::new("descriptor", encoded, magic)?;
        let domain_id = reader.str("domain id", MAX_NAME_BYTES)?.to_string();
        let owner = reader.str("owner", MAX_NAME_BYTES)?.to_string();
        let metadata = decode_metadata(
            reader.bytes("metadata", MAX_METADATA_ENTRIES * (MAX_NAME_BYTES + MAX_METADATA_VALUE_BYTES + 8) + 4)?,
        )?;
        let acl = acl_from_xml(reader.str("access list XML", MAX_ACL_XML_BYTES)?)?;
        let shared_with = decode_list(reader.bytes("shared-with list", MAX_SHARED_WITH * (MAX_NAME_BYTES + 4) + 4)?)?;
        let version = reader.u64("version")?;
        let cipher_spec = reader.str("cipher spec", MAX_NAME_BYTES)?.to_string();
        let policy = if with_policy { Some(reader.str("access policy", MAX_POLICY_BYTES)?.to_string()) } else { None };
        let volume_format = if reader.is_at_end() {
            VolumeFormat::V1
        } else {
            match reader.str("volume format", MAX_NAME_BYTES)? {
                VOLUME_FORMAT_V2_FIELD => VolumeFormat::V2,
                other => return Err(Error::malformed("descriptor", format!("unknown volume format field {other:?}"))),
            }
        };
        reader.finish()?;
        let descriptor =
            Self { domain_id, owner, metadata, acl, shared_with, version, cipher_spec, volume_format, policy };
        if descriptor.encode()? != encoded {
            return Err(Error::malformed("descriptor", "not in canonical form (order or XML layout differs)"));
        }
        Ok(descriptor)
    }

    /// The canonical encoding of the metadata alone: `meta` in the key derivation.
    pub fn metadata_encoding(&self) -> Vec<u8> {
        let mut writer = Writer::new(b"");
        writer.u64(self.metadata.len() as u64);
        for (key, value) in &self.metadata {
            writer.str(key).str(value);
        }
        writer.finish()
    }

    /// H(meta) of docs/PROTOCOL.md "Key derivation": SHA-256 of the metadata encoding.
    pub fn metadata_hash(&self) -> [u8; 32] {
        Sha256::digest(self.metadata_encoding()).into()
    }
}

/// The rules the encoding puts on a policy's text: not empty (no policy is `None`, encoded as
/// version 1) and at most [`MAX_POLICY_BYTES`]. Whether it is valid Cedar under the schema is
/// the TTP's check (`policy_invalid`), not the encoding's.
pub fn validate_policy_text(policy: &str) -> Result<()> {
    if policy.trim().is_empty() {
        return Err(Error::malformed(
            "access policy",
            "the policy is empty; a descriptor without a policy carries none (the access list decides)",
        ));
    }
    if policy.len() > MAX_POLICY_BYTES {
        return Err(Error::TooLarge { what: "access policy", size: policy.len(), limit: MAX_POLICY_BYTES });
    }
    Ok(())
}

/// SHA-256 of a descriptor's canonical encoding (what the TTP registers).
pub fn descriptor_hash(encoded: &[u8]) -> [u8; 32] {
    Sha256::digest(encoded).into()
}

/// Names (owners, VM ids, host ids, metadata keys): 1 to 64 characters of
/// `A-Z a-z 0-9 . _ - @ :` that can never act as a path component or an option: not `.` or
/// `..` and not starting with `-` (hosts turn VM ids into directory and libvirt names, and a
/// key must never be released for a name the host will then refuse).
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':');
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.chars().all(ok_char) {
        // `{:?}` escapes control characters: the refusal is safe to print on a terminal.
        return Err(Error::malformed(
            what,
            format!("{name:?} must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 . _ - @ :"),
        ));
    }
    if name == "." || name == ".." {
        return Err(Error::malformed(what, format!("{name:?} is a path component, not a name")));
    }
    if name.starts_with('-') {
        return Err(Error::malformed(what, format!("{name:?} starts with '-' (it would read as an option)")));
    }
    Ok(())
}

fn encode_list(items: &[String]) -> Vec<u8> {
    let mut writer = Writer::new(b"");
    writer.u64(items.len() as u64);
    for item in items {
        writer.str(item);
    }
    writer.finish()
}

fn decode_list(encoded: &[u8]) -> Result<Vec<String>> {
    let mut reader = Reader::new("name list", encoded, b"")?;
    let count = reader.u64("name count")?;
    if count > MAX_SHARED_WITH as u64 {
        return Err(Error::TooLarge { what: "name list", size: count as usize, limit: MAX_SHARED_WITH });
    }
    let items =
        (0..count).map(|_| reader.str("name", MAX_NAME_BYTES).map(str::to_string)).collect::<Result<Vec<_>>>()?;
    reader.finish()?;
    Ok(items)
}

fn decode_metadata(encoded: &[u8]) -> Result<BTreeMap<String, String>> {
    let mut reader = Reader::new("metadata", encoded, b"")?;
    let count = reader.u64("metadata count")?;
    if count > MAX_METADATA_ENTRIES as u64 {
        return Err(Error::TooLarge { what: "metadata entries", size: count as usize, limit: MAX_METADATA_ENTRIES });
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..count {
        let key = reader.str("metadata key", MAX_NAME_BYTES)?.to_string();
        let value = reader.str("metadata value", MAX_METADATA_VALUE_BYTES)?.to_string();
        metadata.insert(key, value);
    }
    reader.finish()?;
    Ok(metadata)
}

/// The canonical access-list XML: `<acl><vm id="vm-a" mode="rw"/>...</acl>`, entries sorted by VM
/// id, no whitespace, no declaration.
pub fn acl_to_xml(acl: &[AclEntry]) -> String {
    let mut entries: Vec<&AclEntry> = acl.iter().collect();
    entries.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    let mut xml = String::from("<acl>");
    for entry in entries {
        // vm ids are validated to a character set that needs no XML escaping.
        xml.push_str(&format!("<vm id=\"{}\" mode=\"{}\"/>", entry.vm_id, entry.mode));
    }
    xml.push_str("</acl>");
    xml
}

/// Strict access-list parser: only `<acl>` with `<vm id mode/>` children; no text, comments,
/// DTDs, processing instructions, namespaces, unknown or repeated attributes; size-limited.
pub fn acl_from_xml(xml: &str) -> Result<Vec<AclEntry>> {
    if xml.len() > MAX_ACL_XML_BYTES {
        return Err(Error::TooLarge { what: "access list XML", size: xml.len(), limit: MAX_ACL_XML_BYTES });
    }
    let bad = |detail: String| Error::malformed("access list XML", detail);
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut seen_root = false;
    let mut entries = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| bad(format!("at byte {}: {e}", reader.buffer_position())))?;
        match event {
            Event::Start(start) if depth == 0 && !seen_root => {
                expect_element(&start, "acl")?;
                if start.attributes().next().is_some() {
                    return Err(bad("<acl> takes no attributes".into()));
                }
                seen_root = true;
                depth = 1;
            }
            Event::Empty(start) if depth == 0 && !seen_root => {
                expect_element(&start, "acl")?;
                seen_root = true;
            }
            Event::Empty(element) if depth == 1 => {
                expect_element(&element, "vm")?;
                if entries.len() == MAX_ACL_ENTRIES {
                    return Err(Error::TooLarge {
                        what: "access list entries",
                        size: MAX_ACL_ENTRIES + 1,
                        limit: MAX_ACL_ENTRIES,
                    });
                }
                entries.push(parse_vm_element(&element)?);
            }
            Event::End(_) if depth == 1 => depth = 0,
            Event::Eof => break,
            other => {
                return Err(bad(format!("unexpected {:?} at byte {}", event_kind(&other), reader.buffer_position())));
            }
        }
    }
    if !seen_root || depth != 0 {
        return Err(bad("missing or unclosed <acl> root".into()));
    }
    Ok(entries)
}

fn expect_element(element: &BytesStart<'_>, name: &str) -> Result<()> {
    // quick-xml 0.42 hands names and attribute values out as `str` (`QName::into_inner`).
    let found = element.name().into_inner();
    if found != name {
        return Err(Error::malformed("access list XML", format!("unexpected element <{found}>, expected <{name}>")));
    }
    Ok(())
}

fn parse_vm_element(element: &BytesStart<'_>) -> Result<AclEntry> {
    let bad = |detail: String| Error::malformed("access list XML", detail);
    let mut vm_id = None;
    let mut mode = None;
    for attribute in element.attributes() {
        let attribute = attribute.map_err(|e| bad(format!("bad attribute: {e}")))?;
        // The raw value (entities not expanded): names with '&' are refused by validate_name.
        let value: &str = &attribute.value;
        match attribute.key.into_inner() {
            "id" if vm_id.is_none() => vm_id = Some(value.to_string()),
            "mode" if mode.is_none() => mode = Some(value.parse::<AccessMode>()?),
            other => return Err(bad(format!("unexpected or repeated attribute {other:?} on <vm>"))),
        }
    }
    let vm_id = vm_id.ok_or_else(|| bad("<vm> without id".into()))?;
    validate_name("vm id", &vm_id)?;
    let mode = mode.ok_or_else(|| bad(format!("<vm id=\"{vm_id}\"> without mode")))?;
    Ok(AclEntry { vm_id, mode })
}

fn event_kind(event: &Event<'_>) -> &'static str {
    match event {
        Event::Start(_) => "start tag",
        Event::End(_) => "end tag",
        Event::Empty(_) => "element",
        Event::Text(_) => "text",
        Event::CData(_) => "CDATA",
        Event::Comment(_) => "comment",
        Event::Decl(_) => "XML declaration",
        Event::PI(_) => "processing instruction",
        Event::DocType(_) => "DOCTYPE",
        Event::GeneralRef(_) => "entity reference",
        Event::Eof => "end of input",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_could_be_path_components_or_options_are_refused() {
        for bad in [".", "..", "-rf", "--vm", "", "a/b", "vm\u{1b}[2J"] {
            let err = super::validate_name("VM id", bad).expect_err(bad);
            assert!(!err.to_string().contains('\u{1b}'), "raw ESC in {err}");
        }
        for good in ["vm-a", "a.b", "...", "vm-", "x..y", "dm@hospital:1"] {
            super::validate_name("VM id", good).expect(good);
        }
    }

    use super::*;

    pub(crate) fn sample() -> Descriptor {
        let mut metadata = BTreeMap::new();
        metadata.insert("department".to_string(), "cardiology".to_string());
        metadata.insert("classification".to_string(), "patient-records".to_string());
        let mut d = Descriptor::new(
            "dm-alice",
            metadata,
            vec![
                AclEntry { vm_id: "vm-b".into(), mode: AccessMode::Ro },
                AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw },
            ],
        )
        .unwrap();
        d.shared_with = vec!["dm-bob".into()];
        d
    }

    #[test]
    fn descriptor_round_trips_and_is_canonical() {
        let d = sample();
        let encoded = d.encode().unwrap();
        let decoded = Descriptor::decode(&encoded).unwrap();
        // ACL order is canonicalised by the encoding.
        assert_eq!(decoded.encode().unwrap(), encoded);
        assert_eq!(decoded.access_of("vm-a"), Some(AccessMode::Rw));
        assert_eq!(decoded.access_of("vm-b"), Some(AccessMode::Ro));
        assert_eq!(decoded.access_of("vm-c"), None);
        assert!(decoded.is_manager("dm-bob") && decoded.is_manager("dm-alice") && !decoded.is_manager("dm-eve"));

        let mut tampered = encoded.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(Descriptor::decode(&tampered).is_err());
        tampered = encoded.clone();
        tampered.push(0);
        assert!(Descriptor::decode(&tampered).is_err());
    }

    #[test]
    fn a_descriptor_with_a_policy_is_version_2_and_one_without_still_version_1() {
        let without = sample();
        let v1 = without.encode().unwrap();
        assert!(v1.starts_with(DESCRIPTOR_MAGIC));
        let mut with = without.clone();
        with.policy = Some("permit(principal, action, resource);".into());
        with.volume_format = VolumeFormat::V2;
        let v2 = with.encode().unwrap();
        assert!(v2.starts_with(DESCRIPTOR_MAGIC_V2));
        // (Decoding sorts the access list: compare encodings.)
        let decoded = Descriptor::decode(&v2).unwrap();
        assert_eq!((decoded.policy.as_deref(), decoded.encode().unwrap()), (with.policy.as_deref(), v2.clone()));
        assert_eq!(Descriptor::decode(&v1).unwrap().encode().unwrap(), v1);
        // A version-2 magic on version-1 fields (no policy) is not a second encoding.
        let mut relabelled = v1.clone();
        relabelled[..DESCRIPTOR_MAGIC_V2.len()].copy_from_slice(DESCRIPTOR_MAGIC_V2);
        assert!(Descriptor::decode(&relabelled).is_err());
        // Nor is an empty policy.
        with.policy = Some(" \n".into());
        let err = with.encode().unwrap_err().to_string();
        assert!(err.contains("the policy is empty"), "{err}");
        with.policy = Some("x".repeat(MAX_POLICY_BYTES + 1));
        assert!(matches!(with.encode(), Err(Error::TooLarge { what: "access policy", .. })));
    }

    #[test]
    fn acl_xml_is_strict() {
        let ok = "<acl><vm id=\"vm-a\" mode=\"rw\"/><vm id=\"vm-b\" mode=\"ro\"/></acl>";
        assert_eq!(acl_from_xml(ok).unwrap().len(), 2);
        assert_eq!(acl_from_xml("<acl/>").unwrap().len(), 0);
        for bad in [
            "<acl><vm id=\"vm-a\" mode=\"rx\"/></acl>",
            "<acl><vm id=\"vm-a\"/></acl>",
            "<acl><vm id=\"vm a\" mode=\"rw\"/></acl>",
            "<acl><vm id=\"a\" id=\"b\" mode=\"rw\"/></acl>",
            "<acl><vm id=\"a\" mode=\"rw\" extra=\"1\"/></acl>",
            "<acl>text</acl>",
            "<acl><!-- c --></acl>",
            "<!DOCTYPE acl [<!ENTITY x \"y\">]><acl/>",
            "<?xml version=\"1.0\"?><acl/>",
            "<acl><vm id=\"a\" mode=\"rw\"></vm></acl>",
            "<acl>",
            "<other/>",
            "<acl/><acl/>",
            "",
        ] {
            assert!(acl_from_xml(bad).is_err(), "accepted {bad:?}");
        }
        let huge = format!("<acl>{}</acl>", "<vm id=\"a\" mode=\"rw\"/>".repeat(4000));
        assert!(matches!(acl_from_xml(&huge), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn modes_cover() {
        assert!(AccessMode::Rw.covers(AccessMode::Ro));
        assert!(AccessMode::Rw.covers(AccessMode::Rw));
        assert!(AccessMode::Ro.covers(AccessMode::Ro));
        assert!(!AccessMode::Ro.covers(AccessMode::Rw));
    }

    #[test]
    fn validation_names_the_problem() {
        let mut d = sample();
        d.acl.push(AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Ro });
        let err = d.encode().unwrap_err().to_string();
        assert!(err.contains("vm-a appears twice"), "{err}");
    }
}
