//! `build`: Debian archive → mmdebstrap tarball → unpacked tree → hardening → security
//! checks → ext4 → GPT disk (raw) → qcow2, every step timed and recorded for the provenance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use indicatif::ProgressBar;

use crate::checks::TestReport;
use crate::debian::{self, ArchiveEvidence};
use crate::disk;
use crate::error::{fsx, Error, Result};
use crate::harden::{self, HardeningRecord};
use crate::process::{self, run, run_with_spinner};
use crate::profile::LoadedProfile;
use crate::provenance::{
    self, BuildDefinition, Builder, ExternalParameters, ImageIdentity, InternalParameters, Predicate,
    ResourceDescriptor, RunDetails, RunMetadata, SkyddRecord, Statement, StepRecord,
};

/// File name of the raw GPT disk image in the output directory; a provenance `subject`.
pub const RAW_NAME: &str = "image.raw";
/// File name of the qcow2 conversion of the raw image; the other provenance `subject`.
pub const QCOW2_NAME: &str = "image.qcow2";
/// File name of the signed provenance envelope next to the images (docs/IMAGE-PIPELINE.md,
/// "Provenance").
pub const PROVENANCE_NAME: &str = "provenance.dsse.json";
/// File name of the copy of the profile's exact bytes next to the images; the store keeps it as a
/// blob so `patch` can rebuild from it.
pub const PROFILE_NAME: &str = "profile.toml";

/// Everything a build needs besides the archive. [`BuildOptions::new`] gives the CLI's defaults;
/// tests and `patch` adjust fields.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The role profile with its exact bytes (hashed into the provenance).
    pub profile: LoadedProfile,
    /// Where image.raw, image.qcow2 and the provenance are written.
    pub out_dir: PathBuf,
    /// Scratch space for the tarball and the unpacked tree (tmpfs is fastest).
    pub work_dir: PathBuf,
    /// A persistent .deb cache reused between builds.
    pub apt_cache: PathBuf,
    /// Use SUITE-updates and SUITE-security (false: the point release only).
    pub updates: bool,
    /// Overrides the profile's epoch (SOURCE_DATE_EPOCH).
    pub source_date_epoch: Option<u64>,
    /// Run `oscap-chroot` with the profile's `[oscap]` content (default true); off makes the
    /// OpenSCAP result absent, not failed.
    pub run_oscap: bool,
    /// The OpenPGP keyring mmdebstrap and the archive chain check trust (default
    /// [`debian::ARCHIVE_KEYRING`]); its sha256 is recorded as the trust anchor.
    pub keyring: PathBuf,
    /// Keep the work dir (for debugging).
    pub keep_work: bool,
}

impl BuildOptions {
    /// Defaults for `profile` writing to `out_dir`: work directory on `/dev/shm` (tmpfs, for
    /// creation-order directory entries; docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 4) or
    /// the temp dir, .deb cache `/var/cache/image-pipeline/apt`, updates on, OpenSCAP on, the
    /// Debian archive keyring, SOURCE_DATE_EPOCH from the environment if set.
    pub fn new(profile: LoadedProfile, out_dir: PathBuf) -> Self {
        let work_root = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        Self {
            work_dir: work_root.join(format!("image-pipeline-{}-{}", profile.profile.image.role, std::process::id())),
            apt_cache: PathBuf::from("/var/cache/image-pipeline/apt"),
            profile,
            out_dir,
            updates: true,
            source_date_epoch: std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()),
            run_oscap: true,
            keyring: PathBuf::from(debian::ARCHIVE_KEYRING),
            keep_work: false,
        }
    }

    /// The effective SOURCE_DATE_EPOCH (seconds since 1970): the override if set, else the
    /// profile's `source_date_epoch`.
    pub fn epoch(&self) -> u64 {
        self.source_date_epoch.unwrap_or(self.profile.profile.image.source_date_epoch)
    }
}

