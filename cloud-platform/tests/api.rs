//! The cloud platform API end to end, with real parties on loopback: a cloud CA, a TTP over
//! mutual TLS with SQLite, the cloud platform itself (`cloud_platform::build` + `serve`), and
//! for the attach test a compute host with its own swtpm running the secure component agent.
//!
//! Proves: create registers version 1 with the TTP and writes a sparse volume whose header
//! decodes; list is paginated and shows only the caller's domains; an update lands in the
//! other header slot while the old slot stays valid, and a torn write leaves the old header
//! in force; only the owner creates, changes and deletes (the CP refuses others by their
//! TLS identity); the TTP's refusals come back with the TTP's code; delete zeroes the header
//! area, removes the file and the TTP refuses the domain afterwards; hosts and instances
//! register; attach is forwarded to the instance's host (an unreachable host is named);
//! revoking a VM or narrowing its mode detaches it on its host.

use secure_component::prerequisites::{self, Need};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::Method;
use cloud_platform::CpConfig;
use net::{Role, TlsFiles};
use protocol::cloud::{
    AgentAttachmentList, Attachment, AttachmentList, ComputeHost, CreateAttachmentRequest, CreateDomainRequest,
    DeleteDomainBody, DomainList, DomainView, Instance, InstanceList, UpdateDomainRequest,
};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format::{self, SlotError, DATA_OFFSET, HEADER_AREA_SIZE, SLOT_SIZE};
use protocol::messages::{
    Deletion, HeaderRecord, MountGrant, RegisterDomainRequest, RegisterDomainResponse, Registration,
};
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use skydd_ca::{CertificateAuthority, Validity};
use tokio_util::sync::CancellationToken;
use ttp::attestation::AttestationPolicy;

const MIB: u64 = 1 << 20;

// ---- a small loopback lab ------------------------------------------------------------------

struct Pki {
    dir: PathBuf,
    ca_cert: String,
    ca_key: zeroize::Zeroizing<String>,
}

impl Pki {
    fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (ca_cert, ca_key) = CertificateAuthority::generate("skydd-test-ca").unwrap();
        std::fs::write(dir.join("ca.pem"), &ca_cert).unwrap();
        Self { dir: dir.to_path_buf(), ca_cert, ca_key }
    }

    fn issue(&self, role: Role, name: &str) -> TlsFiles {
        let issued = CertificateAuthority::issue(&self.ca_cert, &self.ca_key, role, name, Validity::Days(30)).unwrap();
        let files = TlsFiles::in_dir(&self.dir, name);
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        let mut key =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&files.key).unwrap();
        std::io::Write::write_all(&mut key, issued.key_pem.as_bytes()).unwrap();
        files
    }

    fn client(&self, name: &str, server_role: Role, url: &str) -> net::Client {
        net::Client::new(url, TlsFiles::in_dir(&self.dir, name).client_config(server_role).unwrap()).unwrap()
    }
}

struct Server {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    (listener, url)
}

async fn start_ttp(
    root: &Path,
    pki: &Pki,
    policy: &AttestationPolicy,
    listener: tokio::net::TcpListener,
) -> (Server, Arc<ttp::service::Ttp>) {
    let tls = pki.issue(Role::Ttp, "ttp-1");
    let data_dir = root.join("ttp-data");
    ttp::config::create_master_key(&data_dir).unwrap();
    let policy_path = root.join("attestation.toml");
    std::fs::write(&policy_path, toml::to_string(policy).unwrap()).unwrap();
    let config = ttp::config::TtpConfig {
        listen: "127.0.0.1:0".into(),
        data_dir,
        ca: tls.ca.clone(),
        crl: tls.crl.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        attestation: policy_path,
        registration_replicas: Vec::new(),
    };
    let (service, server_tls) = ttp::server::build(&config).unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let shutdown = CancellationToken::new();
    let (s, t) = (service.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        ttp::server::serve(listener, s, server_tls, t).await.unwrap();
    });
    (Server { url, shutdown, task }, service)
}

