//! `secure-component`: the Skydd agent of a compute host. See `secure-component --help`.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "secure-component",
    about = "Skydd secure component: releases domain keys into this host's TPM and opens volumes for its VMs",
    long_about = "The secure component runs on every compute host beside the hypervisor. The cloud platform asks it \
(over mutual TLS) to attach a domain to a VM; it then proves this host's measured state to the TTP with a TPM quote, \
receives the domain key encrypted to a PCR-bound TPM key, decrypts it inside the TPM, opens the volume (dm-crypt, or \
the userspace engine when the kernel has no device-mapper), wipes the key and gives the plaintext device to the VM.\n\n\
Set-up of a host:\n  \
1. get a certificate with role secure-component whose name is the host id\n     \
(cloud-platform ca issue --role secure-component --name host-1 ...)\n  \
2. write sc.toml (listen, tcti, state_dir, vm_root, backend, hypervisor, ttp_url, ca, cert, key;\n     \
the example at the top of secure-component/src/config.rs shows every key)\n  \
3. secure-component enroll --config sc.toml   (once, and again after a trusted update)\n  \
4. secure-component serve --config sc.toml\n  \
5. register the host with the cloud platform (POST /v1/hosts with its agent URL)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent API (attach, detach, list) over mutual TLS to the cloud platform.
    ///
    /// Attachments are recorded in <state_dir>/attachments and reported again after a
    /// restart. With the userspace backend a mapping cannot outlive this process: on
    /// Ctrl-C/SIGTERM the agent unmounts and closes its mappings, and lists them as stale
    /// after the restart until the cloud platform detaches them.
    Serve {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_SC_CONFIG")]
        config: PathBuf,
        /// Override the listen address of the configuration.
        #[arg(long)]
        listen: Option<String>,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Enroll this host's TPM with the TTP: create an attestation key and a binding key bound
    /// to the configured PCRs (pcr_selection), prove both to the TTP.
    ///
    /// The TTP accepts the host only if its TPM's EK certificate chains to a trusted TPM
    /// vendor root and the PCR values match a reference state of its attestation policy.
    /// Run it once per host, and again after a trusted update changed the PCRs.
    ///
    /// With [[partner]] tables, it enrolls at the home TTP (ttp_url) with fresh keys and then
    /// at every partner's TTP with the same keys (one TPM, one binding key); `--ttp NAME`
    /// enrolls at one of them only ("home" or a partner's name), reusing the stored keys
    /// while they still fit the host's PCRs.
    Enroll {
        #[arg(long, env = "SKYDD_SC_CONFIG")]
        config: PathBuf,
        /// Enroll at this TTP only: "home" or the name of a [[partner]].
        #[arg(long)]
        ttp: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen, json_logs } => {
            init_logging(json_logs);
            let mut config = secure_component::config::AgentConfig::load(&config)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let (service, tls) = secure_component::service::build(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("bind {}", config.listen))?;
            let shutdown = net::stop_on_signals();
            tracing::info!(listen = %config.listen, backend = service.backend_kind(), hypervisor = service.driver_kind(), "secure component serving");
            let served = secure_component::service::serve(listener, service.clone(), tls, shutdown).await;
            // Orderly stop of what cannot outlive the process (userspace mappings).
            tokio::task::spawn_blocking(move || service.shutdown()).await.ok();
            served?;
        }
        Command::Enroll { config, ttp } => {
            init_logging(false);
            let config = secure_component::config::AgentConfig::load(&config)?;
            if let Some(name) = &ttp {
                config.partner(name)?;
            }
            let (service, _) = secure_component::service::build(&config)?;
            let enrolled = match &ttp {
                Some(name) => vec![(
                    name.clone(),
                    service.enroll_at(name).await.with_context(|| format!("enrollment at {name}"))?,
                )],
                None => service.enroll_everywhere().await.context("enrollment")?,
            };
            for (name, result) in enrolled {
                let url = config.partner(&name)?.map_or(config.ttp_url.as_str(), |p| p.ttp_url.as_str());
                println!(
                    "enrolled host {} with the TTP {name} at {url}\n  reference state: {}\n  EK fingerprint:  {}\n  PCRs bound:      {} {:?}",
                    result.host_id, result.reference_state, result.ek_fingerprint, config.pcr_selection.bank, config.pcr_selection.indices
                );
            }
            println!("Next: `secure-component serve --config ...`, then register the host with the cloud platform(s).");
        }
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}
