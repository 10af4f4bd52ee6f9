//! The all-in-one cloud of `skydd up`: a CA, the TTP, the cloud platform and compute hosts
//! (each with its own swtpm and secure component), all real services on loopback with
//! embedded SQLite, plus a domain-manager configuration per manager; and two such clouds
//! that share hosts ([`PartnerClouds`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use net::Role;
use protocol::cloud::{ComputeHost, Instance};
use protocol::pki::RoleAllowance;
use secure_component::config::{BackendChoice, HypervisorChoice, LaunchConfig};
use secure_component::service::AttachmentService;
use secure_component::swtpm::Swtpm;
use tokio_util::sync::CancellationToken;
use ttp::attestation::{AttestationPolicy, EkRoot};

use crate::lab::{LabPki, RunningTtp};
use crate::vms::{GuestImage, Guests};

/// One compute host of the all-in-one cloud.
pub struct ComputeNode {
    /// The host's id (`compute-1`...), the subject CN of its secure component's certificate.
    pub id: String,
    /// `https://127.0.0.1:PORT` of its secure component, as the cloud platform calls it.
    pub agent_url: String,
    /// Where the local hypervisor driver mounts each VM's volumes: `<vm_root>/<vm>/<domain>`.
    pub vm_root: PathBuf,
    /// The secure component's service, for tests that inspect attachments directly.
    pub service: Arc<AttachmentService>,
    server: Server,
    /// Dropped last: the secure component talks to it until it stops.
    _swtpm: Swtpm,
}

struct Server {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A whole Skydd cloud on loopback in one process (`skydd up`): the lab CA, the TTP, the
/// cloud platform and the compute hosts of a [`Layout`], with a configuration file per
/// domain manager.
pub struct AllInOne {
    /// The directory everything is written under (CA, data directories, configurations).
    pub dir: PathBuf,
    /// The cloud CA every party trusts.
    pub pki: LabPki,
    /// The TTP serving on loopback.
    pub ttp: RunningTtp,
    ttp_policy: AttestationPolicy,
    /// `https://127.0.0.1:PORT` of the cloud platform.
    pub cp_url: String,
    cp_server: Server,
    /// The compute hosts, in the order of the layout.
    pub hosts: Vec<ComputeNode>,
    /// Domain-manager configuration files, by manager name.
    pub manager_configs: Vec<(String, PathBuf)>,
    /// The layout's VMs as qemu guests ([`AllInOne::start_with_vms`]); empty when the VMs
    /// are directories (the `local` driver's mounts).
    pub guests: Guests,
    guest_image: Option<GuestImage>,
}

/// What to start.
pub struct Layout<'a> {
    /// Compute hosts and the VMs that run on each.
    pub hosts: &'a [(&'a str, &'a [&'a str])],
    /// Domain managers to issue certificates and write configuration files for.
    pub managers: &'a [&'a str],
}

/// The demo's cloud: vm-a on compute-1, vm-b and vm-c on compute-2; dm-alice and dm-bob.
pub const DEMO_LAYOUT: Layout<'static> =
    Layout { hosts: &[("compute-1", &["vm-a"]), ("compute-2", &["vm-b", "vm-c"])], managers: &["dm-alice", "dm-bob"] };

/// Changes the secure-component configuration of the host it is given the id of
/// ([`AllInOne::start_configured`]).
pub type HostConfigurer = dyn Fn(&str, &mut secure_component::config::AgentConfig) + Sync;

/// Hosts of cloud B that also serve cloud A ([`PartnerClouds`], docs/PKI.md "A partner
/// cloud's host"): B's cloud platform places B's VMs on them, A's places A's.
pub struct SharedHosts<'a> {
    /// The name cloud B's hosts know cloud A by (`[[partner]] name`), e.g. "cloud-a".
    pub partner_name: &'a str,
    /// Hosts of B's layout that serve A too, and the VMs of cloud A placed on each. A's
    /// attestation policy trusts B's TPM vendor root for exactly these host ids.
    pub hosts: &'a [(&'a str, &'a [&'a str])],
    /// The secure-component names (or patterns, `b-compute-*`) A's TTP and cloud platform
    /// accept from B's root in TLS; wider than `hosts` when B may bring more hosts later,
    /// each of which A's attestation policy must still name before it enrolls.
    pub tls_names: &'a [&'a str],
}

