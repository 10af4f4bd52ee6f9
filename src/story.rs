//! The story `skydd demo` tells on the all-in-one cloud, through the public API only (the
//! domain-manager library the CLI uses, and the VMs: commands in their qemu guests, or the
//! `local` driver's mount points with `--no-vms`). Every step checks what it claims and fails
//! loudly if the cloud did otherwise.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use domain_manager::config::DmConfig;
use domain_manager::ops::DomainManager;
use protocol::domain::{AccessMode, VolumeFormat};

use crate::cloud::{AllInOne, Layout};
use crate::vms::Guests;

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
    let vms =
        if cloud.guests.by_vm.is_empty() { Vms::Directories { cloud, layout } } else { Vms::Guests(&cloud.guests) };

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
    let seen = vms.write_record("vm-a", &id, RECORD_TEXT)?;
    match &vms {
        Vms::Directories { .. } => {
            ensure!(seen == attachment.mount_path, "vm-a's volume is at {}, expected {seen}", attachment.mount_path);
            n.say(&format!(
                "compute-1 quoted its TPM, got the key sealed to its TPM, opened the volume on {} and mounted it at {}",
                attachment.device, attachment.mount_path
            ));
        }
        Vms::Guests(_) => n.say(&format!(
            "compute-1 quoted its TPM (covering the image vm-a was launched from), got the key sealed to its TPM, \
             served the volume over vhost-user and hot-plugged it into vm-a's guest (qemu device {}); \
             inside the guest: {seen}",
            attachment.mount_path
        )),
    }
    n.proves("the key was released only to an attested host, for a VM in the access list");

    n.step("vm-a detaches (its writes are now on the volume); vm-b (on compute-2) attaches read-only");
    alice.detach(&id, "vm-a").await?;
    let attachment_b = alice.attach(&id, "vm-b", AccessMode::Ro, 300).await?;
    let read_back = vms.read_record("vm-b", &id).with_context(|| format!("vm-b reads {RECORD_NAME}"))?;
    ensure!(read_back == RECORD_TEXT, "vm-b read different bytes than vm-a wrote");
    n.say(&format!(
        "vm-b reads what vm-a wrote ({} bytes) through its own mapping on {}{}",
        read_back.len(),
        attachment_b.host,
        if vms.in_guests() { ", in its guest" } else { "" }
    ));
    n.proves("two hosts derived the same key from the TTP; the volume format is shared");

    n.step("vm-a asks to attach read-write again while vm-b reads");
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await;
    expect_refusal(&mut n, &mut report, "", refused, "vm-a attaching rw beside vm-b", "single_writer")?;
    n.proves("a domain is open read-write once and alone: ext4 is not a cluster file system, so no second mount can corrupt it");

    n.step("vm-b tries to write");
    for line in vms.try_write("vm-b", &id)? {
        n.say(&line);
    }
    n.proves("a read-only grant gives a read-only block device, enforced below the file system");

    n.step("the cloud operator looks at the raw volume");
    let raw_path = cloud.dir.join("cloud-platform").join("volumes").join(format!("{id}.vol"));
    let found = contains(&raw_path, RECORD_TEXT.as_bytes()).with_context(|| format!("read {}", raw_path.display()))?;
    ensure!(!found, "the raw volume holds the patient record in plaintext");
    n.say(&format!("{} does not contain the record's text anywhere", raw_path.display()));
    n.proves("the cloud platform stores only ciphertext");

    n.step("the cloud operator flips one bit of the record on the volume; vm-b reads it again");
    let record_at = vms.record_offset("vm-b", &id)?;
    flip_bit(&raw_path, record_at)?;
    let tampered_read = vms.read_uncached("vm-b", &id);
    flip_bit(&raw_path, record_at)?; // put it back, so the story goes on with an intact volume
    n.say(&format!("vm-b's read fails: {}", tampered_read?));
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
    ensure!(vms.detached("vm-b", &id)?, "vm-b still has the volume after the revocation");
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
    let vm_c_text = vms.read_record("vm-c", &id)?;
    ensure!(vm_c_text == RECORD_TEXT, "vm-c read different bytes");
    n.say(&format!("dm-bob's read-only grant was accepted; vm-c reads the record at {}", bob_attachment.mount_path));
    n.proves("sharing lets another domain manager grant mounts, within the access list");

    if let Vms::Guests(guests) = &vms {
        trusted_launch(&mut n, &mut report, cloud, guests, &alice, &id).await?;
    }

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
    let mut expected_codes = vec!["vm_not_in_acl", "mode_not_permitted"];
    if vms.in_guests() {
        expected_codes.push("image_not_allowed");
    }
    for code in expected_codes {
        ensure!(report.history_outcomes.iter().any(|o| o == code), "the {code} refusal is missing from the history");
    }
    let bob_view = bob.history(&id).await?;
    ensure!(bob_view.records.len() == history.records.len(), "dm-bob sees a different history");
    n.proves("every release and every refusal is recorded; the chain was verified before the TTP answered");

    n.step("cleaning up: detach every VM");
    vms.release("vm-c", &id)?;
    alice.detach(&id, "vm-c").await?;

    n.step("the cloud operator keeps a copy; vm-a adds an allergy; the operator restores the old copy");
    let old_copy = std::fs::read(&raw_path).with_context(|| format!("copy {}", raw_path.display()))?;
    alice.attach(&id, "vm-a", AccessMode::Rw, 300).await?;
    let updated = format!("{RECORD_TEXT}{ALLERGY_TEXT}");
    vms.write_record("vm-a", &id, &updated)?;
    alice.detach(&id, "vm-a").await?;
    let new_copy = std::fs::read(&raw_path)?;
    std::fs::write(&raw_path, &old_copy).with_context(|| format!("restore {}", raw_path.display()))?;
    let refused = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await;
    std::fs::write(&raw_path, &new_copy)?; // the operator gives up: the newest copy is back
    expect_refusal(&mut n, &mut report, "", refused, "attaching the restored old copy", "integrity_rollback")?;
    alice.attach(&id, "vm-a", AccessMode::Ro, 300).await?;
    let current = vms.read_record("vm-a", &id)?;
    ensure!(current == updated, "after the newest copy came back, vm-a does not read the allergy");
    vms.release("vm-a", &id)?;
    alice.detach(&id, "vm-a").await?;
    n.say("with the newest copy back, vm-a reads the record with the allergy");
    n.proves(
        "the TTP anchors each committed root: an older copy of the volume is refused, so no write is silently undone",
    );
    Ok(report)
}

