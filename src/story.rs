//! The story `skydd demo` tells on the all-in-one cloud, through the public API only (the
//! domain-manager library the CLI uses, and the VMs' mount points). Every step checks what
//! it claims and fails loudly if the cloud did otherwise.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use domain_manager::config::DmConfig;
use domain_manager::ops::DomainManager;
use protocol::domain::{AccessMode, VolumeFormat};

use crate::cloud::{AllInOne, Layout};

const RECORD_NAME: &str = "patient-0042.txt";
const RECORD_TEXT: &str = "Patient 0042, cardiology: ECG 2026-11-20 normal sinus rhythm; follow-up in 6 months.\n";

/// What the story saw, for tests.
#[derive(Debug, Default)]
pub struct StoryReport {
    /// Id of the domain the story created.
    pub domain_id: String,
    /// (code, message) of each refusal the story provoked, in order.
    pub refusals: Vec<(String, String)>,
    /// Outcome of each record of the viewing history read at the end.
    pub history_outcomes: Vec<String>,
}

/// Prints Skydd's story as numbered steps, each with what it proves.
pub struct Narrator<'a> {
    step: usize,
    out: &'a mut dyn FnMut(&str),
}

impl<'a> Narrator<'a> {
    /// A narrator writing each line to `out`.
    pub fn new(out: &'a mut dyn FnMut(&str)) -> Self {
        Self { step: 0, out }
    }
    fn step(&mut self, text: &str) {
        self.step += 1;
        (self.out)(&format!("\n[{}] {text}", self.step));
    }
    fn say(&mut self, text: &str) {
        (self.out)(&format!("    {text}"));
    }
    fn proves(&mut self, text: &str) {
        (self.out)(&format!("    proves: {text}"));
    }
}

/// Expects `result` to be refused with `expected`: narrates the refusal (after `lead`, e.g.
/// "dm-bob asks read-write for vm-c: ") and keeps it in the report.
fn expect_refusal(
    n: &mut Narrator<'_>,
    report: &mut StoryReport,
    lead: &str,
    result: domain_manager::Result<impl std::fmt::Debug>,
    what: &str,
    expected: &str,
) -> Result<()> {
    let (code, message) = match result {
        Err(domain_manager::Error::Refused { code, message, .. }) => (code, message),
        Err(other) => bail!("{what}: expected a refusal, got: {other}"),
        Ok(value) => bail!("{what}: expected a refusal, but it succeeded: {value:?}"),
    };
    n.say(&format!("{lead}refused ({code}): {message}"));
    ensure!(code == expected, "expected {expected}, got {code}");
    report.refusals.push((code, message));
    Ok(())
}

