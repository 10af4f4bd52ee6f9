//! Building the agent from its configuration and serving its API over mutual TLS.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use net::{Role, TlsFiles};
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
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
    // Follows the TLS files: a revoked TTP certificate is refused within 2 s, without a restart.
    let ttp = net::Client::from_files(&config.ttp_url, &tls_files, Role::Ttp, std::time::Duration::from_secs(30))
        .map_err(|e| Error::Config(format!("TTP client for {}: {e}", config.ttp_url)))?;

    let backend = match config.backend {
        BackendChoice::DmCrypt => Backend::DmCrypt(DmCryptBackend::new()?),
        BackendChoice::Userspace => Backend::Userspace(UserspaceBackend::new(config.userspace_dir())?),
        BackendChoice::VhostUser => Backend::VhostUser(VhostUserBlkBackend::new(config.vhost_user_dir())?),
        BackendChoice::Auto => match DmCryptBackend::new() {
            Ok(b) => Backend::DmCrypt(b),
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
    let service = AttachmentService {
        config: config.clone(),
        host: AttestedHost { host_id, tpm, ttp },
        backend,
        driver,
        records,
        busy: Mutex::new(HashSet::new()),
        timings: Mutex::new(VecDeque::new()),
        launcher,
    };
    service.report_startup();
    Ok((Arc::new(service), server_tls))
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