/// Everything a cloud needs besides its layout: set up before it starts when it is one of
/// two partner clouds.
struct Plan {
    pki: LabPki,
    ttp: (tokio::net::TcpListener, String),
    /// `[[partner]]` tables of the hosts that serve a partner too, by host id.
    host_partners: Vec<(String, secure_component::config::PartnerConfig)>,
    /// The partner's TPM vendor roots, limited to its hosts, and those hosts' reference states.
    partner_ek_roots: Vec<ttp::attestation::EkRoot>,
    partner_states: Vec<ttp::attestation::ReferenceState>,
    /// The partner's hosts to register with this cloud platform (id, agent URL, this cloud's VMs).
    partner_hosts: Vec<(String, String, Vec<String>)>,
    /// The image every layout VM is launched from as a qemu guest (`None`: directories).
    guest_image: Option<(GuestImage, String)>,
}

impl Plan {
    /// The plan of a cloud on its own (no partner): a new CA under `dir/pki` and a TTP
    /// address.
    async fn own(
        dir: &Path,
        guest_image: Option<(GuestImage, String)>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        progress("cloud CA: creating the CA and issuing certificates");
        Ok(Plan {
            pki: LabPki::create(&dir.join("pki"))?,
            ttp: bind().await?,
            host_partners: Vec::new(),
            partner_ek_roots: Vec::new(),
            partner_states: Vec::new(),
            partner_hosts: Vec::new(),
            guest_image,
        })
    }
}

async fn bind() -> Result<(tokio::net::TcpListener, String)> {
    RunningTtp::bind().await
}

impl AllInOne {
    /// Starts everything under `dir`; `progress` is told each step.
    pub async fn start(dir: &Path, layout: &Layout<'_>, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::start_configured(dir, layout, &|_, _| {}, progress).await
    }

    /// As [`AllInOne::start`], with `configure` changing each host's secure-component
    /// configuration (given the host id) before it is written, measured and started: e.g.
    /// `backend = vhost-user` and `hypervisor = qemu` for hosts whose VMs are real guests.
    pub async fn start_configured(
        dir: &Path,
        layout: &Layout<'_>,
        configure: &HostConfigurer,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let plan = Plan::own(dir, None, progress).await?;
        Self::start_planned(dir, layout, plan, configure, progress).await
    }

    /// As [`AllInOne::start`], with every layout VM a qemu guest launched from `image` through
    /// its compute host's secure component (trusted launch, docs/PROTOCOL.md "Trusted
    /// launch"): this cloud's `image-pipeline` identity signs the allowlist of the image's
    /// pipeline store; the TTP and the hosts check it; the hosts run `backend = "vhost-user"`
    /// and `hypervisor = "qemu"` (attach hot-plugs a virtio disk into the running guest).
    /// `accel` is qemu's accelerator (`tcg`, `kvm`, or `kvm:tcg`).
    pub async fn start_with_vms(
        dir: &Path,
        layout: &Layout<'_>,
        image: &GuestImage,
        accel: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let plan = Plan::own(dir, Some((image.clone(), accel.to_string())), progress).await?;
        Self::start_planned(dir, layout, plan, &|_, _| {}, progress).await
    }

    /// The signed image allowlist of a cloud with guests.
    pub fn allowlist_path(&self) -> PathBuf {
        self.dir.join("allowlist.dsse.json")
    }

    /// The raw image the guests were launched from (`None` without guests).
    pub fn guest_image_path(&self) -> Option<PathBuf> {
        self.guest_image.as_ref().map(|image| image.raw.clone())
    }

    /// Registers instance `vm` on compute host `host_id` with the cloud platform, as its
    /// operator does.
    pub async fn register_instance(&self, vm: &str, host_id: &str) -> Result<()> {
        let operator = self.pki.client("cloud-platform", Role::CloudPlatform, &self.cp_url)?;
        let _: Instance =
            operator.post_json("/v1/instances", &Instance { id: vm.to_string(), host: host_id.to_string() }).await?;
        Ok(())
    }

    /// This cloud's TPM vendor CA (the swtpm local CA its hosts' EK certificates chain to).
    pub fn tpm_vendor_ca(&self) -> PathBuf {
        self.dir.join("tpm-vendor-ca")
    }