/// Runs the demo story on `cloud`: creates a domain, attaches, provokes the refusals,
/// reads the history. Narrates to `out` and returns what it saw for tests.
pub async fn run(cloud: &AllInOne, layout: &Layout<'_>, out: &mut dyn FnMut(&str)) -> Result<StoryReport> {
    let mut n = Narrator::new(out);
    let mut report = StoryReport::default();
    let alice = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-alice")?)?)?;
    let bob = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-bob")?)?)?;
    let mount = |vm: &str, domain: &str| {
        cloud.vm_mount(vm, domain, layout).with_context(|| format!("{vm} is not in the layout"))
    };

    n.step("dm-alice creates a domain: patient records of cardiology; vm-a may read and write, vm-b may only read");
    let metadata = [("department", "cardiology"), ("classification", "patient-records")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let acl = vec![domain_manager::ops::parse_acl_entry("vm-a:rw")?, domain_manager::ops::parse_acl_entry("vm-b:ro")?];
    let domain = alice.create_with_format(metadata, acl, Vec::new(), 64 << 20, VolumeFormat::V2).await?;
    let id = domain.id.clone();
    report.domain_id = id.clone();
    n.say(&format!("domain {id}, version {}, 64 MiB, stored by the cloud platform", domain.version));
    n.proves("the TTP registered the owner-signed descriptor; the cloud platform holds the volume but no key");

    n.step("vm-a (on compute-1) attaches the domain read-write and writes a patient record");
    let attachment = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await?;
    let vm_a_dir = mount("vm-a", &id)?;
    ensure!(
        attachment.mount_path == vm_a_dir.to_string_lossy(),
        "vm-a's volume is at {}, expected {}",
        attachment.mount_path,
        vm_a_dir.display()
    );
    write_synced(&vm_a_dir.join(RECORD_NAME), RECORD_TEXT)?;
    n.say(&format!(
        "compute-1 quoted its TPM, got the key sealed to its TPM, opened the volume on {} and mounted it at {}",
        attachment.device, attachment.mount_path
    ));
    n.proves("the key was released only to an attested host, for a VM in the access list");

    n.step("vm-a detaches (its writes are now on the volume); vm-b (on compute-2) attaches read-only");
    alice.detach(&id, "vm-a").await?;
    let attachment_b = alice.attach(&id, "vm-b", AccessMode::Ro, 300).await?;
    let vm_b_dir = mount("vm-b", &id)?;
    let read_back =
        std::fs::read_to_string(vm_b_dir.join(RECORD_NAME)).with_context(|| format!("vm-b reads {RECORD_NAME}"))?;
    ensure!(read_back == RECORD_TEXT, "vm-b read different bytes than vm-a wrote");
    n.say(&format!(
        "vm-b reads what vm-a wrote ({} bytes) through its own mapping on {}",
        read_back.len(),
        attachment_b.host
    ));
    n.proves("two hosts derived the same key from the TTP; the volume format is shared");

    n.step("vm-a asks to attach read-write again while vm-b reads");
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await;
    expect_refusal(&mut n, &mut report, "", refused, "vm-a attaching rw beside vm-b", "single_writer")?;
    n.proves("a domain is open read-write once and alone: ext4 is not a cluster file system, so no second mount can corrupt it");

    n.step("vm-b tries to write");
    match std::fs::write(vm_b_dir.join("tamper.txt"), b"x") {
        Err(e) if e.raw_os_error() == Some(libc_erofs()) => n.say(&format!("refused by the kernel: {e}")),
        Err(e) => bail!("vm-b's write failed, but not as a read-only file system: {e}"),
        Ok(()) => bail!("vm-b wrote to a read-only attachment"),
    }
    n.proves("a read-only grant gives a read-only block device, enforced below the file system");

    n.step("the cloud operator looks at the raw volume");
    let raw_path = cloud.dir.join("cloud-platform").join("volumes").join(format!("{id}.vol"));
    let found = contains(&raw_path, RECORD_TEXT.as_bytes()).with_context(|| format!("read {}", raw_path.display()))?;
    ensure!(!found, "the raw volume holds the patient record in plaintext");
    n.say(&format!("{} does not contain the record's text anywhere", raw_path.display()));
    n.proves("the cloud platform stores only ciphertext");

    n.step("the cloud operator flips one bit of the record on the volume; vm-b reads it again");
    let record_at = record_offset_on_volume(&vm_b_dir.join(RECORD_NAME))?;
    flip_bit(&raw_path, record_at)?;
    let tampered_read = read_uncached(&vm_b_dir.join(RECORD_NAME));
    flip_bit(&raw_path, record_at)?; // put it back, so the story goes on with an intact volume
    match tampered_read {
        Err(e) if e.raw_os_error() == Some(EIO) => n.say(&format!("vm-b's read fails: {e}")),
        Err(e) => bail!("vm-b's read of the tampered record failed, but not with EIO: {e}"),
        Ok(text) => bail!("vm-b read the tampered record without an error ({} bytes)", text.len()),
    }
    let violation = wait_for_event(&alice, &id, "integrity_violation").await?;
    n.say(&format!(
        "the viewing history shows #{} integrity_violation by {}: {}",
        violation.0, violation.1, violation.2
    ));
    n.proves(
        "format 2 tags every sector: the provider's change reads as an error, never as altered data, and is recorded",
    );

    n.step("dm-alice revokes vm-b; vm-b then tries to attach again");
    let revoked = alice.revoke(&id, "vm-b").await?;
    let still_mounted = std::fs::read_to_string("/proc/mounts")?.contains(&*vm_b_dir.to_string_lossy());
    ensure!(!still_mounted, "vm-b's mount is still there after the revocation");
    n.say(&format!(
        "the cloud platform detached vm-b as soon as version {} of the descriptor was registered",
        revoked.version
    ));
    let refused = alice.attach(&id, "vm-b", AccessMode::Ro, 300).await;
    expect_refusal(&mut n, &mut report, "", refused, "vm-b re-attaching after revocation", "vm_not_in_acl")?;
    n.proves("revocation is immediate, and the TTP refuses any VM outside the access list");

    n.step("dm-alice grants vm-c read-only and shares the domain with dm-bob, who attaches vm-c");
    alice.grant(&id, "vm-c", AccessMode::Ro).await?;
    alice.share(&id, "dm-bob").await?;
    let refused = bob.attach(&id, "vm-c", AccessMode::Rw, 300).await;
    let lead = "dm-bob asks read-write for vm-c: ";
    expect_refusal(&mut n, &mut report, lead, refused, "dm-bob asking rw for vm-c", "mode_not_permitted")?;
    let bob_attachment = bob.attach(&id, "vm-c", AccessMode::Ro, 300).await?;
    let vm_c_text = std::fs::read_to_string(mount("vm-c", &id)?.join(RECORD_NAME))?;
    ensure!(vm_c_text == RECORD_TEXT, "vm-c read different bytes");
    n.say(&format!("dm-bob's read-only grant was accepted; vm-c reads the record at {}", bob_attachment.mount_path));
    n.proves("sharing lets another domain manager grant mounts, within the access list");

    n.step("dm-alice reads the viewing history from the TTP");
    let history = alice.history(&id).await?;
    for record in &history.records {
        n.say(&format!(
            "#{:<3} {:<19} {:<22} {:<5} {:<10} by {}",
            record.seq,
            record.event,
            record.outcome,
            record.vm_id.as_deref().unwrap_or("-"),
            record.host_id.as_deref().unwrap_or("-"),
            record.actor
        ));
    }
    report.history_outcomes = history.records.iter().map(|r| r.outcome.clone()).collect();
    for code in ["vm_not_in_acl", "mode_not_permitted"] {
        ensure!(report.history_outcomes.iter().any(|o| o == code), "the {code} refusal is missing from the history");
    }
    let bob_view = bob.history(&id).await?;
    ensure!(bob_view.records.len() == history.records.len(), "dm-bob sees a different history");
    n.proves("every release and every refusal is recorded; the chain was verified before the TTP answered");

    n.step("cleaning up: detach every VM");
    alice.detach(&id, "vm-c").await?;

    n.step("the cloud operator keeps a copy; vm-a adds an allergy; the operator restores the old copy");
    let old_copy = std::fs::read(&raw_path).with_context(|| format!("copy {}", raw_path.display()))?;
    alice.attach(&id, "vm-a", AccessMode::Rw, 300).await?;
    let updated = format!("{RECORD_TEXT}{ALLERGY_TEXT}");
    write_synced(&mount("vm-a", &id)?.join(RECORD_NAME), &updated)?;
    alice.detach(&id, "vm-a").await?;
    let new_copy = std::fs::read(&raw_path)?;
    std::fs::write(&raw_path, &old_copy).with_context(|| format!("restore {}", raw_path.display()))?;
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await;
    std::fs::write(&raw_path, &new_copy)?; // the operator gives up: the newest copy is back
    expect_refusal(&mut n, &mut report, "", refused, "attaching the restored old copy", "integrity_rollback")?;
    alice.attach(&id, "vm-a", AccessMode::Ro, 300).await?;
    let current = std::fs::read_to_string(mount("vm-a", &id)?.join(RECORD_NAME))?;
    ensure!(current == updated, "after the newest copy came back, vm-a does not read the allergy");
    alice.detach(&id, "vm-a").await?;
    n.say("with the newest copy back, vm-a reads the record with the allergy");
    n.proves(
        "the TTP anchors each committed root: an older copy of the volume is refused, so no write is silently undone",
    );
    Ok(report)
}

const ALLERGY_TEXT: &str = "Allergy: penicillin (anaphylaxis 2019).\n";
const EIO: i32 = 5;

/// Byte offset, in the raw volume file, of the first block of `path` (ext4 on the volume's
/// data area, docs/FORMAT.md: data sector n at 1 MiB + 4096·n), from `filefrag` (e2fsprogs).
fn record_offset_on_volume(path: &Path) -> Result<u64> {
    let out =
        std::process::Command::new("filefrag").args(["-e", "-b4096"]).arg(path).output().context("run filefrag")?;
    ensure!(out.status.success(), "filefrag {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // "   0:        0..       0:       8706..      8706:      1:             last,eof"
    let physical = text
        .lines()
        .find(|l| l.trim_start().starts_with("0:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|range| range.split("..").next())
        .and_then(|start| start.trim().parse::<u64>().ok())
        .with_context(|| format!("no first extent in filefrag's output: {text}"))?;
    Ok(protocol::format::DATA_OFFSET + physical * 4096)
}

fn flip_bit(path: &Path, offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset + 20)?;
    file.write_all_at(&[byte[0] ^ 0x10], offset + 20)?;
    file.sync_all()?;
    Ok(())
}

/// Reads `path` past the page cache above the volume (dropping clean cached pages first).
fn read_uncached(path: &Path) -> std::io::Result<String> {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    std::fs::read_to_string(path)
}

/// The first history record of `event` (seq, host, message), waiting up to 10 s for it.
async fn wait_for_event(dm: &DomainManager, id: &str, event: &str) -> Result<(u64, String, String)> {
    for _ in 0..50 {
        let history = dm.history(id).await?;
        if let Some(r) = history.records.iter().find(|r| r.event == event) {
            return Ok((r.seq, r.host_id.clone().unwrap_or_default(), r.message.clone()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bail!("no {event} record in the viewing history after 10 s")
}

fn write_synced(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

const fn libc_erofs() -> i32 {
    30 // EROFS on Linux
}

/// Whether `needle` occurs in the file (read in chunks that overlap by the needle's length).
fn contains(path: &Path, needle: &[u8]) -> Result<bool> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut window = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(false);
        }
        window.extend_from_slice(&chunk[..n]);
        if window.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
        let keep = window.len().saturating_sub(needle.len());
        window.drain(..keep);
    }
}
