//! The `cloud-platform` binary: a thin clap dispatcher over the cloud_platform library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cloud_platform::ca;
use protocol::pki::{RevocationReason, Role};

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
    /// The cloud certificate authority: create it, issue and revoke party certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Serve the cloud platform API over mutual TLS.
    #[command(long_about = "Serve the cloud platform API (docs/CLOUD-API.md) over mutual TLS 1.3.\n\n\
The configuration is a TOML file:\n\n  \
listen = \"127.0.0.1:7500\"\n  \
data_dir = \"/var/lib/skydd/cp\"      # cp.sqlite and volumes/<domain>.vol\n  \
ca = [\"/etc/skydd/ca.pem\"]\n  \
cert = \"/etc/skydd/cp-1.pem\"        # issued with --role cloud-platform\n  \
key = \"/etc/skydd/cp-1-key.pem\"\n  \
ttp_url = \"https://127.0.0.1:7443\"\n\n\
Flags override the file.")]
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
    /// Create a new CA: writes DIR/ca.pem (give it to every party), DIR/ca-key.pem (0600) and DIR/crl.pem.
    #[command(long_about = "Create a new cloud CA (ECDSA P-256, valid 10 years).\n\n\
Writes DIR/ca.pem, the root certificate every party trusts (public), DIR/ca-key.pem, \
the CA private key (mode 0600; keep it offline when you are not issuing), and DIR/crl.pem, \
an empty certificate revocation list (number 1, valid 30 days; public: list it in every \
service's `crl` setting, and renew it with `ca crl`). Refuses to overwrite an existing CA: \
that would silently distrust every certificate it issued.\n\n\
Example:\n  cloud-platform ca init --dir /etc/skydd/ca --name \"Hospital Cloud CA\"")]
    Init {
        /// Directory for the CA files (created with mode 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Subject CN of the CA certificate.
        #[arg(long, default_value = ca::DEFAULT_CA_NAME)]
        name: String,
    },
    /// Issue a certificate for one party: writes NAME.pem and NAME-key.pem (0600).
    #[command(long_about = "Issue a certificate for one party, signed by the CA in --dir.\n\n\
The certificate's subject CN is NAME and it carries ROLE (in a Skydd extension and the \
subject OU); each service checks the role of every peer, so a domain manager's certificate \
cannot be used to talk to the TTP as a secure component. SANs: NAME, localhost, 127.0.0.1, \
plus every --san. Usable for both TLS server and client.\n\n\
Examples:\n  cloud-platform ca issue --dir ca --role ttp --name ttp-1 --san ttp.hospital.example\n  \
cloud-platform ca issue --dir ca --role secure-component --name compute-07 --san 10.0.0.7 --out /tmp/compute-07\n  \
cloud-platform ca issue --dir ca --role domain-manager --name alice --days 90\n  \
cloud-platform ca issue --dir ca --role domain-manager --name erik --organisation \"Karolinska Cardiology\" --org-role cardiologist\n\n\
--organisation and --org-role (a domain manager only, both or neither) say whom the manager acts \
for and as what, as OrBAC names them; access policies read them as \
context.grant_signer_affiliation (docs/PROTOCOL.md \"Access policy\").")]
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
        #[arg(long, default_value_t = skydd_ca::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Extra subject alternative name: a DNS name or an IP address. Repeatable.
        #[arg(long = "san", value_name = "DNS|IP")]
        sans: Vec<String>,
        /// A domain manager's organisation (e.g. "Karolinska Cardiology"); needs --org-role.
        #[arg(long, requires = "org_role")]
        organisation: Option<String>,
        /// A domain manager's role in its organisation (e.g. cardiologist); needs --organisation.
        #[arg(long, requires = "organisation")]
        org_role: Option<String>,
    },
    /// Revoke a party's certificate: adds it to DIR/crl.pem and re-signs the list.
    #[command(long_about = "Revoke a certificate issued by the CA in --dir: add its serial number, the \
