//! The secure component agent's configuration: one TOML file (`secure-component serve
//! --config sc.toml`). Example:
//!
//! ```toml
//! listen = "0.0.0.0:7600"
//! host_id = "host-1"                       # = the CN of `cert`; may be left out
//! tcti = "device:/dev/tpmrm0"              # or "swtpm:host=127.0.0.1,port=2321"
//! state_dir = "/var/lib/skydd/sc"          # TPM key blobs, attachment records
//! vm_root = "/var/lib/skydd/vms"           # local driver: <vm_root>/<vm_id>/<domain_id>
//! backend = "auto"                         # "auto" | "dm-crypt" | "userspace" | "vhost-user"
//! hypervisor = "local"                     # "local" | "libvirt" | "qemu"
//! ttp_url = "https://ttp.example:7443"
//! ca = ["/etc/skydd/ca.pem"]
//! cert = "/etc/skydd/host-1.pem"           # role secure-component
//! key = "/etc/skydd/host-1-key.pem"        # mode 0600
//!
//! [pcr_selection]                          # what enrollment binds the binding key to
//! bank = "sha256"
//! indices = [0, 1, 2, 3, 4, 5, 6, 7, 11]
//!
//! [libvirt]                                # only with hypervisor = "libvirt"
//! uri = "qemu:///system"
//!
//! [qemu]                                   # only with hypervisor = "qemu"
//! qmp_dir = "/run/skydd/qmp"               # <qmp_dir>/<vm_id>.qmp: each VM's QMP socket
//!
//! [launch]                                 # optional, with hypervisor = "qemu": trusted launch
//! allowlist = "/etc/skydd/allowlist.dsse.json"   # from `image-pipeline allowlist`
//! accel = "tcg"                            # "kvm" where /dev/kvm runs guests
//! ```

use std::path::{Path, PathBuf};

use protocol::attest::PcrSelection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which volume backend opens domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// dm-crypt when the kernel has device-mapper, the userspace engine otherwise.
    #[default]
    Auto,
    /// Always the kernel's dm-crypt (docs/DMCRYPT.md); start-up fails without device-mapper.
    DmCrypt,
    /// Always the userspace engine (FUSE + loop device, [`crate::volume::userspace`]), even
    /// where dm-crypt is available.
    Userspace,
    /// The same engine served to a qemu guest as a vhost-user-blk disk
    /// ([`crate::volume::vhost_user`], docs/VHOST-USER.md); needs `hypervisor = "qemu"` or
    /// `"libvirt"`.
    VhostUser,
}

/// How opened volumes reach VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorChoice {
    /// Mount under `<vm_root>/<vm_id>/<domain_id>` (all-in-one cloud, tests).
    #[default]
    Local,
    /// `virsh attach-device --live` into the libvirt domain named like the VM.
    Libvirt,
    /// QMP hot-plug into a running qemu whose monitor is `<qmp_dir>/<vm_id>.qmp`
    /// ([`crate::hypervisor::qemu`]).
    Qemu,
}

/// The `[qemu]` table: where the `qemu` driver finds each VM's QMP monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Directory of the QMP sockets, one `<vm_id>.qmp` per VM; `<state_dir>/qmp` if absent.
    #[serde(default)]
    pub qmp_dir: Option<PathBuf>,
}

/// The `[launch]` table: this host launches VMs itself, only from images on a signed
/// allowlist ([`crate::launch`], docs/PROTOCOL.md "Trusted launch"). Needs `hypervisor =
/// "qemu"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// The signed allowlist (`image-pipeline allowlist --out FILE`), checked at start under
    /// `ca` and `crl`; a new list takes a restart.
    pub allowlist: PathBuf,
    /// The name of the `cloud-platform` certificate that must sign it (default
    /// `image-pipeline`).
    #[serde(default = "default_image_signer")]
    pub signer: String,
    /// The qemu program (default `qemu-system-x86_64` from PATH).
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// qemu's accelerator: `kvm` where /dev/kvm runs guests, `tcg` (default) elsewhere, or
    /// `kvm:tcg` for the first that works.
    #[serde(default = "default_accel")]
    pub accel: String,
}