/// The cloud platform as `cloud-platform serve --config cp.toml` runs it, in this process.
async fn start_cp(root: &Path, pki: &Pki, ttp_url: &str) -> (Server, CpConfig) {
    let tls = pki.issue(Role::CloudPlatform, "cp-1");
    let config = CpConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: root.join("cp-data"),
        ca: tls.ca.clone(),
        crl: tls.crl.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        ttp_url: ttp_url.to_string(),
        max_volume_bytes: 1 << 40,
        reconcile_interval_secs: cloud_platform::config::DEFAULT_RECONCILE_INTERVAL_SECS,
        quota: Default::default(),
    };
    let config_path = root.join("cp.toml");
    std::fs::write(&config_path, config.to_toml().unwrap()).unwrap();
    let config = CpConfig::load(&config_path).unwrap();
    let (cp, server_tls) = cloud_platform::build(&config).unwrap();
    let (listener, url) = bind().await;
    let shutdown = CancellationToken::new();
    let t = shutdown.clone();
    let task = tokio::spawn(async move {
        cloud_platform::serve(listener, cp, server_tls, t).await.unwrap();
    });
    (Server { url, shutdown, task }, config)
}

/// A domain manager: signs with its certificate's key and calls the CP as itself.
struct Manager {
    name: String,
    key: SignatureKey,
    cp: net::Client,
}

impl Manager {
    fn create(pki: &Pki, name: &str, cp_url: &str) -> Self {
        let files = pki.issue(Role::DomainManager, name);
        let material = files.load().unwrap();
        let der = protocol::pki::certs_from_pem(&material.cert_pem, "certificate").unwrap()[0].to_vec();
        let key = SignatureKey::from_pem(&material.key_pem, der).unwrap();
        Self { name: name.to_string(), key, cp: pki.client(name, Role::CloudPlatform, cp_url) }
    }

    fn descriptor(&self, acl: &[(&str, AccessMode)]) -> Descriptor {
        let metadata = BTreeMap::from([("department".to_string(), "cardiology".to_string())]);
        let acl = acl.iter().map(|(vm, mode)| AclEntry { vm_id: vm.to_string(), mode: *mode }).collect();
        Descriptor::new(&self.name, metadata, acl).unwrap()
    }

    fn sign(&self, descriptor: &Descriptor) -> SignedEnvelope {
        self.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap())
    }

    fn grant(&self, domain_id: &str, vm_id: &str, mode: AccessMode) -> SignedEnvelope {
        let grant = MountGrant {
            domain_id: domain_id.into(),
            vm_id: vm_id.into(),
            mode,
            expires_at: cloud_platform::service::now_unix() + 300,
            nonce: rand::random(),
            issuer: self.name.clone(),
        };
        self.key.sign_envelope(SignatureContext::MountGrant, grant.encode())
    }

    fn deletion(&self, domain_id: &str) -> DeleteDomainBody {
        let deletion = Deletion { domain_id: domain_id.into(), requested_at: cloud_platform::service::now_unix() };
        DeleteDomainBody { deletion: self.key.sign_envelope(SignatureContext::Deletion, deletion.encode()) }
    }

    async fn create_domain(&self, descriptor: &Descriptor, size_bytes: u64) -> Result<DomainView, net::Error> {
        self.cp.post_json("/v1/domains", &CreateDomainRequest { descriptor: self.sign(descriptor), size_bytes }).await
    }

    async fn update(&self, descriptor: &Descriptor) -> Result<DomainView, net::Error> {
        let path = format!("/v1/domains/{}/descriptor", descriptor.domain_id);
        self.cp.put_json(&path, &UpdateDomainRequest { descriptor: self.sign(descriptor) }).await
    }

    async fn get(&self, domain_id: &str) -> Result<DomainView, net::Error> {
        self.cp.get_json(&format!("/v1/domains/{domain_id}")).await
    }

    async fn delete(&self, domain_id: &str, body: &DeleteDomainBody) -> Result<DomainView, net::Error> {
        self.cp.request_json(Method::DELETE, &format!("/v1/domains/{domain_id}"), Some(body)).await
    }

    async fn attach(&self, domain_id: &str, vm: &str, mode: AccessMode) -> Result<Attachment, net::Error> {
        let request = CreateAttachmentRequest {
            domain_id: domain_id.into(),
            instance_id: vm.into(),
            mode,
            grant: self.grant(domain_id, vm, mode),
        };
        self.cp.post_json("/v1/attachments", &request).await
    }

    async fn attachments(&self, domain_id: &str) -> Vec<Attachment> {
        let list: AttachmentList = self.cp.get_json(&format!("/v1/attachments?domain_id={domain_id}")).await.unwrap();
        list.attachments
    }
}

