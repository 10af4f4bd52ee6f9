//! The loopback lab these tests share: a cloud CA, a TTP over mutual TLS with SQLite and the
//! cloud platform itself (`cloud_platform::build` + `serve`), each test with its own (they
//! start in milliseconds), and a domain manager that signs as itself.
//!
//! The root crate's `skydd::lab` provides the same parties, but `skydd` depends on
//! `cloud-platform`, so this crate cannot dev-depend on it without a cycle.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::Method;
use cloud_platform::CpConfig;
use net::{Role, TlsFiles};
use protocol::cloud::{
    Attachment, AttachmentList, ComputeHost, CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody,
    DomainView, Instance, UpdateDomainRequest,
};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format::HEADER_AREA_SIZE;
use protocol::messages::{Deletion, HeaderRecord, MountGrant, Registration};
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use skydd_ca::{CertificateAuthority, Validity};
use tokio_util::sync::CancellationToken;
use ttp::attestation::AttestationPolicy;

pub const MIB: u64 = 1 << 20;

pub struct Pki {
    dir: PathBuf,
    ca_cert: String,
    ca_key: zeroize::Zeroizing<String>,
}

impl Pki {
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (ca_cert, ca_key) = CertificateAuthority::generate("skydd-test-ca").unwrap();
        std::fs::write(dir.join("ca.pem"), &ca_cert).unwrap();
        Self { dir: dir.to_path_buf(), ca_cert, ca_key }
    }

    pub fn issue(&self, role: Role, name: &str) -> TlsFiles {
        let issued = CertificateAuthority::issue(&self.ca_cert, &self.ca_key, role, name, Validity::Days(30)).unwrap();
        let files = TlsFiles::in_dir(&self.dir, name);
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        let mut key =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&files.key).unwrap();
        std::io::Write::write_all(&mut key, issued.key_pem.as_bytes()).unwrap();
        files
    }

    pub fn client(&self, name: &str, server_role: Role, url: &str) -> net::Client {
        net::Client::new(url, TlsFiles::in_dir(&self.dir, name).client_config(server_role).unwrap()).unwrap()
    }
}

pub struct Server {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// A server that has already stopped (a placeholder for one being restarted).
    pub fn stopped() -> Self {
        Self { url: String::new(), shutdown: CancellationToken::new(), task: tokio::spawn(async {}) }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

pub async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    (listener, url)
}

pub async fn start_ttp(
    root: &Path,
    pki: &Pki,
    policy: &AttestationPolicy,
    listener: tokio::net::TcpListener,
) -> (Server, Arc<ttp::service::Ttp>) {
    let tls = pki.issue(Role::Ttp, "ttp-1");
    let data_dir = root.join("ttp-data");
    // No TPM: K_TTP exists as 2-of-3 custodians' shares, which start the TTP.
    let custodians = ttp::master_key::create_version(
        &data_dir,
        &Default::default(),
        ttp::master_key::Custodians { shares: 3, threshold: 2 },
    )
    .unwrap();
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
        limits: Default::default(),
        database_url: None,
        database_pool_size: 16,
        group_commit: true,
        master_key: Default::default(),
        trusted_launch: None,
    };
    let (service, server_tls) = ttp::server::build_with_shares(&config, &custodians.shares).unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let shutdown = CancellationToken::new();
    let (s, t) = (service.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        ttp::server::serve(listener, s, server_tls, t).await.unwrap();
    });
    (Server { url, shutdown, task }, service)
}

/// `SKYDD_CP_TEST_STORE=postgres`: each CP of these tests keeps its state in a fresh database
/// of the test binary's real PostgreSQL server (testkit's) instead of its SQLite file.
fn test_database_url() -> Option<String> {
    (std::env::var("SKYDD_CP_TEST_STORE").as_deref() == Ok("postgres"))
        .then(|| skydd_testkit::postgres::Postgres::shared().create_database())
}

