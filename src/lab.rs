//! A loopback lab: a cloud CA with issued identities, a TTP serving mutual TLS on
//! 127.0.0.1, compute hosts each with its own swtpm, and domain managers that sign.
//! Everything is real (certificates, TLS, SQLite, TPMs); only the network is loopback.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use net::{Role, TlsFiles};
use protocol::attest::PcrSelection;
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::messages::{
    grant_digest, Deletion, HeaderRecord, KeyReleaseResponse, MountGrant, Placement, RegisterDomainRequest,
    RegisterDomainResponse,
};
use protocol::pki::RevocationReason;
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use secure_component::host::{AttestedHost, TpmWorker};
use secure_component::key_release::{KeyRequest, ObtainedKey};
use secure_component::swtpm::Swtpm;
use skydd_ca::{CertificateAuthority, Validity};
use tokio_util::sync::CancellationToken;
use ttp::attestation::{AttestationPolicy, ReferenceState};

/// The lab's cloud CA, made and revoked through `cloud-platform ca` (cloud_platform::ca):
/// `dir` holds ca.pem, ca-key.pem and the revocation list crl.pem, which every party of the
/// lab checks, and every party's certificate.
pub struct LabPki {
    /// The CA directory: ca.pem, ca-key.pem, crl.pem and every issued NAME.pem/NAME-key.pem.
    pub dir: PathBuf,
    ca_cert_pem: String,
    ca_key_pem: zeroize::Zeroizing<String>,
    /// Partner clouds' roots (with what each may issue) and revocation lists that parties
    /// issued from here trust besides this CA ([`LabPki::trust`]), and the roles of the parties
    /// that do (`None`: every party).
    partners: Vec<(net::TrustedRootFile, PathBuf, Option<Vec<Role>>)>,
}

impl LabPki {
    /// Makes a new lab CA (`skydd-lab-ca`) in `dir`, as `cloud-platform ca init` does.
    pub fn create(dir: &Path) -> Result<Self> {
        Self::create_named(dir, "skydd-lab-ca")
    }

    /// A lab CA named `ca_name` (a second cloud's, in federation tests).
    pub fn create_named(dir: &Path, ca_name: &str) -> Result<Self> {
        let paths = cloud_platform::ca::init(dir, ca_name)?;
        let ca_cert_pem = std::fs::read_to_string(&paths.cert)?;
        let ca_key_pem = zeroize::Zeroizing::new(std::fs::read_to_string(&paths.key)?);
        Ok(Self { dir: dir.to_path_buf(), ca_cert_pem, ca_key_pem, partners: Vec::new() })
    }

    /// Every party issued from here afterwards also trusts `partner`'s root, for `allow`
    /// only, and checks its revocation list (docs/PKI.md "Federation").
    pub fn trust(&mut self, partner: &LabPki, allow: Vec<protocol::pki::RoleAllowance>) {
        let root = net::TrustedRootFile::limited(partner.dir.join("ca.pem"), allow);
        self.partners.push((root, partner.dir.join(net::CRL_FILE), None));
    }

    /// As [`LabPki::trust`], but only the parties of the roles `parties` trust the partner's
    /// root (trust is per service: docs/PKI.md "Federation").
    pub fn trust_for(&mut self, parties: &[Role], partner: &LabPki, allow: Vec<protocol::pki::RoleAllowance>) {
        let root = net::TrustedRootFile::limited(partner.dir.join("ca.pem"), allow);
        self.partners.push((root, partner.dir.join(net::CRL_FILE), Some(parties.to_vec())));
    }

    /// The TLS files of `name` (issued earlier): this CA's and the partners' roots and lists
    /// that the party's role trusts.
    pub fn files(&self, name: &str) -> TlsFiles {
        let role = std::fs::read_to_string(self.dir.join(format!("{name}.pem")))
            .ok()
            .and_then(|pem| protocol::pki::single_cert_der(&pem, "certificate").ok())
            .and_then(|der| protocol::pki::identity_from_certificate(&der).ok())
            .map(|identity| identity.role);
        self.files_for(name, role)
    }

