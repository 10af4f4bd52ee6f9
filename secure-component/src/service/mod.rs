//! The secure component agent (docs/CLOUD-API.md, "Secure component agent"): the cloud
//! platform asks it over mutual TLS to attach a domain to a VM on this host, to detach it,
//! and to list what is attached.
//!
//! Attach runs the mount flow (docs/CLOUD-API.md, "Message sequence: attach"): challenge
//! from the TTP, TPM quote, key release, TPM decryption under the PCR policy, then the volume
//! backend opens the volume with the key (dm-crypt or the userspace engine), the key is
//! wiped, the hypervisor driver gives the device to the VM, and a small JSON record (never
//! key material) is written to `<state_dir>/attachments/<attachment id>.json`.
//!
//! Restarts: records are re-read at start-up and listed. dm-crypt mappings live in the
//! kernel and are found again as attached. A userspace mapping is served by this process
//! (FUSE), so it cannot outlive it: on an orderly stop the agent unmounts the VM's file
//! system and closes the mapping itself (nothing is lost), after a crash the kernel aborts
//! the FUSE connection; either way the restarted agent lists the attachment as **stale**
//! with the reason, and `DELETE` tears down whatever is left. It is not re-attached
//! automatically: that needs a fresh key release, hence a fresh grant from a domain manager.
//!
//! Modules by step: [`startup`] builds and serves the agent, [`clouds`] tells which cloud
//! (home or a `[[partner]]`) a request is for and keeps the enrollment of each TTP, `attach`
//! and `detach` are the two flows, `status` cross-checks records with the backend and the
//! driver, [`backend`] wraps the volume backend in use, and a reservation keeps two requests
//! off one attachment or mapping at a time.

pub mod backend;
pub mod clouds;
pub mod http;
pub mod records;
pub mod startup;

mod attach;
mod detach;
mod integrity;
mod reservation;
mod rotate;
mod status;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::host::{AttestedHost, EnrollmentResult};
use crate::hypervisor::HypervisorDriver;
pub use attach::AttachTimings;
pub use backend::{mapping_name, Backend, MappingState};
pub use clouds::{Cloud, EnrollmentRecord};
use records::RecordStore;
pub use startup::{build, load_and_build, serve};

/// How many recent attach timings [`AttachmentService::recent_timings`] keeps.
const TIMINGS_KEPT: usize = 1000;

/// The agent: the host's TPM and TTP client, a volume backend, a hypervisor driver and the
/// attachment records.
pub struct AttachmentService {
    config: AgentConfig,
    /// This host as the home TTP sees it.
    host: AttestedHost,
    /// The partner clouds this host also serves (`[[partner]]`), each with its TTP.
    partners: Vec<clouds::PartnerTtp>,
    /// The home cloud's roots, when partners are configured.
    home_roots: clouds::HomeRoots,
    backend: Backend,
    driver: Box<dyn HypervisorDriver>,
    records: RecordStore,
    /// Attachment ids and mapping names with an attach or detach in progress.
    busy: Mutex<HashSet<String>>,
    timings: Mutex<VecDeque<AttachTimings>>,
    /// Trusted launch of VMs from allowlisted images, when configured (`[launch]`).
    launcher: Option<crate::launch::Launcher>,
    /// Online re-encryptions running under a live mapping, by mapping name (rotate.rs):
    /// stopped and waited for before the mapping closes.
    re_encryptions: Mutex<HashMap<String, rotate::ReEncryption>>,
}

impl AttachmentService {
    /// The configuration the agent was started with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// This host as the home TTP sees it (host id, TPM worker, TTP client);
    /// [`AttachmentService::host_for`] for a partner's.
    pub fn attested_host(&self) -> &AttestedHost {
        &self.host
    }

    /// The VM launcher, when this host launches VMs (`[launch]` in its configuration).
    pub fn launcher(&self) -> Result<&crate::launch::Launcher> {
        self.launcher.as_ref().ok_or_else(|| {
            Error::Prerequisites("this host launches no VMs: its configuration has no [launch] table".into())
        })
    }

    /// Trusted launch of `request`'s VM, then its report to the TTP, which audits the attempt
    /// (docs/PROTOCOL.md "Trusted launch"): what `POST /v1/vms` does. Beside the outcome, the
    /// seq of the TTP's `launch` record, or `None` when the report did not reach the TTP or
    /// could not be made (the outcome stands either way: a refusal stays a refusal).
    pub async fn launch_vm(
        self: &Arc<Self>,
        request: crate::launch::LaunchRequest,
    ) -> (Result<crate::launch::LaunchedVm>, Option<u64>) {
        let service = self.clone();
        let launched =
            tokio::task::spawn_blocking(move || service.launcher().map(|launcher| launcher.launch_reported(&request)))
                .await;
        let (outcome, report) = match launched {
            Ok(Ok(launched)) => launched,
            Ok(Err(no_launcher)) => return (Err(no_launcher), None),
            Err(join) => {
                let detail = format!("the launch task failed: {join}");
                return (Err(Error::Hypervisor { driver: "qemu", detail }), None);
            }
        };
        let audit_seq = match report {
            Some(report) => crate::launch::report_to_ttp(&self.host.ttp, &report).await,
            None => None,
        };
        (outcome, audit_seq)
    }

    /// "dm-crypt" or "userspace", as reported by `/v1/health`.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// "local" or "libvirt", as reported by `/v1/health`.
    pub fn driver_kind(&self) -> &'static str {
        self.driver.kind()
    }

    /// Enrolls this host's TPM with the home TTP with fresh keys, binding to the configured
    /// PCR selection (partners' TTPs must be enrolled again afterwards:
    /// [`AttachmentService::enroll_everywhere`] does both).
    pub async fn enroll(&self) -> Result<EnrollmentResult> {
        self.enroll_with(crate::config::HOME_TTP, crate::host::EnrollmentKeys::Fresh).await
    }

    /// The timings of the most recent attaches (oldest first), for measurements.
    pub fn recent_timings(&self) -> Vec<AttachTimings> {
        self.timings.lock().map(|t| t.iter().copied().collect()).unwrap_or_default()
    }
}

impl Drop for AttachmentService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_attachment_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "attachment id {id:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ . not starting with '.'"
        )))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_ids() {
        assert!(check_attachment_id("att-1_x.y").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(129)] {
            assert!(check_attachment_id(bad).is_err(), "{bad:?}");
        }
    }
}
