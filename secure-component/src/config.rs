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
//! [rotation]                               # optional: online re-encryption after a key rotation
//! online_rate_mib_s = 200                  # at most this many MiB/s, so the VM keeps more of the host
//!
//! [launch]                                 # optional, with hypervisor = "qemu": trusted launch
//! allowlist = "/etc/skydd/allowlist.dsse.json"   # from `image-pipeline allowlist`
//! accel = "tcg"                            # "kvm" where /dev/kvm runs guests
//!
//! [[partner]]                              # optional, repeatable: a partner cloud this host also serves
//! name = "cloud-a"                         # for `enroll --ttp`, logs and <state_dir>/enrollments/<name>.json
//! cloud_platform = "cloud-platform-a"      # the client-certificate name of the partner's cloud platform
//! ca = "/etc/skydd/partner-a/ca.pem"       # the root it must chain to: one of the files of `ca`
//! ttp_url = "https://ttp-a.example:7443"   # the partner's TTP, which releases its domains' keys
//! volume_root = "/srv/partner-a/volumes"   # where the partner's volume store is mounted on this host
//! ```
//!
//! # Home and partner clouds
//!
//! `ttp_url` is the home TTP: it releases the keys of every attach the home cloud platform
//! asks for (any cloud-platform certificate that chains to a root of `ca` that no partner
//! names). A `[[partner]]` lets a second cloud's cloud platform place its VMs on this host
//! too (docs/PKI.md "A partner cloud's host"): a request whose client certificate is named
//! `cloud_platform` **and** chains to the partner's `ca` root is served with that partner's
//! TTP, checked against its `volume_root`, and its attachments are listed and detached only
//! by that same cloud platform. A cloud platform that is neither is refused (`forbidden`).
//! List the partner's root in `ca` limited to what this host needs of that cloud, e.g.
//! `{ file = "/etc/skydd/partner-a/ca.pem", allow = [{ role = "ttp", names = ["ttp-a"] },
//! { role = "cloud-platform", names = ["cloud-platform-a"] }] }`; the client for each TTP
//! trusts only its own cloud's roots.
//!
//! Enrollment: `secure-component enroll` enrolls at the home TTP and then at every
//! partner's, all with the same attestation key and PCR-bound binding key (one TPM, one set
//! of keys in `<state_dir>/tpm`); `--ttp NAME` enrolls at one TTP only, reusing those keys
//! while they still fit the host's PCRs. What is per TTP (the host id and EK it enrolled,
//! its reference state there) is kept in `<state_dir>/enrollments/<name>.json` (`home` for
//! the home TTP).

use std::path::{Path, PathBuf};

use protocol::attest::PcrSelection;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which volume backend opens domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// dm-crypt when the kernel has device-mapper, with the userspace engine beside it for
    /// read-write format-2 volumes (docs/DMCRYPT.md "Format 2, read-write"); the userspace
    /// engine alone otherwise.
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

/// The `[rotation]` table: how this host re-encrypts a volume online under a live mapping
/// after its key was rotated (docs/PROTOCOL.md "Online re-encryption").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// At most this many MiB re-encrypted per second on average; absent: flat out (the VM
    /// then runs at about half its throughput meanwhile, docs/PERFORMANCE.md "fio during an
    /// online rotation"). A rotation finished at attach, before the VM sees the volume,
    /// always runs flat out.
    #[serde(default)]
    pub online_rate_mib_s: Option<u64>,
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
    /// The firmware qemu boots (`-bios`): `/usr/share/ovmf/OVMF.fd` (Debian package `ovmf`)
    /// for the pipeline's bootable images, which boot under UEFI; absent: qemu's SeaBIOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
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
    /// Online re-encryption after a key rotation.
    #[serde(default)]
    pub rotation: RotationConfig,
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
    /// `[[partner]]` tables: partner clouds whose cloud platforms may also place VMs here,
    /// each served with its own TTP (see the module documentation).
    #[serde(default, rename = "partner", skip_serializing_if = "Vec::is_empty")]
    pub partners: Vec<PartnerConfig>,
}

