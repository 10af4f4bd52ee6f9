//! `skydd`: the all-in-one launcher. `skydd up` runs a whole cloud on loopback (a CA, the
//! TTP, the cloud platform, two compute hosts each with its own swtpm and secure
//! component, each layout VM a qemu guest launched through trusted launch); `skydd demo`
//! tells Skydd's story on it, inside the guests. `--no-vms` makes the VMs directories.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use skydd::cloud::{AllInOne, DEMO_LAYOUT};

#[derive(Parser)]
#[command(
    name = "skydd",
    about = "Skydd all-in-one: domain-based storage protection, a whole cloud on one machine",
    long_about = "Runs every Skydd party on loopback with real certificates, mutual TLS, SQLite and software TPMs \
(swtpm). Needs root.\n\n  skydd up     start the cloud and keep it running; use domain-manager with the printed config\n  \
skydd demo   start it, tell the story step by step, stop\n\nWith VMs (the default): each layout VM (vm-a on compute-1, \
vm-b and vm-c on compute-2) is a qemu guest its compute host launches from the image-pipeline's demo-vm image, \
only because that image's digest is on the signed allowlist (trusted launch; OVMF firmware; TCG by default, KVM \
with --accel kvm on a host whose /dev/kvm runs guests). Volumes are served over vhost-user and hot-plugged into the running guests; the story's \
commands run inside them. The image is built once (a few minutes, Debian mirror needed) and cached under \
target/guest-images (SKYDD_GUEST_IMAGE_CACHE).\n\nWith --no-vms (machines without qemu): each VM is a directory \
the volume is mounted under (FUSE + loop; dm-crypt where the kernel has device-mapper)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the all-in-one cloud and keep it running until Ctrl-C.
    Up {
        /// Where the cloud keeps its CA, databases, TPM state, volumes and VM mounts.
        #[arg(long, default_value = "/var/lib/skydd-allinone")]
        dir: PathBuf,
        /// VMs are directories the volumes are mounted under, not qemu guests.
        #[arg(long)]
        no_vms: bool,
        /// qemu's accelerator for the guests: tcg (works everywhere), kvm (a host whose
        /// /dev/kvm runs guests: they boot in seconds), or kvm:tcg (the first that starts).
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
    /// Build the demo guest image (image-pipeline's `demo-vm` profile) into the cache, or
    /// find it there, and print where it is. `skydd up` and `skydd demo` build it themselves
    /// when it is missing; scripts/demo.sh runs this first so the demo's own time is the
    /// cloud and the story. Cache: SKYDD_GUEST_IMAGE_CACHE, else target/guest-images.
    GuestImage,
    /// Start the all-in-one cloud in a fresh directory, tell the story, stop.
    Demo {
        /// Keep the cloud's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// VMs are directories the volumes are mounted under, not qemu guests.
        #[arg(long)]
        no_vms: bool,
        /// qemu's accelerator for the guests: tcg (works everywhere), kvm (a host whose
        /// /dev/kvm runs guests: they boot in seconds), or kvm:tcg (the first that starts).
        #[arg(long, default_value = "tcg")]
        accel: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let mut progress = |line: &str| println!("  .. {line}");
    match Cli::parse().command {
        Command::Up { dir, no_vms, accel } => {
            println!("starting the all-in-one cloud in {}", dir.display());
            let cloud = start(&dir, no_vms, &accel, &mut progress).await?;
            println!("\nthe cloud is up:");
            println!(
                "  TTP             {} (built in {:.0} ms, K_TTP unsealed from its swtpm; custodians' shares in {})",
                cloud.ttp.url,
                cloud.ttp.build_time.as_secs_f64() * 1e3,
                cloud.ttp.custodians_dir.display()
            );
            println!("  cloud platform  {}", cloud.cp_url);
            for host in &cloud.hosts {
                if no_vms {
                    println!("  {:<15} {} (VMs mount under {})", host.id, host.agent_url, host.vm_root.display());
                } else {
                    println!("  {:<15} {}", host.id, host.agent_url);
                }
            }
            for guest in cloud.guests.by_vm.values() {
                println!(
                    "  {:<15} qemu pid {} on {}, from {}@{}; QMP {}, guest agent {}",
                    guest.vm_id,
                    guest.launched.pid,
                    guest.host_id,
                    guest.launched.image.role,
                    guest.launched.image.version,
                    guest.launched.qmp.display(),
                    guest.launched.serial.display()
                );
            }
            for (name, config) in &cloud.manager_configs {
                println!("  {name:<15} export SKYDD_DM_CONFIG={}", config.display());
            }
            println!("\ntry:\n  export SKYDD_DM_CONFIG={}\n  domain-manager domain create --meta department=cardiology --vm vm-a:rw --vm vm-b:ro --size 64M\n  domain-manager vm list\n\nCtrl-C stops the cloud (volumes are detached, guests stopped).",
                cloud.manager_config("dm-alice")?.display());
            tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
            println!("stopping");
            cloud.stop().await;
        }
        Command::GuestImage => {
            let cache = skydd::vms::default_cache_dir();
            let image = tokio::task::block_in_place(|| skydd::vms::guest_image(&cache, &mut progress))?;
            println!("{}\n  version {}\n  sha256  {}", image.raw.display(), image.version, image.sha256);
        }
        Command::Demo { dir, no_vms, accel } => {
            let temp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
            println!(
                "Skydd demo: a hospital's patient records on an untrusted cloud\n\nstarting the all-in-one cloud in {}",
                dir.display()
            );
            let started = std::time::Instant::now();
            let cloud = start(&dir, no_vms, &accel, &mut progress).await?;
            println!("  .. the cloud is up ({:.1} s)", started.elapsed().as_secs_f64());
            let mut say = |line: &str| println!("{line}");
            let outcome = skydd::story::run(&cloud, &DEMO_LAYOUT, &mut say).await;
            cloud.stop().await;
            outcome?;
            println!("\nDemo complete in {:.0} s: every step did what it claims.", started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// Starts the demo layout under `dir`: with qemu guests from the cached (or freshly built)
/// `demo-vm` image, or with directories as VMs (`no_vms`).
async fn start(dir: &std::path::Path, no_vms: bool, accel: &str, progress: &mut dyn FnMut(&str)) -> Result<AllInOne> {
    if no_vms {
        return AllInOne::start(dir, &DEMO_LAYOUT, progress).await;
    }
    let cache = skydd::vms::default_cache_dir();
    let image = tokio::task::block_in_place(|| skydd::vms::guest_image(&cache, progress))?;
    AllInOne::start_with_vms(dir, &DEMO_LAYOUT, &image, accel, progress).await
}
