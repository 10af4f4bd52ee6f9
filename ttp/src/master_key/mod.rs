//! K_TTP, never at rest in the clear (docs/OPERATOR.md "Master key custodians"). Each
//! version of the master key exists outside memory only as
//!
//! - a copy sealed to the TTP host's TPM under PolicyPCR ([`tpm`]), which `ttp serve`
//!   unseals at start, and
//! - a Shamir t-of-n split held by custodians ([`shares`]), combined by `ttp unseal` or
//!   `ttp serve --unseal-shares` when the TPM copy cannot be used (new hardware, changed
//!   PCRs, no TPM) and to bring up another replica.
//!
//! `data_dir/master-key/v<N>.json` records each version: its fingerprint, the split's
//! threshold and the sealed copy (TPM blobs), never the key. Every registration records
//! the version that derives its key ([`MasterKeys::current_version`] for new domains);
//! older versions stay loaded until no registered domain uses them.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use protocol::kdf::MASTER_KEY_BYTES;
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod shares;
pub mod tpm;

pub use shares::ShareLine;

/// The directory under the data directory that records the master-key versions.
pub const MASTER_KEY_DIR: &str = "master-key";
/// Where K_TTP was kept in the clear before versions; refused at start.
pub const LEGACY_MASTER_KEY_FILE: &str = "master.key";
/// The label of the fingerprint HKDF (docs/PROTOCOL.md "Key derivation").
const FINGERPRINT_INFO: &[u8] = b"skydd/v1/master-key-fingerprint";

/// The `[master_key]` section of ttp.toml: the TPM that holds the sealed copies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyConfig {
    /// The TTP host's TPM (`device:/dev/tpmrm0`, or `swtpm:host=127.0.0.1,port=P` in tests).
    /// Unset: no sealed copy; the TTP starts only from custodians' shares.
    #[serde(default)]
    pub tpm_tcti: Option<String>,
    /// PCRs (sha256 bank) the sealed copy is bound to; default 0-7 (firmware, boot loader,
    /// Secure Boot policy).
    #[serde(default = "default_pcrs")]
    pub pcrs: Vec<u8>,
}

impl Default for MasterKeyConfig {
    fn default() -> Self {
        Self { tpm_tcti: None, pcrs: default_pcrs() }
    }
}

fn default_pcrs() -> Vec<u8> {
    (0..8).collect()
}

/// How K_TTP is split for its custodians.
#[derive(Debug, Clone, Copy)]
pub struct Custodians {
    /// Shares made (one per custodian).
    pub shares: u8,
    /// Shares that recover the key.
    pub threshold: u8,
}

/// What `data_dir/master-key/v<N>.json` records about one version (no key material).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    /// The version, from 1.
    pub version: u32,
    /// [`fingerprint`] of the key.
    pub fingerprint: String,
    /// Unix seconds of its creation.
    pub created_at: u64,
    /// The custodians' split: shares made and the threshold.
    pub shares: u8,
    /// Shares that recover it.
    pub threshold: u8,
    /// The copy sealed to this host's TPM, if a TPM is configured.
    pub sealed: Option<tpm::SealedCopy>,
}

/// The master-key versions this TTP has unsealed, in locked, zeroized memory.
pub struct MasterKeys {
    keys: BTreeMap<u32, SecretBytes>,
}

impl From<SecretBytes> for MasterKeys {
    /// A single key as version 1 (in-process tests, older call sites).
    fn from(key: SecretBytes) -> Self {
        Self { keys: BTreeMap::from([(1, key)]) }
    }
}

impl MasterKeys {
    /// The keys by version; refuses an empty set or a key that is not 32 bytes.
    pub fn new(keys: BTreeMap<u32, SecretBytes>) -> Result<Self> {
        if keys.is_empty() {
            return Err(Error::MasterKey("no master-key version is loaded".into()));
        }
        if let Some((version, key)) = keys.iter().find(|(_, k)| k.len() != MASTER_KEY_BYTES) {
            return Err(Error::Config(format!(
                "K_TTP version {version} is {} bytes, not {MASTER_KEY_BYTES}",
                key.len()
            )));
        }
        Ok(Self { keys })
    }