time and the reason to the certificate revocation list, sign the list with the next CRL number \
(valid 30 days) and replace DIR/crl.pem atomically. Needs DIR/ca-key.pem.\n\n\
Services that list DIR/crl.pem in their `crl` setting refuse the certificate for new TLS \
connections within 2 s, and the TTP refuses grants and registrations signed with it from the \
next request on, without a restart. Hosts that keep their own copy of crl.pem need the new file \
copied to them. Only the certificate file is needed, not its key. A certificate of another CA, \
or one already on the list, is refused. There is no un-revoke: issue a new certificate.\n\n\
Examples:\n  cloud-platform ca revoke --dir /etc/skydd/ca --cert /etc/skydd/ca/alice.pem --reason affiliation-changed\n  \
cloud-platform ca revoke --dir /etc/skydd/ca --cert /tmp/compute-07/compute-07.pem --reason key-compromise\n  \
cloud-platform ca revoked --dir /etc/skydd/ca")]
    Revoke {
        /// Directory of the CA (holding ca.pem, ca-key.pem and crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to revoke (PEM, e.g. NAME.pem as `ca issue` wrote it).
        #[arg(long, value_name = "PARTY.pem")]
        cert: PathBuf,
        /// Why; recorded in the list as the RFC 5280 reason code.
        #[arg(long, value_enum, default_value_t = ReasonArg::Unspecified)]
        reason: ReasonArg,
    },
    /// Renew the revocation list: same entries, next CRL number, fresh next update.
    #[command(long_about = "Re-sign DIR/crl.pem with the same entries, the next CRL number and a next \
update --days from now, and replace it atomically. Needs DIR/ca-key.pem.\n\n\
Every service that checks revocation refuses EVERY certificate of this CA once its list is \
past its next update (a stale list must not silently stop revoking), so run this from cron \
well before that, e.g. weekly with the default 30 days, and copy the new crl.pem to hosts \
that keep their own copy. `ca revoked` shows when the current list expires.\n\n\
Examples:\n  cloud-platform ca crl --dir /etc/skydd/ca\n  \
cloud-platform ca crl --dir /etc/skydd/ca --days 7\n\n\
A crontab line (Mondays at 03:00):\n  0 3 * * 1  cloud-platform ca crl --dir /etc/skydd/ca")]
    Crl {
        /// Directory of the CA (holding ca.pem, ca-key.pem and crl.pem).
        #[arg(long)]
        dir: PathBuf,
        /// Days until the new list's next update.
        #[arg(long, default_value_t = skydd_ca::DEFAULT_CRL_DAYS)]
        days: u32,
    },
    /// Show the revocation list: revoked serials, reasons, and when the list expires.
    #[command(long_about = "Read DIR/crl.pem, check that the CA in DIR/ca.pem signed it, and print its \
