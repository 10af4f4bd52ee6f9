//! The all-in-one cloud of `skydd up`: a CA, the TTP, the cloud platform and compute hosts
//! (each with its own swtpm and secure component), all real services on loopback with
//! embedded SQLite, plus a domain-manager configuration per manager.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use net::Role;
use protocol::cloud::{ComputeHost, Instance};
use protocol::pki::RoleAllowance;
use secure_component::service::AttachmentService;
use secure_component::swtpm::Swtpm;
use tokio_util::sync::CancellationToken;
use ttp::attestation::AttestationPolicy;

use crate::lab::{LabPki, RunningTtp};

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
    /// The partner cloud's CA, when hosts were lent by one ([`AllInOne::start_with_partner`]).
    pub partner_pki: Option<LabPki>,
}

/// Compute hosts a partner cloud lends to this one (docs/PKI.md "A partner cloud's host"):
/// their certificates come from the partner's CA and their TPMs from another vendor; this
/// cloud's TTP and cloud platform trust the partner's root for exactly these host names, the
/// hosts trust this cloud's root for its TTP and its cloud platform only.
pub struct PartnerHosts<'a> {
    /// The partner CA's name (its subject CN).
    pub ca_name: &'a str,
    /// The lent hosts and the VMs of this cloud that run on each.
    pub hosts: &'a [(&'a str, &'a [&'a str])],
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

async fn bind() -> Result<(tokio::net::TcpListener, String)> {
    RunningTtp::bind().await
}

impl AllInOne {
    /// Starts everything under `dir`; `progress` is told each step.
    pub async fn start(dir: &Path, layout: &Layout<'_>, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::start_federated(dir, layout, None, progress).await
    }

    /// [`AllInOne::start`], plus the compute hosts `partner` lends, enrolled at this cloud's
    /// TTP and registered with its cloud platform like its own.
    pub async fn start_with_partner(
        dir: &Path,
        layout: &Layout<'_>,
        partner: &PartnerHosts<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        Self::start_federated(dir, layout, Some(partner), progress).await
    }

    async fn start_federated(
        dir: &Path,
        layout: &Layout<'_>,
        partner: Option<&PartnerHosts<'_>>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        progress("cloud CA: creating the CA and issuing certificates");
        let mut pki = LabPki::create(&dir.join("pki"))?;
        let (ttp_listener, ttp_url) = bind().await?;
        let vendor_ca = dir.join("tpm-vendor-ca");
        let partner_vendor_ca = dir.join("partner-tpm-vendor-ca");
        let mut partner_pki = None;
        if let Some(partner) = partner {
            progress(&format!(
                "partner CA {:?}: each side trusts the other's root for named parties only",
                partner.ca_name
            ));
            let mut theirs = LabPki::create_named(&dir.join("partner-pki"), partner.ca_name)?;
            let names: Vec<&str> = partner.hosts.iter().map(|(host, _)| *host).collect();
            pki.trust(&theirs, vec![RoleAllowance::named(Role::SecureComponent, &names)?]);
            theirs.trust(
                &pki,
                vec![
                    RoleAllowance::named(Role::Ttp, &["ttp-1"])?,
                    RoleAllowance::named(Role::CloudPlatform, &["cloud-platform"])?,
                ],
            );
            partner_pki = Some(theirs);
        }
        let own_hosts = layout.hosts.iter().map(|host| (host, &pki, &vendor_ca));
        let lent_hosts = partner
            .map(|p| p.hosts)
            .unwrap_or_default()
            .iter()
            .filter_map(|host| partner_pki.as_ref().map(|theirs| (host, theirs, &partner_vendor_ca)));
        let all_hosts: Vec<_> = own_hosts.chain(lent_hosts).collect();

        // The secure component runs inside this binary: it is what each host measures.
        let binary = std::env::current_exe().context("locate the running binary (the secure component's)")?;
        let mut pending = Vec::new();
        let mut reference_states = Vec::new();
        for ((host_id, _), host_pki, host_vendor_ca) in &all_hosts {
            progress(&format!(
                "{host_id}: manufacturing its TPM (swtpm with an EK certificate) and starting its secure component"
            ));
            let swtpm = Swtpm::start_with_ca(&dir.join(host_id).join("swtpm"), host_vendor_ca)
                .with_context(|| format!("start the swtpm of {host_id}"))?;
            let tls = host_pki.issue(Role::SecureComponent, host_id)?;
            let mut config = crate::lab::loopback_agent_config(dir, host_id, swtpm.tcti(), &ttp_url, &tls);
            // The hosts open only the cloud platform's volume files (the all-in-one cloud's
            // shared storage).
            let volumes = dir.join("cloud-platform").join("volumes");
            std::fs::create_dir_all(&volumes)?;
            config.volume_root = Some(volumes);
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
        let mut trusted_ek_roots = secure_component::swtpm::ca_certificates_der(&vendor_ca)?;
        if partner_pki.is_some() {
            trusted_ek_roots.extend(secure_component::swtpm::ca_certificates_der(&partner_vendor_ca)?);
        }
        let policy =
            AttestationPolicy { trusted_ek_roots, ek_intermediates: Vec::new(), ek_crls: Vec::new(), reference_states };
        let ttp = RunningTtp::start(dir, &pki, &policy, ttp_listener).await?;

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
        for ((host_id, swtpm, config, service, tls_config), ((_, vms), _, _)) in pending.into_iter().zip(all_hosts) {
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
            let _: ComputeHost = operator
                .post_json("/v1/hosts", &ComputeHost { id: host_id.clone(), agent_url: agent_url.clone() })
                .await?;
            for vm in *vms {
                let _: Instance = operator
                    .post_json("/v1/instances", &Instance { id: vm.to_string(), host: host_id.clone() })
                    .await?;
            }
            hosts.push(ComputeNode {
                id: host_id,
                agent_url,
                vm_root: config.vm_root.clone(),
                service,
                server: Server { shutdown, task },
                _swtpm: swtpm,
            });
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
        Ok(Self {
            dir: dir.to_path_buf(),
            pki,
            ttp,
            ttp_policy: policy,
            cp_url,
            cp_server,
            hosts,
            manager_configs,
            partner_pki,
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
