//! Stage 3: archival and destruction.
//!
//! `archive`: the raw image encrypted with the project's AES-256-XTS engine
//! (`skydd_volume::xts::XtsEngine`, 4096-byte sectors, sector index as tweak) under the
//! key of a fresh domain registered at the TTP for this archive alone (metadata
//! `classification = archive-highest`). The plaintext copies leave the store.
//! `restore`: the key released again, the archive decrypted, the digest checked against the
//! signed record (byte-identical), the images put back.
//! `destroy`: the archive's domain deleted at the TTP (owner-signed), so its key can never be
//! derived again (crypto-shredding), then every copy removed; the record stays, marked
//! destroyed. Why overwriting is not relied on: docs/IMAGE-PIPELINE.md.
//!
//! File format (`.skarc`): a 4096-byte header sector (`SKYDD-IMAGE-ARCHIVE-1\n`, then a
//! JSON header: version id, plaintext length and sha256, domain id), then the ciphertext
//! sectors; sector 0 of the ciphertext is the image's first 4 KiB.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::messages::{
    grant_digest, DeleteDomainRequest, Deletion, HeaderRecord, MountGrant, Placement, RegisterDomainRequest,
    RegisterDomainResponse,
};
use protocol::secret::SecretBytes;
use protocol::signing::{SignatureContext, SignatureKey};
use secure_component::key_release::KeyRequest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::build::{QCOW2_NAME, RAW_NAME};
use crate::error::{fsx, Error, Result};
use crate::store::{now_rfc3339, ArchiveRef, Destruction, Status, Store, VersionRecord};

/// First bytes of every `.skarc` file; `restore` refuses a file without them ("not an image archive
/// (bad magic)").
pub const MAGIC: &[u8] = b"SKYDD-IMAGE-ARCHIVE-1\n";
/// XTS data unit in bytes: the header occupies one such sector, the image is encrypted sector by
/// sector with the sector index as tweak (docs/IMAGE-PIPELINE.md, "Stage 3: archival and
/// destruction").
pub const SECTOR: usize = 4096;
const CHUNK: usize = 4 << 20;

/// The archive's domain as the key source knows it.
#[derive(Debug, Clone)]
pub struct ArchiveDomain {
    /// The TTP's id of the domain created for this archive; deleting it is the destruction.
    pub domain_id: String,
    /// The signed domain descriptor and TTP registration, kept in the version record (base64) so
    /// the key can be released again for `restore`.
    pub header: HeaderRecord,
}

/// Where archive keys come from. One implementation talks to the TTP (`TtpKeySource`).
#[allow(async_fn_in_trait)]
pub trait KeySource {
    /// Registers a new domain for the archive of `label` and returns it with its key.
    async fn create(&self, label: &str) -> Result<(ArchiveDomain, SecretBytes)>;
    /// The key of an existing archive domain.
    async fn key(&self, domain: &ArchiveDomain) -> Result<SecretBytes>;
    /// Deletes the domain: afterwards no key can ever be released for it.
    async fn delete(&self, domain: &ArchiveDomain) -> Result<()>;
    /// For the record ("ttp https://...").
    fn describe(&self) -> String;
}