/// The refusal's HTTP status, code and message (printed: this is what a person reads).
fn refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> (u16, String, String) {
    match result {
        Err(net::Error::Api { status, code, message }) => {
            println!("  refused: HTTP {status} {code}: {message}");
            (status, code, message)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn header_area(path: &Path) -> Vec<u8> {
    let mut area = vec![0u8; HEADER_AREA_SIZE];
    std::fs::File::open(path).unwrap().read_exact_at(&mut area, 0).unwrap();
    area
}

fn registration_of(header: &HeaderRecord) -> Registration {
    Registration::decode(&header.registration.message).unwrap()
}

// ---- domains -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::create(&root.join("pki"));
    let (listener, ttp_url) = bind().await;
    let (ttp, ttp_service) = start_ttp(root, &pki, &AttestationPolicy::default(), listener).await;
    let (cp, config) = start_cp(root, &pki, &ttp.url).await;
    let alice = Manager::create(&pki, "dm-alice", &cp.url);
    let bob = Manager::create(&pki, "dm-bob", &cp.url);
    let mallory = Manager::create(&pki, "dm-mallory", &cp.url);
    let volumes = config.data_dir.join("volumes");

    println!("create: dm-alice creates a 64 MiB domain (vm-a rw, vm-b ro)");
    let d1 = alice.descriptor(&[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]);
    let id = d1.domain_id.clone();
    let v1 = alice.create_domain(&d1, 64 * MIB).await.expect("alice creates her domain");
    assert_eq!(
        (v1.id.as_str(), v1.owner.as_str(), v1.version, v1.status.as_str()),
        (id.as_str(), "dm-alice", 1, "available")
    );
    assert_eq!((v1.size_bytes, v1.acl.clone(), v1.metadata.clone()), (64 * MIB, d1.acl.clone(), d1.metadata.clone()));
    assert_eq!(v1.header.descriptor.message, d1.encode().unwrap(), "the header holds the descriptor alice signed");
    let reg1 = registration_of(&v1.header);
    assert_eq!((reg1.domain_id.as_str(), reg1.version), (id.as_str(), 1));
    v1.header.registration.verify_signature(SignatureContext::Registration).expect("the TTP signed the registration");

    println!("  the volume file: sized, sparse, header in slot 0 with sequence 1");
    let path = volumes.join(format!("{id}.vol"));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), DATA_OFFSET + 64 * MIB);
    println!("  {} bytes long, {} bytes allocated", meta.len(), meta.blocks() * 512);
    assert!(meta.blocks() * 512 <= DATA_OFFSET, "only the header is allocated: {} bytes", meta.blocks() * 512);
    let active = format::decode_header_area(&header_area(&path)).unwrap();
    assert_eq!((active.slot, active.seq, active.skipped.clone()), (0, 1, Some((1, SlotError::Empty))));
    assert_eq!(HeaderRecord::decode(&active.payload).unwrap(), v1.header, "the header on disk is the one answered");
    assert_eq!(alice.get(&id).await.unwrap(), v1);

    println!("refusal: sizes that are not a positive multiple of 4096, or beyond the limit");
    for size in [0, 10_000, 2 << 40] {
        let (status, code, message) = refusal(alice.create_domain(&alice.descriptor(&[]), size).await);
        assert_eq!((status, code.as_str()), (400, "invalid_size"), "{message}");
    }

    println!("refusal: dm-mallory submits a descriptor dm-alice signed (a replay): only the owner creates");
    let stolen = alice.descriptor(&[("vm-m", AccessMode::Rw)]);
    let (status, code, message) = refusal(
        mallory
            .cp
            .post_json::<_, DomainView>(
                "/v1/domains",
                &CreateDomainRequest { descriptor: alice.sign(&stolen), size_bytes: MIB },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    assert!(message.contains("dm-alice") && message.contains("dm-mallory"), "{message}");
    assert!(ttp_service.store().domain(&stolen.domain_id).unwrap().is_none(), "the TTP never saw it");
    assert!(!volumes.join(format!("{}.vol", stolen.domain_id)).exists());

    println!("list: pages of 2 over dm-alice's 3 domains; dm-bob sees none");
    let mut ids = vec![id.clone()];
    for _ in 0..2 {
        let d = alice.descriptor(&[("vm-a", AccessMode::Rw)]);
        ids.push(alice.create_domain(&d, 4096).await.unwrap().id);
    }
    ids.sort();
    let page1: DomainList = alice.cp.get_json("/v1/domains?limit=2").await.unwrap();
    assert_eq!(page1.domains.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(page1.next_marker.as_deref(), Some(ids[1].as_str()));
    let page2: DomainList = alice.cp.get_json(&format!("/v1/domains?limit=2&marker={}", ids[1])).await.unwrap();
    assert_eq!(page2.domains.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids[2..]);
    assert_eq!(page2.next_marker, None);
    let bobs: DomainList = bob.cp.get_json("/v1/domains").await.unwrap();
    assert!(bobs.domains.is_empty());
    let (status, code, _) = refusal(mallory.get(&id).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.get_json::<DomainList>("/v1/domains?limit=0").await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));

    println!("update: version 2 grants vm-c ro and shares with dm-bob; the header goes to slot 1");
    let d2 = d1
        .next_version(|d| {
            d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Ro });
            d.shared_with.push("dm-bob".into());
        })
        .unwrap();
    let v2 = alice.update(&d2).await.expect("the owner updates");
    assert_eq!((v2.version, v2.shared_with.clone()), (2, vec!["dm-bob".to_string()]));
    assert_eq!(v2.acl.len(), 3);
    let reg2 = registration_of(&v2.header);
    assert_eq!((reg2.version, reg2.nonce_r), (2, reg1.nonce_r), "the TTP carried r over");
    let area = header_area(&path);
    let active = format::decode_header_area(&area).unwrap();
    assert_eq!((active.slot, active.seq, active.skipped.clone()), (1, 2, None));
    assert_eq!(HeaderRecord::decode(&active.payload).unwrap(), v2.header);
    let old = format::decode_slot(&area[..SLOT_SIZE]).expect("the old slot is still valid");
    assert_eq!((old.seq, HeaderRecord::decode(&old.payload).unwrap()), (1, v1.header.clone()));
    let bobs: DomainList = bob.cp.get_json("/v1/domains").await.unwrap();
    assert_eq!(bobs.domains.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [id.as_str()], "shared with dm-bob now");
    assert_eq!(bob.get(&id).await.unwrap().version, 2);

    println!("refusal: dm-bob (shared, not the owner) tries version 3");
    let d3_by_bob = d2.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-a")).unwrap();
    let (status, code, message) = refusal(bob.update(&d3_by_bob).await);
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    assert!(message.contains("only the owner dm-alice"), "{message}");

    println!("refusal by the TTP, passed through: dm-alice sends version 2 again");
    let (status, code, message) = refusal(alice.update(&d2).await);
    assert_eq!((status, code.as_str()), (409, "version_rollback"), "{message}");
    assert_eq!(alice.get(&id).await.unwrap().version, 2, "nothing changed");

    println!("torn write: the newer slot (1) is damaged; the older slot (0) is read");
    {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut saved = vec![0u8; 4096];
        file.read_exact_at(&mut saved, SLOT_SIZE as u64).unwrap();
        file.write_all_at(&[0xa5; 100], SLOT_SIZE as u64 + 200).unwrap();
        let active = format::decode_header_area(&header_area(&path)).unwrap();
        assert_eq!((active.slot, active.seq), (0, 1));
        assert!(matches!(active.skipped, Some((1, SlotError::ChecksumMismatch { .. }))), "{:?}", active.skipped);
        let seen = alice.get(&id).await.unwrap();
        assert_eq!((seen.version, seen.header.clone()), (1, v1.header.clone()), "the CP reads the header in force");
        file.write_all_at(&saved, SLOT_SIZE as u64).unwrap();
        assert_eq!(alice.get(&id).await.unwrap().version, 2);
    }

    println!("delete: dm-bob may not; a deletion for another domain is refused; dm-alice deletes");
    let (status, code, _) = refusal(bob.delete(&id, &bob.deletion(&id)).await);
    assert_eq!((status, code.as_str()), (403, "owner_mismatch"));
    let (status, code, _) =
        refusal(alice.delete(&id, &alice.deletion(&ids.iter().find(|x| **x != id).unwrap().clone())).await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    let held = std::fs::File::open(&path).unwrap();
    let deleted = alice.delete(&id, &alice.deletion(&id)).await.expect("the owner deletes");
    assert_eq!((deleted.status.as_str(), deleted.version), ("deleted", 2));
    assert!(!path.exists(), "the volume file is removed");
    let mut area = vec![0xffu8; HEADER_AREA_SIZE];
    held.read_exact_at(&mut area, 0).unwrap();
    assert!(area.iter().all(|&b| b == 0), "both header slots were overwritten with zeros before the file was removed");
    let (status, code, message) = refusal(alice.get(&id).await);
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    assert!(message.contains(&id), "{message}");
    let (status, code, _) = refusal(alice.delete(&id, &alice.deletion(&id)).await);
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    let left: DomainList = alice.cp.get_json("/v1/domains").await.unwrap();
    assert_eq!(left.domains.len(), 2);

    println!("the TTP refuses the deleted domain: a newer version with the last registration");
    let cp_at_ttp = pki.client("cp-1", Role::Ttp, &ttp.url);
    let d3 = d2.next_version(|_| {}).unwrap();
    let (status, code, _) = refusal(
        cp_at_ttp
            .post_json::<_, RegisterDomainResponse>(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: alice.sign(&d3),
                    previous_registration: Some(v2.header.registration.clone()),
                },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (410, "domain_deleted"));
    assert_eq!(ttp_url, ttp.url);

    cp.stop().await;
    ttp.stop().await;
}

// ---- hosts, instances, an unreachable host --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_instances_and_an_unreachable_host() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::create(&root.join("pki"));
    let (listener, _) = bind().await;
    let (ttp, _) = start_ttp(root, &pki, &AttestationPolicy::default(), listener).await;
    let (cp, _) = start_cp(root, &pki, &ttp.url).await;
    let alice = Manager::create(&pki, "dm-alice", &cp.url);
    let mallory = Manager::create(&pki, "dm-mallory", &cp.url);
    pki.issue(Role::CloudPlatform, "cp-operator");
    let operator = pki.client("cp-operator", Role::CloudPlatform, &cp.url);

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent_url = format!("https://127.0.0.1:{closed}");

    println!("hosts: only the operator (cloud-platform role) registers a compute host");
    let host = ComputeHost { id: "compute-1".into(), agent_url: agent_url.clone() };
    let (status, code, _) = refusal(alice.cp.post_json::<_, ComputeHost>("/v1/hosts", &host).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(
        operator
            .post_json::<_, ComputeHost>(
                "/v1/hosts",
                &ComputeHost { id: "compute-2".into(), agent_url: "http://x".into() },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert_eq!(operator.post_json::<_, ComputeHost>("/v1/hosts", &host).await.unwrap(), host);
    let hosts: serde_json::Value = operator.get_json("/v1/hosts").await.unwrap();
    assert_eq!(hosts["hosts"][0]["id"], "compute-1");
    // The topology is the operator's: a tenant sees neither hosts nor instances.
    let (status, code, _) = refusal(alice.cp.get_json::<serde_json::Value>("/v1/hosts").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.get_json::<serde_json::Value>("/v1/instances").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));

    println!("instances: placed by the operator only, on a registered host only; listed in pages");
    let (status, code, _) = refusal(
        operator
            .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "nowhere".into() })
            .await,
    );
    assert_eq!((status, code.as_str()), (404, "host_unknown"));
    // A tenant cannot place (or move) a VM, its own or another's.
    let (status, code, _) = refusal(
        alice
            .cp
            .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "compute-1".into() })
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let i = Instance { id: vm.into(), host: "compute-1".into() };
        assert_eq!(operator.post_json::<_, Instance>("/v1/instances", &i).await.unwrap(), i);
    }
    let page: InstanceList = operator.get_json("/v1/instances?limit=2").await.unwrap();
    assert_eq!(page.instances.len(), 2);
    assert_eq!(page.next_marker.as_deref(), Some("vm-b"));
    let page: InstanceList = operator.get_json("/v1/instances?limit=2&marker=vm-b").await.unwrap();
    assert_eq!((page.instances[0].id.as_str(), page.next_marker), ("vm-c", None));

    println!("attach: the instance's host does not answer; the refusal names it");
    let d = alice.descriptor(&[("vm-a", AccessMode::Rw)]);
    let id = alice.create_domain(&d, MIB).await.unwrap().id;
    let (status, code, message) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (502, "host_unreachable"));
    assert!(message.contains("compute-1") && message.contains(&agent_url), "{message}");
    assert!(alice.attachments(&id).await.is_empty(), "nothing recorded");
    let (status, code, _) = refusal(alice.attach(&id, "vm-zz", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (404, "instance_unknown"));
    let (status, code, _) = refusal(mallory.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.delete_json::<Attachment>("/v1/attachments/0123").await);
    assert_eq!((status, code.as_str()), (404, "attachment_unknown"));
    assert_eq!(alice.get(&id).await.unwrap().status, "available");

    cp.stop().await;
    ttp.stop().await;
}