    fn files_for(&self, name: &str, role: Option<Role>) -> TlsFiles {
        let mut files = TlsFiles::in_dir(&self.dir, name);
        for (root, crl, parties) in &self.partners {
            let trusted = match (parties, role) {
                (Some(parties), Some(role)) => parties.contains(&role),
                _ => true,
            };
            if !trusted {
                continue;
            }
            files.ca.push(root.clone());
            if !files.crl.is_empty() {
                files.crl.push(crl.clone());
            }
        }
        files
    }

    /// The root certificate file (`ca.pem`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Revokes `name`'s certificate as `cloud-platform ca revoke` does: a new `crl.pem`
    /// (replaced atomically; servers pick it up within 2 s, the TTP on its next signed request).
    pub fn revoke(&self, name: &str, reason: RevocationReason) -> Result<()> {
        cloud_platform::ca::revoke(&self.dir, &self.dir.join(format!("{name}.pem")), reason)?;
        Ok(())
    }

    /// The CA certificate (PEM) every lab party trusts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// Issues `name` with `role` (valid now) and writes NAME.pem and NAME-key.pem (0600).
    pub fn issue(&self, role: Role, name: &str) -> Result<TlsFiles> {
        self.issue_with_validity(role, name, Validity::Days(30))
    }

    /// Issues `name` with `role` for an explicit `validity` (tests of expired and not-yet-valid
    /// certificates); writes the same files as [`LabPki::issue`].
    pub fn issue_with_validity(&self, role: Role, name: &str, validity: Validity) -> Result<TlsFiles> {
        let issued = CertificateAuthority::issue(&self.ca_cert_pem, &self.ca_key_pem, role, name, validity)?;
        self.write_issued(name, role, &issued)
    }

    /// Writes NAME.pem and NAME-key.pem (0600).
    fn write_issued(&self, name: &str, role: Role, issued: &skydd_ca::IssuedIdentity) -> Result<TlsFiles> {
        let files = self.files_for(name, Some(role));
        std::fs::write(&files.cert, &issued.cert_pem)?;
        write_private(&files.key, issued.key_pem.as_bytes())?;
        Ok(files)
    }

    /// Issues a domain-manager certificate for `name` acting for `affiliation` (its
    /// organisation and role there, docs/PKI.md "Affiliation"); writes the same files as
    /// [`LabPki::issue`].
    pub fn issue_affiliated(&self, name: &str, affiliation: &protocol::pki::Affiliation) -> Result<TlsFiles> {
        let issued = CertificateAuthority::issue_affiliated(
            &self.ca_cert_pem,
            &self.ca_key_pem,
            Role::DomainManager,
            name,
            Validity::Days(30),
            &[],
            Some(affiliation),
        )?;
        self.write_issued(name, Role::DomainManager, &issued)
    }

