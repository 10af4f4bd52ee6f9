//! The all-in-one's VMs as real qemu guests (docs/IMAGE-PIPELINE.md "The demo guest"): the `demo-vm` image
//! that `image-pipeline` builds (cached by its inputs), the signed allowlist this cloud's
//! `image-pipeline` identity issues for it, and each layout VM launched through its compute
//! host's secure component (trusted launch), with a connection to its guest agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image_pipeline::build::BuildOptions;
use image_pipeline::profile::LoadedProfile;
use image_pipeline::provenance::{Signer, TrustPolicy};
use image_pipeline::store::{Status, Store};
use net::Role;
use sha2::{Digest, Sha256};

use crate::guest::GuestAgent;
use crate::lab::LabPki;

/// The pipeline profile of the guests (image-pipeline/profiles/demo-vm.toml).
pub const PROFILE: &str = "demo-vm";
/// The UEFI firmware the image boots under (Debian package `ovmf`).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Guest memory (MiB): the agent, mkfs and a page cache need little.
const GUEST_MEMORY_MIB: u32 = 384;

/// The guest image: a promoted version in a pipeline store kept between runs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The pipeline's store holding it (`image-pipeline --store` of this directory).
    pub store: PathBuf,
    /// The raw image (the store's blob, read-only): what the launcher hashes and boots.
    pub raw: PathBuf,
    /// Its SHA-256 (hex), the allowlist's `raw_sha256`.
    pub sha256: String,
    /// `demo-vm@N`.
    pub version: String,
    /// How long the build took; `None` when the cached image was reused.
    pub build_time: Option<Duration>,
}

/// Where the image cache lives: `SKYDD_GUEST_IMAGE_CACHE`, else `guest-images/` in the
/// Cargo target directory the running binary was built into (`target/release/skydd` →
/// `target/guest-images`), else /var/cache/skydd/guest-images.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKYDD_GUEST_IMAGE_CACHE") {
        return PathBuf::from(dir);
    }
    let target = std::env::current_exe().ok().and_then(|exe| {
        // target/<profile>/skydd, or target/<profile>/deps/<test> for tests.
        exe.ancestors().find(|dir| dir.file_name().is_some_and(|n| n == "target")).map(Path::to_path_buf)
    });
    target.map(|t| t.join("guest-images")).unwrap_or_else(|| PathBuf::from("/var/cache/skydd/guest-images"))
}

/// The `demo-vm` image for the profile shipped with this build: reused from
/// `cache/demo-vm-<inputs>/store` when a promoted version is there, else built by the
/// pipeline (point release only, so the same inputs give the same image), its provenance
/// signed by the cache's own pipeline identity, verified and promoted. The key is the
/// SHA-256 of the profile's bytes; the .deb cache is shared (`cache/apt`).
pub fn guest_image(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<GuestImage> {
    let profile = LoadedProfile::load(PROFILE).context("load the demo-vm profile")?;
    let key = hex::encode(&Sha256::digest(&profile.bytes)[..8]);
    let dir = cache.join(format!("{PROFILE}-{key}"));
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Two runs at once (a demo beside a test) build the image once: the second waits here,
    // then finds it promoted. The lock ends with the process, so a killed build frees it.
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        progress(&format!("guest image: another process is building it in {}; waiting", dir.display()));
        lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    }
    let store = Store::open(&store_dir).with_context(|| format!("open the image store {}", store_dir.display()))?;
    let promoted = |store: &Store| -> Result<Option<GuestImage>> {
        let newest = store.versions(PROFILE)?.into_iter().rev().find(|r| r.status == Status::Promoted);
        Ok(newest.map(|r| GuestImage {
            store: store_dir.clone(),
            raw: store.blob_path(&r.raw_sha256),
            sha256: r.raw_sha256.clone(),
            version: r.id(),
            build_time: None,
        }))
    };
    if let Some(image) = promoted(&store)? {
        progress(&format!(
            "guest image: {} (cached in {}, sha256 {}…)",
            image.version,
            dir.display(),
            &image.sha256[..16]
        ));
        return Ok(image);
    }
    progress(&format!(
        "guest image: building {PROFILE} with image-pipeline into {} (once per profile; a few minutes)",
        dir.display()
    ));
    let started = Instant::now();
    let pki_dir = dir.join("pki");
    let _ = std::fs::remove_dir_all(&pki_dir);
    let pki = LabPki::create_named(&pki_dir, "Skydd guest image build CA")?;
    let signer = pipeline_signer(&pki)?;
    let mut options = BuildOptions::new(profile, dir.join(format!("build-{}", std::process::id())));
    options.apt_cache = cache.join("apt");
    options.updates = false;
    options.run_oscap = false;
    options.source_date_epoch = None;
    let outcome = image_pipeline::pipeline::build_signed(&options, &signer, Some(&store), None)
        .context("build the guest image with image-pipeline")?;
    let record = outcome.record.context("the pipeline stored no version")?;
    let policy = TrustPolicy {
        roots: vec![protocol::pki::TrustedRoot::any_role(pki.ca_pem().to_string())],
        crl_pems: Vec::new(),
        signer_name: image_pipeline::provenance::DEFAULT_SIGNER_NAME.into(),
        now_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
    };
    store.promote(&record.id(), &policy).context("promote the guest image")?;
    let _ = std::fs::remove_dir_all(&options.out_dir);
    let mut image = promoted(&store)?.context("the promoted guest image is not in the store")?;
    image.build_time = Some(started.elapsed());
    progress(&format!("guest image: built {} in {:.0} s", image.version, started.elapsed().as_secs_f64()));
    Ok(image)
}