/// The name of the home TTP in `secure-component enroll --ttp` and in
/// `<state_dir>/enrollments/`; no partner may take it.
pub const HOME_TTP: &str = "home";

/// A `[[partner]]` table: a partner cloud whose cloud platform places VMs on this host,
/// whose TTP releases the keys of those attaches (docs/PKI.md "A partner cloud's host").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// A short name of the partner ("cloud-a"): `enroll --ttp NAME`, logs, and the
    /// enrollment record `<state_dir>/enrollments/<name>.json`.
    pub name: String,
    /// The subject name of the partner cloud platform's client certificate.
    pub cloud_platform: String,
    /// The trusted root (one of the files listed in `ca`) the partner's cloud platform and
    /// TTP certificates chain to.
    pub ca: PathBuf,
    /// The partner's TTP (comma-separated URLs are replicas of it, as for `ttp_url`).
    pub ttp_url: String,
    /// Where the partner's volume store is reachable on this host: its attaches must name a
    /// volume below it (unset: any path, with a warning at start, as for `volume_root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_root: Option<PathBuf>,
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
        config.check_partners()?;
        Ok(config)
    }

    /// The `[[partner]]` tables must name distinct clouds, each with a root of `ca`, a TTP
    /// other than the home one, and leave at least one root for the home cloud.
    fn check_partners(&self) -> Result<()> {
        let urls = |list: &str| -> Vec<String> {
            list.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect()
        };
        let home_urls = urls(&self.ttp_url);
        let mut seen_urls: Vec<(String, &str)> = home_urls.iter().map(|u| (u.clone(), HOME_TTP)).collect();
        for (i, partner) in self.partners.iter().enumerate() {
            let which = format!("partner #{} ({:?})", i + 1, partner.name);
            protocol::domain::validate_name("partner name", &partner.name)
                .map_err(|e| Error::Config(format!("{which}: {e}")))?;
            if partner.name == HOME_TTP {
                return Err(Error::Config(format!("{which}: the name {HOME_TTP:?} is the home TTP's; choose another")));
            }
            protocol::pki::check_name(&partner.cloud_platform)
                .map_err(|e| Error::Config(format!("{which}: cloud_platform: {e}")))?;
            if let Some(earlier) = self.partners[..i].iter().find(|p| p.name == partner.name) {
                return Err(Error::Config(format!(
                    "{which}: partner {:?} is configured twice; each [[partner]] needs its own name",
                    earlier.name
                )));
            }
            if let Some(earlier) =
                self.partners[..i].iter().find(|p| p.cloud_platform == partner.cloud_platform && p.ca == partner.ca)
            {
                return Err(Error::Config(format!(
                    "{which}: cloud platform {:?} under root {} is already partner {:?}; one cloud platform has one TTP",
                    partner.cloud_platform,
                    partner.ca.display(),
                    earlier.name
                )));
            }
            let own = urls(&partner.ttp_url);
            if own.is_empty() {
                return Err(Error::Config(format!("{which}: ttp_url is empty")));
            }
            for url in own {
                if let Some((_, other)) = seen_urls.iter().find(|(u, _)| *u == url) {
                    let whose = if *other == HOME_TTP {
                        "the home TTP's (ttp_url)".to_string()
                    } else {
                        format!("partner {other:?}'s")
                    };
                    return Err(Error::Config(format!(
                        "{which}: ttp_url {url} is also {whose}; a partner's keys come from the partner's own TTP"
                    )));
                }
                seen_urls.push((url, &partner.name));
            }
            if !self.ca.iter().any(|root| root.path() == partner.ca) {
                return Err(Error::Config(format!(
                    "{which}: ca {} is not one of the trusted roots in `ca`; list it there, limited to the partner's \
                     TTP and cloud platform (docs/PKI.md \"Federation\")",
                    partner.ca.display()
                )));
            }
        }
        if !self.partners.is_empty() && self.home_roots().next().is_none() {
            return Err(Error::Config(
                "every root of `ca` is a partner's: the home cloud needs a root of its own (the first of `ca`)".into(),
            ));
        }
        Ok(())
    }

    /// The roots of `ca` no partner names: the home cloud's.
    pub fn home_roots(&self) -> impl Iterator<Item = &net::TrustedRootFile> {
        self.ca.iter().filter(|root| !self.partners.iter().any(|p| p.ca == root.path()))
    }

    /// The partner named `name`, or `None` for [`HOME_TTP`]; an error naming the configured
    /// ones otherwise.
    pub fn partner(&self, name: &str) -> Result<Option<&PartnerConfig>> {
        if name == HOME_TTP {
            return Ok(None);
        }
        self.partners.iter().find(|p| p.name == name).map(Some).ok_or_else(|| {
            let known: Vec<&str> =
                std::iter::once(HOME_TTP).chain(self.partners.iter().map(|p| p.name.as_str())).collect();
            Error::Config(format!("no TTP named {name:?} in the configuration; configured: {}", known.join(", ")))
        })
    }

    /// Encodes the configuration as TOML (what `from_toml` reads back).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("encoding the configuration: {e}")))
    }

    /// Where the TPM worker keeps the AK and binding key blobs.
    pub fn tpm_state_dir(&self) -> PathBuf {
        self.state_dir.join("tpm")
    }

    /// One enrollment record per TTP, `<name>.json` ([`HOME_TTP`] or a partner's name).
    pub fn enrollments_dir(&self) -> PathBuf {
        self.state_dir.join("enrollments")
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

    const HOME: &str = r#"
        tcti = "swtpm:host=127.0.0.1,port=2321"
        state_dir = "/var/lib/skydd/sc"
        ttp_url = "https://ttp-b.example:7443"
        ca = ["/etc/skydd/ca.pem", { file = "/etc/skydd/partner-a/ca.pem", allow = [{ role = "ttp" }, { role = "cloud-platform", names = ["cloud-platform-a"] }] }]
        cert = "b-compute-07.pem"
        key = "b-compute-07-key.pem"
    "#;

    fn partner(name: &str, url: &str) -> String {
        format!(
            "[[partner]]\nname = \"{name}\"\ncloud_platform = \"cloud-platform-a\"\nca = \"/etc/skydd/partner-a/ca.pem\"\nttp_url = \"{url}\"\n"
        )
    }

    #[test]
    fn partner_tables_are_checked_when_read() {
        let one = format!("{HOME}\n{}", partner("cloud-a", "https://ttp-a.example:7443"));
        let c = AgentConfig::from_toml(&one).unwrap();
        assert_eq!(c.partners.len(), 1);
        assert_eq!(c.partners[0].cloud_platform, "cloud-platform-a");
        assert_eq!(
            c.home_roots().map(|r| r.path().to_path_buf()).collect::<Vec<_>>(),
            vec![PathBuf::from("/etc/skydd/ca.pem")]
        );
        assert_eq!(c.partner("cloud-a").unwrap().unwrap().name, "cloud-a");
        assert!(c.partner(HOME_TTP).unwrap().is_none());
        assert!(c.partner("cloud-z").unwrap_err().to_string().contains("configured: home, cloud-a"));
        assert_eq!(AgentConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);

        let refused = |text: String, words: &str| {
            let e = AgentConfig::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        };
        let twice = format!("{one}{}", partner("cloud-a", "https://ttp-c.example:7443"));
        refused(twice, "configured twice");
        let same_cp = format!("{one}{}", partner("cloud-c", "https://ttp-c.example:7443"));
        refused(same_cp, "one cloud platform has one TTP");
        refused(format!("{HOME}\n{}", partner("cloud-a", "https://ttp-b.example:7443/")), "is also the home TTP's");
        refused(format!("{HOME}\n{}", partner(HOME_TTP, "https://ttp-a.example:7443")), "is the home TTP's");
        let unlisted = one.replace("ca = \"/etc/skydd/partner-a/ca.pem\"\nttp", "ca = \"/etc/skydd/other.pem\"\nttp");
        refused(unlisted, "is not one of the trusted roots");
        let only_partner_roots = one.replace("\"/etc/skydd/ca.pem\", ", "");
        refused(only_partner_roots, "needs a root of its own");
        refused(format!("{one}volume = \"x\"\n"), "volume");
    }
}