/// The cloud platform as `cloud-platform serve --config cp.toml` runs it, in this process.
pub async fn start_cp(root: &Path, pki: &Pki, ttp_url: &str) -> (Server, CpConfig) {
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
        limits: Default::default(),
        database_url: test_database_url(),
        database_pool_size: 8,
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
pub struct Manager {
    name: String,
    key: SignatureKey,
    pub cp: net::Client,
}

impl Manager {
    pub fn create(pki: &Pki, name: &str, cp_url: &str) -> Self {
        let files = pki.issue(Role::DomainManager, name);
        let material = files.load().unwrap();
        let der = protocol::pki::certs_from_pem(&material.cert_pem, "certificate").unwrap()[0].to_vec();
        let key = SignatureKey::from_pem(&material.key_pem, der).unwrap();
        Self { name: name.to_string(), key, cp: pki.client(name, Role::CloudPlatform, cp_url) }
    }

    pub fn descriptor(&self, acl: &[(&str, AccessMode)]) -> Descriptor {
        let metadata = BTreeMap::from([("department".to_string(), "cardiology".to_string())]);
        let acl = acl.iter().map(|(vm, mode)| AclEntry { vm_id: vm.to_string(), mode: *mode }).collect();
        Descriptor::new(&self.name, metadata, acl).unwrap()
    }

    pub fn sign(&self, descriptor: &Descriptor) -> SignedEnvelope {
        self.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap())
    }

    pub fn grant(&self, domain_id: &str, vm_id: &str, mode: AccessMode) -> SignedEnvelope {
        let grant = MountGrant {
            domain_id: domain_id.into(),
            vm_id: vm_id.into(),
            mode,
            expires_at: cloud_platform::service::now_unix() + 300,
            nonce: rand::random(),
            issuer: self.name.clone(),
            purpose: String::new(),
            reason: String::new(),
        };
        self.key.sign_envelope(SignatureContext::MountGrant, grant.encode())
    }

    pub fn deletion(&self, domain_id: &str) -> DeleteDomainBody {
        let deletion = Deletion { domain_id: domain_id.into(), requested_at: cloud_platform::service::now_unix() };
        DeleteDomainBody { deletion: self.key.sign_envelope(SignatureContext::Deletion, deletion.encode()) }
    }

    pub async fn create_domain(&self, descriptor: &Descriptor, size_bytes: u64) -> Result<DomainView, net::Error> {
        self.cp.post_json("/v1/domains", &CreateDomainRequest { descriptor: self.sign(descriptor), size_bytes }).await
    }

    pub async fn update(&self, descriptor: &Descriptor) -> Result<DomainView, net::Error> {
        let path = format!("/v1/domains/{}/descriptor", descriptor.domain_id);
        self.cp.put_json(&path, &UpdateDomainRequest { descriptor: self.sign(descriptor) }).await
    }

    pub async fn get(&self, domain_id: &str) -> Result<DomainView, net::Error> {
        self.cp.get_json(&format!("/v1/domains/{domain_id}")).await
    }

    pub async fn delete(&self, domain_id: &str, body: &DeleteDomainBody) -> Result<DomainView, net::Error> {
        self.cp.request_json(Method::DELETE, &format!("/v1/domains/{domain_id}"), Some(body)).await
    }

    pub async fn attach(&self, domain_id: &str, vm: &str, mode: AccessMode) -> Result<Attachment, net::Error> {
        let request = CreateAttachmentRequest {
            domain_id: domain_id.into(),
            instance_id: vm.into(),
            mode,
            grant: self.grant(domain_id, vm, mode),
        };
        self.cp.post_json("/v1/attachments", &request).await
    }

    pub async fn attachments(&self, domain_id: &str) -> Vec<Attachment> {
        let list: AttachmentList = self.cp.get_json(&format!("/v1/attachments?domain_id={domain_id}")).await.unwrap();
        list.attachments
    }
}

/// The refusal's HTTP status, code and message (printed: this is what a person reads).
pub fn refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> (u16, String, String) {
    match result {
        Err(net::Error::Api { status, code, message }) => {
            println!("  refused: HTTP {status} {code}: {message}");
            (status, code, message)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub fn header_area(path: &Path) -> Vec<u8> {
    let mut area = vec![0u8; HEADER_AREA_SIZE];
    std::fs::File::open(path).unwrap().read_exact_at(&mut area, 0).unwrap();
    area
}

pub fn registration_of(header: &HeaderRecord) -> Registration {
    Registration::decode(&header.registration.message).unwrap()
}

/// One test's parties: its own directory, CA, TTP and cloud platform.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub ttp: Server,
    pub ttp_service: Arc<ttp::service::Ttp>,
    pub cp: Server,
    pub config: CpConfig,
}

impl Lab {
    /// A lab whose TTP trusts no compute host (enough for everything but a key release).
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki"));
        let (listener, _) = bind().await;
        Self::start_in(dir, pki, &AttestationPolicy::default(), listener).await
    }

    /// A lab in `dir` with `pki`, its TTP on `ttp_listener` with `policy` (for a secure
    /// component that needs the TTP's URL before the TTP can know its PCRs).
    pub async fn start_in(
        dir: tempfile::TempDir,
        pki: Pki,
        policy: &AttestationPolicy,
        ttp_listener: tokio::net::TcpListener,
    ) -> Self {
        let (ttp, ttp_service) = start_ttp(dir.path(), &pki, policy, ttp_listener).await;
        let (cp, config) = start_cp(dir.path(), &pki, &ttp.url).await;
        Self { dir, pki, ttp, ttp_service, cp, config }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A domain manager with a certificate of its own, calling this lab's CP.
    pub fn manager(&self, name: &str) -> Manager {
        Manager::create(&self.pki, name, &self.cp.url)
    }

    /// The operator (role cloud-platform) calling this lab's CP.
    pub fn operator(&self) -> net::Client {
        self.pki.issue(Role::CloudPlatform, "cp-operator");
        self.pki.client("cp-operator", Role::CloudPlatform, &self.cp.url)
    }

    /// The volume file of domain `id`.
    pub fn volume(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("volumes").join(format!("{id}.vol"))
    }

    /// Registers `host` at `agent_url` and places `vms` on it, as the operator.
    pub async fn place(&self, host: &str, agent_url: &str, vms: &[&str]) {
        let operator = self.operator();
        let host = ComputeHost { id: host.into(), agent_url: agent_url.into() };
        operator.post_json::<_, ComputeHost>("/v1/hosts", &host).await.unwrap();
        for vm in vms {
            let instance = Instance { id: vm.to_string(), host: host.id.clone() };
            operator.post_json::<_, Instance>("/v1/instances", &instance).await.unwrap();
        }
    }

    pub async fn stop(self) {
        self.cp.stop().await;
        self.ttp.stop().await;
    }
}