/// Archive keys from the TTP, through the protocol's normal flows: the archive owner (a
/// domain-manager identity) signs the descriptor, grant and deletion; the pipeline's
/// cloud-platform identity registers; a secure component with an attested TPM obtains the
/// key (it is decrypted inside that TPM, never sent in the clear).
pub struct TtpKeySource {
    /// The archive owner's domain-manager signing key: signs descriptor, mount grants and deletion.
    pub owner: SignatureKey,
    /// The owner's name as it appears in descriptors and grants (`issuer`).
    pub owner_name: String,
    /// mTLS client with a cloud-platform certificate (registration, deletion).
    pub registrar: net::Client,
    /// The key of that cloud-platform certificate: signs the placement of the archiver's VM
    /// id on the archiver's host for each key release (docs/PROTOCOL.md "Placement").
    pub placer: SignatureKey,
    /// The secure component's agent that obtains the key through the TTP's key release into its
    /// attested TPM.
    pub agent: secure_component::host::AttestedHost,
    /// The ACL entry of the archive domain (the archiver's own id).
    pub vm_id: String,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn ttp_err(step: &str, e: impl std::fmt::Display) -> Error {
    Error::KeySource(format!("{step}: {e}"))
}

impl TtpKeySource {
    fn grant(&self, domain_id: &str) -> protocol::signing::SignedEnvelope {
        let grant = MountGrant {
            domain_id: domain_id.to_string(),
            vm_id: self.vm_id.clone(),
            mode: AccessMode::Rw,
            expires_at: now_unix() + 300,
            nonce: rand::random(),
            issuer: self.owner_name.clone(),
            purpose: String::new(),
            reason: String::new(),
        };
        self.owner.sign_envelope(SignatureContext::MountGrant, grant.encode())
    }
}

impl KeySource for TtpKeySource {
    async fn create(&self, label: &str) -> Result<(ArchiveDomain, SecretBytes)> {
        let metadata = [
            ("classification".to_string(), "archive-highest".to_string()),
            ("purpose".to_string(), "vm-image-archive".to_string()),
            ("image".to_string(), label.to_string()),
        ]
        .into_iter()
        .collect();
        let descriptor = Descriptor::new(
            &self.owner_name,
            metadata,
            vec![AclEntry { vm_id: self.vm_id.clone(), mode: AccessMode::Rw }],
        )?;
        let signed = self.owner.sign_envelope(SignatureContext::Descriptor, descriptor.encode()?);
        let response: RegisterDomainResponse = self
            .registrar
            .post_json(
                "/v1/domains",
                &RegisterDomainRequest { descriptor: signed.clone(), previous_registration: None },
            )
            .await
            .map_err(|e| ttp_err("register the archive domain at the TTP", e))?;
        let domain = ArchiveDomain {
            domain_id: descriptor.domain_id.clone(),
            header: HeaderRecord { descriptor: signed, registration: response.registration, rotation: None },
        };
        let key = self.key(&domain).await?;
        Ok((domain, key))
    }

    async fn key(&self, domain: &ArchiveDomain) -> Result<SecretBytes> {
        let grant = self.grant(&domain.domain_id);
        let placement = Placement {
            vm_id: self.vm_id.clone(),
            host_id: self.agent.host_id.clone(),
            grant_digest: grant_digest(&grant),
            placed_at: now_unix(),
        };
        let placement = self.placer.sign_envelope(SignatureContext::Placement, placement.encode());
        let request = KeyRequest {
            header: &domain.header,
            grant: &grant,
            placement: &placement,
            vm_id: &self.vm_id,
            mode: AccessMode::Rw,
            launched_image: None,
        };
        let obtained = self
            .agent
            .obtain_key(&request)
            .await
            .map_err(|e| ttp_err(&format!("obtain the key of archive domain {}", domain.domain_id), e))?;
        // A release wraps K || K_mac (docs/PROTOCOL.md "Key derivation"); archives are
        // format 1, so only the XTS key K is used.
        let released = obtained.key.expose();
        let xts_len = protocol::kdf::VOLUME_KEY_BYTES;
        if released.len() < xts_len {
            return Err(ttp_err(
                &format!("obtain the key of archive domain {}", domain.domain_id),
                format!("the TTP released {} bytes of key, fewer than the {xts_len} of an XTS key", released.len()),
            ));
        }
        let mut key = SecretBytes::zeroed(xts_len);
        key.expose_mut().copy_from_slice(&released[..xts_len]);
        Ok(key)
    }

    async fn delete(&self, domain: &ArchiveDomain) -> Result<()> {
        let deletion = Deletion { domain_id: domain.domain_id.clone(), requested_at: now_unix() };
        let envelope = self.owner.sign_envelope(SignatureContext::Deletion, deletion.encode());
        let answer: std::result::Result<serde_json::Value, net::Error> = self
            .registrar
            .post_json(&format!("/v1/domains/{}/delete", domain.domain_id), &DeleteDomainRequest { deletion: envelope })
            .await;
        match answer {
            Ok(_) => Ok(()),
            // Deleted already (an earlier destroy stopped half-way): the goal holds.
            Err(net::Error::Api { code, .. }) if code == "domain_deleted" => Ok(()),
            Err(e) => Err(ttp_err(&format!("delete archive domain {} at the TTP", domain.domain_id), e)),
        }
    }

