//! `ttp`: the trusted third party of Skydd. See `ttp --help` and README.md "Operator's guide".

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ttp",
    about = "Skydd trusted third party: derives domain keys, checks access lists and TPM attestation, keeps the audit log",
    long_about = "The TTP is the only party that can derive a domain's key (from its master key K_TTP and the \
domain's registration). It releases a key only to an enrolled compute host whose TPM quotes a trusted state, \
only for a VM in the domain's access list with a valid grant, and only encrypted to that host's PCR-bound TPM key.\n\n\
First run `ttp init --data-dir DIR`, then `ttp serve --config ttp.toml`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the master key K_TTP (32 random bytes, mode 0600) in the data directory.
    Init {
        #[arg(long, env = "SKYDD_TTP_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Operator actions on enrolled compute hosts.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Serve the TTP API over mutual TLS.
    Serve {
        /// The TOML configuration (listen, data_dir, ca, cert, key, attestation).
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// Override the listen address of the configuration.
        #[arg(long)]
        listen: Option<String>,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// Allow HOST, whose TPM was replaced, to enroll once with another EK than the one pinned
    /// at its first enrollment (audited as `host_replace`; the enrollment that follows names
    /// the old and the new EK). Runs beside a serving TTP on the same database.
    Replace {
        /// The TOML configuration (only data_dir is used).
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// The host id (the CN of its secure component's certificate).
        #[arg(long)]
        host: String,
        /// Who approves the replacement, for the audit record (default: $SUDO_USER or $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Init { data_dir } => {
            let path = ttp::config::create_master_key(&data_dir)?;
            println!(
                "created K_TTP in {} (mode 0600). Back it up offline: without it no domain key can be derived.",
                path.display()
            );
        }
        Command::Host { command: HostCommand::Replace { config, host, operator } } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let store = config.open_store()?;
            let operator = operator
                .or_else(|| std::env::var("SUDO_USER").ok())
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            let record = ttp::service::allow_host_replacement(&store, &format!("operator:{operator}"), &host)?;
            println!("audit #{}: {}", record.seq, record.message);
            println!("{host} may now enroll once with a new EK; run `secure-component enroll` on it.");
        }
        Command::Serve { config, listen, json_logs } => {
            init_logging(json_logs);
            let mut config = ttp::config::TtpConfig::load(&config)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let (service, tls) = ttp::server::build(&config)?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("bind {}", config.listen))?;
            // SIGINT or SIGTERM: open requests drain before the process exits.
            let shutdown = net::stop_on_signals();
            tracing::info!(listen = %config.listen, "TTP serving");
            ttp::server::serve_limited(listener, service, tls, &config.limits, shutdown).await?;
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
