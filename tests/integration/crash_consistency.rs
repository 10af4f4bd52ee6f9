//! Crash consistency: the TTP and the cloud platform run as real child
//! processes (this test binary re-executed with `SKYDD_CRASH_CHILD=ttp:<config>` or
//! `cp:<config>`, built with `ttp::server::build` / `cloud_platform::server::build` from
//! their TOML files), the secure component of one compute host (swtpm, userspace backend,
//! local driver) runs in this process. In each round a driver runs attaches, detaches,
//! grants and revokes through `domain_manager::ops::DomainManager` and key releases as the
//! host, while the TTP or the CP is killed with SIGKILL at a random moment and restarted on
//! the same data directory and port. Then:
//!
//! - every version the CP acknowledged (2xx) is known to the TTP, which never went back, and
//!   the header in force on disk has a valid slot and a version at least that high;
//! - every key release the TTP acknowledged (its `audit_seq`) and every acknowledged
//!   registration is still in the audit chain, and the whole chain verifies
//!   (`Ttp::verify_audit_chain` on the data directory, and a history read over mTLS);
//! - every acknowledged attachment is still known to the CP with the status last
//!   acknowledged;
//! - the CP reconciles with the host by itself: a mapping the host holds but the CP never
//!   recorded as attached (a CP killed mid-attach) is adopted or detached, and no record
//!   stays `attaching`; a domain left behind its TTP registration (CP killed between the
//!   TTP registration and the header write) is caught up by the CP itself from its
//!   written-ahead update, without anyone repeating it; a new attach works after every
//!   restart.
//!
//! Half the domains are format 2 (docs/FORMAT.md "Version 2"), so the TTP is also killed in
//! the middle of root commits: their attaches must keep working after every restart.
//!
//! Unacknowledged operations may be lost; acknowledged ones never. Prints one line per round.
//! `SKYDD_CRASH_ROUNDS` (default 16) and `SKYDD_CRASH_SEED` tune it. Needs root, swtpm,
//! /dev/fuse and /dev/loop-control; fails naming what is missing without them.

use skydd_testkit::prerequisites;
use skydd_testkit::Cleanup;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain_manager::ops::DomainManager;
use net::Role;
use protocol::cloud::{AttachmentStatus, ComputeHost, Instance, MappingStatus};
use protocol::domain::{AccessMode, AclEntry, VolumeFormat};
use protocol::format::HEADER_AREA_SIZE;
use protocol::messages::HeaderRecord;
use rand::{RngExt, SeedableRng};
use secure_component::service::{self, AttachmentService};
use secure_component::swtpm::Swtpm;
use skydd::lab::LabPki;
use tokio_util::sync::CancellationToken;
use ttp::attestation::{AttestationPolicy, ReferenceState};

const CHILD_ENV: &str = "SKYDD_CRASH_CHILD";
const VOLUME_BYTES: u64 = 16 << 20;
const DOMAINS: usize = 3;