    /// An mTLS JSON client for `name` (issued earlier) talking to a server of `server_role`.
    pub fn client(&self, name: &str, server_role: Role, base_url: &str) -> Result<net::Client> {
        let tls = self.files(name).client_config(server_role)?;
        Ok(net::Client::new(base_url, tls)?)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    Ok(())
}

/// Prepares a TTP replica's data directory `to` from a running TTP's `from`: copies K_TTP's
/// version records (`master-key/`: fingerprints and split parameters, never the key), so the
/// replica starts from the custodians' shares.
pub fn copy_master_key_records(from: &Path, to: &Path) -> Result<()> {
    let (from, to) = (from.join(ttp::master_key::MASTER_KEY_DIR), to.join(ttp::master_key::MASTER_KEY_DIR));
    std::fs::create_dir_all(&to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(&from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copy {}", entry.path().display()))?;
    }
    Ok(())
}

/// A TTP served in this process on a loopback port, with its own swtpm holding K_TTP's
/// sealed copy; the custodians' shares (2 of 3) are kept in `custodians_dir`, outside the
/// data directory, as custodians would keep them away from the TTP host.
pub struct RunningTtp {
    /// `https://127.0.0.1:PORT`, the address the TTP listens on.
    pub url: String,
    /// The TTP's data directory (its store, audit log and master-key records); kept across
    /// an [`RunningTtp::outage`].
    pub data_dir: PathBuf,
    /// One file per custodian's share of each K_TTP version.
    pub custodians_dir: PathBuf,
    /// The TTP host's TPM (killed on drop); kept across an [`RunningTtp::outage`]. Always
    /// set but while an outage swaps it to the restarted TTP.
    tpm: Option<Swtpm>,
    /// How long the TTP's build took, K_TTP's unseal from the TPM included.
    pub build_time: std::time::Duration,
    /// The TTP itself, for tests that inspect its state directly.
    pub service: Arc<ttp::service::Ttp>,
    /// Its `[trusted_launch]` table, kept for a restart after an outage.
    trusted_launch: Option<ttp::config::TrustedLaunchConfig>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningTtp {
    /// Reserves the TTP's loopback port first, so hosts can be configured with its URL
    /// before the attestation policy (which needs the hosts' PCRs) exists.
    pub async fn bind() -> Result<(tokio::net::TcpListener, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        Ok((listener, url))
    }

    /// Starts a TTP named `ttp-1` on `listener` with `policy`, its data in `dir`: on a fresh
    /// `dir` a swtpm for the TTP host and `ttp init` (K_TTP sealed to it, split 2 of 3).
    pub async fn start(
        dir: &Path,
        pki: &LabPki,
        policy: &AttestationPolicy,
        listener: tokio::net::TcpListener,
    ) -> Result<Self> {
        let tpm = Swtpm::start(&dir.join("ttp-tpm"))?;
        Self::start_on(dir, pki, policy, listener, tpm, None).await
    }

    /// As [`RunningTtp::start`], releasing keys only to VMs launched from images on the
    /// allowlist of `trusted_launch` (docs/PROTOCOL.md "Trusted launch").
    pub async fn start_with_trusted_launch(
        dir: &Path,
        pki: &LabPki,
        policy: &AttestationPolicy,
        listener: tokio::net::TcpListener,
        trusted_launch: ttp::config::TrustedLaunchConfig,
    ) -> Result<Self> {
        let tpm = Swtpm::start(&dir.join("ttp-tpm"))?;
        Self::start_on(dir, pki, policy, listener, tpm, Some(trusted_launch)).await
    }

    /// The TTP host's TPM, e.g. for a test that changes its PCRs.
    pub fn tpm(&self) -> Option<&Swtpm> {
        self.tpm.as_ref()
    }

    /// The master-key configuration of the lab TTP on `tpm`: sealed to PCRs 0-7.
    pub fn master_key_config(tpm: &Swtpm) -> ttp::master_key::MasterKeyConfig {
        ttp::master_key::MasterKeyConfig { tpm_tcti: Some(tpm.tcti()), ..Default::default() }
    }

    /// K_TTP version `version`, combined from the custodians' shares: for tests that compute
    /// a domain key independently of the TTP.
    pub fn master_key_from_custodians(&self, version: u32) -> Result<protocol::secret::SecretBytes> {
        let shares: Vec<_> = ttp::master_key::read_share_dir(&self.custodians_dir)?
            .into_iter()
            .filter(|s| s.version == version)
            .collect();
        Ok(ttp::master_key::shares::combine(&shares)?)
    }

    async fn start_on(
        dir: &Path,
        pki: &LabPki,
        policy: &AttestationPolicy,
        listener: tokio::net::TcpListener,
        tpm: Swtpm,
        trusted_launch: Option<ttp::config::TrustedLaunchConfig>,
    ) -> Result<Self> {
        let tls = pki.issue(Role::Ttp, "ttp-1")?;
        let data_dir = dir.join("ttp-data");
        let custodians_dir = dir.join("ttp-custodians");
        let master_key = Self::master_key_config(&tpm);
        if ttp::master_key::records(&data_dir)?.is_empty() {
            let custodians = ttp::master_key::Custodians { shares: 3, threshold: 2 };
            let created = ttp::master_key::create_version(&data_dir, &master_key, custodians)?;
            ttp::master_key::write_share_files(&custodians_dir, &created.shares)?;
        }
        let policy_path = dir.join("attestation.toml");
        std::fs::write(&policy_path, toml::to_string(policy).context("encode attestation policy")?)?;
        let config = ttp::config::TtpConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.clone(),
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
            master_key,
            trusted_launch: trusted_launch.clone(),
        };
        let started = std::time::Instant::now();
        let (service, server_tls) = ttp::server::build(&config)?;
        let build_time = started.elapsed();
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let shutdown = CancellationToken::new();
        let serve_shutdown = shutdown.clone();
        let serve_service = service.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = ttp::server::serve(listener, serve_service, server_tls, serve_shutdown).await {
                tracing::error!(error = %e, "TTP stopped");
            }
        });
        Ok(Self { url, data_dir, custodians_dir, tpm: Some(tpm), build_time, service, trusted_launch, shutdown, task })
    }

