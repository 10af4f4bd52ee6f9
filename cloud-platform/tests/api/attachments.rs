//! Attach through a real secure component: compute-1 with its own swtpm, enrolled with the
//! TTP; each test its own compute host and lab.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use net::Role;
use protocol::cloud::{AgentAttachmentList, Attachment, AttachmentStatus, ComputeHost};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use secure_component::config::{AgentConfig, BackendChoice, HypervisorChoice, LibvirtConfig};
use secure_component::prerequisites::{self, Need};
use secure_component::service::{self, AttachmentService};
use secure_component::swtpm::Swtpm;
use tokio_util::sync::CancellationToken;
use ttp::attestation::AttestationPolicy;

use crate::lab::{bind, refusal, Lab, Manager, Pki, Server, MIB};

/// Mounts and loop devices under `root`.
fn leftovers(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().to_string();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root))
        .map(|l| format!("mount: {l}"))
        .collect();
    let losetup = std::process::Command::new("losetup").arg("-a").output().expect("losetup runs");
    out.extend(
        String::from_utf8_lossy(&losetup.stdout).lines().filter(|l| l.contains(&root)).map(|l| format!("loop: {l}")),
    );
    out
}

/// compute-1: its swtpm and its secure component agent, serving on loopback.
struct Compute {
    swtpm: Swtpm,
    agent: Arc<AttachmentService>,
    agent_tls: net::ServerTls,
    server: Server,
    vm_root: PathBuf,
}

impl Compute {
    async fn serve(agent: Arc<AttachmentService>, tls: net::ServerTls) -> Server {
        let (listener, url) = bind().await;
        let shutdown = CancellationToken::new();
        let t = shutdown.clone();
        let task = tokio::spawn(async move {
            service::serve(listener, agent, tls, t).await.unwrap();
        });
        Server { url, shutdown, task }
    }

    /// The attachment ids the agent holds, as the CP's certificate reads them.
    async fn attachment_ids(&self, lab: &Lab) -> Vec<String> {
        let client = lab.pki.client("cp-1", Role::SecureComponent, &self.server.url);
        let list: AgentAttachmentList = client.get_json("/v1/attachments").await.unwrap();
        list.attachments.into_iter().map(|a| a.attachment_id).collect()
    }

    /// Where `vm` sees domain `id`.
    fn vm_dir(&self, vm: &str, id: &str) -> PathBuf {
        self.vm_root.join(vm).join(id)
    }