    /// The reference state this cloud's TTP expects of its host `host_id`.
    pub fn reference_state(&self, host_id: &str) -> Option<&ttp::attestation::ReferenceState> {
        self.ttp_policy.reference_states.iter().find(|s| s.name == format!("{host_id}-measured"))
    }

    /// The compute host `host_id`.
    pub fn host(&self, host_id: &str) -> Option<&ComputeNode> {
        self.hosts.iter().find(|h| h.id == host_id)
    }

    async fn start_planned(
        dir: &Path,
        layout: &Layout<'_>,
        plan: Plan,
        configure: &HostConfigurer,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let Plan {
            pki,
            ttp: (ttp_listener, ttp_url),
            host_partners,
            partner_ek_roots,
            partner_states,
            partner_hosts,
            guest_image,
        } = plan;
        let vendor_ca = dir.join("tpm-vendor-ca");
        let allowlist = dir.join("allowlist.dsse.json");
        if let Some((image, _)) = &guest_image {
            progress(&format!(
                "image pipeline: the cloud's image-pipeline identity signs the allowlist of {} ({})",
                image.version,
                allowlist.display()
            ));
            crate::vms::write_allowlist(image, &pki, &allowlist)?;
        }

        // The secure component runs inside this binary: it is what each host measures.
        let binary = std::env::current_exe().context("locate the running binary (the secure component's)")?;
        let mut pending = Vec::new();
        let mut reference_states = partner_states;
        for (host_id, _) in layout.hosts {
            progress(&format!(
                "{host_id}: manufacturing its TPM (swtpm with an EK certificate) and starting its secure component"
            ));
            let swtpm = Swtpm::start_with_ca(&dir.join(host_id).join("swtpm"), &vendor_ca)
                .with_context(|| format!("start the swtpm of {host_id}"))?;
            let tls = pki.issue(Role::SecureComponent, host_id)?;
            let mut config = crate::lab::loopback_agent_config(dir, host_id, swtpm.tcti(), &ttp_url, &tls);
            // The hosts open only the cloud platform's volume files (the all-in-one cloud's
            // shared storage).
            let volumes = dir.join("cloud-platform").join("volumes");
            std::fs::create_dir_all(&volumes)?;
            config.volume_root = Some(volumes);
            config.partners =
                host_partners.iter().filter(|(id, _)| id == host_id).map(|(_, partner)| partner.clone()).collect();
            if let Some((_, accel)) = &guest_image {
                config.backend = BackendChoice::VhostUser;
                config.hypervisor = HypervisorChoice::Qemu;
                config.launch = Some(LaunchConfig {
                    allowlist: allowlist.clone(),
                    signer: image_pipeline::provenance::DEFAULT_SIGNER_NAME.into(),
                    qemu: "qemu-system-x86_64".into(),
                    accel: accel.clone(),
                    firmware: Some(crate::vms::OVMF.into()),
                });
            }
            configure(host_id, &mut config);
            let config_text = toml::to_string(&config)?;
            std::fs::write(dir.join(host_id).join("secure-component.toml"), &config_text)?;
            // The reference state is computed from the build (the binary and the configuration
            // as written), never read from a host (docs/TPM.md "Measured state").
            let expected = secure_component::measure::Measurement::of(&binary, config_text.as_bytes())?;
            reference_states.push(crate::lab::measured_reference_state(&format!("{host_id}-measured"), &expected));
            progress(&format!(
                "{host_id}: measured start-up (secure component binary and configuration into PCR {})",
                secure_component::measure::MEASURED_STATE_PCR
            ));
            crate::lab::measured_start_up(&swtpm, &config.state_dir, &binary, config_text.as_bytes())
                .with_context(|| format!("measure the start-up of {host_id}"))?;
            let (service, tls_config) = secure_component::service::build(&config)
                .with_context(|| format!("build the secure component of {host_id}"))?;
            pending.push((host_id.to_string(), swtpm, config, service, tls_config));
        }

        progress("TTP: master key, attestation policy (the TPM vendor CA and each host's expected measured state)");
        let mut trusted_ek_roots = EkRoot::every_host_each(secure_component::swtpm::ca_certificates_der(&vendor_ca)?);
        trusted_ek_roots.extend(partner_ek_roots);
        let policy =
            AttestationPolicy { trusted_ek_roots, ek_intermediates: Vec::new(), ek_crls: Vec::new(), reference_states };
        let ttp = match &guest_image {
            Some(_) => {
                let trusted_launch = ttp::config::TrustedLaunchConfig {
                    allowlist: allowlist.clone(),
                    signer: image_pipeline::provenance::DEFAULT_SIGNER_NAME.into(),
                };
                RunningTtp::start_with_trusted_launch(dir, &pki, &policy, ttp_listener, trusted_launch).await?
            }
            None => RunningTtp::start(dir, &pki, &policy, ttp_listener).await?,
        };

        progress("cloud platform: starting its API");
        let (cp_listener, cp_url) = bind().await?;
        let cp_tls = pki.issue(Role::CloudPlatform, "cloud-platform")?;
        let cp_config = cloud_platform::config::CpConfig {
            listen: cp_listener.local_addr()?.to_string(),
            data_dir: dir.join("cloud-platform"),
            ca: cp_tls.ca.clone(),
            crl: cp_tls.crl.clone(),
            cert: cp_tls.cert.clone(),
            key: cp_tls.key.clone(),
            ttp_url: ttp.url.clone(),
            max_volume_bytes: cloud_platform::config::DEFAULT_MAX_VOLUME_BYTES,
            reconcile_interval_secs: cloud_platform::config::DEFAULT_RECONCILE_INTERVAL_SECS,
            quota: Default::default(),
            limits: Default::default(),
            database_url: None,
            database_pool_size: 8,
        };
        std::fs::write(dir.join("cloud-platform.toml"), cp_config.to_toml()?)?;
        let (cp, cp_server_tls) = cloud_platform::server::build(&cp_config)?;
        let cp_shutdown = CancellationToken::new();
        let cp_server = Server {
            shutdown: cp_shutdown.clone(),
            task: tokio::spawn(async move {
                if let Err(e) = cloud_platform::server::serve(cp_listener, cp, cp_server_tls, cp_shutdown).await {
                    tracing::error!(error = %e, "cloud platform stopped");
                }
            }),
        };
        let operator = pki.client("cloud-platform", Role::CloudPlatform, &cp_url)?;

        let mut hosts = Vec::new();
        for ((host_id, swtpm, config, service, tls_config), (_, vms)) in pending.into_iter().zip(layout.hosts) {
            progress(&format!("{host_id}: enrolling its TPM with the TTP and registering with the cloud platform"));
            let enrolled = service.enroll().await.with_context(|| format!("enroll {host_id}"))?;
            progress(&format!(
                "{host_id}: enrolled (EK {}…, reference state {})",
                &enrolled.ek_fingerprint[..16],
                enrolled.reference_state
            ));
            let (listener, agent_url) = bind().await?;
            let shutdown = CancellationToken::new();
            let serve_service = service.clone();
            let serve_shutdown = shutdown.clone();
            let task = tokio::spawn(async move {
                if let Err(e) =
                    secure_component::service::serve(listener, serve_service, tls_config, serve_shutdown).await
                {
                    tracing::error!(error = %e, "secure component stopped");
                }
            });
            let vms: Vec<String> = vms.iter().map(|vm| vm.to_string()).collect();
            register_host(&operator, &host_id, &agent_url, &vms).await?;
            hosts.push(ComputeNode {
                id: host_id,
                agent_url,
                vm_root: config.vm_root.clone(),
                service,
                server: Server { shutdown, task },
                _swtpm: swtpm,
            });
        }
        for (host_id, agent_url, vms) in &partner_hosts {
            progress(&format!("{host_id}: a partner's host, registered with this cloud platform for {vms:?}"));
            register_host(&operator, host_id, agent_url, vms).await?;
        }

        let mut manager_configs = Vec::new();
        for name in layout.managers {
            let tls = pki.issue(Role::DomainManager, name)?;
            let config = domain_manager::config::DmConfig {
                cloud_platform_url: cp_url.clone(),
                ttp_url: ttp.url.clone(),
                ca: tls.ca.clone(),
                crl: tls.crl.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            };
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(&path, toml::to_string(&config)?)?;
            progress(&format!("{name}: domain-manager configuration written to {}", path.display()));
            manager_configs.push((name.to_string(), path));
        }
        let guests = match &guest_image {
            Some((image, accel)) => {
                // A KVM guest hardly uses the CPU while it boots; a TCG guest keeps a core busy.
                let wave = if accel.starts_with("kvm") { usize::MAX } else { 1 };
                let launches: Vec<_> = hosts
                    .iter()
                    .zip(layout.hosts)
                    .map(|(host, (_, vms))| {
                        (host.id.clone(), &host.service, vms.iter().map(|vm| vm.to_string()).collect())
                    })
                    .collect();
                tokio::task::block_in_place(|| Guests::launch(&launches, &image.raw, wave, progress))?
            }
            None => Guests::default(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            pki,
            ttp,
            ttp_policy: policy,
            cp_url,
            cp_server,
            hosts,
            manager_configs,
            guests,
            guest_image: guest_image.map(|(image, _)| image),
        })
    }