fn default_image_signer() -> String {
    "image-pipeline".to_string()
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

fn default_accel() -> String {
    "tcg".to_string()
}

/// The `[libvirt]` table: how the `libvirt` driver reaches libvirtd. Ignored by the `local`
/// driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// Connection URI (`virsh -c`), e.g. "qemu:///system"; libvirt's default if absent.
    #[serde(default)]
    pub uri: Option<String>,
    /// The virsh program; "virsh" from PATH if absent.
    #[serde(default)]
    pub virsh: Option<PathBuf>,
}

/// The whole agent configuration file (see the module documentation for an example).
/// Unknown keys are refused, so a misspelt option is an error, not a silent default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address the agent API listens on (mutual TLS; only the cloud platform may call).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// This host's id as the TTP knows it: the name in `cert`. Taken from the certificate
    /// when absent; a different value is refused.
    #[serde(default)]
    pub host_id: Option<String>,
    /// The TPM: "device:/dev/tpmrm0" on a real host, "swtpm:host=127.0.0.1,port=P" for swtpm.
    pub tcti: String,
    /// TPM key blobs (`tpm/`), attachment records (`attachments/`), userspace mappings
    /// (`userspace/`). Keep it on persistent storage; it never holds a domain key.
    pub state_dir: PathBuf,
    /// Root of the per-VM directories of the local driver.
    #[serde(default = "default_vm_root")]
    pub vm_root: PathBuf,
    /// The directory holding the volume files this host may open (the cloud platform's
    /// volume store, shared with the hosts). When set, an attach naming a `volume_path`
    /// outside it (after resolving symlinks) is refused before any key is asked for. Unset:
    /// any path the cloud platform names is opened (a warning at start; set it on every
    /// production host).
    #[serde(default)]
    pub volume_root: Option<PathBuf>,
    /// `[limits]`: connection and request-rate limits per identity (docs/CLOUD-API.md
    /// "Connection limits"); every key optional.
    #[serde(default)]
    pub limits: net::ConnectionLimits,
    /// Which volume backend opens domains; `auto` by default.
    #[serde(default)]
    pub backend: BackendChoice,
    /// Which hypervisor driver hands opened volumes to VMs; `local` by default.
    #[serde(default)]
    pub hypervisor: HypervisorChoice,
    /// Settings of the `libvirt` driver.
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// Settings of the `qemu` driver.
    #[serde(default)]
    pub qemu: QemuConfig,
    /// Trusted launch: VMs this host starts from allowlisted images (absent: it launches none).
    #[serde(default)]
    pub launch: Option<LaunchConfig>,
    /// The TTP's base URL.
    pub ttp_url: String,
    /// Trusted CA roots: the own cloud's first, federated partners' after. Each a PEM file
    /// path (that root may issue every role), or `{ file = "PATH", allow = [{ role = "ROLE",
    /// names = ["NAME-or-PATTERN", ...] }, ...] }` to limit what it may issue (docs/PKI.md
    /// "Federation").
    pub ca: Vec<net::TrustedRootFile>,
    /// Certificate revocation lists (PEM files), one per trusted CA (CA_DIR/crl.pem).
    /// Checked on every TLS peer; a change is picked up for incoming connections without a
    /// restart. Empty: nothing is revoked.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Own certificate (role secure-component) and key.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM); keep it mode 0600.
    pub key: PathBuf,
    /// PCRs the binding key is bound to at enrollment (`secure-component enroll`).
    #[serde(default)]
    pub pcr_selection: PcrSelection,
    /// The host's region (jurisdiction), e.g. "eu-north", claimed at enrollment. The host's
    /// start-up must extend PCR 12 with its measurement and `pcr_selection` must include 12
    /// (docs/TPM.md "Location"); the TTP refuses the claim otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:7600".to_string()
}