    /// Stops the server and waits for it to finish (its TPM stops with it).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// A TTP outage as the other parties see it: the server stops (its data stays), `during`
    /// runs, then the TTP starts again on the same address from the same data directory.
    pub async fn outage<T>(
        &mut self,
        dir: &Path,
        pki: &LabPki,
        policy: &AttestationPolicy,
        during: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
        let outcome = during.await;
        let address = self.url.trim_start_matches("https://").to_string();
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("bind the TTP's address {address} again"))?;
        // The same TPM serves the restarted TTP.
        let tpm = match self.tpm.take() {
            Some(tpm) => tpm,
            None => Swtpm::start(&dir.join("ttp-tpm"))?,
        };
        let trusted_launch = self.trusted_launch.take();
        *self = Self::start_on(dir, pki, policy, listener, tpm, trusted_launch).await?;
        Ok(outcome)
    }
}

/// A compute host: its swtpm and its secure component's TTP-facing side (`host`).
pub struct LabHost {
    /// The secure component's TTP-facing side (enrollment, key release) for `host_id`.
    pub host: AttestedHost,
    /// Kept alive for the host's lifetime (killed on drop).
    pub swtpm: Swtpm,
}

impl LabHost {
    /// Starts a swtpm whose EK certificate is issued by the swtpm local CA in `ek_ca_dir`,
    /// and a secure component identity `host_id`.
    pub fn start(dir: &Path, pki: &LabPki, host_id: &str, ek_ca_dir: &Path, ttp_url: &str) -> Result<Self> {
        let swtpm = Swtpm::start_with_ca(&dir.join(host_id).join("swtpm"), ek_ca_dir)?;
        pki.issue(Role::SecureComponent, host_id)?;
        let tpm = TpmWorker::start(&swtpm.tcti(), dir.join(host_id).join("sc-state"))?;
        let ttp = pki.client(host_id, Role::Ttp, ttp_url)?;
        Ok(Self { host: AttestedHost { host_id: host_id.to_string(), tpm, ttp }, swtpm })
    }

    /// This host's current PCR values as a reference state named `name`.
    pub async fn reference_state(&self, name: &str, selection: &PcrSelection) -> Result<ReferenceState> {
        let selection_copy = selection.clone();
        let values = self.host.tpm.run(move |tpm| tpm.read_pcrs(&selection_copy)).await?;
        Ok(ReferenceState { name: name.to_string(), selection: selection.clone(), pcr_values: values })
    }
}

/// The reference state of a loopback host after a measured start-up with `measurement`,
/// computed without any host: [`PcrSelection::default_host`], PCRs 0-7 zero (swtpm runs no
/// firmware, so nothing extends them) and the measured-state PCR as
/// [`Measurement::pcr_value`](secure_component::measure::Measurement::pcr_value).
pub fn measured_reference_state(name: &str, measurement: &secure_component::measure::Measurement) -> ReferenceState {
    let selection = PcrSelection::default_host();
    let pcr_values = selection
        .normalized_indices()
        .into_iter()
        .map(|index| {
            let value = if index == secure_component::measure::MEASURED_STATE_PCR {
                measurement.pcr_value().to_vec()
            } else {
                vec![0u8; 32]
            };
            (index, value)
        })
        .collect();
    ReferenceState { name: name.to_string(), selection, pcr_values }
}

/// A loopback host's measured start-up, before its secure component runs: the SHA-256 of
/// `binary` and of `config` extended into the measured-state PCR of `swtpm`. Returns the
/// measurement.
pub fn measured_start_up(
    swtpm: &Swtpm,
    state_dir: &Path,
    binary: &Path,
    config: &[u8],
) -> Result<secure_component::measure::Measurement> {
    let measurement = secure_component::measure::Measurement::of(binary, config)?;
    let mut tpm = secure_component::tpm::HostTpm::open(&swtpm.tcti(), state_dir)?;
    secure_component::measure::extend(&mut tpm, &measurement)?;
    Ok(measurement)
}