    /// Stops the TTP, runs `during`, and starts the TTP again on the same address and data
    /// (tests of what the other parties do while the TTP is down).
    pub async fn ttp_outage<T>(&mut self, during: impl std::future::Future<Output = T>) -> Result<T> {
        self.ttp.outage(&self.dir, &self.pki, &self.ttp_policy, during).await
    }

    /// The configuration file of domain manager `name`; an error if the layout has none.
    pub fn manager_config(&self, name: &str) -> Result<PathBuf> {
        self.manager_configs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("no manager {name}"))
    }

    /// The compute host a VM runs on.
    pub fn host_of_vm(&self, vm: &str, layout: &Layout<'_>) -> Option<&ComputeNode> {
        let host_id = layout.hosts.iter().find(|(_, vms)| vms.contains(&vm)).map(|(h, _)| *h)?;
        self.hosts.iter().find(|h| h.id == host_id)
    }

    /// Where VM `vm` sees domain `domain_id` (the local hypervisor driver's mount point).
    pub fn vm_mount(&self, vm: &str, domain_id: &str, layout: &Layout<'_>) -> Option<PathBuf> {
        self.host_of_vm(vm, layout).map(|h| h.vm_root.join(vm).join(domain_id))
    }

    /// Stops every service: hosts first (they unmount and close their volumes), then the
    /// cloud platform and the TTP.
    pub async fn stop(self) {
        for host in self.hosts {
            host.server.stop().await;
            let service = host.service;
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while Arc::strong_count(&service) > 1 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::task::spawn_blocking(move || service.shutdown()).await;
        }
        self.cp_server.stop().await;
        self.ttp.stop().await;
    }
}