    pub(crate) fn into_inner(self) -> BTreeMap<u32, SecretBytes> {
        self.keys
    }

    /// The newest version: it derives the keys of domains registered from now on.
    pub fn current_version(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(1)
    }

    /// The versions loaded, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The key of `version`, or a refusal saying it is not loaded here.
    pub fn key(&self, version: u32) -> Result<&SecretBytes> {
        self.keys.get(&version).ok_or_else(|| {
            Error::MasterKey(format!(
                "K_TTP version {version} is not loaded on this TTP (loaded: {:?}); unseal it here (`ttp unseal` with its shares) and restart",
                self.versions()
            ))
        })
    }
}

/// HKDF-SHA256(K_TTP, info "skydd/v1/master-key-fingerprint"), 8 bytes in hex: names a key
/// (shares, version records, status) without revealing anything usable about it.
pub fn fingerprint(key: &SecretBytes) -> Result<String> {
    let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, key.expose());
    let mut out = [0u8; 8];
    hkdf.expand(FINGERPRINT_INFO, &mut out).map_err(|e| Error::MasterKey(format!("fingerprint: {e}")))?;
    Ok(hex::encode(out))
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(MASTER_KEY_DIR)
}

fn record_path(data_dir: &Path, version: u32) -> PathBuf {
    dir(data_dir).join(format!("v{version}.json"))
}

/// The version records in `data_dir`, oldest first.
pub fn records(data_dir: &Path) -> Result<Vec<VersionRecord>> {
    let dir = dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { context: format!("read {}", dir.display()), source: e }),
    };
    let mut records = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::Io { context: format!("read {}", dir.display()), source: e })?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Io { context: format!("read {}", path.display()), source: e })?;
        let record: VersionRecord =
            serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        records.push(record);
    }
    records.sort_by_key(|r| r.version);
    Ok(records)
}

fn write_record(data_dir: &Path, record: &VersionRecord) -> Result<()> {
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io { context: format!("create {}", dir.display()), source: e })?;
    let path = record_path(data_dir, record.version);
    let tmp = dir.join(format!(".v{}.json.tmp", record.version));
    let text =
        serde_json::to_string_pretty(record).map_err(|e| Error::Config(format!("encode {}: {e}", path.display())))?;
    let io = |e| Error::Io { context: format!("write {}", path.display()), source: e };
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// A new version made by [`create_version`]: its record and the custodians' shares.
pub struct CreatedVersion {
    /// What is recorded about it.
    pub record: VersionRecord,
    /// One share per custodian, to hand out and then forget.
    pub shares: Vec<ShareLine>,
}

/// Makes the next K_TTP version (1 on a fresh data directory): 32 random bytes, sealed to the
/// TPM if one is configured, split for the custodians; only the record is written.
pub fn create_version(data_dir: &Path, config: &MasterKeyConfig, custodians: Custodians) -> Result<CreatedVersion> {
    refuse_legacy_file(data_dir)?;
    let version = records(data_dir)?.last().map_or(1, |r| r.version + 1);
    let mut key = SecretBytes::zeroed(MASTER_KEY_BYTES);
    openssl::rand::rand_bytes(key.expose_mut())
        .map_err(|e| Error::Config(format!("the system random generator failed: {e}")))?;
    store_version(data_dir, config, &key, version, custodians)
}

fn refuse_legacy_file(data_dir: &Path) -> Result<()> {
    let legacy = data_dir.join(LEGACY_MASTER_KEY_FILE);
    if legacy.exists() {
        return Err(Error::MasterKey(format!(
            "{} holds K_TTP in the clear: run `ttp init --import-legacy --data-dir {}` to seal and split it (the file is then overwritten and removed)",
            legacy.display(),
            data_dir.display()
        )));
    }
    Ok(())
}

