//! `ttp`: the trusted third party of Skydd. See `ttp --help` and README.md "Operator's guide".

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ttp::store::TtpStore;

#[derive(Parser)]
#[command(
    name = "ttp",
    about = "Skydd trusted third party: derives domain keys, checks access lists and TPM attestation, keeps the audit log",
    long_about = "The TTP is the only party that can derive a domain's key (from its master key K_TTP and the \
domain's registration). It releases a key only to an enrolled compute host whose TPM quotes a trusted state, \
only for a VM in the domain's access list with a valid grant, and only encrypted to that host's PCR-bound TPM key.\n\n\
First run `ttp init --config ttp.toml` (K_TTP sealed to this host's TPM and split for its custodians), \
then `ttp serve --config ttp.toml`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the master key K_TTP (version 1): sealed to this host's TPM ([master_key] of the
    /// configuration) and split into shares for custodians. It is never written in the clear.
    Init {
        #[command(flatten)]
        place: KeyPlace,
        #[command(flatten)]
        custodians: CustodianArgs,
        /// Seal and split the K_TTP of an older installation (DATA_DIR/master.key, plain
        /// bytes) instead of making one; the file is then overwritten and removed.
        #[arg(long)]
        import_legacy: bool,
    },
    /// Combine custodians' shares of K_TTP (from files, or typed at the console if none are
    /// given) and seal it to this host's TPM in its current state: after new hardware or an
    /// approved change of the measured PCRs, or to bring up a replica.
    Unseal {
        /// The TOML configuration (data_dir and [master_key] are used).
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// A file holding one or more share lines (`-` for standard input).
        #[arg(long = "share")]
        shares: Vec<PathBuf>,
    },
    /// Seal every K_TTP version again to the TPM's current state over the configured PCRs
    /// (e.g. after changing [master_key] pcrs); versions the TPM refuses need --share.
    Reseal {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// Share files for versions whose sealed copy the TPM refuses (`-`: standard input).
        #[arg(long = "share")]
        shares: Vec<PathBuf>,
    },
    /// Master-key versions: how many domains each derives, a new version, retiring one.
    MasterKey {
        #[command(subcommand)]
        command: MasterKeyCommand,
    },
    /// Operator actions on enrolled compute hosts.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Print audit records (oldest first: seq, time, event, outcome, host, VM, message) and
    /// verify the whole hash chain from record 1. Read-only: it opens the database without
    /// writing or migrating it, so it runs beside a serving TTP. It exits non-zero when the
    /// chain is broken (an edited, removed or relinked record), after printing what it read.
    ///
    /// Example, every launch compute-2 reported (a refused image shows as image_not_allowed):
    /// `ttp audit --config ttp.toml --event launch --host compute-2`
    Audit {
        /// The TOML configuration (its database is used).
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// Only records of this event: launch, launch_report, key_release, enroll, register,
        /// integrity_violation, ...
        #[arg(long)]
        event: Option<String>,
        /// Only records naming this compute host (the CN of its secure component's certificate).
        #[arg(long)]
        host: Option<String>,
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
        /// Combine K_TTP from these share files (`-`: typed at the console until the
        /// threshold is reached) instead of unsealing it from the TPM.
        #[arg(long = "unseal-shares", num_args = 1..)]
        unseal_shares: Vec<PathBuf>,
    },
}

/// Where K_TTP's records go: the configuration (with its TPM) or a bare data directory.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct KeyPlace {
    /// The TOML configuration (data_dir and [master_key] are used).
    #[arg(long, env = "SKYDD_TTP_CONFIG")]
    config: Option<PathBuf>,
    /// A data directory without a TPM: K_TTP exists only as the custodians' shares.
    #[arg(long, env = "SKYDD_TTP_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl KeyPlace {
    fn resolve(&self) -> anyhow::Result<(PathBuf, ttp::master_key::MasterKeyConfig)> {
        match (&self.config, &self.data_dir) {
            (Some(config), _) => {
                let config = ttp::config::TtpConfig::load(config)?;
                Ok((config.data_dir, config.master_key))
            }
            (None, Some(dir)) => Ok((dir.clone(), Default::default())),
            (None, None) => anyhow::bail!("give --config or --data-dir"),
        }
    }
}

/// How K_TTP is split.
#[derive(clap::Args)]
struct CustodianArgs {
    /// Shares to make, one per custodian.
    #[arg(long, default_value_t = 5)]
    shares: u8,
    /// Shares that recover K_TTP.
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Write each share to its own file (0600) in this directory, to hand to one custodian
    /// each; without it the shares are printed.
    #[arg(long)]
    share_dir: Option<PathBuf>,
}

impl CustodianArgs {
    fn custodians(&self) -> ttp::master_key::Custodians {
        ttp::master_key::Custodians { shares: self.shares, threshold: self.threshold }
    }
}

