//! Building the agent from its configuration and serving its API over mutual TLS.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use net::{Role, TlsFiles};
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::clouds::{HomeRoots, PartnerTtp};
use super::records::RecordStore;
use super::{http, AttachmentService};
use crate::config::{AgentConfig, BackendChoice, HypervisorChoice};
use crate::error::{Error, Result};
use crate::host::{AttestedHost, TpmWorker};
use crate::hypervisor::libvirt::LibvirtDriver;
use crate::hypervisor::local::LocalDriver;
use crate::hypervisor::qemu::QemuDriver;
use crate::hypervisor::HypervisorDriver;
use crate::volume::dmcrypt::DmCryptBackend;
use crate::volume::userspace::UserspaceBackend;
use crate::volume::vhost_user::VhostUserBlkBackend;

/// Builds the agent from its configuration: TLS identity (role secure-component), TTP
/// client, TPM worker, backend, hypervisor driver, records. Returns the service and the
/// server TLS configuration accepting only the cloud platform.
pub fn build(config: &AgentConfig) -> Result<(Arc<AttachmentService>, net::ServerTls)> {
    config.limits.serve_options().map_err(Error::Config)?;
    let tls_files =
        TlsFiles { ca: config.ca.clone(), cert: config.cert.clone(), key: config.key.clone(), crl: config.crl.clone() };
    let material = tls_files.load().map_err(|e| Error::Config(format!("TLS files: {e}")))?;
    let identity =
        material.identity().map_err(|e| Error::Config(format!("own certificate {}: {e}", config.cert.display())))?;
    if identity.role != Role::SecureComponent {
        return Err(Error::Config(format!(
            "{} has role {}; the secure component needs a secure-component certificate (cloud-platform ca issue --role secure-component)",
            config.cert.display(),
            identity.role
        )));
    }
    match &config.volume_root {
        Some(root) if !root.is_dir() => {
            return Err(Error::Config(format!("volume_root {} is not a directory", root.display())));
        }
        Some(_) => {}
        None => tracing::warn!("no volume_root configured: this host opens any volume path the cloud platform names"),
    }
    let host_id = match &config.host_id {
        None => identity.name.clone(),
        Some(id) if *id == identity.name => id.clone(),
        Some(id) => {
            return Err(Error::Config(format!(
                "host_id is {id:?} but the certificate {} names {:?}; the TTP knows a host by its certificate name",
                config.cert.display(),
                identity.name
            )))
        }
    };
    let server_tls = tls_files.server_tls(&[Role::CloudPlatform]).map_err(|e| Error::Config(format!("TLS: {e}")))?;
    // Each TTP's client trusts only its own cloud's roots (all of them without partners).
    let home_files = TlsFiles { ca: config.home_roots().cloned().collect(), ..tls_files.clone() };
    let ttp = ttp_client(&config.ttp_url, &home_files)?;

    let backend = match config.backend {
        BackendChoice::DmCrypt => Backend::DmCrypt(DmCryptBackend::new()?),
        BackendChoice::Userspace => Backend::Userspace(UserspaceBackend::new(config.userspace_dir())?),
        BackendChoice::VhostUser => Backend::VhostUser(VhostUserBlkBackend::new(config.vhost_user_dir())?),
        BackendChoice::Auto => match DmCryptBackend::new() {
            // The engine beside dm-crypt keeps the tags and tree of format-2 volumes opened
            // read-write (docs/DMCRYPT.md "Format 2, read-write").
            Ok(kernel) => Backend::DmCryptAndEngine { kernel, engine: UserspaceBackend::new(config.userspace_dir())? },
            Err(Error::DeviceMapperUnavailable(why)) => {
                tracing::info!(%why, "backend auto: using the userspace engine");
                Backend::Userspace(UserspaceBackend::new(config.userspace_dir())?)
            }
            Err(e) => return Err(e),
        },
    };
    let driver: Box<dyn HypervisorDriver> = match config.hypervisor {
        HypervisorChoice::Local => Box::new(LocalDriver::new(&config.vm_root)?),
        HypervisorChoice::Libvirt => Box::new(LibvirtDriver::with_virsh(
            config.libvirt.virsh.clone(),
            config.libvirt.uri.clone(),
            config.libvirt_dir(),
        )?),
        HypervisorChoice::Qemu => Box::new(QemuDriver::new(config.qmp_dir())),
    };
    let vhost_user = matches!(backend, Backend::VhostUser(_));
    let fits = match config.hypervisor {
        HypervisorChoice::Local => !vhost_user,
        HypervisorChoice::Qemu => vhost_user,
        HypervisorChoice::Libvirt => true,
    };
    if !fits {
        return Err(Error::Config(format!(
            "backend \"{}\" and hypervisor \"{}\" do not fit: a vhost-user disk is plugged into a VM by the qemu or \
             libvirt driver, and the qemu driver plugs only vhost-user disks; the local driver needs a block device",
            backend.kind(),
            driver.kind()
        )));
    }
    let records = RecordStore::open(config.records_dir())?;
    let launcher = crate::launch::Launcher::from_config(config, &material)?;
    let tpm = TpmWorker::start(&config.tcti, config.tpm_state_dir())?;
    let (partners, home_roots) = partner_ttps(config, &material, &tls_files, &host_id, &tpm)?;
    let service = AttachmentService {
        config: config.clone(),
        host: AttestedHost { host_id, tpm, ttp },
        partners,
        home_roots,
        backend,
        driver,
        records,
        busy: Mutex::new(HashSet::new()),
        timings: Mutex::new(VecDeque::new()),
        launcher,
        re_encryptions: Mutex::new(HashMap::new()),
    };
    service.report_startup();
    Ok((Arc::new(service), server_tls))
}