    fn describe(&self) -> String {
        format!("ttp {}", self.registrar.base_url())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ArchiveHeader {
    version_id: String,
    plain_len: u64,
    plain_sha256: String,
    domain_id: String,
    cipher: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Encrypts `plain` into `out` (format in the module comment). Returns the archive's sha256.
pub fn encrypt_file(
    plain: &Path,
    out: &Path,
    key: &SecretBytes,
    version_id: &str,
    plain_sha256: &str,
    domain_id: &str,
) -> Result<String> {
    let engine = skydd_volume::xts::XtsEngine::new(key)
        .map_err(|e| Error::Archive { what: "key".into(), detail: e.to_string() })?;
    let plain_len = std::fs::metadata(plain).map_err(|e| Error::io("stat image", plain, e))?.len();
    let header = ArchiveHeader {
        version_id: version_id.into(),
        plain_len,
        plain_sha256: plain_sha256.into(),
        domain_id: domain_id.into(),
        cipher: "aes-xts-plain64:512:4096".into(),
    };
    let mut head = MAGIC.to_vec();
    head.extend(serde_json::to_vec(&header).map_err(|e| Error::json("archive header", e))?);
    if head.len() > SECTOR {
        return Err(Error::Archive { what: "header".into(), detail: "longer than one sector".into() });
    }
    head.resize(SECTOR, 0);
    let mut input = std::fs::File::open(plain).map_err(|e| Error::io("open image", plain, e))?;
    let tmp = out.with_extension("tmp");
    let mut output = std::fs::File::create(&tmp).map_err(|e| Error::io("create archive", &tmp, e))?;
    let mut hasher = Sha256::new();
    output.write_all(&head).map_err(|e| Error::io("write archive", &tmp, e))?;
    hasher.update(&head);
    let bar = crate::process::byte_bar("encrypting (AES-256-XTS)", plain_len);
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    let mut sector: u64 = 0;
    loop {
        let n = read_full(&mut input, &mut buf, plain)?;
        if n == 0 {
            break;
        }
        let padded = n.div_ceil(SECTOR) * SECTOR;
        buf[n..padded].fill(0);
        engine
            .encrypt_sectors(sector, &mut buf[..padded])
            .map_err(|e| Error::Archive { what: "encryption".into(), detail: e.to_string() })?;
        output.write_all(&buf[..padded]).map_err(|e| Error::io("write archive", &tmp, e))?;
        hasher.update(&buf[..padded]);
        sector += (padded / SECTOR) as u64;
        bar.inc(n as u64);
    }
    output.sync_all().map_err(|e| Error::io("sync archive", &tmp, e))?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, out).map_err(|e| Error::io("move archive into place", out, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Decrypts an archive to `out`; checks length and sha256 against the header and returns
/// the plaintext's sha256.
pub fn decrypt_file(archive: &Path, out: &Path, key: &SecretBytes) -> Result<String> {
    let engine = skydd_volume::xts::XtsEngine::new(key)
        .map_err(|e| Error::Archive { what: "key".into(), detail: e.to_string() })?;
    let mut input = std::fs::File::open(archive).map_err(|e| Error::io("open archive", archive, e))?;
    let mut head = vec![0u8; SECTOR];
    input.read_exact(&mut head).map_err(|e| Error::io("read archive header", archive, e))?;
    if !head.starts_with(MAGIC) {
        return Err(Error::Archive {
            what: archive.display().to_string(),
            detail: "not an image archive (bad magic)".into(),
        });
    }
    let json_end = head.iter().rposition(|b| *b != 0).map(|i| i + 1).unwrap_or(MAGIC.len());
    let header: ArchiveHeader =
        serde_json::from_slice(&head[MAGIC.len()..json_end]).map_err(|e| Error::json("archive header", e))?;
    let tmp = out.with_extension("restoring");
    let mut output = std::fs::File::create(&tmp).map_err(|e| Error::io("create restored image", &tmp, e))?;
    let bar = crate::process::byte_bar("decrypting (AES-256-XTS)", header.plain_len);
    let mut hasher = Sha256::new();
    let mut remaining = header.plain_len;
    let mut sector: u64 = 0;
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    while remaining > 0 {
        let n = read_full(&mut input, &mut buf, archive)?;
        if n == 0 || n % SECTOR != 0 {
            return Err(Error::Archive {
                what: archive.display().to_string(),
                detail: format!("truncated: {remaining} plaintext bytes missing"),
            });
        }
        engine
            .decrypt_sectors(sector, &mut buf[..n])
            .map_err(|e| Error::Archive { what: "decryption".into(), detail: e.to_string() })?;
        let take = (n as u64).min(remaining) as usize;
        output.write_all(&buf[..take]).map_err(|e| Error::io("write restored image", &tmp, e))?;
        hasher.update(&buf[..take]);
        remaining -= take as u64;
        sector += (n / SECTOR) as u64;
        bar.inc(take as u64);
    }
    bar.finish_and_clear();
    let sha = hex::encode(hasher.finalize());
    if sha != header.plain_sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Archive {
            what: archive.display().to_string(),
            detail: format!(
                "decrypted image hashes to {sha}, the archive header says {} (wrong key or altered archive)",
                header.plain_sha256
            ),
        });
    }
    output.sync_all().map_err(|e| Error::io("sync restored image", &tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io("move restored image into place", out, e))?;
    Ok(sha)
}

fn read_full(input: &mut std::fs::File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = input.read(&mut buf[filled..]).map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

fn domain_of(record: &VersionRecord, archive: &ArchiveRef) -> Result<ArchiveDomain> {
    let encoded = b64()
        .decode(&archive.header)
        .map_err(|e| Error::Archive { what: record.id(), detail: format!("stored header is not base64: {e}") })?;
    Ok(ArchiveDomain { domain_id: archive.domain_id.clone(), header: HeaderRecord::decode(&encoded)? })
}

/// `archive VERSION`.
pub async fn archive<K: KeySource>(store: &Store, spec: &str, keys: &K) -> Result<VersionRecord> {
    let record = store.resolve(spec)?;
    if !matches!(record.status, Status::Built | Status::Promoted) {
        return Err(Error::InvalidState {
            version: record.id(),
            action: "archived".into(),
            reason: format!("it is {}", record.status),
        });
    }
    if record.archive.is_some() {
        return Err(Error::InvalidState {
            version: record.id(),
            action: "archived".into(),
            reason: "it is archived already".into(),
        });
    }
    let raw = store.blob_path(&record.raw_sha256);
    if crate::debian::sha256_of_file(&raw)? != record.raw_sha256 {
        return Err(Error::Archive {
            what: record.id(),
            detail: "the stored raw image does not match its digest; run verify".into(),
        });
    }
    let (domain, key) = keys.create(&record.id()).await?;
    let file = format!("{}-{}.skarc", record.role, record.version);
    let path = store.root.join("archives").join(&file);
    let archive_sha256 = encrypt_file(&raw, &path, &key, &record.id(), &record.raw_sha256, &domain.domain_id)?;
    drop(key);
    let _lock = store.lock()?;
    let mut r = store.resolve(&record.id())?;
    r.archive = Some(ArchiveRef {
        file,
        archive_sha256,
        domain_id: domain.domain_id.clone(),
        header: b64().encode(domain.header.encode()),
        archived_at: now_rfc3339(),
        ttp: keys.describe(),
    });
    // The plaintext leaves the active store (unless another live version is the same bytes).
    for sha in [&record.raw_sha256, &record.qcow2_sha256] {
        if !store.shared_with_live(sha, &record.id())? {
            fsx::remove_file_if_exists(&store.blob_path(sha), "plaintext image")?;
        }
    }
    store.save(&r)?;
    Ok(r)
}

/// `restore VERSION`: back into the store (and to `out`, if given). Byte-identical or error.
pub async fn restore<K: KeySource>(store: &Store, spec: &str, keys: &K, out: Option<&Path>) -> Result<PathBuf> {
    let record = store.resolve(spec)?;
    let archive = record.archive.clone().ok_or_else(|| Error::InvalidState {
        version: record.id(),
        action: "restored".into(),
        reason: "it has no archive".into(),
    })?;
    if record.status == Status::Destroyed {
        return Err(Error::InvalidState {
            version: record.id(),
            action: "restored".into(),
            reason: "it was destroyed (its key can no longer be derived)".into(),
        });
    }
    let domain = domain_of(&record, &archive)?;
    let key = keys.key(&domain).await?;
    let path = store.root.join("archives").join(&archive.file);
    let restored = store.root.join("archives").join(format!("{}.raw", archive.file));
    let sha = decrypt_file(&path, &restored, &key)?;
    drop(key);
    if sha != record.raw_sha256 {
        let _ = std::fs::remove_file(&restored);
        return Err(Error::Archive {
            what: record.id(),
            detail: format!("restored image hashes to {sha}, the signed record says {}", record.raw_sha256),
        });
    }
    store.put_blob(&restored, Some(&record.raw_sha256))?;
    // qcow2 again from the raw (qemu-img is deterministic); must match the record too.
    let qcow2 = store.root.join("archives").join(format!("{}.{QCOW2_NAME}", archive.file));
    crate::disk::make_qcow2(&restored, &qcow2)?;
    store.put_blob(&qcow2, Some(&record.qcow2_sha256))?;
    let _ = std::fs::remove_file(&qcow2);
    let final_path = match out {
        Some(o) => {
            std::fs::rename(&restored, o)
                .or_else(|_| std::fs::copy(&restored, o).map(|_| ()))
                .map_err(|e| Error::io("write restored image", o, e))?;
            let _ = std::fs::remove_file(&restored);
            o.to_path_buf()
        }
        None => {
            let _ = std::fs::remove_file(&restored);
            store.blob_path(&record.raw_sha256)
        }
    };
    Ok(final_path)
}

/// `destroy VERSION`: crypto-shred the archive (domain deleted at the TTP), remove every
/// copy from the store, keep the record marked destroyed.
pub async fn destroy<K: KeySource>(store: &Store, spec: &str, keys: &K) -> Result<VersionRecord> {
    let record = store.resolve(spec)?;
    if record.status == Status::Destroyed {
        return Err(Error::InvalidState {
            version: record.id(),
            action: "destroyed".into(),
            reason: "it was destroyed already".into(),
        });
    }
    let mut domain_deleted = None;
    if let Some(archive) = &record.archive {
        let domain = domain_of(&record, archive)?;
        keys.delete(&domain).await?;
        domain_deleted = Some(format!("{} at {}", domain.domain_id, keys.describe()));
    }
    let _lock = store.lock()?;
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    if let Some(archive) = &record.archive {
        let path = store.root.join("archives").join(&archive.file);
        if fsx::remove_file_if_exists(&path, "archive")? {
            removed.push(format!("archive {} (sha256 {})", archive.file, archive.archive_sha256));
        }
    }
    for (name, sha) in [(RAW_NAME, &record.raw_sha256), (QCOW2_NAME, &record.qcow2_sha256)] {
        if store.shared_with_live(sha, &record.id())? {
            kept.push(format!("{name} {sha}: the same bytes are another live version"));
        } else if fsx::remove_file_if_exists(&store.blob_path(sha), "image blob")? {
            removed.push(format!("{name} {sha}"));
        }
    }
    kept.push(format!(
        "provenance {} and profile {} (the record of what existed)",
        record.provenance_sha256, record.profile_sha256
    ));
    let mut r = store.resolve(&record.id())?;
    r.status = Status::Destroyed;
    r.destroyed = Some(Destruction { at: now_rfc3339(), domain_deleted, removed, kept });
    store.save(&r)?;
    Ok(r)
}