fn default_vm_root() -> PathBuf {
    PathBuf::from("/var/lib/skydd/vms")
}

impl AgentConfig {
    /// Reads and parses the file at `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text; fails with [`Error::Config`] naming the bad key or value.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        // The TTP refuses them too (pcr_resettable); say so before enrolling.
        let resettable = config.pcr_selection.resettable_indices();
        if !resettable.is_empty() {
            return Err(Error::Config(format!(
                "pcr_selection contains PCR {:?}, which any process can reset (TPM2_PCR_Reset at locality 0); use PCRs 0-15",
                resettable
            )));
        }
        Ok(config)
    }

    /// Encodes the configuration as TOML (what `from_toml` reads back).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("encoding the configuration: {e}")))
    }

    /// Where the TPM worker keeps the AK and binding key blobs.
    pub fn tpm_state_dir(&self) -> PathBuf {
        self.state_dir.join("tpm")
    }

    /// One JSON record per attachment (no key material).
    pub fn records_dir(&self) -> PathBuf {
        self.state_dir.join("attachments")
    }

    /// The userspace backend's mapping records and FUSE mount points.
    pub fn userspace_dir(&self) -> PathBuf {
        self.state_dir.join("userspace")
    }

    /// The vhost-user sockets of the `vhost-user` backend.
    pub fn vhost_user_dir(&self) -> PathBuf {
        self.state_dir.join("vhost-user")
    }

    /// The QMP sockets the `qemu` driver connects to.
    pub fn qmp_dir(&self) -> PathBuf {
        self.qemu.qmp_dir.clone().unwrap_or_else(|| self.state_dir.join("qmp"))
    }

    /// Device XML files of the libvirt driver.
    pub fn libvirt_dir(&self) -> PathBuf {
        self.state_dir.join("libvirt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_full_configs() {
        let minimal = r#"
            tcti = "swtpm:host=127.0.0.1,port=2321"
            state_dir = "/var/lib/skydd/sc"
            ttp_url = "https://127.0.0.1:7443"
            ca = ["ca.pem"]
            cert = "host-1.pem"
            key = "host-1-key.pem"
        "#;
        let c = AgentConfig::from_toml(minimal).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7600");
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.hypervisor, HypervisorChoice::Local);
        assert_eq!(c.pcr_selection, PcrSelection::default_host());
        assert_eq!(c.records_dir(), PathBuf::from("/var/lib/skydd/sc/attachments"));

        let full = format!(
            "{minimal}\nbackend = \"dm-crypt\"\nhypervisor = \"libvirt\"\nhost_id = \"host-1\"\n[libvirt]\nuri = \"qemu:///system\"\n[pcr_selection]\nbank = \"sha256\"\nindices = [7]\n"
        );
        let c = AgentConfig::from_toml(&full).unwrap();
        assert_eq!(c.backend, BackendChoice::DmCrypt);
        assert_eq!(c.hypervisor, HypervisorChoice::Libvirt);
        assert_eq!(c.libvirt.uri.as_deref(), Some("qemu:///system"));
        assert_eq!(c.pcr_selection.indices, vec![7]);
        assert_eq!(AgentConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);

        let typo = format!("{minimal}\nbackedn = \"userspace\"\n");
        let e = AgentConfig::from_toml(&typo).unwrap_err().to_string();
        assert!(e.contains("backedn"), "{e}");
        let bad = format!("{minimal}\nbackend = \"lukes\"\n");
        assert!(AgentConfig::from_toml(&bad).is_err());
        // Issue 21: a resettable PCR in the selection is refused at load.
        let debug = format!("{minimal}\n[pcr_selection]\nbank = \"sha256\"\nindices = [0, 16]\n");
        let e = AgentConfig::from_toml(&debug).unwrap_err().to_string();
        assert!(e.contains("PCR [16]"), "{e}");
    }
}