/// Registers compute host `host_id` (its agent at `agent_url`) and the instances `vms` on it
/// with the cloud platform, as its operator does.
async fn register_host(operator: &net::Client, host_id: &str, agent_url: &str, vms: &[String]) -> Result<()> {
    let _: ComputeHost = operator
        .post_json("/v1/hosts", &ComputeHost { id: host_id.to_string(), agent_url: agent_url.to_string() })
        .await?;
    for vm in vms {
        let _: Instance =
            operator.post_json("/v1/instances", &Instance { id: vm.clone(), host: host_id.to_string() }).await?;
    }
    Ok(())
}

/// Two whole clouds in one process, each with its own CA, TTP, cloud platform and hosts,
/// where hosts of cloud B also serve cloud A (docs/PKI.md "A partner cloud's host"). On a
/// shared host B's cloud platform attaches B's domains with keys from B's TTP, and A's cloud
/// platform attaches A's domains to A's VMs with keys from A's TTP, sealed to the same TPM.
///
/// Trust is per service: A's TTP and cloud platform trust B's root for B's secure
/// components named in [`SharedHosts::tls_names`]; A's attestation policy trusts B's TPM
/// vendor root for [`SharedHosts::hosts`] only; B's secure components trust A's root for A's
/// TTP (`ttp-1`) and A's cloud platform (`cloud-platform`) only, and serve that cloud platform
/// as `[[partner]]` [`SharedHosts::partner_name`] with A's volume store as its `volume_root`.
pub struct PartnerClouds {
    /// Cloud A: the owner's cloud, whose VMs also run on B's shared hosts.
    pub a: AllInOne,
    /// Cloud B: the partner whose hosts serve both.
    pub b: AllInOne,
}