    async fn stop(self) {
        self.server.stop().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Arc::strong_count(&self.agent) > 1 {
            assert!(Instant::now() < deadline, "the agent service is still referenced after the server stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let agent = self.agent;
        tokio::task::spawn_blocking(move || agent.shutdown()).await.unwrap();
        drop(self.swtpm);
    }
}

/// A lab whose TTP trusts compute-1's PCRs, compute-1 enrolled and registered with the CP,
/// vm-a, vm-b and vm-c placed on it.
async fn lab_with_compute_1() -> (Lab, Compute) {
    prerequisites::require(Need::USERSPACE_HOST);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::create(&root.join("pki"));
    let (ttp_listener, ttp_url) = bind().await;

    println!("compute-1: swtpm and the secure component agent");
    let ek_ca = root.join("tpm-vendor-ca");
    let swtpm = Swtpm::start_with_ca(&root.join("compute-1").join("swtpm"), &ek_ca).unwrap();
    let sc_tls = pki.issue(Role::SecureComponent, "compute-1");
    let sc_config = AgentConfig {
        listen: "127.0.0.1:0".into(),
        host_id: None,
        tcti: swtpm.tcti(),
        state_dir: root.join("compute-1").join("sc"),
        vm_root: root.join("compute-1").join("vms"),
        backend: BackendChoice::Auto,
        hypervisor: HypervisorChoice::Local,
        libvirt: LibvirtConfig::default(),
        qemu: Default::default(),
        launch: None,
        rotation: Default::default(),
        ttp_url,
        ca: sc_tls.ca.clone(),
        crl: sc_tls.crl.clone(),
        cert: sc_tls.cert.clone(),
        key: sc_tls.key.clone(),
        pcr_selection: Default::default(),
        region: None,
        volume_root: None,
        limits: Default::default(),
        partners: Vec::new(),
    };
    let (agent, agent_tls) = service::build(&sc_config).unwrap();
    let server = Compute::serve(agent.clone(), agent_tls.clone()).await;

    println!("TTP: attestation policy with compute-1's PCRs; compute-1 enrolls");
    let selection = sc_config.pcr_selection.clone();
    let pcr_values = agent.attested_host().tpm.run(move |tpm| tpm.read_pcrs(&selection)).await.unwrap();
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![ttp::attestation::ReferenceState {
            name: "compute-v1".into(),
            selection: sc_config.pcr_selection.clone(),
            pcr_values,
        }],
    };
    let lab = Lab::start_in(dir, pki, &policy, ttp_listener).await;
    agent.enroll().await.expect("compute-1 enrolls");

    println!("CP: the operator registers compute-1 and places vm-a, vm-b, vm-c on it");
    lab.place("compute-1", &server.url, &["vm-a", "vm-b", "vm-c"]).await;
    let compute = Compute { swtpm, agent, agent_tls, server, vm_root: sc_config.vm_root };
    (lab, compute)
}

/// dm-alice's domain (vm-a rw, vm-b ro) with a note vm-a wrote through a rw attachment it
/// then detached (ext4 is not a cluster file system: a ro mount sees what an unmounted rw
/// one wrote).
async fn domain_with_a_note(alice: &Manager, compute: &Compute) -> Descriptor {
    let d1 = alice.descriptor(&[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]);
    let id = alice.create_domain(&d1, 64 * MIB).await.unwrap().id;
    let a = alice.attach(&id, "vm-a", AccessMode::Rw).await.expect("vm-a attaches rw");
    std::fs::write(compute.vm_dir("vm-a", &id).join("note.txt"), b"from vm-a\n").unwrap();
    let _: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    d1
}

fn status_of(list: &[Attachment], attachment_id: &str) -> AttachmentStatus {
    list.iter().find(|x| x.id == attachment_id).map(|x| x.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_forwarded_to_the_instances_host_and_detach_is_idempotent() {
    let (lab, compute) = lab_with_compute_1().await;
    let alice = lab.manager("dm-alice");
    let d1 = alice.descriptor(&[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]);
    let id = alice.create_domain(&d1, 64 * MIB).await.unwrap().id;
    let a = alice.attach(&id, "vm-a", AccessMode::Rw).await.expect("vm-a attaches rw");
    println!("  {a:?}");
    assert_eq!(
        (a.status, a.host.as_str(), a.version, a.mode),
        (AttachmentStatus::Attached, "compute-1", 1, AccessMode::Rw)
    );
    assert_eq!(PathBuf::from(&a.mount_path), compute.vm_dir("vm-a", &id));
    assert_eq!(alice.get(&id).await.unwrap().status, "in-use");
    let (status, code, _) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (409, "already_attached"));

    println!("detach vm-a through the CP, twice");
    let detached: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    assert_eq!(detached.status, AttachmentStatus::Detached);
    assert!(compute.attachment_ids(&lab).await.is_empty());
    let again: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    assert_eq!(again.status, AttachmentStatus::Detached, "detaching twice answers the detached attachment");
    assert_eq!(alice.get(&id).await.unwrap().status, "available");
    assert_eq!(leftovers(lab.root()), Vec::<String>::new(), "no mount or loop device left");
    compute.stop().await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_or_only_readers_and_the_ttp_checks_the_access_list() {
    let (lab, compute) = lab_with_compute_1().await;
    let alice = lab.manager("dm-alice");
    let id = domain_with_a_note(&alice, &compute).await.domain_id;
    println!("vm-b attaches ro and reads the note; vm-a rw beside it is refused (single writer)");
    let b = alice.attach(&id, "vm-b", AccessMode::Ro).await.expect("vm-b attaches ro");
    assert_eq!(std::fs::read(compute.vm_dir("vm-b", &id).join("note.txt")).unwrap(), b"from vm-a\n");
    let (status, code, message) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (409, "single_writer"), "{message}");
    assert!(message.contains(&b.id), "the refusal names the attachment to detach: {message}");
    let a = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro beside vm-b");
    println!("vm-c (not in the access list) is refused by the TTP");
    let (status, code, message) = refusal(alice.attach(&id, "vm-c", AccessMode::Ro).await);
    assert_eq!((status, code.as_str()), (403, "vm_not_in_acl"));
    assert!(message.contains("vm-c"), "{message}");
    assert_eq!(lab.ttp_service.store().audit_records(Some(&id)).unwrap().last().unwrap().outcome, "vm_not_in_acl");
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    assert_eq!(compute.attachment_ids(&lab).await, expected);
    compute.stop().await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_vm_or_narrowing_its_mode_detaches_it_on_its_host() {
    let (lab, compute) = lab_with_compute_1().await;
    let alice = lab.manager("dm-alice");
    let d1 = domain_with_a_note(&alice, &compute).await;
    let id = d1.domain_id.clone();
    let a = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro");
    let b = alice.attach(&id, "vm-b", AccessMode::Ro).await.expect("vm-b attaches ro");

    println!("revoke: version 2 removes vm-b; the CP detaches vm-b on compute-1");
    let d2 = d1.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
    alice.update(&d2).await.expect("revoke vm-b");
    let list = alice.attachments(&id).await;
    assert_eq!(
        (status_of(&list, &a.id), status_of(&list, &b.id)),
        (AttachmentStatus::Attached, AttachmentStatus::Detached)
    );
    assert_eq!(compute.attachment_ids(&lab).await, vec![a.id.clone()]);
    assert!(!compute.vm_dir("vm-b", &id).join("note.txt").exists(), "vm-b's mount is gone");
    let (status, code, _) = refusal(alice.attach(&id, "vm-b", AccessMode::Ro).await);
    assert_eq!((status, code.as_str()), (403, "vm_not_in_acl"));

    println!("vm-a goes from ro to rw (detach, attach rw: alone now)");
    let _: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    let a = alice.attach(&id, "vm-a", AccessMode::Rw).await.expect("vm-a attaches rw alone");
    assert_eq!(compute.attachment_ids(&lab).await, vec![a.id.clone()]);

    println!("narrow: version 3 makes vm-a ro; its rw attachment is detached, a ro one works");
    let d3 = d2.next_version(|d| d.acl = vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Ro }]).unwrap();
    alice.update(&d3).await.expect("narrow vm-a");
    assert_eq!(status_of(&alice.attachments(&id).await, &a.id), AttachmentStatus::Detached);
    assert!(compute.attachment_ids(&lab).await.is_empty());
    let (status, code, _) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (403, "mode_not_permitted"));
    let a2 = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro");
    assert_eq!((a2.version, a2.mode), (3, AccessMode::Ro));
    assert_eq!(std::fs::read(compute.vm_dir("vm-a", &id).join("note.txt")).unwrap(), b"from vm-a\n");
    compute.stop().await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_while_the_host_is_down_leaves_the_attachment_detaching_until_retried() {
    let (lab, mut compute) = lab_with_compute_1().await;
    let alice = lab.manager("dm-alice");
    let id = domain_with_a_note(&alice, &compute).await.domain_id;
    let a = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro");

    println!("compute-1's agent stops answering; deleting the domain still crypto-shreds it and leaves vm-a detaching");
    let stopped = std::mem::replace(&mut compute.server, Server::stopped());
    stopped.stop().await;
    let deleted = alice.delete(&id, &alice.deletion(&id)).await.expect("delete while the host is down");
    assert_eq!(deleted.status, "deleted");
    assert!(!lab.volume(&id).exists());
    assert_eq!(status_of(&alice.attachments(&id).await, &a.id), AttachmentStatus::Detaching);
    let (status, code, message) =
        refusal(alice.cp.delete_json::<Attachment>(&format!("/v1/attachments/{}", a.id)).await);
    assert_eq!((status, code.as_str()), (502, "host_unreachable"));
    assert!(message.contains("compute-1"), "{message}");

    println!("the agent is back on another port; the operator updates the host; the detach is retried");
    compute.server = Compute::serve(compute.agent.clone(), compute.agent_tls.clone()).await;
    lab.operator()
        .post_json::<_, ComputeHost>(
            "/v1/hosts",
            &ComputeHost { id: "compute-1".into(), agent_url: compute.server.url.clone() },
        )
        .await
        .unwrap();
    assert_eq!(compute.attachment_ids(&lab).await, vec![a.id.clone()], "the mapping outlived the deletion until now");
    let d: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.expect("the retried detach");
    assert_eq!(d.status, AttachmentStatus::Detached);
    assert!(compute.attachment_ids(&lab).await.is_empty());
    assert_eq!(leftovers(lab.root()), Vec::<String>::new(), "no mount or loop device left");
    compute.stop().await;
    lab.stop().await;
}