const ALLERGY_TEXT: &str = "Allergy: penicillin (anaphylaxis 2019).\n";
const EIO: i32 = 5;

/// Byte offset, in the raw volume file, of the first block of the file `filefrag -e -b4096`
/// described in `text` (ext4 on the volume's data area, docs/FORMAT.md: data sector n at
/// 1 MiB + 4096·n).
fn record_offset_on_volume(text: &str) -> Result<u64> {
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

const EROFS: i32 = 30;

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

/// Where the story's VMs do their file work.
enum Vms<'a> {
    /// `--no-vms`: each VM is a directory the `local` driver mounts the volume under.
    Directories { cloud: &'a AllInOne, layout: &'a Layout<'a> },
    /// Each VM is a qemu guest: commands run in it through its guest agent; the volume is a
    /// hot-plugged virtio disk, mounted at `/run/skydd/<domain>` in the guest.
    Guests(&'a Guests),
}

impl Vms<'_> {
    fn in_guests(&self) -> bool {
        matches!(self, Vms::Guests(_))
    }

    fn mount(&self, vm: &str, domain: &str) -> Result<std::path::PathBuf> {
        match self {
            Vms::Directories { cloud, layout } => {
                cloud.vm_mount(vm, domain, layout).with_context(|| format!("{vm} is not in the layout"))
            }
            Vms::Guests(_) => Ok(Path::new("/run/skydd").join(domain)),
        }
    }

    /// Runs `script` in `vm`'s guest after shell code that sets `$disk` to the domain's
    /// hot-plugged disk (waiting for it, bounded) and `$dir` to its mount point.
    fn in_guest(guests: &Guests, vm: &str, domain: &str, script: &str) -> Result<crate::guest::Output> {
        let serial: String = secure_component::service::mapping_name(domain, vm).chars().take(20).collect();
        let find = format!(
            "disk=''; for i in $(seq 1 300); do for d in /sys/block/vd*; do \
             [ \"$(cat \"$d/serial\" 2>/dev/null)\" = {serial} ] && disk=/dev/${{d##*/}}; done; \
             [ -n \"$disk\" ] && break; sleep 0.1; done; \
             [ -n \"$disk\" ] || {{ echo 'no disk with serial {serial} in the guest' >&2; exit 3; }}; \
             dir=/run/skydd/{domain}; mkdir -p $dir; "
        );
        tokio::task::block_in_place(|| guests.run(vm, &format!("{find}{script}")))
    }

    fn guest_sh(guests: &Guests, vm: &str, domain: &str, script: &str) -> Result<String> {
        let out = Self::in_guest(guests, vm, domain, script)?;
        ensure!(out.code == 0, "{vm}: `{script}` exited {}: {}{}", out.code, out.stdout, out.stderr);
        Ok(out.stdout)
    }

    /// `vm` writes the record (read-write attachment) and flushes it to the volume; in a
    /// guest it formats the disk first if it holds no file system yet, and unmounts after.
    /// Returns where the record went.
    fn write_record(&self, vm: &str, domain: &str, text: &str) -> Result<String> {
        let dir = self.mount(vm, domain)?;
        match self {
            Vms::Directories { .. } => {
                write_synced(&dir.join(RECORD_NAME), text)?;
                Ok(dir.display().to_string())
            }
            Vms::Guests(guests) => {
                ensure!(!text.contains('\''), "the record must not contain a single quote");
                let out = Self::guest_sh(
                    guests,
                    vm,
                    domain,
                    &format!(
                        "if dumpe2fs -h $disk >/dev/null 2>&1; then made=''; else mkfs.ext4 -q $disk; made='mkfs.ext4, '; fi; \
                         mount -t ext4 $disk $dir && printf '%s' '{text}' > $dir/{RECORD_NAME} && sync && umount $dir && \
                         echo \"${{made}}mount $disk $dir, write {RECORD_NAME}, sync, umount\""
                    ),
                )?;
                Ok(out.trim().to_string())
            }
        }
    }

    /// `vm` reads the record; a guest mounts the disk read-only first (kept mounted).
    fn read_record(&self, vm: &str, domain: &str) -> Result<String> {
        let dir = self.mount(vm, domain)?;
        match self {
            Vms::Directories { .. } => Ok(std::fs::read_to_string(dir.join(RECORD_NAME))?),
            Vms::Guests(guests) => Self::guest_sh(
                guests,
                vm,
                domain,
                &format!(
                    "grep -q \" $dir \" /proc/mounts || mount -t ext4 -o ro,noload $disk $dir; cat $dir/{RECORD_NAME}"
                ),
            ),
        }
    }

    /// `vm` (read-only attachment) tries to write; returns the lines that narrate each
    /// refusal, failing if anything was written.
    fn try_write(&self, vm: &str, domain: &str) -> Result<Vec<String>> {
        let dir = self.mount(vm, domain)?;
        match self {
            Vms::Directories { .. } => match std::fs::write(dir.join("tamper.txt"), b"x") {
                Err(e) if e.raw_os_error() == Some(EROFS) => Ok(vec![format!("refused by the kernel: {e}")]),
                Err(e) => bail!("{vm}'s write failed, but not as a read-only file system: {e}"),
                Ok(()) => bail!("{vm} wrote to a read-only attachment"),
            },
            Vms::Guests(guests) => {
                let refused = |script: &str, what: &str, why: &str| -> Result<crate::guest::Output> {
                    let out = Self::in_guest(guests, vm, domain, script)?;
                    ensure!(out.code != 0, "{vm}'s guest kernel let {what} through");
                    ensure!(out.stderr.contains(why), "{vm}'s {what} failed, but not with {why:?}: {}", out.stderr);
                    Ok(out)
                };
                refused("echo x > $dir/tamper.txt", "a file write", "Read-only file system")?;
                let raw = refused(
                    "dd if=/dev/zero of=$disk bs=4096 count=1 oflag=direct",
                    "a raw write to the read-only disk",
                    "Operation not permitted",
                )?;
                Ok(vec![
                    "refused by the kernel: Read-only file system (its guest kernel, writing a file)".into(),
                    format!(
                        "and a raw write to the disk (dd oflag=direct) is refused too: {}",
                        raw.stderr.lines().find(|l| l.contains("not permitted")).unwrap_or_default().trim()
                    ),
                ])
            }
        }
    }

    /// Where the record's first block lies in the raw volume file (`filefrag` in the VM).
    fn record_offset(&self, vm: &str, domain: &str) -> Result<u64> {
        let dir = self.mount(vm, domain)?;
        let text = match self {
            Vms::Directories { .. } => {
                let path = dir.join(RECORD_NAME);
                let out = std::process::Command::new("filefrag")
                    .args(["-e", "-b4096"])
                    .arg(&path)
                    .output()
                    .context("run filefrag")?;
                ensure!(out.status.success(), "filefrag {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            Vms::Guests(guests) => {
                Self::guest_sh(guests, vm, domain, &format!("filefrag -e -b4096 $dir/{RECORD_NAME}"))?
            }
        };
        record_offset_on_volume(&text)
    }

    /// `vm` reads the record past its page cache; Ok(the error) when the read fails with EIO,
    /// an error when it succeeds or fails otherwise.
    fn read_uncached(&self, vm: &str, domain: &str) -> Result<String> {
        let dir = self.mount(vm, domain)?;
        match self {
            Vms::Directories { .. } => {
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                match std::fs::read_to_string(dir.join(RECORD_NAME)) {
                    Err(e) if e.raw_os_error() == Some(EIO) => Ok(e.to_string()),
                    Err(e) => bail!("{vm}'s read of the tampered record failed, but not with EIO: {e}"),
                    Ok(text) => bail!("{vm} read the tampered record without an error ({} bytes)", text.len()),
                }
            }
            Vms::Guests(guests) => {
                let out = Self::in_guest(
                    guests,
                    vm,
                    domain,
                    &format!("echo 3 > /proc/sys/vm/drop_caches; cat $dir/{RECORD_NAME}"),
                )?;
                ensure!(out.code != 0, "{vm} read the tampered record without an error ({} bytes)", out.stdout.len());
                ensure!(
                    out.stderr.contains("Input/output error"),
                    "{vm}'s read of the tampered record failed, but not with EIO: {}",
                    out.stderr
                );
                Ok(format!("Input/output error (in its guest: {})", out.stderr.trim()))
            }
        }
    }

    /// Whether `vm` no longer has the volume (no mount; in a guest, no disk); a guest's stale
    /// mount of the removed disk is let go.
    fn detached(&self, vm: &str, domain: &str) -> Result<bool> {
        let dir = self.mount(vm, domain)?;
        match self {
            Vms::Directories { .. } => Ok(!std::fs::read_to_string("/proc/mounts")?.contains(&*dir.to_string_lossy())),
            Vms::Guests(guests) => {
                let serial: String = secure_component::service::mapping_name(domain, vm).chars().take(20).collect();
                let out = tokio::task::block_in_place(|| {
                    guests.sh(
                        vm,
                        &format!(
                            "umount -l /run/skydd/{domain} 2>/dev/null; for d in /sys/block/vd*; do \
                             [ \"$(cat \"$d/serial\" 2>/dev/null)\" = {serial} ] && echo present; done; true"
                        ),
                    )
                })?;
                Ok(out.trim().is_empty())
            }
        }
    }

    /// Before a detach: a guest unmounts the domain's file system.
    fn release(&self, vm: &str, domain: &str) -> Result<()> {
        if let Vms::Guests(guests) = self {
            tokio::task::block_in_place(|| guests.sh(vm, &format!("umount /run/skydd/{domain} 2>/dev/null; true")))?;
        }
        Ok(())
    }
}

/// The trusted-launch step (guests only): a tampered copy of the image is refused at launch,
/// and the refusal is in the TTP's audit log (the host's launch report); a VM no host
/// launched from an allowlisted image is refused its key by the TTP, and the refusal is in
/// the domain's viewing history.
async fn trusted_launch(
    n: &mut Narrator<'_>,
    report: &mut StoryReport,
    cloud: &AllInOne,
    guests: &Guests,
    alice: &DomainManager,
    id: &str,
) -> Result<()> {
    const ROGUE: &str = "vm-x";
    n.step("the cloud operator launches vm-x on compute-2 from a tampered copy of the guest image");
    let guest = guests.by_vm.values().next().context("no guest is running")?;
    let host = cloud.host("compute-2").context("no compute-2")?;
    let image = cloud.dir.join("tampered-demo-vm.raw");
    let original = cloud.guest_image_path().context("the cloud has no guest image")?;
    std::fs::copy(&original, &image).with_context(|| format!("copy {}", original.display()))?;
    {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&image)?;
        // One byte of the root file system's area (past the partition table and the ESP).
        let at = file.metadata()?.len() / 2;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at)?;
        file.write_all_at(&[byte[0] ^ 0x01], at)?;
        file.sync_all()?;
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444))?;
    }
    let request =
        secure_component::launch::LaunchRequest { vm_id: ROGUE.into(), image: image.clone(), memory_mib: 384, cpus: 1 };
    // Through the host's own launch (what its `POST /v1/vms` runs), which reports the attempt
    // to the TTP.
    let (launched, audit_seq) = host.service.launch_vm(request).await;
    match launched {
        Err(e @ secure_component::Error::ImageNotAllowed(_)) => n.say(&format!("compute-2's launcher refused: {e}")),
        Err(e) => bail!("the tampered image's launch failed, but not as an image off the allowlist: {e}"),
        Ok(vm) => bail!("compute-2 launched {ROGUE} from a tampered image (qemu pid {})", vm.pid),
    }
    let seq = audit_seq.context("compute-2's report of the refused launch did not reach the TTP")?;
    let record = cloud.ttp.service.store().audit_record(seq)?.context("the TTP's audit log lacks the launch report")?;
    ensure!(
        (record.event.as_str(), record.outcome.as_str(), record.host_id.as_deref(), record.vm_id.as_deref())
            == ("launch", "image_not_allowed", Some("compute-2"), Some(ROGUE)),
        "the TTP audited the refused launch as {} {} by {:?} for {:?}",
        record.event,
        record.outcome,
        record.host_id,
        record.vm_id
    );
    // The record's message up to the host's own wording: who, what, which image.
    let what = record.message.split_once(": ").map_or(record.message.as_str(), |(what, _)| what);
    n.say(&format!("the TTP's audit log holds #{} {} {}: {what}", record.seq, record.event, record.outcome));
    let _ = std::fs::remove_file(&image);
    n.say(&format!(
        "the allowlist holds {}@{} (sha256 {}…) only, signed by the cloud's image-pipeline identity",
        guest.launched.image.role,
        guest.launched.image.version,
        &guest.launched.image.sha256[..16]
    ));

    n.step("vm-x (on compute-2, not launched through trusted launch) is granted read-only and attaches");
    cloud.register_instance(ROGUE, "compute-2").await?;
    alice.grant(id, ROGUE, AccessMode::Ro).await?;
    let refused = alice.attach(id, ROGUE, AccessMode::Ro, 300).await;
    expect_refusal(n, report, "", refused, "attaching a VM no host launched", "image_not_allowed")?;
    n.proves("a VM runs only from a signed, allowlisted image, and only such a VM gets a domain key");
    Ok(())
}