/// Seals and splits the K_TTP of an older installation (`master.key`, 32 plain bytes) as
/// version 1, then overwrites and removes the file.
pub fn import_legacy(data_dir: &Path, config: &MasterKeyConfig, custodians: Custodians) -> Result<CreatedVersion> {
    let legacy = data_dir.join(LEGACY_MASTER_KEY_FILE);
    if !records(data_dir)?.is_empty() {
        return Err(Error::MasterKey(format!("{} already records master-key versions", dir(data_dir).display())));
    }
    let io = |e| Error::Io { context: format!("read {}", legacy.display()), source: e };
    let mut bytes = std::fs::read(&legacy).map_err(io)?;
    if bytes.len() != MASTER_KEY_BYTES {
        zeroize::Zeroize::zeroize(&mut bytes);
        return Err(Error::MasterKey(format!("{} is not {MASTER_KEY_BYTES} bytes", legacy.display())));
    }
    let key = SecretBytes::from_slice_wiping(&mut bytes);
    let created = store_version(data_dir, config, &key, 1, custodians)?;
    let wipe = |e| Error::Io { context: format!("overwrite {}", legacy.display()), source: e };
    let mut file = std::fs::OpenOptions::new().write(true).open(&legacy).map_err(wipe)?;
    file.write_all(&[0u8; MASTER_KEY_BYTES]).and_then(|_| file.sync_all()).map_err(wipe)?;
    std::fs::remove_file(&legacy).map_err(wipe)?;
    Ok(created)
}

fn store_version(
    data_dir: &Path,
    config: &MasterKeyConfig,
    key: &SecretBytes,
    version: u32,
    custodians: Custodians,
) -> Result<CreatedVersion> {
    let fingerprint = fingerprint(key)?;
    let shares = shares::split(key, version, &fingerprint, custodians.shares, custodians.threshold)?;
    let sealed = match &config.tpm_tcti {
        Some(tcti) => Some(tpm::TtpTpm::open(tcti)?.seal(key, &config.pcrs)?),
        None => None,
    };
    let record = VersionRecord {
        version,
        fingerprint,
        created_at: crate::store::now_unix(),
        shares: custodians.shares,
        threshold: custodians.threshold,
        sealed,
    };
    write_record(data_dir, &record)?;
    Ok(CreatedVersion { record, shares })
}

/// Loads every recorded version: from `shares` where they are given for it, else from its
/// sealed copy. A version with neither is refused, naming what to do.
pub fn unlock(data_dir: &Path, config: &MasterKeyConfig, shares: &[ShareLine]) -> Result<MasterKeys> {
    refuse_legacy_file(data_dir)?;
    let records = records(data_dir)?;
    if records.is_empty() {
        return Err(Error::MasterKey(format!(
            "no master key in {}: run `ttp init --data-dir {}` first, or `ttp unseal` with a replica's custodians' shares",
            dir(data_dir).display(),
            data_dir.display()
        )));
    }
    let mut by_version: BTreeMap<u32, Vec<&ShareLine>> = BTreeMap::new();
    for share in shares {
        by_version.entry(share.version).or_default().push(share);
    }
    if let Some(unknown) = by_version.keys().find(|v| !records.iter().any(|r| r.version == **v)) {
        return Err(Error::MasterKey(format!(
            "shares of K_TTP version {unknown} were given, but it is not recorded here"
        )));
    }
    let mut tpm = None;
    let mut keys = BTreeMap::new();
    for record in &records {
        let key = match (by_version.get(&record.version), &record.sealed, &config.tpm_tcti) {
            (Some(given), _, _) => combine_for(record, given)?,
            (None, Some(sealed), Some(tcti)) => {
                if tpm.is_none() {
                    tpm = Some(tpm::TtpTpm::open(tcti)?);
                }
                tpm.as_mut().map(|t| t.unseal(sealed, record.version)).transpose()?.ok_or_else(|| {
                    Error::MasterKey("the TPM connection was lost".into())
                })?
            }
            (None, _, _) => {
                return Err(Error::MasterKey(format!(
                    "K_TTP version {} has no copy sealed to a configured TPM here: start with `ttp serve --unseal-shares FILE...` ({} of its {} custodians' shares), or seal it with `ttp unseal`",
                    record.version, record.threshold, record.shares
                )))
            }
        };
        if fingerprint(&key)? != record.fingerprint {
            return Err(Error::MasterKey(format!(
                "the unsealed K_TTP version {} has another fingerprint than recorded ({})",
                record.version, record.fingerprint
            )));
        }
        keys.insert(record.version, key);
    }
    MasterKeys::new(keys)
}