/// A finished (unsigned) build.
#[derive(Debug, Clone)]
pub struct BuildResult {
    /// Path of `image.raw` in the output directory.
    pub raw: PathBuf,
    /// Path of `image.qcow2` in the output directory.
    pub qcow2: PathBuf,
    /// Hex sha256 of `image.raw`; a provenance subject digest and the image's identity in the
    /// store.
    pub raw_sha256: String,
    /// Hex sha256 of `image.qcow2`.
    pub qcow2_sha256: String,
    /// Size of `image.raw` in bytes (apparent size; the file is sparse).
    pub raw_size: u64,
    /// Size of `image.qcow2` in bytes.
    pub qcow2_size: u64,
    /// The verified archive chain: keyring digest, `InRelease` records, `Packages` digests and
    /// every installed package's `.deb` digest.
    pub evidence: ArchiveEvidence,
    /// Every step run, in order, with status and duration.
    pub steps: Vec<StepRecord>,
    /// What hardening changed, action by action.
    pub hardening: Vec<HardeningRecord>,
    /// The security check and OpenSCAP results; when they did not pass the build still returns `Ok`
    /// and the caller must not publish the image ([`crate::pipeline::build_signed`] stores nothing
    /// and returns [`Error::ChecksFailed`]).
    pub tests: TestReport,
    /// When the build started (recorded as `startedOn`).
    pub started: SystemTime,
    /// When the build finished (recorded as `finishedOn`).
    pub finished: SystemTime,
    /// Version lines of the tools that shaped the image (see [`provenance::Builder::version`]).
    pub tool_versions: BTreeMap<String, String>,
    /// Total wall-clock time of the build in seconds; kept in the store's version record.
    pub seconds: f64,
}

struct Steps {
    records: Vec<StepRecord>,
}

impl Steps {
    fn run<T>(&mut self, name: &str, command: &str, bar: &ProgressBar, f: impl FnOnce() -> Result<T>) -> Result<T> {
        bar.set_message(format!("{name}: {command}"));
        let started = Instant::now();
        let result = f();
        let duration_ms = started.elapsed().as_millis() as u64;
        let status = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        self.records.push(StepRecord {
            name: name.into(),
            command: command.into(),
            status,
            duration_ms,
            outputs: BTreeMap::new(),
        });
        bar.println(format!(
            "  {name:<16} {:>7.1}s  {}",
            duration_ms as f64 / 1000.0,
            if result.is_ok() { "ok" } else { "FAILED" }
        ));
        result
    }

    fn annotate(&mut self, key: &str, value: String) {
        if let Some(last) = self.records.last_mut() {
            last.outputs.insert(key.into(), value);
        }
    }
}

/// An exclusive lock on the shared apt cache (two builds at once would race in sync-in/out).
struct CacheLock(#[allow(dead_code)] std::fs::File);

impl CacheLock {
    fn take(dir: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        fsx::create_dir_all(dir, "apt cache")?;
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open cache lock", &path, e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io("lock apt cache", &path, std::io::Error::last_os_error()));
        }
        Ok(Self(file))
    }
}

fn mmdebstrap_args(opts: &BuildOptions, tarball: &Path, lists: &Path, purge_script: &Path) -> Vec<String> {
    let p = &opts.profile.profile;
    let mut include: Vec<String> = p.packages.include.clone();
    if p.image.boot {
        for extra in ["linux-image-amd64", "initramfs-tools", "systemd-boot-efi"] {
            if !include.iter().any(|i| i == extra) {
                include.push(extra.into());
            }
        }
    }
    let keyring = opts.keyring.display().to_string();
    let cache = opts.apt_cache.display().to_string();
    let components = p.image.components.join(" ");
    let mut args = vec![
        format!("--variant={}", p.image.variant),
        "--mode=root".into(),
        "--format=tar".into(),
        format!("--keyring={keyring}"),
        "--aptopt=Acquire::Languages \"none\"".into(),
        "--aptopt=APT::Install-Recommends \"false\"".into(),
        "--dpkgopt=force-unsafe-io".into(),
        "--skip=download/empty".into(),
        "--skip=essential/unlink".into(),
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/".into(),
        format!("--setup-hook=sync-in {cache} /var/cache/apt/archives/"),
        format!("--customize-hook=sh {} \"$1\"", purge_script.display()),
    ];
    if !p.image.initramfs_modules.is_empty() {
        // Names were checked by Profile::validate (a-z, 0-9, '_', '-'): safe in the shell line.
        args.push(format!(
            "--customize-hook=chroot \"$1\" sh -c 'printf \"%s\\n\" {} > /etc/initramfs-tools/modules && \
             echo MODULES=list > /etc/initramfs-tools/conf.d/skydd-modules && update-initramfs -u -k all'",
            p.image.initramfs_modules.join(" ")
        ));
    }
    args.extend([
        format!("--customize-hook=sync-out /var/cache/apt/archives {cache}"),
        format!("--customize-hook=sync-out /var/lib/apt/lists {}", lists.display()),
    ]);
    if !include.is_empty() {
        args.push(format!("--include={}", include.join(",")));
    }
    args.push(p.image.suite.clone());
    args.push(tarball.display().to_string());
    args.push(format!("deb [signed-by={keyring}] {} {} {components}", p.image.mirror, p.image.suite));
    if opts.updates {
        args.push(format!("deb [signed-by={keyring}] {} {}-updates {components}", p.image.mirror, p.image.suite));
        args.push(format!(
            "deb [signed-by={keyring}] {} {}-security {components}",
            p.image.security_mirror, p.image.suite
        ));
    }
    args
}

