//! The secure component agent end to end: a real TTP over mutual TLS with
//! SQLite, one compute host with its own swtpm running the agent service (userspace backend:
//! this kernel has no device-mapper; local hypervisor driver), a volume file prepared the
//! way the cloud platform prepares it, and a cloud-platform identity calling the agent API.
//!
//! Proves: attach rw (mkfs, mount, write), detach, attach ro for another VM (the file is
//! there, writes fail with EROFS), a ro attach beside a live rw one (mounts with noload), a
//! VM not in the ACL refused with the TTP's own code and message, only the cloud platform
//! may call, a restart lists the attachment as stale (userspace mappings end with the
//! process) and detach cleans everything up (no loop device, no FUSE mount left), a crash
//! (kill -9 of the agent process) is found stale and cleaned up the same way. Then measures
//! attach latency over 50 attach+detach cycles and prints where the time goes.
//!
//! Needs root, /dev/fuse, /dev/loop-control and swtpm; fails naming what is missing without
//! them (secure_component::prerequisites).

use skydd_testkit::prerequisites;
use skydd_testkit::Cleanup;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use net::Role;
use protocol::cloud::{AgentAttachRequest, AgentAttachment, AgentAttachmentList, MappingStatus};
use protocol::domain::AccessMode;
use protocol::format::{self, DATA_OFFSET};
use protocol::messages::HeaderRecord;
use protocol::signing::SignedEnvelope;
use secure_component::config::AgentConfig;
use secure_component::service::{self, AttachTimings, AttachmentService};
use secure_component::swtpm::Swtpm;
use skydd::lab::{register, DomainManager, LabPki, Operator, RunningTtp};
use tokio_util::sync::CancellationToken;
use ttp::attestation::AttestationPolicy;

const EROFS: i32 = 30;
const DATA_LEN: u64 = 64 << 20;
/// Environment variable that turns this test binary into a child agent process.
const CHILD_CONFIG: &str = "SKYDD_SC_TEST_CHILD_CONFIG";

/// A volume file as the cloud platform writes it: header slot 0 with the header record,
/// sparse data area from 1 MiB.
fn prepare_volume(path: &Path, header: &HeaderRecord) {
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(&format::new_header_area(&header.encode()).unwrap(), 0).unwrap();
    f.set_len(DATA_OFFSET + DATA_LEN).unwrap();
}