/// The child role: serve the TTP or the CP from a configuration file until killed.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (role, config_path) = spec.split_once(':').expect("role:config");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let ready = format!("{config_path}.ready");
        match role {
            "ttp" => {
                let config = ttp::config::TtpConfig::load(Path::new(config_path)).unwrap();
                // No TPM here: the custodians' shares beside the configuration start it.
                let shares = ttp::master_key::read_share_dir(Path::new(&format!("{config_path}.shares"))).unwrap();
                let (service, tls) = ttp::server::build_with_shares(&config, &shares).unwrap();
                let listener = tokio::net::TcpListener::bind(&config.listen).await.unwrap();
                std::fs::write(&ready, std::process::id().to_string()).unwrap();
                ttp::server::serve(listener, service, tls, CancellationToken::new()).await.unwrap();
            }
            "cp" => {
                let config = cloud_platform::CpConfig::load(Path::new(config_path)).unwrap();
                let (cp, tls) = cloud_platform::server::build(&config).unwrap();
                let listener = tokio::net::TcpListener::bind(&config.listen).await.unwrap();
                std::fs::write(&ready, std::process::id().to_string()).unwrap();
                cloud_platform::server::serve(listener, cp, tls, CancellationToken::new()).await.unwrap();
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

/// A service running as a child process of this test.
struct ChildService {
    role: &'static str,
    config: PathBuf,
    log: PathBuf,
    process: Option<std::process::Child>,
    starts: usize,
}

impl ChildService {
    fn new(role: &'static str, config: PathBuf, log: PathBuf) -> Self {
        Self { role, config, log, process: None, starts: 0 }
    }

    async fn start(&mut self) {
        let ready = PathBuf::from(format!("{}.ready", self.config.display()));
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        // A long-lived child must not keep another test's TPM connection open.
        secure_component::tpm::close_inherited_fds_on_exec(&mut command);
        let child = command
            .args(["--exact", "crash_consistency::crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}:{}", self.role, self.config.display()))
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.process = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!("the {} child exited with {status} while starting; see {}", self.role, self.log.display());
            }
            assert!(Instant::now() < deadline, "the {} child did not start", self.role);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as `kill -9`.
    fn kill9(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What was acknowledged, per domain.
#[derive(Default, Debug)]
struct Acked {
    /// Every version a 2xx answer of the CP carried (create, grant, revoke, show).
    versions: BTreeSet<u64>,
    /// `audit_seq` of every key release the TTP answered.
    audit_seqs: BTreeSet<u64>,
    /// Attachment id -> (vm, last acknowledged status).
    attachments: BTreeMap<String, (String, &'static str)>,
}

#[derive(Default)]
struct Ledger {
    domains: BTreeMap<String, Acked>,
    ops_ok: usize,
    ops_failed: usize,
    releases_ok: usize,
    failures: BTreeMap<String, usize>,
    /// Set by a failure: the driver pauses briefly instead of spinning against a dead peer.
    backoff: bool,
}

impl Ledger {
    fn max_version(&self, domain: &str) -> u64 {
        self.domains.get(domain).and_then(|d| d.versions.last().copied()).unwrap_or(0)
    }

    fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.ops_failed += 1;
        self.backoff = true;
        let text = e.to_string();
        let key = format!(
            "{what}: {}",
            text.split(&['(', ':'][..]).take(2).collect::<Vec<_>>().join(":").chars().take(60).collect::<String>()
        );
        *self.failures.entry(key).or_default() += 1;
    }
}

fn dm_config(pki: &LabPki, name: &str, cp_url: &str, ttp_url: &str) -> domain_manager::config::DmConfig {
    let tls = net::TlsFiles::in_dir(&pki.dir, name);
    domain_manager::config::DmConfig {
        cloud_platform_url: cp_url.into(),
        ttp_url: ttp_url.into(),
        ca: tls.ca,
        crl: tls.crl,
        cert: tls.cert,
        key: tls.key,
    }
}

/// One driver step on a random domain: toggle vm-b in the ACL (grant ro / revoke), attach or
/// detach vm-a (rw) or vm-b (ro). Records every 2xx answer.
async fn driver_step(dm: &DomainManager, ledger: &Mutex<Ledger>, domains: &[String], rng: &mut rand::rngs::StdRng) {
    let domain = domains[rng.random_range(0..domains.len())].clone();
    let choice = rng.random_range(0..11);
    if choice == 10 {
        // A key rotation (online when vm-a holds a format-1 domain read-write; a format-2 one
        // moves its tags and tree at the next read-write attach). Killed between the TTP and
        // the header, the CP finishes it by itself.
        let result = dm.rotate(&domain, true).await;
        let mut l = ledger.lock().unwrap();
        match result {
            Ok(_) => l.ops_ok += 1,
            Err(e) => l.failed("rotate", &e),
        }
        return;
    }
    if choice < 3 {
        // Toggle vm-b, deciding from the header in force (so a retried, unacknowledged update
        // is repeated byte for byte).
        let view = match dm.show(&domain).await {
            Ok(v) => v,
            Err(e) => return ledger.lock().unwrap().failed("show", &e),
        };
        ledger.lock().unwrap().domains.entry(domain.clone()).or_default().versions.insert(view.version);
        let has_b = view.acl.iter().any(|e| e.vm_id == "vm-b");
        let result =
            if has_b { dm.revoke(&domain, "vm-b").await } else { dm.grant(&domain, "vm-b", AccessMode::Ro).await };
        let mut l = ledger.lock().unwrap();
        match result {
            Ok(view) => {
                l.ops_ok += 1;
                let d = l.domains.entry(domain).or_default();
                d.versions.insert(view.version);
                if has_b {
                    // The CP detached vm-b before answering.
                    for (_, (vm, status)) in d.attachments.iter_mut() {
                        if vm == "vm-b" && *status == "attached" {
                            *status = "revoked";
                        }
                    }
                }
            }
            Err(e) => l.failed(if has_b { "revoke" } else { "grant" }, &e),
        }
        return;
    }
    let vm = if choice < 7 { "vm-a" } else { "vm-b" };
    let attached = ledger
        .lock()
        .unwrap()
        .domains
        .get(&domain)
        .map(|d| d.attachments.iter().find(|(_, (v, s))| v == vm && *s == "attached").map(|(id, _)| id.clone()))
        .unwrap_or(None);
    match attached {
        Some(id) => {
            let result = dm.detach(&domain, vm).await;
            let mut l = ledger.lock().unwrap();
            match result {
                Ok(a) => {
                    l.ops_ok += 1;
                    l.domains.get_mut(&domain).unwrap().attachments.insert(a.id, (vm.to_string(), "detached"));
                }
                Err(e) => {
                    l.failed("detach", &e);
                    // An unacknowledged detach may have happened; the acknowledged state
                    // "attached" is no longer a promise either way.
                    l.domains.get_mut(&domain).unwrap().attachments.insert(id, (vm.to_string(), "unknown"));
                }
            }
        }
        None => {
            let mode = if vm == "vm-a" { AccessMode::Rw } else { AccessMode::Ro };
            let result = dm.attach(&domain, vm, mode, 300).await;
            let mut l = ledger.lock().unwrap();
            match result {
                Ok(a) => {
                    l.ops_ok += 1;
                    let d = l.domains.entry(domain).or_default();
                    d.versions.insert(a.version);
                    d.attachments.insert(a.id, (vm.to_string(), "attached"));
                }
                Err(e) => l.failed(&format!("attach {vm}"), &e),
            }
        }
    }
}

/// Key releases as the host itself (challenge, quote, release): records each `audit_seq`.
async fn release_step(
    dm: &DomainManager,
    sc: &AttachmentService,
    signer: &skydd::lab::DomainManager,
    placer: &skydd::lab::Operator,
    ledger: &Mutex<Ledger>,
    domain: &str,
) {
    let header = match dm.show(domain).await {
        Ok(v) => v.header,
        Err(e) => {
            ledger.lock().unwrap().failed("show for release", &e);
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
    };
    let grant = signer.grant(domain, "vm-a", AccessMode::Ro, 300);
    match placer.request_release(sc.attested_host(), &header, &grant, "vm-a", AccessMode::Ro).await {
        Ok(response) => {
            let mut l = ledger.lock().unwrap();
            l.releases_ok += 1;
            l.domains.entry(domain.to_string()).or_default().audit_seqs.insert(response.audit_seq);
        }
        Err(e) => {
            ledger.lock().unwrap().failed("release", &e);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header_on_disk(volume: &Path) -> Result<(usize, u64, HeaderRecord), String> {
    let mut area = Vec::with_capacity(HEADER_AREA_SIZE);
    std::fs::File::open(volume)
        .map_err(|e| format!("open {}: {e}", volume.display()))?
        .take(HEADER_AREA_SIZE as u64)
        .read_to_end(&mut area)
        .map_err(|e| e.to_string())?;
    let active =
        protocol::format::decode_header_area(&area).map_err(|e| format!("{}: no valid slot: {e}", volume.display()))?;
    let record = HeaderRecord::decode(&active.payload).map_err(|e| e.to_string())?;
    Ok((active.slot, active.seq, record))
}

fn version_of(header: &HeaderRecord) -> u64 {
    header.unverified_contents().unwrap().0.version
}

async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = domain_manager::Result<T>>,
{
    // Up to 10 s: an attach the driver's cancelled call left running on the host (a format-2
    // one builds its tree first) finishes, and the CP reconciles it, within that.
    let mut last = None;
    for _ in 0..25 {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                last = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }
    }
    panic!("{what} failed after a restart: {}", last.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistency_under_kill_9() {
    crash_rounds(Deployment::Single).await
}

/// The same rounds against two TTP and two CP replicas sharing one real PostgreSQL server
/// (docs/ARCHITECTURE.md "Replicated deployment"): each round kills one replica with SIGKILL
/// while the others serve (the clients fail over: the driver must keep getting answers), or
/// restarts PostgreSQL under load (every service reconnects on its own). The same ledger
/// checks follow. `SKYDD_CRASH_REPLICA_ROUNDS` (default 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_lose_nothing_to_kill_9_of_one_or_a_database_restart() {
    crash_rounds(Deployment::Replicated).await
}

/// How the TTP and the CP run in [`crash_rounds`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Deployment {
    /// One TTP and one CP, each on its SQLite file.
    Single,
    /// Two TTP and two CP replicas over one PostgreSQL server (a database each).
    Replicated,
}

/// What a round takes down.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Ttp(usize),
    Cp(usize),
    Postgres,
}

impl std::fmt::Display for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Victim::Ttp(i) => write!(f, "TTP-{}", i + 1),
            Victim::Cp(i) => write!(f, "CP-{}", i + 1),
            Victim::Postgres => write!(f, "PostgreSQL"),
        }
    }
}

async fn crash_rounds(deployment: Deployment) {
    let replicated = deployment == Deployment::Replicated;
    if std::env::var("SKYDD_CRASH_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    }
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    prerequisites::require(prerequisites::USERSPACE_HOST);
    let started = Instant::now();
    let (rounds_env, default_rounds) =
        if replicated { ("SKYDD_CRASH_REPLICA_ROUNDS", 5) } else { ("SKYDD_CRASH_ROUNDS", 16) };
    let rounds: usize = std::env::var(rounds_env).ok().and_then(|s| s.parse().ok()).unwrap_or(default_rounds);
    let seed: u64 = std::env::var("SKYDD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u32>() as u64);
    println!("crash consistency: {rounds} rounds, seed {seed} (SKYDD_CRASH_SEED={seed} repeats the choices)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let _cleanup = Cleanup::new(root.clone());
    let pki = LabPki::create(&root.join("pki")).unwrap();
    // Replicas: every client is given both URLs (net::Client fails over between them).
    let replicas = if replicated { 2 } else { 1 };
    let ttp_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let cp_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let urls = |ports: &[u16]| ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let (ttp_url, cp_url) = (urls(&ttp_ports), urls(&cp_ports));
    // Its own server (not the binary's shared one): this test stops and starts it.
    let postgres = replicated.then(skydd_testkit::postgres::Postgres::start);
    let (ttp_database, cp_database) = match &postgres {
        Some(server) => (Some(server.create_database()), Some(server.create_database())),
        None => (None, None),
    };

    // The compute host: swtpm and the secure component, in this process.
    let ek_ca = root.join("tpm-vendor-ca");
    let swtpm = Swtpm::start_with_ca(&root.join("compute-1").join("swtpm"), &ek_ca).unwrap();
    let sc_tls = pki.issue(Role::SecureComponent, "compute-1").unwrap();
    let sc_config = skydd::lab::loopback_agent_config(&root, "compute-1", swtpm.tcti(), &ttp_url, &sc_tls);
    let (sc, sc_server_tls) = service::build(&sc_config).unwrap();
    let sc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("https://127.0.0.1:{}", sc_listener.local_addr().unwrap().port());
    let sc_shutdown = CancellationToken::new();
    let sc_task = {
        let (s, t) = (sc.clone(), sc_shutdown.clone());
        tokio::spawn(async move { service::serve(sc_listener, s, sc_server_tls, t).await.unwrap() })
    };

    // The TTP: master key, attestation policy with the host's PCRs, configuration file.
    let selection = sc_config.pcr_selection.clone();
    let pcr_values = sc.attested_host().tpm.run(move |tpm| tpm.read_pcrs(&selection)).await.unwrap();
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![ReferenceState {
            name: "compute-v1".into(),
            selection: sc_config.pcr_selection.clone(),
            pcr_values,
        }],
    };
    let policy_path = root.join("attestation.toml");
    std::fs::write(&policy_path, toml::to_string(&policy).unwrap()).unwrap();
    let ttp_tls = pki.issue(Role::Ttp, "ttp-1").unwrap();
    let ttp_data = |i: usize| if i == 0 { root.join("ttp-data") } else { root.join(format!("ttp-data-{}", i + 1)) };
    let custodians = ttp::master_key::create_version(
        &ttp_data(0),
        &Default::default(),
        ttp::master_key::Custodians { shares: 3, threshold: 2 },
    )
    .unwrap();
    let mut ttp_configs = Vec::new();
    let mut ttp_children = Vec::new();
    for (i, port) in ttp_ports.iter().enumerate() {
        if i > 0 {
            // A replica: K_TTP's version records (fingerprints, no key); K_TTP from the shares.
            skydd::lab::copy_master_key_records(&ttp_data(0), &ttp_data(i)).unwrap();
        }
        let ttp_config = ttp::config::TtpConfig {
            listen: format!("127.0.0.1:{port}"),
            data_dir: ttp_data(i),
            ca: ttp_tls.ca.clone(),
            crl: ttp_tls.crl.clone(),
            cert: ttp_tls.cert.clone(),
            key: ttp_tls.key.clone(),
            attestation: policy_path.clone(),
            registration_replicas: Vec::new(),
            limits: Default::default(),
            database_url: ttp_database.clone(),
            database_pool_size: 16,
            group_commit: true,
            master_key: Default::default(),
            trusted_launch: None,
        };
        let ttp_config_path = root.join(format!("ttp-{}.toml", i + 1));
        // No TPM here: the custodians' shares beside each configuration start the child.
        ttp::master_key::write_share_files(&root.join(format!("ttp-{}.toml.shares", i + 1)), &custodians.shares)
            .unwrap();
        std::fs::write(&ttp_config_path, toml::to_string(&ttp_config).unwrap()).unwrap();
        let mut ttp_child = ChildService::new("ttp", ttp_config_path, root.join(format!("ttp-{}.log", i + 1)));
        ttp_child.start().await;
        ttp_configs.push(ttp_config);
        ttp_children.push(ttp_child);
    }
    sc.enroll().await.expect("compute-1 enrolls");

    // The cloud platform.
    let cp_tls = pki.issue(Role::CloudPlatform, "cloud-platform").unwrap();
    let cp_data = root.join("cp-data");
    let mut cp_children = Vec::new();
    for (i, port) in cp_ports.iter().enumerate() {
        // The replicas share the volume files (data_dir/volumes) and the database.
        let cp_config = cloud_platform::CpConfig {
            listen: format!("127.0.0.1:{port}"),
            data_dir: cp_data.clone(),
            ca: cp_tls.ca.clone(),
            crl: cp_tls.crl.clone(),
            cert: cp_tls.cert.clone(),
            key: cp_tls.key.clone(),
            ttp_url: ttp_url.clone(),
            max_volume_bytes: cloud_platform::config::DEFAULT_MAX_VOLUME_BYTES,
            reconcile_interval_secs: 2,
            quota: Default::default(),
            limits: Default::default(),
            database_url: cp_database.clone(),
            database_pool_size: 8,
        };
        let cp_config_path = root.join(format!("cp-{}.toml", i + 1));
        std::fs::write(&cp_config_path, cp_config.to_toml().unwrap()).unwrap();
        let mut cp_child = ChildService::new("cp", cp_config_path, root.join(format!("cp-{}.log", i + 1)));
        cp_child.start().await;
        cp_children.push(cp_child);
    }
    let operator = pki.client("cloud-platform", Role::CloudPlatform, &cp_url).unwrap();
    let _: ComputeHost = operator
        .post_json("/v1/hosts", &ComputeHost { id: "compute-1".into(), agent_url: agent_url.clone() })
        .await
        .unwrap();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let _: Instance =
            operator.post_json("/v1/instances", &Instance { id: vm.into(), host: "compute-1".into() }).await.unwrap();
    }

    // dm-alice: the lab signer (for the host's own key releases) and the public API client.
    let placer = Arc::new(skydd::lab::Operator::of(&pki, "cloud-platform").unwrap());
    let signer = Arc::new(skydd::lab::DomainManager::create(&pki, "dm-alice").unwrap());
    let config = dm_config(&pki, "dm-alice", &cp_url, &ttp_url);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut domains = Vec::new();
    {
        let dm = DomainManager::connect(&config).unwrap();
        for i in 0..DOMAINS {
            let metadata = BTreeMap::from([("ward".to_string(), format!("ward-{i}"))]);
            // Every other domain is format 2: its roots are committed to the TTP being killed.
            let format = if i % 2 == 0 { VolumeFormat::V2 } else { VolumeFormat::V1 };
            let acl = vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }];
            let view = dm.create_with_format(metadata, acl, vec![], VOLUME_BYTES, format).await.unwrap();
            ledger.lock().unwrap().domains.entry(view.id.clone()).or_default().versions.insert(view.version);
            domains.push(view.id);
        }
    }
    println!(
        "setup: TTP and CP as child processes, compute-1 enrolled, {DOMAINS} domains of dm-alice ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // dm-alice's raw API client, for DELETE /v1/attachments/{id} of `detaching` ones.
    let dm_http = pki.client("dm-alice", Role::CloudPlatform, &cp_url).unwrap();
    let mut totals = (0usize, 0usize, 0usize, 0usize, 0usize); // orphans, stale, healed, unenforced, leaked creates
    for round in 0..rounds {
        let round_started = Instant::now();
        // Replicas: each kind of failure in turn, so five rounds cover them all.
        const REPLICA_VICTIMS: [Victim; 5] =
            [Victim::Ttp(0), Victim::Postgres, Victim::Cp(0), Victim::Ttp(1), Victim::Cp(1)];
        let victim = match replicated {
            true => REPLICA_VICTIMS[round % REPLICA_VICTIMS.len()],
            false if rng.random_bool(0.5) => Victim::Ttp(0),
            false => Victim::Cp(0),
        };
        let kill_after = Duration::from_millis(rng.random_range(300..2500));
        let stop = CancellationToken::new();
        let (ops_before, fail_before, rel_before) = {
            let l = ledger.lock().unwrap();
            (l.ops_ok, l.ops_failed, l.releases_ok)
        };

        // The driver: two tasks, one for CP operations and one for key releases.
        let mut tasks = Vec::new();
        for worker in 0..2u64 {
            let (config, ledger, domains, stop, sc) =
                (config.clone(), ledger.clone(), domains.clone(), stop.clone(), sc.clone());
            let (signer, placer) = (signer.clone(), placer.clone());
            let seed = rng.random::<u64>();
            tasks.push(tokio::spawn(async move {
                let dm = DomainManager::connect(&config).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ worker);
                while !stop.is_cancelled() {
                    if std::mem::take(&mut ledger.lock().unwrap().backoff) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if worker == 0 {
                        driver_step(&dm, &ledger, &domains, &mut rng).await;
                    } else {
                        let domain = domains[rng.random_range(0..domains.len())].clone();
                        release_step(&dm, &sc, &signer, &placer, &ledger, &domain).await;
                    }
                }
            }));
        }
        tokio::time::sleep(kill_after).await;
        match victim {
            Victim::Ttp(i) => ttp_children[i].kill9(),
            Victim::Cp(i) => cp_children[i].kill9(),
            // A fast shutdown: the services' connections are cut mid-transaction.
            Victim::Postgres => tokio::task::block_in_place(|| postgres.as_ref().unwrap().stop()),
        }
        let answered_at_kill = {
            let l = ledger.lock().unwrap();
            l.ops_ok + l.releases_ok
        };
        if replicated {
            // The surviving replica answers: the driver fails over and goes on.
            tokio::time::sleep(Duration::from_millis(rng.random_range(1500..2500))).await;
        } else {
            // Keep driving against the dead service for a moment: those operations must fail.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        }
        stop.cancel();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(60), task).await.expect("the driver stops").unwrap();
        }
        let answered_after_kill = {
            let l = ledger.lock().unwrap();
            l.ops_ok + l.releases_ok - answered_at_kill
        };
        if replicated && !matches!(victim, Victim::Postgres) {
            assert!(
                answered_after_kill > 0,
                "round {round}: nothing was answered in the 1.5 s after {victim} was killed: the clients did not fail over"
            );
        }
        // The database comes back; the services must find it again by themselves.
        let database_restart_started = Instant::now();
        if let (Victim::Postgres, Some(server)) = (victim, &postgres) {
            tokio::task::block_in_place(|| server.start_again());
        }
        let database_down_ms = database_restart_started.elapsed().as_millis();

        // ---- checks on the data directories as the crash left them -----------------------
        // (PostgreSQL's client blocks: the checks run off the async workers.)
        let (ttp_versions, chain_len, audit_present) = tokio::task::block_in_place(|| {
            let (ttp_state, _) = ttp::server::build_with_shares(&ttp_configs[0], &custodians.shares).unwrap();
            let chain_len = ttp_state
                .verify_audit_chain()
                .unwrap_or_else(|e| panic!("round {round}: the audit chain does not verify: {e}"));
            let records = ttp_state.store().audit_records(None).unwrap();
            let by_seq: HashMap<u64, &protocol::messages::AuditRecord> = records.iter().map(|r| (r.seq, r)).collect();
            let l = ledger.lock().unwrap();
            let mut versions = HashMap::new();
            let mut present = 0;
            for (domain, acked) in &l.domains {
                let stored = ttp_state
                    .store()
                    .domain(domain)
                    .unwrap()
                    .unwrap_or_else(|| panic!("round {round}: the TTP lost domain {domain}"));
                let want = acked.versions.last().copied().unwrap_or(0);
                assert!(
                    stored.latest_version >= want,
                    "round {round}: the TTP holds version {} of {domain}, the CP acknowledged {want}",
                    stored.latest_version
                );
                versions.insert(domain.clone(), stored.latest_version);
                for seq in &acked.audit_seqs {
                    let record = by_seq
                        .get(seq)
                        .unwrap_or_else(|| panic!("round {round}: acknowledged audit record {seq} is missing"));
                    assert_eq!(
                        (record.event.as_str(), record.outcome.as_str(), record.domain_id.as_deref()),
                        ("key_release", "ok", Some(domain.as_str())),
                        "round {round}: record {seq}"
                    );
                    present += 1;
                }
                for v in &acked.versions {
                    let text = format!("registered version {v} of domain {domain}");
                    assert!(
                        records.iter().any(|r| r.event == "register" && r.outcome == "ok" && r.message == text),
                        "round {round}: no audit record of acknowledged registration v{v} of {domain}"
                    );
                }
            }
            (versions, chain_len, present)
        });
        let mut header_versions = HashMap::new();
        for domain in &domains {
            let volume = cp_data.join("volumes").join(format!("{domain}.vol"));
            let (_slot, _seq, header) = header_on_disk(&volume).unwrap_or_else(|e| panic!("round {round}: {e}"));
            let v = version_of(&header);
            let acked = ledger.lock().unwrap().max_version(domain);
            assert!(
                v >= acked,
                "round {round}: the header in force of {domain} holds version {v}, the CP acknowledged {acked}"
            );
            assert!(
                v <= ttp_versions[domain],
                "round {round}: header v{v} of {domain} is newer than the TTP's v{}",
                ttp_versions[domain]
            );
            header_versions.insert(domain.clone(), v);
        }

        // ---- restart on the same data directory and port ------------------------------------
        let restart_started = Instant::now();
        match victim {
            Victim::Ttp(i) => ttp_children[i].start().await,
            Victim::Cp(i) => cp_children[i].start().await,
            Victim::Postgres => {}
        }
        let restart_ms = restart_started.elapsed().as_millis();
        let dm = DomainManager::connect(&config).unwrap();

        // Domains left behind their TTP registration (killed between the TTP and the header
        // write) are caught up by the CP itself, from its written-ahead pending update: no
        // command is repeated. Reading the domain is enough to finish it (a CP restart already
        // did at start-up).
        let mut healed = 0;
        for domain in &domains {
            let view = retry("show", || dm.show(domain)).await;
            let (_, _, header) = header_on_disk(&cp_data.join("volumes").join(format!("{domain}.vol")))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(
                version_of(&header),
                view.version,
                "round {round}: the CP shows v{} of {domain} but the header in force holds v{}",
                view.version,
                version_of(&header)
            );
            assert!(
                view.version >= ttp_versions[domain],
                "round {round}: {domain} is stuck: the TTP registered v{} but the CP shows v{} after the restart, without anyone repeating the update",
                ttp_versions[domain], view.version
            );
            if header_versions[domain] < ttp_versions[domain] {
                ledger.lock().unwrap().domains.get_mut(domain).unwrap().versions.insert(view.version);
                healed += 1;
            }
        }

        // Nor is any domain behind a key rotation the TTP registered: after the reads above,
        // each header names the TTP's newest generation (an interrupted rotation was finished
        // by the CP itself, from its written-ahead record).
        let (mut rotated_domains, ttp_state_after) = (
            0,
            tokio::task::block_in_place(|| {
                ttp::server::build_with_shares(&ttp_configs[0], &custodians.shares).unwrap().0
            }),
        );
        for domain in &domains {
            let (_, _, header) = header_on_disk(&cp_data.join("volumes").join(format!("{domain}.vol")))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let in_header =
                protocol::messages::Registration::decode(&header.registration.message).unwrap().key_generation;
            let at_ttp =
                tokio::task::block_in_place(|| ttp_state_after.store().domain(domain).unwrap().unwrap().key_generation);
            assert_eq!(
                in_header, at_ttp,
                "round {round}: {domain}'s header names key generation {in_header}, the TTP {at_ttp}"
            );
            rotated_domains += usize::from(at_ttp > 1);
        }
        drop(ttp_state_after);

        // The CP reconciles with compute-1 by itself (at start-up and every 2 s here): it
        // adopts attaches it wrote ahead but never heard back about, detaches mappings it
        // does not hold open (orphans of a kill -9 mid-attach), and marks detached what the
        // host no longer has. Wait until the two agree.
        let settle_started = Instant::now();
        let mut disagreed: Option<(usize, usize)> = None; // orphan mappings and `attaching` records, first look
                                                          // What compute-1 holds once settled; nothing below changes it before the stale check.
        let on_host = loop {
            let on_host = sc.list().unwrap().attachments;
            let in_cp = retry("list attachments", || dm.attachments()).await;
            let orphans: Vec<_> = on_host
                .iter()
                .filter(|h| {
                    h.status == MappingStatus::Attached
                        && !in_cp.iter().any(|c| c.id == h.attachment_id && c.status == AttachmentStatus::Attached)
                })
                .map(|h| h.attachment_id.clone())
                .collect();
            let attaching: Vec<_> =
                in_cp.iter().filter(|c| c.status == AttachmentStatus::Attaching).map(|c| c.id.clone()).collect();
            disagreed.get_or_insert((orphans.len(), attaching.len()));
            if orphans.is_empty() && attaching.is_empty() {
                break on_host;
            }
            assert!(
                settle_started.elapsed() < Duration::from_secs(20),
                "round {round}: the CP did not reconcile with compute-1 within 20 s: mappings it does not hold attached {orphans:?}, records still attaching {attaching:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let settle_ms = settle_started.elapsed().as_millis();

        // The CP's view after the restart: versions and acknowledged attachments.
        let cp_attachments = retry("list attachments", || dm.attachments()).await;
        let mut histories = 0;
        for domain in &domains {
            let view = retry("show", || dm.show(domain)).await;
            let acked = ledger.lock().unwrap().max_version(domain);
            assert!(
                view.version >= acked,
                "round {round}: the CP shows v{} of {domain}, acknowledged v{acked}",
                view.version
            );
            let history = retry("history", || dm.history(domain)).await;
            let seqs: BTreeSet<u64> = history.records.iter().map(|r| r.seq).collect();
            let mut reconciled = Vec::new();
            let l = ledger.lock().unwrap();
            for seq in &l.domains[domain].audit_seqs {
                assert!(seqs.contains(seq), "round {round}: history of {domain} lacks acknowledged record {seq}");
            }
            histories += 1;
            for (id, (vm, status)) in &l.domains[domain].attachments {
                let found = cp_attachments.iter().find(|a| &a.id == id);
                match *status {
                    "attached" => {
                        let a = found.unwrap_or_else(|| {
                            panic!("round {round}: acknowledged attachment {id} of {vm} is unknown to the CP")
                        });
                        // The CP's start-up reconciliation detaches an acknowledged attachment
                        // when the header in force no longer allows it (an unacknowledged revoke
                        // that reached the disk before kill -9); otherwise it stays attached.
                        let header = header_on_disk(&cp_data.join("volumes").join(format!("{domain}.vol"))).unwrap().2;
                        let allowed = header.unverified_contents().unwrap().0.access_of(vm).is_some();
                        let host_has = on_host.iter().any(|h| &h.attachment_id == id);
                        if allowed && host_has {
                            assert_eq!(
                                a.status,
                                AttachmentStatus::Attached,
                                "round {round}: acknowledged attachment {id} of {vm}"
                            );
                        } else if allowed {
                            // An unacknowledged detach reached the host before kill -9; the
                            // reconciliation recorded what the host holds.
                            assert_eq!(
                                a.status,
                                AttachmentStatus::Detached,
                                "round {round}: {id} of {vm} is gone from compute-1 but the CP says {}",
                                a.status
                            );
                            reconciled.push((id.clone(), vm.clone()));
                        } else {
                            assert!(
                                a.status == AttachmentStatus::Detached || a.status == AttachmentStatus::Detaching,
                                "round {round}: {id} of {vm} is {} although the header in force revokes it",
                                a.status
                            );
                            reconciled.push((id.clone(), vm.clone()));
                        }
                    }
                    "detached" => {
                        let a = found.unwrap_or_else(|| {
                            panic!("round {round}: acknowledged detached attachment {id} is unknown to the CP")
                        });
                        assert_eq!(a.status, AttachmentStatus::Detached, "round {round}: acknowledged detach of {id}");
                    }
                    "revoked" => {
                        let a = found.unwrap_or_else(|| {
                            panic!("round {round}: attachment {id} revoked with acknowledgement is unknown to the CP")
                        });
                        assert!(
                            a.status == AttachmentStatus::Detached || a.status == AttachmentStatus::Detaching,
                            "round {round}: acknowledged revocation left {id} {}",
                            a.status
                        );
                    }
                    _ => {}
                }
            }
            drop(l);
            let mut l = ledger.lock().unwrap();
            for (id, vm) in reconciled {
                println!("  round {round}: the CP's start-up reconciliation detached {id} of {vm} (revoked by the header in force)");
                l.domains.get_mut(domain).unwrap().attachments.insert(id, (vm, "detached"));
            }
        }

        // The host against the CP: mappings the CP never acknowledged (orphans), CP
        // attachments the host no longer has (stale), and VMs whose access was revoked by a
        // version in force while a mapping is still open (revocation not yet enforced).
        let open_in_cp: Vec<_> = cp_attachments.iter().filter(|a| a.status != AttachmentStatus::Detached).collect();
        for a in &on_host {
            assert!(
                a.status != MappingStatus::Attached || open_in_cp.iter().any(|c| c.id == a.attachment_id),
                "round {round}: compute-1 maps attachment {} ({} on {}) that the CP does not hold open, after the reconciliation settled",
                a.attachment_id, a.vm_id, &a.domain_id[..8]
            );
        }
        let (orphans, attaching) = disagreed.unwrap_or_default();
        let mut stale = 0;
        let mut unenforced = 0;
        for a in &open_in_cp {
            let host_has = on_host.iter().any(|h| h.attachment_id == a.id && h.status == MappingStatus::Attached);
            let header = header_on_disk(&cp_data.join("volumes").join(format!("{}.vol", a.domain_id))).unwrap().2;
            let allowed =
                header.unverified_contents().unwrap().0.access_of(&a.instance_id).is_some_and(|m| m.covers(a.mode));
            if !host_has || !allowed || a.status == AttachmentStatus::Detaching {
                if !allowed {
                    // The CP reconciles every open attachment with the header in force before it
                    // serves again, so a revocation interrupted by kill -9 is enforced at restart.
                    assert_eq!(
                        a.status,
                        AttachmentStatus::Detaching,
                        "round {round}: attachment {} of {} is still {} although version {} in force revoked it",
                        a.id,
                        a.instance_id,
                        a.status,
                        version_of(&header)
                    );
                    unenforced += 1;
                } else {
                    println!(
                        "  round {round}: attachment {} of {} is {} in the CP but not attached on the host; detaching",
                        a.id, a.instance_id, a.status
                    );
                    stale += 1;
                }
                let d: protocol::cloud::Attachment =
                    dm_http.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
                assert_eq!(d.status, AttachmentStatus::Detached, "round {round}: {d:?}");
                let mut l = ledger.lock().unwrap();
                if let Some(d) = l.domains.get_mut(&a.domain_id) {
                    d.attachments.insert(a.id.clone(), (a.instance_id.clone(), "detached"));
                }
            }
        }
        // Attachments the CP committed but never acknowledged (killed before answering) are
        // durable now: track them so the driver detaches them instead of retrying attaches.
        {
            let mut l = ledger.lock().unwrap();
            for a in &open_in_cp {
                if a.status == AttachmentStatus::Attached
                    && on_host.iter().any(|h| h.attachment_id == a.id && h.status == MappingStatus::Attached)
                {
                    let d = l.domains.get_mut(&a.domain_id).unwrap();
                    let known = d.attachments.get(&a.id).map(|(_, s)| *s);
                    if known != Some("attached")
                        && header_on_disk(&cp_data.join("volumes").join(format!("{}.vol", a.domain_id)))
                            .unwrap()
                            .2
                            .unverified_contents()
                            .unwrap()
                            .0
                            .access_of(&a.instance_id)
                            .is_some()
                    {
                        d.attachments.insert(a.id.clone(), (a.instance_id.clone(), "attached"));
                    }
                }
            }
        }
        // Domains the TTP registered but the CP never acknowledged creating: none here, as
        // the driver does not create; count volume files without a CP record anyway.
        let leaked = std::fs::read_dir(cp_data.join("volumes"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name().to_string_lossy().to_string();
                !domains.iter().any(|d| name == format!("{d}.vol"))
            })
            .count();

        // The host reattaches: a new attach and detach after the restart work.
        let probe = &domains[round % domains.len()];
        // Every open attachment of the probe goes first: a domain is attached read-write once
        // and alone (single_writer), so vm-b's read-only one would refuse vm-a's rw reattach.
        let open = retry("list attachments", || dm.attachments()).await;
        for a in open.iter().filter(|a| &a.domain_id == probe && a.status == AttachmentStatus::Attached) {
            let vm = a.instance_id.clone();
            let d = retry("detach", || dm.detach(probe, &vm)).await;
            ledger.lock().unwrap().domains.get_mut(probe).unwrap().attachments.insert(a.id.clone(), (vm, "detached"));
            assert_eq!(d.status, AttachmentStatus::Detached);
        }
        let a = retry("reattach", || dm.attach(probe, "vm-a", AccessMode::Rw, 300)).await;
        assert_eq!(a.status, AttachmentStatus::Attached);
        assert!(Path::new(&a.mount_path).read_dir().is_ok(), "the VM sees its file system again");
        let d = retry("detach", || dm.detach(probe, "vm-a")).await;
        assert_eq!(d.status, AttachmentStatus::Detached);
        ledger
            .lock()
            .unwrap()
            .domains
            .get_mut(probe)
            .unwrap()
            .attachments
            .insert(a.id.clone(), ("vm-a".into(), "detached"));

        let l = ledger.lock().unwrap();
        println!(
            "round {round}: kill -9 {victim} after {} ms (answers in the window after: {answered_after_kill}; database down {database_down_ms} ms); ops ok {} / failed {}, key releases ok {}; restart {restart_ms} ms; TTP versions >= acknowledged for {} domains; headers valid, versions {:?}; audit chain {chain_len} records verified, {audit_present} acknowledged releases present, {histories} histories read; reconciled by the CP in {settle_ms} ms (orphan mappings {orphans}, attaches never answered {attaching}), stale {stale}, revocations enforced late {unenforced}, domains caught up by the CP {healed}, domains on a rotated key {rotated_domains} (every header at the TTP's generation), stray volume files {leaked}; reattach ok ({:.1} s)",
            kill_after.as_millis(),
            l.ops_ok - ops_before,
            l.ops_failed - fail_before,
            l.releases_ok - rel_before,
            l.domains.len(),
            domains.iter().map(|d| header_versions[d]).collect::<Vec<_>>(),
            round_started.elapsed().as_secs_f64(),
        );
        totals.0 += orphans;
        totals.1 += stale;
        totals.2 += healed;
        totals.3 += unenforced;
        totals.4 += leaked;
    }
    {
        let l = ledger.lock().unwrap();
        let acked_releases: usize = l.domains.values().map(|d| d.audit_seqs.len()).sum();
        println!(
            "crash consistency ({replicas} replica(s) each): {rounds} rounds (TTP starts {}, CP starts {}), {} operations acknowledged, {} key releases acknowledged ({acked_releases} audit records checked every round), no acknowledged record lost; orphans {}, stale {}, healed {}, late revocations {}, stray volumes {}; {:.1} s",
            ttp_children.iter().map(|c| c.starts).sum::<usize>(), cp_children.iter().map(|c| c.starts).sum::<usize>(), l.ops_ok, l.releases_ok, totals.0, totals.1, totals.2, totals.3, totals.4, started.elapsed().as_secs_f64()
        );
        println!("failed (unacknowledged) operations by kind: {:?}", l.failures);
    }

    // Orderly end: detach what is open, stop the host, kill the children.
    let dm = DomainManager::connect(&config).unwrap();
    for a in dm.attachments().await.unwrap().into_iter().filter(|a| a.status != AttachmentStatus::Detached) {
        let _: Result<protocol::cloud::Attachment, _> = dm_http.delete_json(&format!("/v1/attachments/{}", a.id)).await;
    }
    sc_shutdown.cancel();
    let _ = sc_task.await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Arc::strong_count(&sc) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sc2 = sc.clone();
    tokio::task::spawn_blocking(move || sc2.shutdown()).await.unwrap();
    drop(sc);
    cp_children.iter_mut().for_each(ChildService::kill9);
    ttp_children.iter_mut().for_each(ChildService::kill9);
    drop(swtpm);
    if let Some(server) = postgres {
        server.stop();
    }
}