fn purge_script(profile: &LoadedProfile) -> String {
    let list = profile.profile.forbidden_packages().join(" ");
    format!(
        "#!/bin/sh\n# Generated by image-pipeline: remove packages the role must not carry.\nset -e\nroot=\"$1\"\nfor p in {list}; do\n  if chroot \"$root\" dpkg-query -W -f='${{db:Status-Status}}' \"$p\" 2>/dev/null | grep -qx installed; then\n    echo \"purging $p\" >&2\n    chroot \"$root\" env DEBIAN_FRONTEND=noninteractive apt-get -y purge \"$p\"\n  fi\ndone\n"
    )
}

/// Runs the build. On a security-check failure the images are still written (for
/// inspection) and the result carries the failed report; the caller must not publish it.
pub fn build(opts: &BuildOptions) -> Result<BuildResult> {
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let epoch = opts.epoch();
    let profile = &opts.profile;
    let role = profile.profile.image.role.clone();
    fsx::create_dir_all(&opts.out_dir, "output directory")?;
    fsx::remove_dir_all_if_exists(&opts.work_dir, "old work directory")?;
    fsx::create_dir_all(&opts.work_dir, "work directory")?;
    let work = opts.work_dir.clone();
    let result = build_in(opts, &work, epoch, &role, started_at, t0);
    if !opts.keep_work {
        let _ = fsx::remove_dir_all_if_exists(&work, "work directory");
    }
    result
}