/// The operator's placement authority (a cloud-platform certificate): signs where a VM runs,
/// as the cloud platform does for every attach.
pub struct Operator {
    /// The key of its certificate (role cloud-platform).
    pub key: SignatureKey,
}

impl Operator {
    /// Issues a cloud-platform certificate for `name` from the lab CA and loads its key.
    pub fn create(pki: &LabPki, name: &str) -> Result<Self> {
        Ok(Self { key: pki.issue(Role::CloudPlatform, name)?.load()?.signature_key()? })
    }

    /// The signing key of `name`, issued earlier (whatever its role: a test may make a
    /// tenant try to place).
    pub fn of(pki: &LabPki, name: &str) -> Result<Self> {
        Ok(Self { key: TlsFiles::in_dir(&pki.dir, name).load()?.signature_key()? })
    }

    /// The signed placement of `vm_id` on `host_id` for `grant`, made now.
    pub fn place(&self, vm_id: &str, host_id: &str, grant: &SignedEnvelope) -> SignedEnvelope {
        self.place_at(vm_id, host_id, grant, ttp::store::now_unix())
    }

    /// As [`Operator::place`], dated `placed_at` (unix seconds).
    pub fn place_at(&self, vm_id: &str, host_id: &str, grant: &SignedEnvelope, placed_at: u64) -> SignedEnvelope {
        let placement = Placement {
            vm_id: vm_id.to_string(),
            host_id: host_id.to_string(),
            grant_digest: grant_digest(grant),
            placed_at,
        };
        self.key.sign_envelope(SignatureContext::Placement, placement.encode())
    }

    /// The key of `header`'s domain for `vm_id` on `host`, placed there by this operator:
    /// the whole key release of a mount, as a cloud platform and secure component run it.
    pub async fn obtain_key(
        &self,
        host: &AttestedHost,
        header: &HeaderRecord,
        grant: &SignedEnvelope,
        vm_id: &str,
        mode: AccessMode,
    ) -> std::result::Result<ObtainedKey, secure_component::Error> {
        self.obtain_key_launched(host, header, grant, vm_id, mode, None).await
    }

    /// As [`Operator::obtain_key`] for a VM the host launched from `launched_image`
    /// (reported to the TTP and covered by the quote).
    pub async fn obtain_key_launched(
        &self,
        host: &AttestedHost,
        header: &HeaderRecord,
        grant: &SignedEnvelope,
        vm_id: &str,
        mode: AccessMode,
        launched_image: Option<&protocol::image::LaunchedImage>,
    ) -> std::result::Result<ObtainedKey, secure_component::Error> {
        let placement = self.place(vm_id, &host.host_id, grant);
        host.obtain_key(&KeyRequest { header, grant, placement: &placement, vm_id, mode, launched_image }).await
    }

    /// Steps 1-3 of [`Operator::obtain_key`]: the key release alone.
    pub async fn request_release(
        &self,
        host: &AttestedHost,
        header: &HeaderRecord,
        grant: &SignedEnvelope,
        vm_id: &str,
        mode: AccessMode,
    ) -> std::result::Result<KeyReleaseResponse, secure_component::Error> {
        let placement = self.place(vm_id, &host.host_id, grant);
        host.request_release(&KeyRequest { header, grant, placement: &placement, vm_id, mode, launched_image: None })
            .await
    }
}

/// A domain manager: signs descriptors, grants and deletions with its certificate's key.
pub struct DomainManager {
    /// The manager's name, the subject CN of its certificate.
    pub name: String,
    /// The key of its certificate (role domain-manager).
    pub key: SignatureKey,
}

impl DomainManager {
    /// Issues a domain-manager certificate for `name` from the lab CA and loads its key.
    pub fn create(pki: &LabPki, name: &str) -> Result<Self> {
        let material = pki.issue(Role::DomainManager, name)?.load()?;
        Ok(Self { name: name.to_string(), key: material.signature_key()? })
    }