impl PartnerClouds {
    /// Starts cloud B (`dir/cloud-b`, "Cloud B CA"), then cloud A (`dir/cloud-a`, "Cloud A
    /// CA"), then enrolls B's shared hosts at A's TTP with the keys they enrolled at B's.
    pub async fn start(
        dir: &Path,
        a_layout: &Layout<'_>,
        b_layout: &Layout<'_>,
        shared: &SharedHosts<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let (a_dir, b_dir) = (dir.join("cloud-a"), dir.join("cloud-b"));
        std::fs::create_dir_all(&a_dir)?;
        std::fs::create_dir_all(&b_dir)?;
        progress("two CAs: each side trusts the other's root for named parties, in the services that need it");
        let mut pki_a = LabPki::create_named(&a_dir.join("pki"), "Cloud A CA")?;
        let mut pki_b = LabPki::create_named(&b_dir.join("pki"), "Cloud B CA")?;
        pki_a.trust_for(
            &[Role::Ttp, Role::CloudPlatform],
            &pki_b,
            vec![RoleAllowance::named(Role::SecureComponent, shared.tls_names)?],
        );
        pki_b.trust_for(
            &[Role::SecureComponent],
            &pki_a,
            vec![
                RoleAllowance::named(Role::Ttp, &["ttp-1"])?,
                RoleAllowance::named(Role::CloudPlatform, &["cloud-platform"])?,
            ],
        );
        let (a_ttp, b_ttp) = (bind().await?, bind().await?);
        let a_volumes = a_dir.join("cloud-platform").join("volumes");
        std::fs::create_dir_all(&a_volumes)?;
        let partner = secure_component::config::PartnerConfig {
            name: shared.partner_name.to_string(),
            cloud_platform: "cloud-platform".into(),
            ca: pki_a.ca_file(),
            ttp_url: a_ttp.1.clone(),
            volume_root: Some(a_volumes),
        };
        for (host, _) in shared.hosts {
            if !b_layout.hosts.iter().any(|(h, _)| h == host) {
                anyhow::bail!("shared host {host} is not in cloud B's layout");
            }
        }
        let b_plan = Plan {
            pki: pki_b,
            ttp: b_ttp,
            host_partners: shared.hosts.iter().map(|(host, _)| (host.to_string(), partner.clone())).collect(),
            partner_ek_roots: Vec::new(),
            partner_states: Vec::new(),
            partner_hosts: Vec::new(),
            guest_image: None,
        };
        progress("cloud B: its TTP, cloud platform and hosts; the shared hosts know cloud A as a partner");
        let b = AllInOne::start_planned(&b_dir, b_layout, b_plan, &|_, _| {}, progress).await?;

        let shared_ids: Vec<&str> = shared.hosts.iter().map(|(host, _)| *host).collect();
        let mut partner_states = Vec::new();
        let mut partner_hosts = Vec::new();
        for (host, vms) in shared.hosts {
            let state = b.reference_state(host).with_context(|| format!("cloud B has no reference state of {host}"))?;
            partner_states.push(state.clone());
            let node = b.host(host).with_context(|| format!("cloud B runs no host {host}"))?;
            partner_hosts.push((
                host.to_string(),
                node.agent_url.clone(),
                vms.iter().map(|vm| vm.to_string()).collect(),
            ));
        }
        let a_plan = Plan {
            pki: pki_a,
            ttp: a_ttp,
            host_partners: Vec::new(),
            partner_ek_roots: EkRoot::only_for_each(
                secure_component::swtpm::ca_certificates_der(&b.tpm_vendor_ca())?,
                &shared_ids,
            ),
            partner_states,
            partner_hosts,
            guest_image: None,
        };
        progress("cloud A: its TTP trusts B's TPM vendor root for the shared hosts only");
        let a = AllInOne::start_planned(&a_dir, a_layout, a_plan, &|_, _| {}, progress).await?;
        for host in &shared_ids {
            let node = b.host(host).with_context(|| format!("cloud B runs no host {host}"))?;
            let enrolled = node
                .service
                .enroll_at(shared.partner_name)
                .await
                .with_context(|| format!("enroll {host} at cloud A's TTP"))?;
            progress(&format!(
                "{host}: enrolled at cloud A's TTP too (same TPM and binding key, reference state {})",
                enrolled.reference_state
            ));
        }
        Ok(Self { a, b })
    }

    /// Stops cloud A (its cloud platform detaches nothing more on B's hosts), then cloud B.
    pub async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}