fn build_in(
    opts: &BuildOptions,
    work: &Path,
    epoch: u64,
    role: &str,
    started_at: SystemTime,
    t0: Instant,
) -> Result<BuildResult> {
    let profile = &opts.profile;
    let p = &profile.profile;
    let bar = process::spinner(&format!("building {role}"));
    let mut steps = Steps { records: Vec::new() };
    let tarball = work.join("rootfs.tar");
    let lists = work.join("apt-lists");
    let root = work.join("root");
    fsx::create_dir_all(&lists, "apt lists directory")?;
    let purge = work.join("purge-forbidden.sh");
    fsx::write(&purge, purge_script(profile), "purge script")?;

    let lock = CacheLock::take(&opts.apt_cache)?;
    let args = mmdebstrap_args(opts, &tarball, &lists, &purge);
    let env = vec![
        ("SOURCE_DATE_EPOCH".to_string(), epoch.to_string()),
        ("TMPDIR".to_string(), work.display().to_string()),
        ("LC_ALL".to_string(), "C.UTF-8".to_string()),
    ];
    steps.run("bootstrap", &format!("mmdebstrap {}", args.join(" ")), &bar, || {
        run_with_spinner("bootstrap", "mmdebstrap", &args, &env, &bar)
    })?;
    steps.annotate("tarball_sha256", debian::sha256_of_file(&tarball)?);
    drop(lock);

    fsx::create_dir_all(&root, "root tree")?;
    let tar_args = [
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "-xpf",
        &tarball.display().to_string(),
        "-C",
        &root.display().to_string(),
    ];
    steps.run(
        "unpack",
        "tar -xpf rootfs.tar (tmpfs: entries are created in the tarball's sorted order)",
        &bar,
        || run("unpack", "tar", &tar_args, &[]).map(|_| ()),
    )?;
    let _ = std::fs::remove_file(&tarball);

    let evidence = steps.run(
        "archive-chain",
        "gpgv InRelease against the keyring; sha256 of every Packages index and .deb",
        &bar,
        || debian::check_archive_chain(&lists, &opts.apt_cache, &root, &opts.keyring),
    )?;
    steps.annotate("packages", evidence.packages.len().to_string());

    let hardening = steps.run(
        "harden",
        "profile-driven edits of the tree (sshd, services, firewall, sysctl, passwords, SUID)",
        &bar,
        || {
            let records = harden::harden(&root, p)?;
            if p.image.boot {
                write_fstab(&root, role)?;
            }
            tree_clamp(&root, epoch)?;
            Ok(records)
        },
    )?;

    let tests = steps.run(
        "security-checks",
        "services, sockets, sshd, SUID/SGID, packages, world-writable, passwords, sysctl, AppArmor, oscap-chroot",
        &bar,
        || crate::checks::run_all(&root, p, opts.run_oscap),
    )?;
    if !tests.passed() {
        steps.annotate("violations", tests.violations().len().to_string());
    }

    let rootfs = work.join("rootfs.ext4");
    let size_mib = if p.image.disk_size_mib > 0 { p.image.disk_size_mib } else { disk::auto_size_mib(&root)? };
    steps.run(
        "filesystem",
        &format!("mke2fs -t ext4 -d root ({size_mib} MiB, fixed UUID/hash seed/time); debugfs inode times; e2fsck -fn"),
        &bar,
        || disk::make_ext4(&root, &rootfs, size_mib, "root", &format!("{role}/rootfs"), epoch, work),
    )?;

    let esp = work.join("esp.vfat");
    if p.image.boot {
        steps.run("boot", "EFI system partition: systemd-boot, kernel, initramfs, loader entry", &bar, || {
            crate::boot::make_esp(&root, &esp, role, p, epoch, work)
        })?;
    }

    let raw = opts.out_dir.join(RAW_NAME);
    steps.run("disk", "GPT (fixed GUIDs) with the partitions at 1 MiB alignment", &bar, || {
        let mut parts = Vec::new();
        if p.image.boot {
            parts.push(disk::PartitionSpec { image: &esp, type_guid: disk::ESP, name: "ESP" });
        }
        parts.push(disk::PartitionSpec { image: &rootfs, type_guid: disk::ROOT_X86_64, name: "root" });
        disk::write_gpt_disk(&raw, &parts, role).map(|_| ())
    })?;
    let qcow2 = opts.out_dir.join(QCOW2_NAME);
    steps.run("qcow2", "qemu-img convert -O qcow2", &bar, || disk::make_qcow2(&raw, &qcow2))?;

    bar.set_message("hashing outputs");
    let raw_sha256 = debian::sha256_of_file(&raw)?;
    let qcow2_sha256 = debian::sha256_of_file(&qcow2)?;
    let raw_size = std::fs::metadata(&raw).map_err(|e| Error::io("stat", &raw, e))?.len();
    let qcow2_size = std::fs::metadata(&qcow2).map_err(|e| Error::io("stat", &qcow2, e))?.len();
    fsx::write(&opts.out_dir.join(PROFILE_NAME), &profile.bytes, "profile copy")?;
    bar.finish_and_clear();

    let mut tool_versions = BTreeMap::new();
    tool_versions.insert("image-pipeline".into(), env!("CARGO_PKG_VERSION").into());
    tool_versions.insert("mmdebstrap".into(), process::tool_version("mmdebstrap", &["--version"]));
    tool_versions.insert("mke2fs".into(), process::tool_version("mke2fs", &["-V"]));
    tool_versions.insert("qemu-img".into(), process::tool_version("qemu-img", &["--version"]));
    tool_versions.insert("tar".into(), process::tool_version("tar", &["--version"]));
    if opts.run_oscap && p.oscap.is_some() {
        tool_versions.insert("oscap".into(), process::tool_version("oscap", &["--version"]));
    }
    Ok(BuildResult {
        raw,
        qcow2,
        raw_sha256,
        qcow2_sha256,
        raw_size,
        qcow2_size,
        evidence,
        steps: steps.records,
        hardening,
        tests,
        started: started_at,
        finished: SystemTime::now(),
        tool_versions,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn tree_clamp(root: &Path, epoch: u64) -> Result<()> {
    crate::tree::clamp_mtimes(root, epoch).map(|_| ())
}

fn write_fstab(root: &Path, role: &str) -> Result<()> {
    let uuid = disk::uuid_string(&disk::derived_uuid(&format!("{role}/rootfs")));
    let text = format!("# Generated by image-pipeline\nUUID={uuid} / ext4 defaults,errors=remount-ro 0 1\n");
    fsx::write(&crate::tree::at(root, "/etc/fstab"), text, "/etc/fstab")
}

/// The in-toto statement for a finished build.
pub fn statement(opts: &BuildOptions, result: &BuildResult, identity: ImageIdentity) -> Statement {
    let p = &opts.profile.profile;
    let mut subject = vec![
        ResourceDescriptor {
            name: RAW_NAME.into(),
            digest: [("sha256".to_string(), result.raw_sha256.clone())].into(),
            ..Default::default()
        },
        ResourceDescriptor {
            name: QCOW2_NAME.into(),
            digest: [("sha256".to_string(), result.qcow2_sha256.clone())].into(),
            ..Default::default()
        },
    ];
    subject.sort_by(|a, b| a.name.cmp(&b.name));
    let mut deps = vec![ResourceDescriptor {
        uri: format!("file://{}", opts.keyring.display()),
        digest: [("sha256".to_string(), result.evidence.keyring_sha256.clone())].into(),
        annotations: [("role".to_string(), "trust anchor".to_string())].into(),
        ..Default::default()
    }];
    for r in &result.evidence.releases {
        deps.push(ResourceDescriptor {
            uri: r.uri.clone(),
            digest: [("sha256".to_string(), r.sha256.clone())].into(),
            annotations: [
                ("date".to_string(), r.date.clone()),
                ("suite".to_string(), r.suite.clone()),
                ("signedBy".to_string(), r.signed_by.clone()),
            ]
            .into(),
            ..Default::default()
        });
    }
    for (uri, sha) in &result.evidence.indices {
        deps.push(ResourceDescriptor {
            uri: uri.clone(),
            digest: [("sha256".to_string(), sha.clone())].into(),
            ..Default::default()
        });
    }
    for pkg in &result.evidence.packages {
        deps.push(ResourceDescriptor {
            uri: format!("pkg:deb/debian/{}@{}?arch={}", pkg.name, pkg.version.replace(':', "%3A"), pkg.architecture),
            digest: [("sha256".to_string(), pkg.sha256.clone())].into(),
            ..Default::default()
        });
    }
    let mut mirrors = vec![p.image.mirror.clone()];
    if opts.updates {
        mirrors.push(p.image.security_mirror.clone());
    }
    let invocation: [u8; 16] = rand::random();
    Statement {
        statement_type: provenance::STATEMENT_TYPE.into(),
        subject,
        predicate_type: provenance::PREDICATE_TYPE.into(),
        predicate: Predicate {
            build_definition: BuildDefinition {
                build_type: provenance::BUILD_TYPE.into(),
                external_parameters: ExternalParameters {
                    profile: opts.profile.source.clone(),
                    profile_sha256: opts.profile.digest(),
                    role: p.image.role.clone(),
                    suite: p.image.suite.clone(),
                    variant: p.image.variant.clone(),
                    updates: opts.updates,
                    mirrors,
                },
                internal_parameters: InternalParameters {
                    source_date_epoch: opts.epoch(),
                    keyring: opts.keyring.display().to_string(),
                    keyring_sha256: result.evidence.keyring_sha256.clone(),
                },
                resolved_dependencies: deps,
            },
            run_details: RunDetails {
                builder: Builder { id: provenance::BUILDER_ID.into(), version: result.tool_versions.clone() },
                metadata: RunMetadata {
                    invocation_id: hex::encode(invocation),
                    started_on: provenance::rfc3339(result.started),
                    finished_on: provenance::rfc3339(result.finished),
                },
            },
            skydd: SkyddRecord {
                image: identity,
                steps: result.steps.clone(),
                hardening: result.hardening.clone(),
                tests: result.tests.clone(),
                releases: result.evidence.releases.clone(),
                packages: result.evidence.packages.clone(),
            },
        },
    }
}
