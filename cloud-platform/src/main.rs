//! The `cloud-platform` binary: a thin clap dispatcher over the cloud_platform library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cloud_platform::ca;
use protocol::pki::Role;

#[derive(Parser)]
#[command(
    name = "cloud-platform",
    version,
    about = "Skydd cloud platform: the controller that stores encrypted volumes and runs the cloud CA",
    long_about = "Skydd cloud platform: the controller that stores encrypted volumes and routes \
requests between the parties. It never sees a volume key.\n\n\
It also runs the cloud's certificate authority: every party (TTP, cloud platform, secure \
component on each compute host, domain manager) gets an X.509 certificate from it, and every \
link between parties is mutual TLS 1.3 checked against that CA and the role in the certificate."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The cloud certificate authority: create it, issue party certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Serve the cloud platform API over mutual TLS.
    #[command(
        long_about = "Serve the cloud platform API (docs/CLOUD-API.md) over mutual TLS 1.3.\n\n\
The configuration is a TOML file:\n\n  \
listen = \"127.0.0.1:7500\"\n  \
data_dir = \"/var/lib/skydd/cp\"      # cp.sqlite and volumes/<domain>.vol\n  \
ca = [\"/etc/skydd/ca.pem\"]\n  \
cert = \"/etc/skydd/cp-1.pem\"        # issued with --role cloud-platform\n  \
key = \"/etc/skydd/cp-1-key.pem\"\n  \
ttp_url = \"https://127.0.0.1:7443\"\n\n\
Flags override the file."
    )]
    Serve {
        /// The TOML configuration.
        #[arg(long, env = "SKYDD_CP_CONFIG")]
        config: PathBuf,
        /// Override the listen address.
        #[arg(long)]
        listen: Option<String>,
        /// Override the data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override the TTP's URL.
        #[arg(long)]
        ttp_url: Option<String>,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new CA: writes DIR/ca.pem (give it to every party) and DIR/ca-key.pem (0600).
    #[command(
        long_about = "Create a new cloud CA (ECDSA P-256, valid 10 years).\n\n\
Writes DIR/ca.pem, the root certificate every party trusts (public), and DIR/ca-key.pem, \
the CA private key (mode 0600; keep it offline when you are not issuing). Refuses to \
overwrite an existing CA: that would silently distrust every certificate it issued.\n\n\
Example:\n  cloud-platform ca init --dir /etc/skydd/ca --name \"Hospital Cloud CA\""
    )]
    Init {
        /// Directory for the CA files (created with mode 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Subject CN of the CA certificate.
        #[arg(long, default_value = ca::DEFAULT_CA_NAME)]
        name: String,
    },
    /// Issue a certificate for one party: writes NAME.pem and NAME-key.pem (0600).
    #[command(
        long_about = "Issue a certificate for one party, signed by the CA in --dir.\n\n\
The certificate's subject CN is NAME and it carries ROLE (in a Skydd extension and the \
subject OU); each service checks the role of every peer, so a domain manager's certificate \
cannot be used to talk to the TTP as a secure component. SANs: NAME, localhost, 127.0.0.1, \
plus every --san. Usable for both TLS server and client.\n\n\
Examples:\n  cloud-platform ca issue --dir ca --role ttp --name ttp-1 --san ttp.hospital.example\n  \
cloud-platform ca issue --dir ca --role secure-component --name compute-07 --san 10.0.0.7 --out /tmp/compute-07\n  \
cloud-platform ca issue --dir ca --role domain-manager --name alice --days 90"
    )]
    Issue {
        /// Directory of the CA (holding ca.pem and ca-key.pem).
        #[arg(long)]
        dir: PathBuf,
        /// What the party is; services accept only the roles they talk to.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Party name: subject CN, DNS SAN and file name (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// Where to write NAME.pem and NAME-key.pem (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days (cannot outlive the CA).
        #[arg(long, default_value_t = protocol::pki::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Extra subject alternative name: a DNS name or an IP address. Repeatable.
        #[arg(long = "san", value_name = "DNS|IP")]
        sans: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Trusted third party: derives domain keys, checks attestation and access, keeps the audit log.
    Ttp,
    /// Cloud platform (controller): stores ciphertext volumes and headers, routes requests.
    CloudPlatform,
    /// Secure component on a compute host: unseals keys in the host TPM, attaches volumes.
    SecureComponent,
    /// Domain manager (hospital administrator): owns domains, grants and revokes access.
    DomainManager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Ttp => Role::Ttp,
            RoleArg::CloudPlatform => Role::CloudPlatform,
            RoleArg::SecureComponent => Role::SecureComponent,
            RoleArg::DomainManager => Role::DomainManager,
        }
    }
}

fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, name } => {
            let p = ca::init(&dir, &name)?;
            println!("created CA {name:?}");
            println!(
                "  certificate: {}  (give it to every party)",
                p.cert.display()
            );
            println!(
                "  private key: {}  (mode 0600; keep it safe)",
                p.key.display()
            );
        }
        CaCommand::Issue {
            dir,
            role,
            name,
            out,
            days,
            sans,
        } => {
            let role = Role::from(role);
            let p = ca::issue(
                &dir,
                &ca::IssueOptions {
                    role,
                    name: name.clone(),
                    out,
                    days,
                    sans,
                },
            )?;
            println!("issued {role} certificate for {name:?}, valid {days} days");
            println!("  certificate: {}", p.cert.display());
            println!("  private key: {}  (mode 0600)", p.key.display());
        }
    }
    Ok(())
}

fn run_serve(
    config: PathBuf,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    ttp_url: Option<String>,
    json_logs: bool,
) -> anyhow::Result<()> {
    use anyhow::Context;
    init_logging(json_logs);
    let mut config = cloud_platform::CpConfig::load(&config)?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    if let Some(url) = ttp_url {
        config.ttp_url = url;
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async move {
        let (cp, tls) = cloud_platform::build(&config)?;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("bind {}", config.listen))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        tracing::info!(listen = %config.listen, ttp = %config.ttp_url, data_dir = %config.data_dir.display(), "cloud platform serving");
        cloud_platform::serve(listener, cp, tls, shutdown).await?;
        Ok(())
    })
}

fn init_logging(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Ca(c) => run_ca(c),
        Command::Serve {
            config,
            listen,
            data_dir,
            ttp_url,
            json_logs,
        } => run_serve(config, listen, data_dir, ttp_url, json_logs),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-platform: {e:#}");
            ExitCode::FAILURE
        }
    }
}