#[derive(Subcommand)]
enum MasterKeyCommand {
    /// Each K_TTP version: fingerprint, sealed copy, split, and the domains it derives keys for.
    Status {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
    },
    /// Make the next K_TTP version, sealed and split like the first; after a restart it
    /// derives the keys of new domains (older versions keep theirs).
    NewVersion {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        custodians: CustodianArgs,
    },
    /// Forget an old K_TTP version's sealed copy; refused while a registered domain uses it.
    Retire {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_TTP_CONFIG")]
        config: PathBuf,
        /// The version to retire.
        #[arg(long)]
        version: u32,
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
        Command::Init { place, custodians, import_legacy } => {
            let (data_dir, key_config) = place.resolve()?;
            let created = if import_legacy {
                ttp::master_key::import_legacy(&data_dir, &key_config, custodians.custodians())?
            } else {
                ttp::master_key::create_version(&data_dir, &key_config, custodians.custodians())?
            };
            hand_out(&created, &custodians)?;
        }
        Command::Unseal { config, shares } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let shares = shares_from(&shares)?;
            let record = ttp::master_key::unseal_with_shares(&config.data_dir, &config.master_key, &shares)?;
            match &record.sealed {
                Some(sealed) => println!(
                    "K_TTP version {} (fingerprint {}) is sealed to this TPM's PCRs {:?} as they are now; `ttp serve` unseals it at start.",
                    record.version, record.fingerprint, sealed.pcrs
                ),
                None => println!(
                    "the shares combine to K_TTP version {} (fingerprint {}); no TPM is configured, so start with `ttp serve --unseal-shares`.",
                    record.version, record.fingerprint
                ),
            }
        }
        Command::Reseal { config, shares } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let shares = ttp::master_key::read_share_files(&shares)?;
            for record in ttp::master_key::reseal(&config.data_dir, &config.master_key, &shares)? {
                println!(
                    "K_TTP version {} sealed to PCRs {:?} as they are now",
                    record.version, config.master_key.pcrs
                );
            }
        }
        Command::MasterKey { command } => master_key_command(command)?,
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
        Command::Audit { config, event, host } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let records = ttp::store::AuditLogReader::open(&config.database()?)?.records()?;
            print!("{}", audit_listing(&records, event.as_deref(), host.as_deref()));
            let checked = ttp::service::verify_whole_audit_chain(&records)
                .context("the audit chain does not verify; the records above are as stored")?;
            match records.last() {
                Some(head) => println!(
                    "hash chain verified: {checked} records from #1 to #{} (head hash {})",
                    head.seq, head.hash
                ),
                None => println!("the audit log is empty"),
            }
        }
        Command::Serve { config, listen, json_logs, unseal_shares } => {
            init_logging(json_logs);
            let mut config = ttp::config::TtpConfig::load(&config)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let shares = shares_from_if_any(&unseal_shares)?;
            let (service, tls) = ttp::server::build_with_shares(&config, &shares)?;
            tracing::info!(versions = ?service.master_key_versions(), "K_TTP unsealed");
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

/// Prints the custodians' shares or writes one file each, with what to do next.
fn hand_out(created: &ttp::master_key::CreatedVersion, custodians: &CustodianArgs) -> anyhow::Result<()> {
    let record = &created.record;
    match &record.sealed {
        Some(sealed) => println!(
            "created K_TTP version {} (fingerprint {}), sealed to this TPM under PCRs {:?}.",
            record.version, record.fingerprint, sealed.pcrs
        ),
        None => println!(
            "created K_TTP version {} (fingerprint {}); no TPM is configured: the TTP starts only from {} shares.",
            record.version, record.fingerprint, record.threshold
        ),
    }
    match &custodians.share_dir {
        Some(dir) => {
            for path in ttp::master_key::write_share_files(dir, &created.shares)? {
                println!("  share for one custodian: {}", path.display());
            }
            println!("Give each file to a different custodian, then delete it from this machine.");
        }
        None => {
            println!(
                "Shares ({} of {} recover K_TTP); give each line to a different custodian:",
                record.threshold, record.shares
            );
            for share in &created.shares {
                println!("{}", share.to_text().as_str());
            }
        }
    }
    println!(
        "No file on this host holds K_TTP; without the TPM copy or {} shares no domain key can be derived.",
        record.threshold
    );
    Ok(())
}

/// Shares from files, or typed at the console when no file is named.
fn shares_from(files: &[PathBuf]) -> anyhow::Result<Vec<ttp::master_key::ShareLine>> {
    if files.is_empty() || files.iter().any(|f| f.as_os_str() == "-") {
        eprintln!("Custodians: paste your share line and press Enter, one after the other.");
        let shares =
            ttp::master_key::read_shares_until_threshold(&mut std::io::stdin().lock(), &mut std::io::stderr())?;
        let files: Vec<PathBuf> = files.iter().filter(|f| f.as_os_str() != "-").cloned().collect();
        let mut all = ttp::master_key::read_share_files(&files)?;
        all.extend(shares);
        return Ok(all);
    }
    Ok(ttp::master_key::read_share_files(files)?)
}

fn shares_from_if_any(files: &[PathBuf]) -> anyhow::Result<Vec<ttp::master_key::ShareLine>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    shares_from(files)
}

