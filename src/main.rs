//! `skydd`: the all-in-one launcher. `skydd up` runs a whole cloud on loopback (a CA, the
//! TTP, the cloud platform, two compute hosts each with its own swtpm and secure
//! component); `skydd demo` tells Skydd's story on it.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use skydd::cloud::{AllInOne, DEMO_LAYOUT};

#[derive(Parser)]
#[command(
    name = "skydd",
    about = "Skydd all-in-one: domain-based storage protection, a whole cloud on one machine",
    long_about = "Runs every Skydd party on loopback with real certificates, mutual TLS, SQLite, software TPMs \
(swtpm) and encrypted volumes (FUSE + loop; dm-crypt where the kernel has device-mapper). Needs root (loop \
devices, FUSE, mounts).\n\n  skydd up     start the cloud and keep it running; use domain-manager with the printed config\n  \
skydd demo   start it, tell the story step by step, stop"
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
    },
    /// Start the all-in-one cloud in a fresh directory, tell the story, stop.
    Demo {
        /// Keep the cloud's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let mut progress = |line: &str| println!("  .. {line}");
    match Cli::parse().command {
        Command::Up { dir } => {
            println!("starting the all-in-one cloud in {}", dir.display());
            let cloud = AllInOne::start(&dir, &DEMO_LAYOUT, &mut progress).await?;
            println!("\nthe cloud is up:");
            println!(
                "  TTP             {} (built in {:.0} ms, K_TTP unsealed from its swtpm; custodians' shares in {})",
                cloud.ttp.url,
                cloud.ttp.build_time.as_secs_f64() * 1e3,
                cloud.ttp.custodians_dir.display()
            );
            println!("  cloud platform  {}", cloud.cp_url);
            for host in &cloud.hosts {
                println!("  {:<15} {} (VMs mount under {})", host.id, host.agent_url, host.vm_root.display());
            }
            for (name, config) in &cloud.manager_configs {
                println!("  {name:<15} export SKYDD_DM_CONFIG={}", config.display());
            }
            println!("\ntry:\n  export SKYDD_DM_CONFIG={}\n  domain-manager domain create --meta department=cardiology --vm vm-a:rw --vm vm-b:ro --size 64M\n  domain-manager vm list\n\nCtrl-C stops the cloud (VM mounts are detached).",
                cloud.manager_config("dm-alice")?.display());
            tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
            println!("stopping");
            cloud.stop().await;
        }
        Command::Demo { dir } => {
            let temp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
            println!(
                "Skydd demo: a hospital's patient records on an untrusted cloud\n\nstarting the all-in-one cloud in {}",
                dir.display()
            );
            let started = std::time::Instant::now();
            let cloud = AllInOne::start(&dir, &DEMO_LAYOUT, &mut progress).await?;
            println!("  .. the cloud is up ({:.1} s)", started.elapsed().as_secs_f64());
            let mut say = |line: &str| println!("{line}");
            let outcome = skydd::story::run(&cloud, &DEMO_LAYOUT, &mut say).await;
            cloud.stop().await;
            outcome?;
            println!("\nDemo complete: every step did what it claims.");
        }
    }
    Ok(())
}
