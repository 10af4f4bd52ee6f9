//! `image-pipeline`: hardened, versioned, traceable VM images (docs/IMAGE-PIPELINE.md).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use image_pipeline::archive::{self, TtpKeySource};
use image_pipeline::build::{BuildOptions, PROVENANCE_NAME};
use image_pipeline::pipeline;
use image_pipeline::profile::{LoadedProfile, BUILTIN};
use image_pipeline::provenance::{self, Signer, TrustPolicy, DEFAULT_SIGNER_NAME};
use image_pipeline::store::{self, Store};
use net::{Role, TlsFiles};
use serde::Deserialize;

const AFTER_HELP: &str = "\
THE THREE STAGES
  1 creation     build --profile ROLE    Debian archive (signatures and hashes checked) -> mmdebstrap
                                         -> hardening -> security checks -> raw + qcow2 + signed provenance
                 verify IMAGE            signature, signer, steps, tests, digests; any deviation refuses
  2 management   log / show / diff A B   the per-role history in the content-addressed store
                 patch ROLE              rebuild the newest version with updated packages (new version)
                 promote VERSION         approve; allowlist exports approved digests, signed
  3 archival     archive / restore       AES-256-XTS under a TTP domain key; restore is byte-identical
                 destroy VERSION         crypto-shredding: the domain is deleted at the TTP; copies removed

TYPICAL SESSION (as root; keys issued by the cloud CA)
  cloud-platform ca issue --role cloud-platform --name image-pipeline ...
  export IMAGE_PIPELINE_STORE=/srv/images IMAGE_PIPELINE_CA=ca.pem \\
         IMAGE_PIPELINE_SIGNING_KEY=image-pipeline-key.pem IMAGE_PIPELINE_SIGNING_CERT=image-pipeline.pem
  image-pipeline build --profile database
  image-pipeline verify database           # or a build directory / image.raw path
  image-pipeline patch database && image-pipeline diff database@1 database@2
  image-pipeline promote database@2 && image-pipeline allowlist --out allowlist.dsse.json

VERSIONS are ROLE@N (database@3), ROLE (its newest), or a sha256 prefix (8+ hex digits).";