fn master_key_command(command: MasterKeyCommand) -> anyhow::Result<()> {
    match command {
        MasterKeyCommand::Status { config } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let uses = config.open_store()?.master_key_use()?;
            println!("version  fingerprint       sealed-to         split   live-domains  deleted-domains");
            for record in ttp::master_key::records(&config.data_dir)? {
                let used = uses.iter().find(|u| u.version == record.version);
                let sealed =
                    record.sealed.as_ref().map_or_else(|| "no TPM".to_string(), |s| format!("PCRs {:?}", s.pcrs));
                println!(
                    "{:<8} {:<17} {:<17} {}-of-{}  {:<13} {}",
                    record.version,
                    record.fingerprint,
                    sealed,
                    record.threshold,
                    record.shares,
                    used.map_or(0, |u| u.live_domains),
                    used.map_or(0, |u| u.deleted_domains)
                );
            }
        }
        MasterKeyCommand::NewVersion { config, custodians } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let created =
                ttp::master_key::create_version(&config.data_dir, &config.master_key, custodians.custodians())?;
            hand_out(&created, &custodians)?;
            println!(
                "Restart the TTP (every replica, after `ttp unseal` of version {} there): new domains then use it.",
                created.record.version
            );
        }
        MasterKeyCommand::Retire { config, version } => {
            let config = ttp::config::TtpConfig::load(&config)?;
            let uses = config.open_store()?.master_key_use()?;
            let live = uses.iter().find(|u| u.version == version).map_or(0, |u| u.live_domains);
            ttp::master_key::retire(&config.data_dir, version, live)?;
            println!("K_TTP version {version} retired; its custodians can now destroy their shares of it.");
        }
    }
    Ok(())
}

/// The records of `event` naming `host` (each filter when given) as a table, one record a
/// line; text is shown with control characters replaced, so a record cannot forge a line.
fn audit_listing(records: &[protocol::messages::AuditRecord], event: Option<&str>, host: Option<&str>) -> String {
    let printable = |text: &str| text.chars().map(|c| if c.is_control() { '\u{FFFD}' } else { c }).collect::<String>();
    let mut out = format!(
        "{:<7} {:<20} {:<20} {:<26} {:<12} {:<12} message\n",
        "seq", "time (UTC)", "event", "outcome", "host", "vm"
    );
    let selected = records
        .iter()
        .filter(|r| event.is_none_or(|event| r.event == event))
        .filter(|r| host.is_none_or(|host| r.host_id.as_deref() == Some(host)));
    for record in selected {
        out.push_str(&format!(
            "{:<7} {:<20} {:<20} {:<26} {:<12} {:<12} {}\n",
            record.seq,
            protocol::pki::unix_seconds_rfc3339(i64::try_from(record.at).unwrap_or(i64::MAX)),
            printable(&record.event),
            printable(&record.outcome),
            printable(record.host_id.as_deref().unwrap_or("-")),
            printable(record.vm_id.as_deref().unwrap_or("-")),
            printable(&record.message)
        ));
    }
    out
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttp::store::{AuditEntry, AuditLogReader, SqlStore, TtpStore};

    fn entry(event: &str, outcome: &str, host: Option<&str>, message: &str) -> AuditEntry {
        AuditEntry {
            at: 1_764_547_200,
            event: event.into(),
            outcome: outcome.into(),
            message: message.into(),
            domain_id: None,
            host_id: host.map(str::to_string),
            vm_id: Some("vm-x".into()),
            actor: host.unwrap_or("cp-1").into(),
        }
    }

    /// `ttp audit` reads a database the serving TTP holds open, filters by event and host,
    /// and the chain it read verifies; an edited record makes it fail.
    #[test]
    fn the_audit_command_reads_beside_the_writer_and_filters() {
        let dir = std::env::temp_dir().join(format!("ttp-audit-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ttp.sqlite");
        let serving = SqlStore::open(&path).unwrap();
        serving
            .append_audit(entry("launch", "image_not_allowed", Some("compute-2"), "compute-2 refused\nforged"))
            .unwrap();
        serving.append_audit(entry("launch", "ok", Some("compute-1"), "compute-1 launched vm-x")).unwrap();
        serving.append_audit(entry("register", "ok", None, "registered")).unwrap();

        let records = AuditLogReader::open(&ttp::store::Database::Sqlite(path.clone())).unwrap().records().unwrap();
        assert_eq!(ttp::service::verify_whole_audit_chain(&records).unwrap(), 3);
        let listing = audit_listing(&records, Some("launch"), Some("compute-2"));
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 2, "{listing}");
        assert!(lines[1].starts_with("1       2025-12-01T00:00:00Z launch"), "{listing}");
        assert!(lines[1].contains("image_not_allowed") && lines[1].contains("compute-2 refused\u{FFFD}forged"));
        assert_eq!(audit_listing(&records, Some("launch"), None).lines().count(), 3);
        assert_eq!(audit_listing(&records, None, None).lines().count(), 4);

        let mut edited = records.clone();
        edited[0].outcome = "ok".into();
        let broken = ttp::service::verify_whole_audit_chain(&edited).unwrap_err().to_string();
        assert!(broken.contains("record 1 was edited"), "{broken}");
        assert!(AuditLogReader::open(&ttp::store::Database::Sqlite(dir.join("none.sqlite"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