// ---- attach through a real secure component ------------------------------------------------------

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

async fn stop_agent(service: Arc<secure_component::service::AttachmentService>, server: Server) {
    server.stop().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Arc::strong_count(&service) > 1 {
        assert!(Instant::now() < deadline, "the agent service is still referenced after the server stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(move || service.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_revoke_through_the_secure_component() {
    use secure_component::config::{AgentConfig, BackendChoice, HypervisorChoice, LibvirtConfig};
    use secure_component::service;

    prerequisites::require(Need::USERSPACE_HOST);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::create(&root.join("pki"));
    let (ttp_listener, ttp_url) = bind().await;

    println!("compute-1: swtpm and the secure component agent");
    let ek_ca = root.join("tpm-vendor-ca");
    let swtpm = secure_component::swtpm::Swtpm::start_with_ca(&root.join("compute-1").join("swtpm"), &ek_ca).unwrap();
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
        ttp_url: ttp_url.clone(),
        ca: sc_tls.ca.clone(),
        crl: sc_tls.crl.clone(),
        cert: sc_tls.cert.clone(),
        key: sc_tls.key.clone(),
        pcr_selection: Default::default(),
        volume_root: None,
    };
    let (agent, agent_tls) = service::build(&sc_config).unwrap();
    let serve_agent = |agent: Arc<service::AttachmentService>, tls: net::ServerTls| async move {
        let (listener, url) = bind().await;
        let shutdown = CancellationToken::new();
        let t = shutdown.clone();
        let task = tokio::spawn(async move {
            service::serve(listener, agent, tls, t).await.unwrap();
        });
        Server { url, shutdown, task }
    };
    let agent_server = serve_agent(agent.clone(), agent_tls.clone()).await;

    println!("TTP: attestation policy with compute-1's PCRs; compute-1 enrolls");
    let selection = sc_config.pcr_selection.clone();
    let pcr_values = agent.attested_host().tpm.run(move |tpm| tpm.read_pcrs(&selection)).await.unwrap();
    let policy = AttestationPolicy {
        trusted_ek_roots: secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![ttp::attestation::ReferenceState {
            name: "compute-v1".into(),
            selection: sc_config.pcr_selection.clone(),
            pcr_values,
        }],
    };
    let (ttp, ttp_service) = start_ttp(root, &pki, &policy, ttp_listener).await;
    agent.enroll().await.expect("compute-1 enrolls");

    println!("CP: the operator registers compute-1; dm-alice registers vm-a, vm-b, vm-c on it");
    let (cp, _) = start_cp(root, &pki, &ttp.url).await;
    pki.issue(Role::CloudPlatform, "cp-operator");
    let operator = pki.client("cp-operator", Role::CloudPlatform, &cp.url);
    operator
        .post_json::<_, ComputeHost>(
            "/v1/hosts",
            &ComputeHost { id: "compute-1".into(), agent_url: agent_server.url.clone() },
        )
        .await
        .unwrap();
    let alice = Manager::create(&pki, "dm-alice", &cp.url);
    for vm in ["vm-a", "vm-b", "vm-c"] {
        operator
            .post_json::<_, Instance>("/v1/instances", &Instance { id: vm.into(), host: "compute-1".into() })
            .await
            .unwrap();
    }
    let sc_list = || async {
        let list: AgentAttachmentList =
            pki.client("cp-1", Role::SecureComponent, &agent_server.url).get_json("/v1/attachments").await.unwrap();
        list.attachments.into_iter().map(|a| a.attachment_id).collect::<Vec<_>>()
    };

    println!("dm-alice creates a domain (vm-a rw, vm-b ro) and attaches vm-a rw");
    let d1 = alice.descriptor(&[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]);
    let id = alice.create_domain(&d1, 64 * MIB).await.unwrap().id;
    let vm_dir = |vm: &str| sc_config.vm_root.join(vm).join(&id);
    let a = alice.attach(&id, "vm-a", AccessMode::Rw).await.expect("vm-a attaches rw");
    println!("  {a:?}");
    assert_eq!((a.status.as_str(), a.host.as_str(), a.version, a.mode), ("attached", "compute-1", 1, AccessMode::Rw));
    assert_eq!(PathBuf::from(&a.mount_path), vm_dir("vm-a"));
    std::fs::write(vm_dir("vm-a").join("note.txt"), b"from vm-a\n").unwrap();
    assert_eq!(alice.get(&id).await.unwrap().status, "in-use");
    let (status, code, _) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (409, "already_attached"));

    println!("detach vm-a through the CP (ext4 is not a cluster file system: a ro mount sees what an unmounted rw one wrote)");
    let detached: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    assert_eq!(detached.status, "detached");
    assert!(sc_list().await.is_empty());
    let again: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    assert_eq!(again.status, "detached", "detaching twice answers the detached attachment");
    assert_eq!(alice.get(&id).await.unwrap().status, "available");

    println!("vm-b attaches ro and reads the note; vm-a rw beside it is refused (single writer); vm-c (not in the access list) is refused by the TTP");
    let b = alice.attach(&id, "vm-b", AccessMode::Ro).await.expect("vm-b attaches ro");
    assert_eq!(std::fs::read(vm_dir("vm-b").join("note.txt")).unwrap(), b"from vm-a\n");
    let (status, code, message) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (409, "single_writer"), "{message}");
    assert!(message.contains(&b.id), "the refusal names the attachment to detach: {message}");
    let a = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro beside vm-b");
    let (status, code, message) = refusal(alice.attach(&id, "vm-c", AccessMode::Ro).await);
    assert_eq!((status, code.as_str()), (403, "vm_not_in_acl"));
    assert!(message.contains("vm-c"), "{message}");
    assert_eq!(ttp_service.store().audit_records(Some(&id)).unwrap().last().unwrap().outcome, "vm_not_in_acl");
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    assert_eq!(sc_list().await, expected);

    println!("revoke: version 2 removes vm-b; the CP detaches vm-b on compute-1");
    let d2 = d1.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
    alice.update(&d2).await.expect("revoke vm-b");
    let status_of =
        |list: &[Attachment], att: &str| list.iter().find(|x| x.id == att).map(|x| x.status.clone()).unwrap();
    let list = alice.attachments(&id).await;
    assert_eq!((status_of(&list, &a.id).as_str(), status_of(&list, &b.id).as_str()), ("attached", "detached"));
    assert_eq!(sc_list().await, vec![a.id.clone()]);
    assert!(!vm_dir("vm-b").join("note.txt").exists(), "vm-b's mount is gone");
    let (status, code, _) = refusal(alice.attach(&id, "vm-b", AccessMode::Ro).await);
    assert_eq!((status, code.as_str()), (403, "vm_not_in_acl"));

    println!("vm-a goes from ro to rw (detach, attach rw: alone now)");
    let _: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a.id)).await.unwrap();
    let a = alice.attach(&id, "vm-a", AccessMode::Rw).await.expect("vm-a attaches rw alone");
    assert_eq!(sc_list().await, vec![a.id.clone()]);

    println!("narrow: version 3 makes vm-a ro; its rw attachment is detached, a ro one works");
    let d3 = d2.next_version(|d| d.acl = vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Ro }]).unwrap();
    alice.update(&d3).await.expect("narrow vm-a");
    assert_eq!(alice.attachments(&id).await.iter().find(|x| x.id == a.id).unwrap().status, "detached");
    assert!(sc_list().await.is_empty());
    let (status, code, _) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (403, "mode_not_permitted"));
    let a2 = alice.attach(&id, "vm-a", AccessMode::Ro).await.expect("vm-a attaches ro");
    assert_eq!((a2.version, a2.mode), (3, AccessMode::Ro));
    assert_eq!(std::fs::read(vm_dir("vm-a").join("note.txt")).unwrap(), b"from vm-a\n");

    println!("compute-1's agent stops answering; deleting the domain still crypto-shreds it and leaves vm-a detaching");
    agent_server.stop().await;
    let deleted = alice.delete(&id, &alice.deletion(&id)).await.expect("delete while the host is down");
    assert_eq!(deleted.status, "deleted");
    assert!(!root.join("cp-data").join("volumes").join(format!("{id}.vol")).exists());
    assert_eq!(status_of(&alice.attachments(&id).await, &a2.id), "detaching");
    let (status, code, message) =
        refusal(alice.cp.delete_json::<Attachment>(&format!("/v1/attachments/{}", a2.id)).await);
    assert_eq!((status, code.as_str()), (502, "host_unreachable"));
    assert!(message.contains("compute-1"), "{message}");

    println!("the agent is back on another port; the operator updates the host; the detach is retried");
    let agent_server = serve_agent(agent.clone(), agent_tls.clone()).await;
    operator
        .post_json::<_, ComputeHost>(
            "/v1/hosts",
            &ComputeHost { id: "compute-1".into(), agent_url: agent_server.url.clone() },
        )
        .await
        .unwrap();
    let sc_list = || async {
        let list: AgentAttachmentList =
            pki.client("cp-1", Role::SecureComponent, &agent_server.url).get_json("/v1/attachments").await.unwrap();
        list.attachments.into_iter().map(|a| a.attachment_id).collect::<Vec<_>>()
    };
    assert_eq!(sc_list().await, vec![a2.id.clone()], "the mapping outlived the deletion until now");
    let d: Attachment = alice.cp.delete_json(&format!("/v1/attachments/{}", a2.id)).await.expect("the retried detach");
    assert_eq!(d.status, "detached");
    assert!(sc_list().await.is_empty());
    assert_eq!(leftovers(root), Vec::<String>::new(), "no mount or loop device left");

    cp.stop().await;
    stop_agent(agent, agent_server).await;
    ttp.stop().await;
    drop(swtpm);
}