/// Starts the agent of `config` as its own process (this test binary re-executed), to be
/// killed with SIGKILL; returns it and its URL.
async fn spawn_child_agent(root: &Path, config: &AgentConfig) -> (std::process::Child, String) {
    let child_config_path = root.join("host-1").join("sc-child.toml");
    let port_file = PathBuf::from(format!("{}.port", child_config_path.display()));
    let _ = std::fs::remove_file(&port_file);
    std::fs::write(&child_config_path, config.to_toml().unwrap()).unwrap();
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    // A long-lived child must not keep another test's TPM connection open.
    secure_component::tpm::close_inherited_fds_on_exec(&mut command);
    let child = command
        .args(["--exact", "secure_component_agent::child_agent_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_CONFIG, &child_config_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port_file.exists() {
        assert!(Instant::now() < deadline, "the child agent did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let url = format!("https://127.0.0.1:{}", std::fs::read_to_string(&port_file).unwrap().trim());
    (child, url)
}

/// The agent served in this process.
struct RunningAgent {
    url: String,
    service: Arc<AttachmentService>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    async fn start(config: &AgentConfig) -> Self {
        let (service, tls) = service::build(config).expect("agent builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let shutdown = CancellationToken::new();
        let (s, t) = (service.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = service::serve(listener, s, tls, t).await {
                eprintln!("agent stopped: {e}");
            }
        });
        Self { url, service, shutdown, task }
    }

    /// An orderly stop, like `secure-component serve` on SIGTERM.
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        let service = self.service;
        // Connection tasks hold the router (and so the service) until they have drained.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Arc::strong_count(&service) > 1 {
            assert!(Instant::now() < deadline, "the agent service is still referenced after the server stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::spawn_blocking(move || {
            service.shutdown();
            drop(service);
        })
        .await
        .unwrap();
    }
}

struct Cloud {
    pki: LabPki,
    alice: DomainManager,
    /// cp-1's placements of VMs on host-1.
    operator: Operator,
    header: HeaderRecord,
    domain_id: String,
    volume: PathBuf,
}

impl Cloud {
    fn request(&self, attachment_id: &str, vm: &str, mode: AccessMode) -> AgentAttachRequest {
        self.request_with(attachment_id, vm, mode, self.alice.grant(&self.domain_id, vm, mode, 300))
    }

    fn request_with(
        &self,
        attachment_id: &str,
        vm: &str,
        mode: AccessMode,
        grant: SignedEnvelope,
    ) -> AgentAttachRequest {
        AgentAttachRequest {
            attachment_id: attachment_id.into(),
            vm_id: vm.into(),
            mode,
            header: self.header.clone(),
            placement: self.operator.place(vm, "host-1", &grant),
            grant,
            volume_path: self.volume.to_string_lossy().into_owned(),
        }
    }

    fn cp(&self, agent_url: &str) -> net::Client {
        self.pki.client("cp-1", Role::SecureComponent, agent_url).unwrap()
    }
}

fn api_code<T: std::fmt::Debug>(result: Result<T, net::Error>) -> (u16, String, String) {
    match result {
        Err(net::Error::Api { status, code, message }) => {
            println!("  refused: HTTP {status} {code}: {message}");
            (status, code, message)
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Mounts, loop devices and FUSE mounts that mention `root`.
fn leftovers(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().to_string();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root) || (l.contains("fuse.skydd") && l.contains(&root)))
        .map(|l| format!("mount: {l}"))
        .collect();
    let losetup = std::process::Command::new("losetup").arg("-a").output().expect("losetup runs");
    out.extend(
        String::from_utf8_lossy(&losetup.stdout).lines().filter(|l| l.contains(&root)).map(|l| format!("loop: {l}")),
    );
    out
}

fn median_p99(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let n = samples.len();
    let p99 = samples[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    (samples[n / 2], p99)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// When this binary is started as a child agent (the crash scenario), serve and never
/// return; the parent kills it with SIGKILL.
#[test]
fn child_agent_process() {
    let Ok(config_path) = std::env::var(CHILD_CONFIG) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let config = AgentConfig::load(Path::new(&config_path)).unwrap();
        let (service, tls) = service::build(&config).unwrap();
        let listener = tokio::net::TcpListener::bind(&config.listen).await.unwrap();
        let port_file = format!("{config_path}.port");
        std::fs::write(&port_file, listener.local_addr().unwrap().port().to_string()).unwrap();
        service::serve(listener, service, tls, CancellationToken::new()).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_component_agent_end_to_end() {
    if std::env::var(CHILD_CONFIG).is_ok() {
        return;
    }
    prerequisites::require(prerequisites::USERSPACE_HOST);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let _cleanup = Cleanup::new(root.to_path_buf());
    let pki = LabPki::create(&root.join("pki")).unwrap();
    let (ttp_listener, ttp_url) = RunningTtp::bind().await.unwrap();

    println!("host-1: swtpm, secure-component certificate, agent configuration (sc.toml)");
    let ek_ca = root.join("tpm-vendor-ca");
    let swtpm = Swtpm::start_with_ca(&root.join("host-1").join("swtpm"), &ek_ca).unwrap();
    let sc_tls = pki.issue(Role::SecureComponent, "host-1").unwrap();
    let config = skydd::lab::loopback_agent_config(root, "host-1", swtpm.tcti(), &ttp_url, &sc_tls);
    let config_path = root.join("host-1").join("sc.toml");
    std::fs::write(&config_path, config.to_toml().unwrap()).unwrap();
    let config = AgentConfig::load(&config_path).unwrap();

    let agent = RunningAgent::start(&config).await;
    assert_eq!(agent.service.backend_kind(), "userspace", "this kernel has no device-mapper: auto picks userspace");
    assert_eq!(agent.service.attested_host().host_id, "host-1", "host id from the certificate");

    println!("TTP: attestation policy with host-1's PCRs, then enrollment of host-1");
    let selection = config.pcr_selection.clone();
    let pcr_values = agent.service.attested_host().tpm.run(move |tpm| tpm.read_pcrs(&selection)).await.unwrap();
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![ttp::attestation::ReferenceState {
            name: "compute-v1".into(),
            selection: config.pcr_selection.clone(),
            pcr_values,
        }],
    };
    let ttp = RunningTtp::start(root, &pki, &policy, ttp_listener).await.unwrap();
    let enrolled = agent.service.enroll().await.expect("host-1 enrolls");
    assert_eq!(enrolled.reference_state, "compute-v1");

    println!("cloud: dm-alice creates a domain (vm-a rw, vm-b ro); the CP registers it and writes the volume");
    pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let cp_ttp = pki.client("cp-1", Role::Ttp, &ttp.url).unwrap();
    let alice = DomainManager::create(&pki, "dm-alice").unwrap();
    let descriptor = alice
        .new_domain(&[("department", "cardiology")], &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)])
        .unwrap();
    let domain_id = descriptor.domain_id.clone();
    let header = register(&cp_ttp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let volume = root.join("volumes").join(format!("{domain_id}.img"));
    std::fs::create_dir_all(volume.parent().unwrap()).unwrap();
    prepare_volume(&volume, &header);
    let operator = Operator::of(&pki, "cp-1").unwrap();
    let cloud = Cloud { pki, alice, operator, header, domain_id: domain_id.clone(), volume };
    let cp = cloud.cp(&agent.url);
    let vm_dir = |vm: &str| config.vm_root.join(vm).join(&domain_id);

    println!("only the cloud platform may call the agent");
    {
        let dm_client = cloud.pki.client("dm-alice", Role::SecureComponent, &agent.url).unwrap();
        match dm_client.get_json::<AgentAttachmentList>("/v1/attachments").await {
            Err(e @ (net::Error::Tls { .. } | net::Error::Connect { .. } | net::Error::Request { .. })) => {
                println!("  refused: {e}")
            }
            other => panic!("a domain manager must not reach the agent API, got {other:?}"),
        }
    }

    println!("attach: vm-a rw (first use: mkfs.ext4), write a file");
    let attached: AgentAttachment = cp
        .post_json("/v1/attachments", &cloud.request("att-1", "vm-a", AccessMode::Rw))
        .await
        .expect("vm-a attaches rw");
    println!("  {attached:?}");
    assert_eq!(attached.status, MappingStatus::Attached);
    assert_eq!(attached.backend, "userspace");
    assert_eq!(attached.version, 1);
    assert_eq!(PathBuf::from(&attached.mount_path), vm_dir("vm-a"));
    let first = *agent.service.recent_timings().last().unwrap();
    assert!(first.formatted, "the first rw attach formats");
    println!(
        "MEASURED first rw attach (includes mkfs.ext4 of the {} MiB data area): total {}, of which mkfs + mount {}",
        DATA_LEN >> 20,
        ms(first.total),
        ms(first.attach)
    );
    let note = b"written by vm-a through the secure component\n";
    std::fs::write(vm_dir("vm-a").join("note.txt"), note).unwrap();
    // The record holds no key material.
    let record = std::fs::read_to_string(config.state_dir.join("attachments").join("att-1.json")).unwrap();
    assert!(!record.to_lowercase().contains("key"), "{record}");

    println!("refusal: vm-b ro beside the live rw mount of vm-a (single writer on this host)");
    {
        let (status, code, message) = api_code(
            cp.post_json::<_, AgentAttachment>("/v1/attachments", &cloud.request("att-2", "vm-b", AccessMode::Ro))
                .await,
        );
        assert_eq!((status, code.as_str()), (409, "attachment_conflict"), "{message}");
        assert!(message.contains("att-1"), "the refusal names the attachment to detach: {message}");
        let list: AgentAttachmentList = cp.get_json("/v1/attachments").await.unwrap();
        assert_eq!(list.attachments.len(), 1, "nothing was mapped for the refused attach: {list:?}");
    }

    println!("refusal: the same domain for the same VM twice, and an attachment id in use");
    {
        let (status, code, _) = api_code(
            cp.post_json::<_, AgentAttachment>("/v1/attachments", &cloud.request("att-9", "vm-a", AccessMode::Rw))
                .await,
        );
        assert_eq!((status, code.as_str()), (409, "attachment_conflict"));
        let (status, code, _) = api_code(
            cp.post_json::<_, AgentAttachment>("/v1/attachments", &cloud.request("att-1", "vm-b", AccessMode::Ro))
                .await,
        );
        assert_eq!((status, code.as_str()), (409, "attachment_conflict"));
    }

    println!("detach: vm-a (unmount, loop device and FUSE mount gone, record removed)");
    let detached: AgentAttachment = cp.delete_json("/v1/attachments/att-1").await.expect("vm-a detaches");
    assert_eq!(detached.status, MappingStatus::Detached);
    assert!(!vm_dir("vm-a").exists(), "the VM directory is removed");
    assert_eq!(leftovers(root), Vec::<String>::new());
    let (status, code, _) = api_code(cp.delete_json::<AgentAttachment>("/v1/attachments/att-1").await);
    assert_eq!((status, code.as_str()), (404, "attachment_unknown"));

    println!("attach: vm-b ro: the file vm-a wrote is there; writing fails with EROFS");
    let b: AgentAttachment = cp
        .post_json("/v1/attachments", &cloud.request("att-3", "vm-b", AccessMode::Ro))
        .await
        .expect("vm-b attaches ro");
    assert!(!agent.service.recent_timings().last().unwrap().formatted, "ro never formats");
    assert_eq!(std::fs::read(vm_dir("vm-b").join("note.txt")).unwrap(), note);
    let e = std::fs::write(vm_dir("vm-b").join("note.txt"), b"overwrite").expect_err("ro");
    assert_eq!(e.raw_os_error(), Some(EROFS), "{e}");
    let e = std::fs::create_dir(vm_dir("vm-b").join("d")).expect_err("ro");
    assert_eq!(e.raw_os_error(), Some(EROFS), "{e}");
    assert_eq!(b.mode, AccessMode::Ro);

    println!("refusal: vm-z is not in the access list: the TTP's code and message come back unchanged");
    {
        let (status, code, message) = api_code(
            cp.post_json::<_, AgentAttachment>("/v1/attachments", &cloud.request("att-z", "vm-z", AccessMode::Ro))
                .await,
        );
        assert_eq!((status, code.as_str()), (403, "vm_not_in_acl"));
        assert!(message.contains("vm-z"), "{message}");
        assert!(!message.contains("the TTP refused"), "the TTP's message, not a wrapper: {message}");
        let audit = ttp.service.store().audit_records(None).unwrap();
        assert_eq!(audit.last().unwrap().outcome, "vm_not_in_acl");
        let list: AgentAttachmentList = cp.get_json("/v1/attachments").await.unwrap();
        assert_eq!(list.attachments.len(), 1, "the refusal leaves nothing behind");
        // An expired grant (ro: vm-b's ro attachment is open, and nothing goes rw beside it).
        let expired = cloud.request_with(
            "att-e",
            "vm-a",
            AccessMode::Ro,
            cloud.alice.grant(&domain_id, "vm-a", AccessMode::Rw, -5),
        );
        let (_, code, _) = api_code(cp.post_json::<_, AgentAttachment>("/v1/attachments", &expired).await);
        assert_eq!(code, "grant_expired");
    }

    println!("restart: orderly stop (userspace mappings end with the process), start again with the same state_dir");
    agent.stop().await;
    assert_eq!(leftovers(root), Vec::<String>::new(), "the orderly stop unmounted and closed the mapping");
    let agent = RunningAgent::start(&config).await;
    let cp = cloud.cp(&agent.url);
    let list: AgentAttachmentList = cp.get_json("/v1/attachments").await.unwrap();
    println!("  after restart: {list:?}");
    assert_eq!(list.attachments.len(), 1);
    let stale = &list.attachments[0];
    assert_eq!((stale.attachment_id.as_str(), stale.status), ("att-3", MappingStatus::Stale));
    assert!(stale.stale_reason.as_deref().unwrap().contains("stopped"), "{stale:?}");
    let d: AgentAttachment = cp.delete_json("/v1/attachments/att-3").await.expect("a stale attachment detaches");
    assert_eq!(d.status, MappingStatus::Detached);
    let list: AgentAttachmentList = cp.get_json("/v1/attachments").await.unwrap();
    assert!(list.attachments.is_empty());
    assert_eq!(leftovers(root), Vec::<String>::new());

    println!("crash: the agent as its own process attaches vm-b, is killed with SIGKILL; the next agent reports it stale and cleans up");
    agent.stop().await;
    {
        let (mut child, child_url) = spawn_child_agent(root, &config).await;
        let child_cp = cloud.cp(&child_url);
        let _: AgentAttachment = child_cp
            .post_json("/v1/attachments", &cloud.request("att-4", "vm-b", AccessMode::Ro))
            .await
            .expect("the child attaches");
        assert_eq!(std::fs::read(vm_dir("vm-b").join("note.txt")).unwrap(), note);
        child.kill().unwrap();
        child.wait().unwrap();

        let agent = RunningAgent::start(&config).await;
        let cp = cloud.cp(&agent.url);
        let list: AgentAttachmentList = cp.get_json("/v1/attachments").await.unwrap();
        println!("  after the crash: {list:?}");
        assert_eq!(list.attachments.len(), 1);
        assert_eq!(list.attachments[0].status, MappingStatus::Stale);
        assert!(list.attachments[0].stale_reason.as_deref().unwrap().contains("gone"), "{:?}", list.attachments[0]);
        assert!(!leftovers(root).is_empty(), "the crash left a mount, a loop device and a dead FUSE mount");
        let _: AgentAttachment = cp.delete_json("/v1/attachments/att-4").await.expect("detach cleans up after a crash");
        assert_eq!(leftovers(root), Vec::<String>::new());
        agent.stop().await;
    }

    println!(
        "crash with format 2: the agent process holds a format-2 domain read-write, vm-a writes (one file fsynced, \
         one not), the agent is killed with SIGKILL; the next attach settles the pending writes without an alarm"
    );
    {
        let mut descriptor =
            cloud.alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
        descriptor.volume_format = protocol::domain::VolumeFormat::V2;
        let domain = descriptor.domain_id.clone();
        let header = register(&cp_ttp, cloud.alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
        let volume = root.join("volumes").join(format!("{domain}.img"));
        prepare_volume(&volume, &header);
        let request = |id: &str| {
            let grant = cloud.alice.grant(&domain, "vm-a", AccessMode::Rw, 300);
            AgentAttachRequest {
                attachment_id: id.into(),
                vm_id: "vm-a".into(),
                mode: AccessMode::Rw,
                header: header.clone(),
                placement: cloud.operator.place("vm-a", "host-1", &grant),
                grant,
                volume_path: volume.to_string_lossy().into_owned(),
            }
        };
        let mount = config.vm_root.join("vm-a").join(&domain);
        let (mut child, child_url) = spawn_child_agent(root, &config).await;
        let _: AgentAttachment =
            cloud.cp(&child_url).post_json("/v1/attachments", &request("att-v2-1")).await.expect("the child attaches");
        let flushed = b"flushed before the crash\n".repeat(200);
        let mut file = std::fs::File::create(mount.join("flushed.txt")).unwrap();
        std::io::Write::write_all(&mut file, &flushed).unwrap();
        file.sync_all().unwrap();
        drop(file);
        std::fs::write(mount.join("pending.txt"), b"written, never fsynced").unwrap();
        // Direct I/O reaches the volume (data and tags, the zone announced) with no flush: the
        // crash leaves writes the tree does not cover yet.
        let dd = std::process::Command::new("dd")
            .args(["if=/dev/urandom", "bs=4096", "count=256", "oflag=direct", "status=none"])
            .arg(format!("of={}", mount.join("direct.bin").display()))
            .status()
            .unwrap();
        assert!(dd.success(), "dd with oflag=direct into the mount");
        child.kill().unwrap();
        child.wait().unwrap();

        let agent = RunningAgent::start(&config).await;
        let cp = cloud.cp(&agent.url);
        let _: AgentAttachment =
            cp.delete_json("/v1/attachments/att-v2-1").await.expect("the stale attachment detaches");
        let _: AgentAttachment =
            cp.post_json("/v1/attachments", &request("att-v2-2")).await.expect("reattach after the crash");
        assert_eq!(std::fs::read(mount.join("flushed.txt")).unwrap(), flushed, "the fsynced write survived");
        let _: AgentAttachment = cp.delete_json("/v1/attachments/att-v2-2").await.expect("detach");
        let records = ttp.service.store().audit_records(Some(&domain)).unwrap();
        assert!(records.iter().all(|r| r.event != "integrity_violation"), "no false alarm: {records:?}");
        let commits = records.iter().filter(|r| r.event == "integrity_commit" && r.outcome == "ok").count();
        println!("  recovered: the fsynced file reads back, {commits} roots committed, no integrity_violation");
        assert_eq!(leftovers(root), Vec::<String>::new());
        agent.stop().await;
    }

    println!(
        "latency: 50 attach (rw) + detach cycles of vm-a, request until the file system is usable in the VM directory"
    );
    let agent = RunningAgent::start(&config).await;
    let cp = cloud.cp(&agent.url);
    let cycles = 50;
    let mut attach_times = Vec::new();
    let mut detach_times = Vec::new();
    for i in 0..cycles {
        let request = cloud.request(&format!("lat-{i}"), "vm-a", AccessMode::Rw);
        let started = Instant::now();
        let a: AgentAttachment = cp.post_json("/v1/attachments", &request).await.expect("attach");
        let entries = std::fs::read_dir(&a.mount_path).unwrap().count();
        attach_times.push(started.elapsed());
        assert!(entries >= 2, "note.txt and lost+found are visible");
        let started = Instant::now();
        let _: AgentAttachment = cp.delete_json(&format!("/v1/attachments/lat-{i}")).await.expect("detach");
        detach_times.push(started.elapsed());
    }
    let timings: Vec<AttachTimings> = agent.service.recent_timings().into_iter().rev().take(cycles).collect();
    assert_eq!(timings.len(), cycles);
    let column = |f: fn(&AttachTimings) -> Duration| -> (Duration, Duration) {
        let mut v: Vec<Duration> = timings.iter().map(f).collect();
        median_p99(&mut v)
    };
    let (attach_median, attach_p99) = median_p99(&mut attach_times);
    let (detach_median, detach_p99) = median_p99(&mut detach_times);
    println!("MEASURED attach latency (client: POST /v1/attachments until readdir of the mount works), {cycles} cycles with swtpm: median {}, p99 {}", ms(attach_median), ms(attach_p99));
    println!(
        "MEASURED detach latency (DELETE: umount, loop detach, FUSE unmount, record): median {}, p99 {}",
        ms(detach_median),
        ms(detach_p99)
    );
    println!("MEASURED where the attach time goes (server side, median / p99 of {cycles}):");
    for (name, f) in [
        ("TTP challenge (mTLS round trip)", (|t: &AttachTimings| t.challenge) as fn(&AttachTimings) -> Duration),
        ("TPM quote", |t| t.quote),
        ("TTP key release (checks, HKDF, RSA-OAEP, audit)", |t| t.release),
        ("TPM decrypt (PolicyPCR session + RSA-OAEP)", |t| t.decrypt),
        ("userspace open (FUSE mount + loop device)", |t| t.open),
        ("mount ext4 (local driver)", |t| t.attach),
        ("attachment record (fsync)", |t| t.record),
        ("total in the agent", |t| t.total),
    ] {
        let (m, p) = column(f);
        println!("  {name:<50} {:>10} {:>10}", ms(m), ms(p));
    }
    agent.stop().await;
    assert_eq!(leftovers(root), Vec::<String>::new());
    ttp.stop().await;
    drop(swtpm);
}