fn combine_for(record: &VersionRecord, given: &[&ShareLine]) -> Result<SecretBytes> {
    if let Some(foreign) = given.iter().find(|s| s.fingerprint != record.fingerprint) {
        return Err(Error::MasterKey(format!(
            "share {} names K_TTP fingerprint {}, version {} here is {}: it belongs to another TTP's key",
            foreign.index, foreign.fingerprint, record.version, record.fingerprint
        )));
    }
    let owned: Vec<ShareLine> = given.iter().map(|s| ShareLine::parse(&s.to_text())).collect::<Result<_>>()?;
    shares::combine(&owned)
}

/// `ttp unseal`: combines the custodians' shares of one version, checks them against its
/// record (or, on a replica's fresh data directory, against their own fingerprint) and
/// records the version here, sealed to this host's TPM in its current state if one is
/// configured, so that the next start unseals it. Returns the record.
pub fn unseal_with_shares(data_dir: &Path, config: &MasterKeyConfig, given: &[ShareLine]) -> Result<VersionRecord> {
    refuse_legacy_file(data_dir)?;
    let first = given.first().ok_or_else(|| Error::MasterKey("no share given".into()))?;
    let existing = records(data_dir)?.into_iter().find(|r| r.version == first.version);
    let key = match &existing {
        Some(record) => combine_for(record, &given.iter().collect::<Vec<_>>())?,
        None => shares::combine(given)?,
    };
    let sealed = match &config.tpm_tcti {
        Some(tcti) => Some(tpm::TtpTpm::open(tcti)?.seal(&key, &config.pcrs)?),
        None => None,
    };
    let record = VersionRecord {
        version: first.version,
        fingerprint: fingerprint(&key)?,
        created_at: existing.as_ref().map_or_else(crate::store::now_unix, |r| r.created_at),
        shares: first.count,
        threshold: first.threshold,
        sealed,
    };
    write_record(data_dir, &record)?;
    Ok(record)
}

/// `ttp reseal`: every version, unlocked from its sealed copy (or from `shares`), sealed
/// again to the TPM's current state over the configured PCRs.
pub fn reseal(data_dir: &Path, config: &MasterKeyConfig, shares: &[ShareLine]) -> Result<Vec<VersionRecord>> {
    let tcti = config
        .tpm_tcti
        .as_ref()
        .ok_or_else(|| Error::Config("reseal needs a TPM: set [master_key] tpm_tcti in the configuration".into()))?;
    let keys = unlock(data_dir, config, shares)?;
    let mut tpm = tpm::TtpTpm::open(tcti)?;
    let mut updated = Vec::new();
    for mut record in records(data_dir)? {
        record.sealed = Some(tpm.seal(keys.key(record.version)?, &config.pcrs)?);
        write_record(data_dir, &record)?;
        updated.push(record);
    }
    Ok(updated)
}