    /// A first-version descriptor owned by this manager with `metadata` and access list `acl`.
    pub fn new_domain(&self, metadata: &[(&str, &str)], acl: &[(&str, AccessMode)]) -> Result<Descriptor> {
        let metadata: BTreeMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let acl = acl.iter().map(|(vm, mode)| AclEntry { vm_id: vm.to_string(), mode: *mode }).collect();
        Ok(Descriptor::new(&self.name, metadata, acl)?)
    }

    /// Signs `descriptor` as its owner.
    pub fn sign_descriptor(&self, descriptor: &Descriptor) -> Result<SignedEnvelope> {
        Ok(self.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode()?))
    }

    /// A signed single-use mount grant for `vm_id` in `mode`, expiring `valid_for_secs` from now
    /// (negative for grants that are already expired).
    pub fn grant(&self, domain_id: &str, vm_id: &str, mode: AccessMode, valid_for_secs: i64) -> SignedEnvelope {
        let expires_at = (ttp::store::now_unix() as i64).saturating_add(valid_for_secs).max(0) as u64;
        self.grant_until(domain_id, vm_id, mode, expires_at)
    }

    /// A signed mount grant expiring at `expires_at` (unix seconds), whatever that is: for
    /// tests of the TTP's bounds.
    pub fn grant_until(&self, domain_id: &str, vm_id: &str, mode: AccessMode, expires_at: u64) -> SignedEnvelope {
        self.grant_for_purpose(domain_id, vm_id, mode, expires_at, "", "")
    }

    /// A signed mount grant expiring at `expires_at` that states a purpose of use and a
    /// reason (docs/PROTOCOL.md "Mount grant"; empty strings for none).
    pub fn grant_for_purpose(
        &self,
        domain_id: &str,
        vm_id: &str,
        mode: AccessMode,
        expires_at: u64,
        purpose: &str,
        reason: &str,
    ) -> SignedEnvelope {
        let grant = MountGrant {
            domain_id: domain_id.to_string(),
            vm_id: vm_id.to_string(),
            mode,
            expires_at,
            nonce: rand::random(),
            issuer: self.name.clone(),
            purpose: purpose.to_string(),
            reason: reason.to_string(),
        };
        self.key.sign_envelope(SignatureContext::MountGrant, grant.encode())
    }

    /// A signed request to delete (crypto-shred) `domain_id`.
    pub fn deletion(&self, domain_id: &str) -> SignedEnvelope {
        let deletion = Deletion { domain_id: domain_id.to_string(), requested_at: ttp::store::now_unix() };
        self.key.sign_envelope(SignatureContext::Deletion, deletion.encode())
    }
}

/// The cloud platform's registration call (the CP forwards owner-signed descriptors).
pub async fn register(
    cp: &net::Client,
    descriptor: SignedEnvelope,
    previous: Option<SignedEnvelope>,
) -> std::result::Result<HeaderRecord, net::Error> {
    let response: RegisterDomainResponse = cp
        .post_json(
            "/v1/domains",
            &RegisterDomainRequest { descriptor: descriptor.clone(), previous_registration: previous },
        )
        .await?;
    Ok(HeaderRecord { descriptor, registration: response.registration, rotation: None })
}

/// The secure component configuration of a loopback compute host `host_id` under `dir`:
/// its swtpm's TCTI, state and VM directories `dir/<host_id>/{sc,vms}`, the local
/// hypervisor driver, the backend chosen automatically, and its issued TLS files.
pub fn loopback_agent_config(
    dir: &Path,
    host_id: &str,
    tcti: String,
    ttp_url: &str,
    tls: &TlsFiles,
) -> secure_component::config::AgentConfig {
    use secure_component::config::{AgentConfig, BackendChoice, HypervisorChoice, LibvirtConfig};
    AgentConfig {
        listen: "127.0.0.1:0".into(),
        host_id: None,
        tcti,
        state_dir: dir.join(host_id).join("sc"),
        vm_root: dir.join(host_id).join("vms"),
        backend: BackendChoice::Auto,
        hypervisor: HypervisorChoice::Local,
        libvirt: LibvirtConfig::default(),
        qemu: Default::default(),
        launch: None,
        rotation: Default::default(),
        ttp_url: ttp_url.to_string(),
        ca: tls.ca.clone(),
        crl: tls.crl.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        pcr_selection: Default::default(),
        region: None,
        volume_root: None,
        limits: Default::default(),
        partners: Vec::new(),
    }
}