/// The `image-pipeline` signer (a `cloud-platform` certificate of that name) of `pki`.
fn pipeline_signer(pki: &LabPki) -> Result<Signer> {
    let tls = pki.issue(Role::CloudPlatform, image_pipeline::provenance::DEFAULT_SIGNER_NAME)?;
    Signer::from_files(&tls.key, &tls.cert).context("load the image-pipeline signing key")
}

/// Writes `path`: the allowlist of `image`'s store (`image-pipeline allowlist`), signed by
/// the `image-pipeline` identity `pki` issues, the one the cloud's TTP and hosts trust.
pub fn write_allowlist(image: &GuestImage, pki: &LabPki, path: &Path) -> Result<()> {
    let store = Store::open(&image.store)?;
    let (list, bytes) = store.allowlist(&pipeline_signer(pki)?)?;
    if !list.images.iter().any(|entry| entry.raw_sha256 == image.sha256) {
        bail!("the allowlist of {} lacks {}", image.store.display(), image.version);
    }
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// One layout VM running as a guest on its compute host.
pub struct Guest {
    /// The VM's id.
    pub vm_id: String,
    /// The compute host that launched it.
    pub host_id: String,
    /// What the launcher reported (image, qemu pid, sockets).
    pub launched: secure_component::launch::LaunchedVm,
    /// Its guest agent (one command at a time).
    pub agent: Mutex<GuestAgent>,
}

/// The guests of an all-in-one cloud, by VM id.
#[derive(Default)]
pub struct Guests {
    /// Every launched guest.
    pub by_vm: BTreeMap<String, Guest>,
}

impl Guests {
    /// Launches every `(host, vm)` through its host's secure component from `image` and
    /// waits for each guest's agent, `wave` guests booting at a time. Under TCG guests boot
    /// one after the other: on 2 shared cores one guest booted in 24 s alone, two at once
    /// took 110 and 129 s (docs/PERFORMANCE.md "skydd demo with guests").
    pub fn launch(
        hosts: &[(String, &std::sync::Arc<secure_component::service::AttachmentService>, Vec<String>)],
        image: &Path,
        wave: usize,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let wave = wave.max(1);
        let all: Vec<_> = hosts
            .iter()
            .flat_map(|(host_id, service, vms)| vms.iter().map(move |vm_id| (host_id.clone(), *service, vm_id.clone())))
            .collect();
        let mut guests = Guests::default();
        for chunk in all.chunks(wave) {
            let mut pending = Vec::new();
            for (host_id, service, vm_id) in chunk {
                let request = secure_component::launch::LaunchRequest {
                    vm_id: vm_id.clone(),
                    image: image.to_path_buf(),
                    memory_mib: GUEST_MEMORY_MIB,
                    cpus: 1,
                };
                let launched_at = Instant::now();
                // As the host's `POST /v1/vms` does: launch, and report it to the TTP's audit.
                let (launched, audit_seq) = tokio::runtime::Handle::current().block_on(service.launch_vm(request));
                let launched = launched.with_context(|| format!("{host_id}: launch {vm_id}"))?;
                let audit_seq =
                    audit_seq.with_context(|| format!("{host_id}: the TTP did not record the launch of {vm_id}"))?;
                progress(&format!(
                    "{host_id}: launched {vm_id} from {}@{} (sha256 {}…, on the signed allowlist), qemu pid {}; TTP audit #{audit_seq}",
                    launched.image.role,
                    launched.image.version,
                    &launched.image.sha256[..16],
                    launched.pid
                ));
                pending.push((host_id.clone(), launched, launched_at));
            }
            let connected: Vec<Result<Guest>> = std::thread::scope(|scope| {
                let handles: Vec<_> = pending
                    .into_iter()
                    .map(|(host_id, launched, launched_at)| {
                        scope.spawn(move || {
                            let agent = GuestAgent::connect(&launched.vm_id, &launched.serial, launched_at)?;
                            Ok(Guest { vm_id: launched.vm_id.clone(), host_id, launched, agent: Mutex::new(agent) })
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| bail!("a guest's agent thread panicked")))
                    .collect()
            });
            for guest in connected {
                let guest = guest?;
                let boot = guest.agent.lock().map(|a| a.boot_time).unwrap_or_default();
                progress(&format!(
                    "{}: {} booted; its guest agent answered {:.1} s after the launch",
                    guest.host_id,
                    guest.vm_id,
                    boot.as_secs_f64()
                ));
                guests.by_vm.insert(guest.vm_id.clone(), guest);
            }
        }
        Ok(guests)
    }

    /// Runs `script` in `vm_id`'s guest.
    pub fn run(&self, vm_id: &str, script: &str) -> Result<crate::guest::Output> {
        self.agent(vm_id)?.run(script)
    }

    /// Runs `script` in `vm_id`'s guest; fails unless it exits 0.
    pub fn sh(&self, vm_id: &str, script: &str) -> Result<String> {
        self.agent(vm_id)?.sh(script)
    }

    fn agent(&self, vm_id: &str) -> Result<std::sync::MutexGuard<'_, GuestAgent>> {
        let guest = self.by_vm.get(vm_id).with_context(|| format!("{vm_id} is not a running guest"))?;
        Ok(guest.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}