CRL number, this update, next update and every revoked certificate (serial in lower-case hex, \
time of revocation, reason). Warns when the next update is less than 7 days away or past: \
then services refuse every certificate of this CA; run `ca crl`. Needs only public files.\n\n\
Compare a serial with `openssl x509 -in NAME.pem -noout -serial` (upper case there).\n\n\
Example:\n  cloud-platform ca revoked --dir /etc/skydd/ca")]
    Revoked {
        /// Directory of the CA (holding ca.pem and crl.pem).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Warn when the revocation list expires within this many days.
const CRL_WARN_DAYS: i64 = 7;

#[derive(Clone, Copy, ValueEnum)]
enum ReasonArg {
    /// No reason given.
    Unspecified,
    /// The party's private key is (suspected to be) known to someone else.
    KeyCompromise,
    /// The party left the organisation or changed its role.
    AffiliationChanged,
    /// A new certificate replaces this one.
    Superseded,
    /// The party (a host, a VM, a manager) is decommissioned.
    CessationOfOperation,
}

impl From<ReasonArg> for RevocationReason {
    fn from(r: ReasonArg) -> RevocationReason {
        match r {
            ReasonArg::Unspecified => RevocationReason::Unspecified,
            ReasonArg::KeyCompromise => RevocationReason::KeyCompromise,
            ReasonArg::AffiliationChanged => RevocationReason::AffiliationChanged,
            ReasonArg::Superseded => RevocationReason::Superseded,
            ReasonArg::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }
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
            println!("  certificate: {}  (give it to every party)", p.cert.display());
            println!("  private key: {}  (mode 0600; keep it safe)", p.key.display());
            println!(
                "  revocation list: {}  (empty; list it in every service's `crl` setting; renew with `ca crl` before {} days)",
                p.crl.display(),
                skydd_ca::DEFAULT_CRL_DAYS
            );
        }
        CaCommand::Issue { dir, role, name, out, days, sans, organisation, org_role } => {
            let role = Role::from(role);
            let affiliation = match (organisation, org_role) {
                (Some(organisation), Some(org_role)) => {
                    Some(protocol::pki::Affiliation::new(&organisation, &org_role)?)
                }
                _ => None,
            };
            let shown = affiliation.as_ref().map(|a| format!(", {} of {}", a.role, a.organisation)).unwrap_or_default();
            let p = ca::issue(&dir, &ca::IssueOptions { role, name: name.clone(), out, days, sans, affiliation })?;
            println!("issued {role} certificate for {name:?}{shown}, valid {days} days");
            println!("  certificate: {}", p.cert.display());
            println!("  private key: {}  (mode 0600)", p.key.display());
        }
        CaCommand::Revoke { dir, cert, reason } => {
            let entry = ca::revoke(&dir, &cert, reason.into())?;
            let list = ca::revoked(&dir)?;
            println!(
                "revoked {} ({}): serial {}, reason {}",
                entry.name.as_deref().unwrap_or("certificate without a name"),
                cert.display(),
                entry.serial_hex,
                entry.reason.unwrap_or(RevocationReason::Unspecified)
            );
            print_crl_summary(&dir, &list);
            let crl = dir.join(ca::CRL_FILE);
            println!(
                "services that list {} in their `crl` setting refuse this certificate within 2 s; \
                 copy crl.pem to hosts that keep their own copy",
                crl.display()
            );
        }
        CaCommand::Crl { dir, days } => {
            let list = ca::renew_crl(&dir, days)?;
            println!("renewed the revocation list ({} revoked certificates)", list.revoked.len());
            print_crl_summary(&dir, &list);
            println!("copy crl.pem to hosts that keep their own copy");
        }
        CaCommand::Revoked { dir } => {
            let list = ca::revoked(&dir)?;
            println!(
                "revocation list {}: number {}, this update {}",
                dir.join(ca::CRL_FILE).display(),
                list.crl_number,
                ca::rfc3339(list.this_update.unix_timestamp())
            );
            print_next_update(&dir, &list);
            if list.revoked.is_empty() {
                println!("no certificate is revoked");
            } else {
                println!("{:<34} {:<21} reason", "serial", "revoked at");
                for r in &list.revoked {
                    println!(
                        "{:<34} {:<21} {}",
                        r.serial_hex,
                        ca::rfc3339(r.revoked_at.unix_timestamp()),
                        // No reason code means unspecified (RFC 5280 §5.3.1).
                        r.reason.unwrap_or(RevocationReason::Unspecified)
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_crl_summary(dir: &std::path::Path, list: &protocol::pki::RevocationList) {
    println!("  revocation list: {}  (CRL number {})", dir.join(ca::CRL_FILE).display(), list.crl_number);
    print_next_update(dir, list);
}

/// The list's next update, with a warning on stderr when it is near or past.
fn print_next_update(dir: &std::path::Path, list: &protocol::pki::RevocationList) {
    let Some(next) = list.next_update else {
        println!("  next update: none");
        return;
    };
    println!("  next update: {}", ca::rfc3339(next.unix_timestamp()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let left = next.unix_timestamp() - now;
    let renew = format!("cloud-platform ca crl --dir {}", dir.display());
    if left <= 0 {
        eprintln!(
            "warning: the revocation list EXPIRED at {}: services that check it refuse every \
             certificate of this CA. Run `{renew}` now",
            ca::rfc3339(next.unix_timestamp())
        );
    } else if left <= CRL_WARN_DAYS * 86_400 {
        eprintln!(
            "warning: the revocation list expires in {} h; after that services refuse every \
             certificate of this CA. Run `{renew}` soon",
            left / 3_600
        );
    }
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
        // SIGINT or SIGTERM: open requests drain before the process exits.
        let shutdown = net::stop_on_signals();
        tracing::info!(listen = %config.listen, ttp = %config.ttp_url, data_dir = %config.data_dir.display(), "cloud platform serving");
        cloud_platform::serve_limited(listener, cp, tls, &config.limits, shutdown).await?;
        Ok(())
    })
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Ca(c) => run_ca(c),
        Command::Serve { config, listen, data_dir, ttp_url, json_logs } => {
            run_serve(config, listen, data_dir, ttp_url, json_logs)
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-platform: {e:#}");
            ExitCode::FAILURE
        }
    }
}