#[derive(Parser)]
#[command(name = "image-pipeline", version, about = "Hardened, versioned, traceable Debian VM images from a trusted source", after_help = AFTER_HELP)]
struct Cli {
    /// The image store (a directory; created if missing).
    #[arg(long, global = true, env = "IMAGE_PIPELINE_STORE", default_value = "image-store")]
    store: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct SigningArgs {
    /// PKCS#8 PEM private key of a cloud-platform certificate named image-pipeline.
    #[arg(long, env = "IMAGE_PIPELINE_SIGNING_KEY")]
    signing_key: PathBuf,
    /// The certificate (PEM) the cloud CA issued for that key.
    #[arg(long, env = "IMAGE_PIPELINE_SIGNING_CERT")]
    signing_cert: PathBuf,
}

#[derive(clap::Args, Clone)]
struct TrustArgs {
    /// Cloud CA certificate(s) (PEM) the provenance signer must chain to; repeat for partners.
    #[arg(long = "ca", env = "IMAGE_PIPELINE_CA", value_delimiter = ',')]
    ca: Vec<PathBuf>,
    /// The CAs' certificate revocation lists (PEM, CA_DIR/crl.pem); a revoked signer is refused.
    #[arg(long = "crl", env = "IMAGE_PIPELINE_CRL", value_delimiter = ',')]
    crl: Vec<PathBuf>,
    /// Name the signer certificate must carry (role cloud-platform).
    #[arg(long, default_value = DEFAULT_SIGNER_NAME)]
    signer_name: String,
}

#[derive(clap::Args, Clone)]
struct BuildArgs {
    /// Use only the point release (no SUITE-updates / SUITE-security): what an image built at
    /// release time contained. `patch` always adds them.
    #[arg(long)]
    no_updates: bool,
    /// .deb cache kept between builds (nothing is downloaded twice).
    #[arg(long, env = "IMAGE_PIPELINE_APT_CACHE", default_value = "/var/cache/image-pipeline/apt")]
    apt_cache: PathBuf,
    /// Scratch directory (default: a fresh directory in /dev/shm).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the scratch directory (the unpacked tree) for inspection.
    #[arg(long)]
    keep_work: bool,
    /// Skip oscap-chroot (the pipeline's own checks still run and gate).
    #[arg(long)]
    no_oscap: bool,
    /// Timestamp of every file (default: SOURCE_DATE_EPOCH, else the profile's).
    #[arg(long)]
    source_date_epoch: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image for a role profile: raw + qcow2 + signed provenance; stored as the
    /// role's next version unless --no-store.
    #[command(
        after_help = "Shipped profiles: test-minimal, front-end, back-end, database, compute-host (or a path to a TOML file).\nThe build fails (and nothing is stored) if any security check finds a violation; the signed\nrecord of the failure is still written to the output directory."
    )]
    Build {
        /// Shipped profile name or path to a profile TOML.
        #[arg(long)]
        profile: String,
        /// Where image.raw, image.qcow2, provenance.dsse.json go (default: STORE/builds/ROLE-PID).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not add the result to the store.
        #[arg(long)]
        no_store: bool,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Verify an image: a store VERSION, a build directory, or the path of an image.raw next
    /// to its provenance.dsse.json. A refused store version is discarded (images removed,
    /// record kept with the reason) unless --keep.
    Verify {
        image: String,
        #[command(flatten)]
        trust: TrustArgs,
        #[arg(long)]
        keep: bool,
    },
    /// Version history of a role (or of every role).
    Log { role: Option<String> },
    /// One version: record, steps, tests, packages.
    Show {
        version: String,
        /// Also list every package with version and .deb sha256.
        #[arg(long)]
        packages: bool,
    },
    /// Packages added, removed and upgraded, and hardening changes, from A to B.
    Diff { a: String, b: String },
    /// Rebuild the newest version of ROLE with updated packages (the stored profile, plus the
    /// -updates and -security archives); the new version's record lists what changed.
    Patch {
        role: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Approve a version (it is verified first).
    Promote {
        version: String,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Export the approved image digests as a signed file (DSSE), or --verify one.
    Allowlist {
        #[arg(long, default_value = "allowlist.dsse.json")]
        out: PathBuf,
        /// Check a signed allowlist instead of writing one.
        #[arg(long)]
        verify: Option<PathBuf>,
        #[arg(long, env = "IMAGE_PIPELINE_SIGNING_KEY")]
        signing_key: Option<PathBuf>,
        #[arg(long, env = "IMAGE_PIPELINE_SIGNING_CERT")]
        signing_cert: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Encrypt a version with AES-256-XTS under a fresh TTP domain key; the plaintext leaves
    /// the store.
    #[command(after_help = TTP_HELP)]
    Archive {
        version: String,
        #[arg(long, env = "IMAGE_PIPELINE_TTP_CONFIG")]
        ttp_config: PathBuf,
    },
    /// Decrypt an archived version back into the store (byte-identical, checked).
    #[command(after_help = TTP_HELP)]
    Restore {
        version: String,
        /// Also write the raw image here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "IMAGE_PIPELINE_TTP_CONFIG")]
        ttp_config: PathBuf,
    },
    /// Crypto-shred a version: delete its archive domain at the TTP (the key can never be
    /// derived again) and every copy in the store; the record stays, marked destroyed.
    #[command(after_help = TTP_HELP)]
    Destroy {
        version: String,
        #[arg(long, env = "IMAGE_PIPELINE_TTP_CONFIG")]
        ttp_config: PathBuf,
    },
    /// List the shipped profiles, or print one.
    Profiles { name: Option<String> },
}

const TTP_HELP: &str = "\
--ttp-config is a TOML file:
  ttp_url = \"https://ttp.example:8443\"
  ca = [\"/etc/skydd/ca.pem\"]
  registrar_cert = \"image-pipeline.pem\"      # cloud-platform identity (registers, deletes)
  registrar_key  = \"image-pipeline-key.pem\"
  owner_cert = \"image-archive-owner.pem\"     # domain-manager identity owning archive domains
  owner_key  = \"image-archive-owner-key.pem\"
  host_id = \"archiver-1\"                     # secure-component identity with an enrolled TPM
  host_cert = \"archiver-1.pem\"
  host_key  = \"archiver-1-key.pem\"
  tpm = \"device:/dev/tpmrm0\"
  tpm_state = \"/var/lib/skydd/archiver-1\"
  vm_id = \"image-archiver\"";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TtpConfig {
    ttp_url: String,
    ca: Vec<net::TrustedRootFile>,
    #[serde(default)]
    crl: Vec<PathBuf>,
    registrar_cert: PathBuf,
    registrar_key: PathBuf,
    owner_cert: PathBuf,
    owner_key: PathBuf,
    host_id: String,
    host_cert: PathBuf,
    host_key: PathBuf,
    tpm: String,
    tpm_state: PathBuf,
    #[serde(default = "default_vm")]
    vm_id: String,
}

fn default_vm() -> String {
    "image-archiver".into()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn trust_policy(trust: &TrustArgs) -> Result<TrustPolicy> {
    if trust.ca.is_empty() {
        bail!("no CA given: pass --ca ca.pem (or set IMAGE_PIPELINE_CA) so the provenance signer can be checked");
    }
    // Roots given on the command line may issue every role; the signer check then insists on
    // the cloud-platform certificate named --signer-name.
    let mut roots = Vec::new();
    for p in &trust.ca {
        let pem = std::fs::read_to_string(p).with_context(|| format!("read CA certificate {}", p.display()))?;
        roots.push(protocol::pki::TrustedRoot::any_role(pem));
    }
    let mut crl_pems = Vec::new();
    for p in &trust.crl {
        crl_pems.push(net::read_pem_file(p).with_context(|| format!("read revocation list {}", p.display()))?);
    }
    Ok(TrustPolicy { roots, crl_pems, signer_name: trust.signer_name.clone(), now_unix: now_unix() })
}

fn signer(args: &SigningArgs) -> Result<Signer> {
    Signer::from_files(&args.signing_key, &args.signing_cert).context("load the provenance signing key")
}

fn build_options(profile: LoadedProfile, out: PathBuf, args: &BuildArgs) -> BuildOptions {
    let mut opts = BuildOptions::new(profile, out);
    opts.updates = !args.no_updates;
    opts.apt_cache = args.apt_cache.clone();
    if let Some(w) = &args.work_dir {
        opts.work_dir = w.clone();
    }
    opts.keep_work = args.keep_work;
    opts.run_oscap = !args.no_oscap;
    if args.source_date_epoch.is_some() {
        opts.source_date_epoch = args.source_date_epoch;
    }
    opts
}

fn print_outcome(outcome: &pipeline::Outcome) {
    let r = &outcome.result;
    println!("built in {:.1}s", r.seconds);
    for s in &r.steps {
        println!("  {:<16} {:>8.1}s  {}", s.name, s.duration_ms as f64 / 1000.0, s.status);
    }
    println!("image.raw    {} ({} bytes)", r.raw_sha256, r.raw_size);
    println!("image.qcow2  {} ({} bytes)", r.qcow2_sha256, r.qcow2_size);
    println!("provenance   {}", outcome.provenance.display());
    println!("packages     {} (each .deb hash checked against the signed archive indices)", r.evidence.packages.len());
    if let Some(o) = &r.tests.oscap {
        println!("oscap        {} {:?} {}", o.status, o.counts, o.note);
    }
    if let Some(rec) = &outcome.record {
        println!("stored as    {}", rec.id());
        for c in &rec.changes {
            println!("  change: {c}");
        }
    }
}

async fn key_source(path: &Path) -> Result<TtpKeySource> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read TTP config {}", path.display()))?;
    let cfg: TtpConfig = toml::from_str(&text).with_context(|| format!("parse TTP config {}", path.display()))?;
    let registrar_files = TlsFiles {
        ca: cfg.ca.clone(),
        cert: cfg.registrar_cert.clone(),
        key: cfg.registrar_key.clone(),
        crl: cfg.crl.clone(),
    };
    let registrar = net::Client::new(&cfg.ttp_url, registrar_files.client_config(Role::Ttp)?)?;
    let placer = registrar_files.load()?.signature_key()?;
    let host_tls =
        TlsFiles { ca: cfg.ca.clone(), cert: cfg.host_cert.clone(), key: cfg.host_key.clone(), crl: cfg.crl.clone() }
            .client_config(Role::Ttp)?;
    let tpm =
        secure_component::host::TpmWorker::start(&cfg.tpm, cfg.tpm_state.clone()).context("open the archiver's TPM")?;
    let agent = secure_component::host::AttestedHost {
        host_id: cfg.host_id.clone(),
        tpm,
        ttp: net::Client::new(&cfg.ttp_url, host_tls)?,
    };
    let owner_files =
        TlsFiles { ca: cfg.ca.clone(), cert: cfg.owner_cert.clone(), key: cfg.owner_key.clone(), crl: cfg.crl.clone() };
    let material = owner_files.load()?;
    let owner_identity = material.identity()?;
    let owner = material.signature_key()?;
    Ok(TtpKeySource { owner, owner_name: owner_identity.name, registrar, placer, agent, vm_id: cfg.vm_id })
}

fn print_record(r: &store::VersionRecord) {
    println!(
        "{:<22} {:<9} {}  raw {}…  {:>5} MiB  {}{}",
        r.id(),
        r.status.to_string(),
        r.created,
        &r.raw_sha256[..12],
        r.raw_size / (1024 * 1024),
        r.parent.as_ref().map(|p| format!("from {p}, ")).unwrap_or_default(),
        if r.archive.is_some() { "archived" } else { "" }
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let store_dir = cli.store.clone();
    let open_store =
        || Store::open(&store_dir).with_context(|| format!("open the image store {}", store_dir.display()));
    match cli.command {
        Command::Build { profile, out, no_store, signing, build } => {
            let profile = LoadedProfile::load(&profile)?;
            let store = if no_store { None } else { Some(open_store()?) };
            let out = out.unwrap_or_else(|| {
                store_dir.join("builds").join(format!("{}-{}", profile.profile.image.role, std::process::id()))
            });
            let opts = build_options(profile, out.clone(), &build);
            let signer = signer(&signing)?;
            let outcome = pipeline::build_signed(&opts, &signer, store.as_ref(), None)?;
            print_outcome(&outcome);
            if store.is_some() {
                std::fs::remove_dir_all(&out).ok();
            }
        }
        Command::Verify { image, trust, keep } => {
            let policy = trust_policy(&trust)?;
            let path = PathBuf::from(&image);
            if path.exists() {
                let dir =
                    if path.is_dir() { path.clone() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
                let envelope = std::fs::read(dir.join(PROVENANCE_NAME))
                    .with_context(|| format!("read {}", dir.join(PROVENANCE_NAME).display()))?;
                let v = provenance::verify(&envelope, &dir, &policy)?;
                println!("OK: {} verified; signed by {}", dir.display(), v.signer);
                for s in &v.statement.subject {
                    println!("  {} sha256 {}", s.name, s.sha256().unwrap_or("?"));
                }
            } else {
                let store = open_store()?;
                let record = store.resolve(&image)?;
                let v = store.verify(&record, &policy, !keep).with_context(|| {
                    if keep {
                        format!("{} refused", record.id())
                    } else {
                        format!("{} refused and discarded", record.id())
                    }
                })?;
                println!(
                    "OK: {} verified; signed by {}; {} steps, {} checks passed",
                    record.id(),
                    v.signer,
                    v.statement.predicate.skydd.steps.len(),
                    v.statement.predicate.skydd.tests.checks.len()
                );
            }
        }
        Command::Log { role } => {
            let store = open_store()?;
            let roles = match role {
                Some(r) => vec![r],
                None => store.roles()?,
            };
            for role in roles {
                for r in store.versions(&role)? {
                    print_record(&r);
                }
            }
        }
        Command::Show { version, packages } => {
            let store = open_store()?;
            let r = store.resolve(&version)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            let s = store.statement(&r)?;
            let sk = &s.predicate.skydd;
            println!(
                "\nbuilt from {} (sha256 {}), suite {}, updates {}",
                s.predicate.build_definition.external_parameters.profile,
                s.predicate.build_definition.external_parameters.profile_sha256,
                s.predicate.build_definition.external_parameters.suite,
                s.predicate.build_definition.external_parameters.updates
            );
            for rel in &sk.releases {
                println!("archive {} {} sha256 {} ({})", rel.uri, rel.date, rel.sha256, rel.signed_by);
            }
            println!("tool versions: {:?}", s.predicate.run_details.builder.version);
            println!("steps:");
            for st in &sk.steps {
                println!("  {:<16} {:>8.1}s {}", st.name, st.duration_ms as f64 / 1000.0, st.status);
            }
            println!("security checks:");
            for c in &sk.tests.checks {
                println!("  {:<32} {}", c.name, if c.passed { "pass" } else { "FAIL" });
            }
            if let Some(o) = &sk.tests.oscap {
                println!("  oscap-chroot {} {:?} {}", o.status, o.counts, o.note);
            }
            println!("{} packages", sk.packages.len());
            if packages {
                for p in &sk.packages {
                    println!("  {} {} {} {}", p.name, p.version, p.architecture, p.sha256);
                }
            }
        }
        Command::Diff { a, b } => {
            let store = open_store()?;
            let (ra, rb) = (store.resolve(&a)?, store.resolve(&b)?);
            let diff = store::diff_statements(&store.statement(&ra)?, &store.statement(&rb)?);
            println!("{} -> {}", ra.id(), rb.id());
            if diff.is_empty() {
                println!("  no package or hardening difference");
            }
            for line in diff.lines() {
                println!("  {line}");
            }
        }
        Command::Patch { role, out, signing, build } => {
            let store = open_store()?;
            let out =
                out.unwrap_or_else(|| store_dir.join("builds").join(format!("{role}-patch-{}", std::process::id())));
            // The template's profile is replaced by the stored one in `patch`.
            let newest = store.resolve(&role)?;
            let template_profile =
                LoadedProfile::from_bytes(&role, "store", store.read_blob(&newest.profile_sha256, "profile")?)?;
            let opts = build_options(template_profile, out.clone(), &build);
            let outcome = pipeline::patch(&store, &role, &signer(&signing)?, &opts, &out)?;
            print_outcome(&outcome);
            std::fs::remove_dir_all(&out).ok();
        }
        Command::Promote { version, trust } => {
            let store = open_store()?;
            let r = store.promote(&version, &trust_policy(&trust)?)?;
            println!("{} promoted at {}", r.id(), r.promoted_at.unwrap_or_default());
        }
        Command::Allowlist { out, verify, signing_key, signing_cert, trust } => {
            if let Some(file) = verify {
                let list = store::verify_allowlist(
                    &std::fs::read(&file).with_context(|| format!("read {}", file.display()))?,
                    &trust_policy(&trust)?,
                )?;
                println!("OK: allowlist issued {} by {}", list.issued_at, list.issuer);
                for e in &list.images {
                    println!("  {}@{} raw {} qcow2 {}", e.role, e.version, e.raw_sha256, e.qcow2_sha256);
                }
            } else {
                let (Some(key), Some(cert)) = (signing_key, signing_cert) else {
                    bail!("signing the allowlist needs --signing-key and --signing-cert (or IMAGE_PIPELINE_SIGNING_KEY/_CERT)");
                };
                let store = open_store()?;
                let (list, bytes) = store.allowlist(&Signer::from_files(&key, &cert)?)?;
                std::fs::write(&out, bytes).with_context(|| format!("write {}", out.display()))?;
                println!("wrote {} with {} approved image(s)", out.display(), list.images.len());
            }
        }
        Command::Archive { version, ttp_config } => {
            let store = open_store()?;
            let keys = key_source(&ttp_config).await?;
            let r = archive::archive(&store, &version, &keys).await?;
            if let Some(a) = &r.archive {
                println!(
                    "{} archived: {} (sha256 {}), domain {} at {}",
                    r.id(),
                    a.file,
                    a.archive_sha256,
                    a.domain_id,
                    a.ttp
                );
            }
        }
        Command::Restore { version, out, ttp_config } => {
            let store = open_store()?;
            let keys = key_source(&ttp_config).await?;
            let path = archive::restore(&store, &version, &keys, out.as_deref()).await?;
            println!("restored byte-identical to the signed record: {}", path.display());
        }
        Command::Destroy { version, ttp_config } => {
            let store = open_store()?;
            let keys = key_source(&ttp_config).await?;
            let r = archive::destroy(&store, &version, &keys).await?;
            println!("{} destroyed: {}", r.id(), serde_json::to_string_pretty(&r.destroyed)?);
        }
        Command::Profiles { name } => match name {
            Some(n) => print!("{}", String::from_utf8_lossy(&LoadedProfile::load(&n)?.bytes)),
            None => {
                for (n, _) in BUILTIN {
                    let p = LoadedProfile::load(n)?;
                    println!("{:<14} {}", n, p.profile.image.description);
                }
            }
        },
    }
    Ok(())
}