/// Removes version `version`'s record (its sealed copy) once `domains_using` is 0; the
/// custodians then destroy its shares.
pub fn retire(data_dir: &Path, version: u32, domains_using: u64) -> Result<()> {
    let records = records(data_dir)?;
    let newest = records.last().map(|r| r.version);
    if domains_using > 0 {
        return Err(Error::MasterKey(format!(
            "K_TTP version {version} still derives the keys of {domains_using} registered domain(s); it can be retired only when none uses it"
        )));
    }
    if newest == Some(version) {
        return Err(Error::MasterKey(format!("K_TTP version {version} is the newest; make a new version first")));
    }
    let path = record_path(data_dir, version);
    std::fs::remove_file(&path).map_err(|e| Error::Io { context: format!("remove {}", path.display()), source: e })
}

/// Writes each share to `dir/kttp-v<version>-share-<i>-of-<n>.txt` (0600), one file per
/// custodian; returns the paths.
pub fn write_share_files(dir: &Path, shares: &[ShareLine]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { context: format!("create {}", dir.display()), source: e })?;
    shares
        .iter()
        .map(|share| {
            let path = dir.join(format!("kttp-v{}-share-{}-of-{}.txt", share.version, share.index, share.count));
            let io = |e| Error::Io { context: format!("write {}", path.display()), source: e };
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
            file.write_all(share.to_text().as_bytes()).and_then(|_| file.write_all(b"\n")).map_err(io)?;
            Ok(path)
        })
        .collect()
}

/// Reads share lines from files (`-` is standard input).
pub fn read_share_files(paths: &[PathBuf]) -> Result<Vec<ShareLine>> {
    let mut all = Vec::new();
    for path in paths {
        let text = zeroize::Zeroizing::new(if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| Error::Io { context: "read shares from standard input".into(), source: e })?;
            text
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| Error::Io { context: format!("read {}", path.display()), source: e })?
        });
        all.extend(shares::parse_all(&text)?);
    }
    Ok(all)
}

/// Reads shares typed or pasted at a console, one line each, until the threshold of the
/// first share's version is reached (or end of input). A mistyped line is reported on
/// `prompt` and asked again, so three custodians can take turns at one keyboard.
pub fn read_shares_until_threshold(
    input: &mut impl std::io::BufRead,
    prompt: &mut impl std::io::Write,
) -> Result<Vec<ShareLine>> {
    let io = |e| Error::Io { context: "read shares from standard input".into(), source: e };
    let mut shares: Vec<ShareLine> = Vec::new();
    loop {
        let needed = shares.first().map(|s| s.threshold as usize);
        let distinct = shares.iter().map(|s| s.index).collect::<std::collections::BTreeSet<_>>().len();
        if needed.is_some_and(|needed| distinct >= needed) {
            return Ok(shares);
        }
        let _ = match needed {
            Some(needed) => write!(prompt, "share {} of {needed}: ", distinct + 1),
            None => write!(prompt, "first custodian's share: "),
        };
        let _ = prompt.flush();
        let mut line = zeroize::Zeroizing::new(String::new());
        if input.read_line(&mut line).map_err(io)? == 0 {
            let _ = writeln!(prompt);
            return Ok(shares);
        }
        if line.trim().is_empty() {
            continue;
        }
        match ShareLine::parse(&line) {
            Ok(share) if shares.iter().any(|s| s.index == share.index) => {
                let _ = writeln!(prompt, "share {} was given already; the next custodian, please", share.index);
            }
            Ok(share) => shares.push(share),
            Err(e) => {
                let _ = writeln!(prompt, "{e}; try again");
            }
        }
    }
}

/// Every share in the `*.txt` files of `dir` (as [`write_share_files`] leaves them), in
/// file-name order.
pub fn read_share_dir(dir: &Path) -> Result<Vec<ShareLine>> {
    let io = |e| Error::Io { context: format!("read {}", dir.display()), source: e };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    files.retain(|path| path.extension().is_some_and(|e| e == "txt"));
    files.sort();
    read_share_files(&files)
}