/// A TTP client that follows the TLS files: a revoked TTP certificate is refused within
/// 2 s, without a restart.
fn ttp_client(url: &str, files: &TlsFiles) -> Result<net::Client> {
    net::Client::from_files(url, files, Role::Ttp, std::time::Duration::from_secs(30))
        .map_err(|e| Error::Config(format!("TTP client for {url}: {e}")))
}

/// Each `[[partner]]` as served: this host at the partner's TTP (the same TPM, a client
/// trusting only the partner's root) and the check "chains to the partner's root"; and the
/// home roots' check, needed only beside partners. The roots are read once, at start.
fn partner_ttps(
    config: &AgentConfig,
    material: &net::TlsMaterial,
    tls_files: &TlsFiles,
    host_id: &str,
    tpm: &TpmWorker,
) -> Result<(Vec<PartnerTtp>, HomeRoots)> {
    if config.partners.is_empty() {
        return Ok((Vec::new(), None));
    }
    let verifier = |roots: Vec<protocol::pki::TrustedRoot>| {
        protocol::pki::client_cert_verifier(&roots, &[]).map_err(|e| Error::Config(format!("trusted roots: {e}")))
    };
    let roots_where = |wanted: &dyn Fn(&std::path::Path) -> bool| -> Vec<protocol::pki::TrustedRoot> {
        config
            .ca
            .iter()
            .zip(&material.trusted_roots)
            .filter(|(file, _)| wanted(file.path()))
            .map(|(_, r)| r.clone())
            .collect()
    };
    let mut partners = Vec::new();
    for partner in &config.partners {
        let root_file = config.ca.iter().filter(|root| root.path() == partner.ca).cloned().collect();
        let files = TlsFiles { ca: root_file, ..tls_files.clone() };
        if let Some(root) = &partner.volume_root {
            if !root.is_dir() {
                return Err(Error::Config(format!(
                    "partner {:?}: volume_root {} is not a directory",
                    partner.name,
                    root.display()
                )));
            }
        } else {
            tracing::warn!(partner = %partner.name, "no volume_root for this partner: its cloud platform may name any volume path");
        }
        partners.push(PartnerTtp {
            config: partner.clone(),
            host: AttestedHost {
                host_id: host_id.to_string(),
                tpm: tpm.clone(),
                ttp: ttp_client(&partner.ttp_url, &files)?,
            },
            root: verifier(roots_where(&|path| path == partner.ca))?,
        });
        tracing::info!(partner = %partner.name, cloud_platform = %partner.cloud_platform, ttp = %partner.ttp_url,
            "serving a partner cloud: its cloud platform's attaches are keyed by its TTP");
    }
    let home = verifier(roots_where(&|path| !config.partners.iter().any(|p| p.ca == path)))?;
    Ok((partners, Some(home)))
}

/// Serves the agent API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<AttachmentService>,
    tls: net::ServerTls,
    shutdown: CancellationToken,
) -> Result<()> {
    // The configuration's `[limits]` (checked by `build` already).
    let options = service.config().limits.serve_options().map_err(Error::Config)?;
    net::serve_with(listener, tls, http::router(service), options, shutdown)
        .await
        .map_err(|e| Error::Config(format!("serve: {e}")))
}

/// For callers that only have a path (the CLI).
pub fn load_and_build(config_path: &Path) -> Result<(AgentConfig, Arc<AttachmentService>, net::ServerTls)> {
    let config = AgentConfig::load(config_path)?;
    let (service, tls) = build(&config)?;
    Ok((config, service, tls))
}
