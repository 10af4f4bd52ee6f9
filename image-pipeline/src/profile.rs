//! Hardening profiles: one TOML file per role (image-pipeline/profiles/*.toml). A profile says
//! what goes into the image (suite, variant, packages in and out), what the role may run
//! (services, ports), and the hardening baseline (sshd, AppArmor, sysctl, SUID allowlist,
//! SCAP content). The profile's bytes are hashed into the provenance record.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{fsx, Error, Result};

/// The profiles shipped with the tool (also readable from image-pipeline/profiles/).
pub const BUILTIN: &[(&str, &str)] = &[
    ("test-minimal", include_str!("../profiles/test-minimal.toml")),
    ("front-end", include_str!("../profiles/front-end.toml")),
    ("back-end", include_str!("../profiles/back-end.toml")),
    ("database", include_str!("../profiles/database.toml")),
    ("compute-host", include_str!("../profiles/compute-host.toml")),
    ("demo-vm", include_str!("../profiles/demo-vm.toml")),
];

/// One role's hardening profile, parsed from `image-pipeline/profiles/ROLE.toml` (sections as in
/// docs/IMAGE-PIPELINE.md, "Profiles"). Unknown keys are refused, so a typo cannot silently weaken
/// an image; [`Profile::validate`] checks the cross-field rules (ssh port listed in `network.tcp`,
/// nftables and apparmor packages present when asked for).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `[image]`: role, suite, mirrors, variant and the reproducibility inputs of the bootstrap.
    pub image: ImageSection,
    /// `[packages]`: what must, must not and may be installed; enforced by the "package allowlist"
    /// security check (`checks.rs`).
    #[serde(default)]
    pub packages: PackagesSection,
    /// `[services]`: the systemd units that stay enabled or are masked; enforced by the "services"
    /// security check.
    #[serde(default)]
    pub services: ServicesSection,
    /// `[network]`: the role's inbound ports, from which the nftables ruleset is generated and
    /// against which the "listening sockets and firewall" check compares listeners.
    #[serde(default)]
    pub network: NetworkSection,
    /// `[ssh]`: whether sshd is part of the role and on which port.
    #[serde(default)]
    pub ssh: SshSection,
    /// `[hardening]`: AppArmor, the SUID/SGID allowlist and sysctl settings beyond the baseline.
    #[serde(default)]
    pub hardening: HardeningSection,
    /// `[oscap]`: the SCAP Security Guide content `oscap-chroot` evaluates; absent = no OpenSCAP
    /// run.
    #[serde(default)]
    pub oscap: Option<OscapSection>,
}

/// The `[image]` section: what is bootstrapped and how the disk is laid out. Role, suite and
/// variant are recorded in `buildDefinition.externalParameters` of the provenance; every field is
/// covered by the profile's sha256 recorded there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// The role this image serves; versions in the store are kept per role.
    pub role: String,
    /// One-line human description of the role (shown by `image-pipeline profiles`; not used by the
    /// build).
    #[serde(default)]
    pub description: String,
    /// Debian suite to bootstrap (default `bookworm`); `SUITE-updates` and `SUITE-security` are
    /// added when updates are on.
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Debian archive URL (default `http://deb.debian.org/debian`) for the suite and
    /// `SUITE-updates`; must be http(s):// or file:/.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// Security archive URL (default `http://deb.debian.org/debian-security`) for `SUITE-security`.
    #[serde(default = "default_security_mirror")]
    pub security_mirror: String,
    /// Archive components to use (default `main`), joined into each `deb` source line.
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// mmdebstrap variant: minbase, required, important, standard.
    #[serde(default = "default_variant")]
    pub variant: String,
    /// The fixed timestamp of every file in the image (SOURCE_DATE_EPOCH); the environment
    /// variable SOURCE_DATE_EPOCH overrides it.
    pub source_date_epoch: u64,
    /// Size of the root partition in MiB; 0 = computed from the content.
    #[serde(default)]
    pub disk_size_mib: u64,
    /// A kernel, an initramfs and a UEFI boot loader (systemd-boot) in an EFI system partition.
    #[serde(default)]
    pub boot: bool,
    /// Extra kernel command line (AppArmor is added when the profile asks for it).
    #[serde(default)]
    pub kernel_cmdline: String,
    /// Modules the initramfs holds (`MODULES=list` of initramfs-tools, with their
    /// dependencies) instead of most of the kernel's (`MODULES=most`, Debian's default): a
    /// guest that knows its hardware boots faster from a smaller initramfs. Needs `boot`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub initramfs_modules: Vec<String>,
}

/// The `[packages]` section. Checked after the build by the "package allowlist" security check and
/// recorded package by package (with `.deb` sha256) in the provenance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PackagesSection {
    /// Packages passed to mmdebstrap `--include`; each must be installed in the finished image.
    #[serde(default)]
    pub include: Vec<String>,
    /// Packages that must not be in the image (purged if a dependency pulled them in; the
    /// build fails if one cannot be removed).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Glob patterns (`*` and `?`) every installed package must match; empty = any.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The `[services]` section: which systemd units the image may start. Hardening removes every other
/// `*.wants` link; the "services" check fails on any unit enabled but not listed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicesSection {
    /// systemd units that stay enabled; every other enablement link is removed.
    #[serde(default)]
    pub enabled: Vec<String>,
    /// Units masked (linked to /dev/null) so nothing can start them.
    #[serde(default)]
    pub masked: Vec<String>,
}

/// The `[network]` section: the role's ports. Hardening writes them into the default-drop nftables
/// ruleset (`/etc/nftables.conf`); the "listening sockets and firewall" check fails on a socket
/// unit, sshd port or firewall rule outside them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Inbound TCP ports the role serves; the generated nftables rules accept only these.
    #[serde(default)]
    pub tcp: Vec<u16>,
    /// Inbound UDP ports the role serves (e.g. 123 for an NTP server); matched against
    /// `ListenDatagram=` of enabled socket units.
    #[serde(default)]
    pub udp: Vec<u16>,
    /// Require the nftables package (and enable nftables.service) so the rules load at boot.
    #[serde(default)]
    pub firewall: bool,
}

/// The `[ssh]` section. Defaults: enabled, port 22 (which must then be in `network.tcp`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    /// Whether sshd belongs to the role; when it does, hardening installs the sshd drop-in and
    /// first-boot host key generation.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// TCP port sshd listens on; written as `Port` in the drop-in and checked by the "listening
    /// sockets and firewall" and "sshd configuration" checks.
    #[serde(default = "default_ssh_port")]
    pub port: u16,
}

impl Default for SshSection {
    fn default() -> Self {
        Self { enabled: true, port: 22 }
    }
}

/// The `[hardening]` section: baseline settings beyond what every image gets
/// (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 2).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HardeningSection {
    /// AppArmor installed and enforcing (kernel command line, no profile in complain mode).
    #[serde(default)]
    pub apparmor: bool,
    /// Files that may keep their SUID/SGID bit; every other one loses it.
    #[serde(default)]
    pub suid_allowed: Vec<String>,
    /// sysctl settings on top of the pipeline's baseline (same key overrides).
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
}

/// The `[oscap]` section: which SCAP Security Guide content `oscap-chroot` evaluates. The result is
/// recorded, not enforced (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 3, on Debian 12
/// content).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OscapSection {
    /// Path of the SCAP datastream inside the host (e.g.
    /// `/usr/share/xml/scap/ssg/content/ssg-debian11-ds.xml` from ssg-debian); a missing file makes
    /// the OpenSCAP result `skipped`.
    pub datastream: String,
    /// XCCDF profile id inside the datastream (e.g.
    /// `xccdf_org.ssgproject.content_profile_standard`).
    pub profile: String,
}

fn default_suite() -> String {
    "bookworm".into()
}
fn default_mirror() -> String {
    "http://deb.debian.org/debian".into()
}
fn default_security_mirror() -> String {
    "http://deb.debian.org/debian-security".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}
fn default_variant() -> String {
    "minbase".into()
}
fn default_true() -> bool {
    true
}
fn default_ssh_port() -> u16 {
    22
}

/// The sysctl baseline every image gets (CIS/ANSSI-style network and kernel hardening).
pub fn sysctl_baseline() -> BTreeMap<String, String> {
    [
        ("fs.protected_fifos", "2"),
        ("fs.protected_hardlinks", "1"),
        ("fs.protected_regular", "2"),
        ("fs.protected_symlinks", "1"),
        ("fs.suid_dumpable", "0"),
        ("kernel.dmesg_restrict", "1"),
        ("kernel.kptr_restrict", "2"),
        ("kernel.randomize_va_space", "2"),
        ("kernel.unprivileged_bpf_disabled", "1"),
        ("kernel.yama.ptrace_scope", "1"),
        ("net.core.bpf_jit_harden", "2"),
        ("net.ipv4.conf.all.accept_redirects", "0"),
        ("net.ipv4.conf.all.accept_source_route", "0"),
        ("net.ipv4.conf.all.log_martians", "1"),
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.accept_redirects", "0"),
        ("net.ipv4.conf.default.accept_source_route", "0"),
        ("net.ipv4.conf.default.rp_filter", "1"),
        ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv4.tcp_syncookies", "1"),
        ("net.ipv6.conf.all.accept_ra", "0"),
        ("net.ipv6.conf.all.accept_redirects", "0"),
        ("net.ipv6.conf.default.accept_redirects", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Packages no role may carry: clear-text remote logins, legacy daemons, desktop stacks.
pub const ALWAYS_FORBIDDEN: &[&str] = &[
    "telnetd",
    "inetutils-telnetd",
    "rsh-server",
    "rsh-redone-server",
    "nis",
    "talkd",
    "xinetd",
    "tftpd",
    "tftpd-hpa",
    "vsftpd",
    "proftpd-basic",
    "avahi-daemon",
    "cups",
    "xserver-xorg-core",
    "snmpd",
];

/// A profile together with the exact bytes it was read from (for the digest).
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    /// Profile name: the shipped name, or the file stem of a TOML path.
    pub name: String,
    /// Where the bytes came from: `builtin:NAME`, a file path, or `store:ROLE@N` for a patch
    /// rebuilt from the stored copy; used in error messages.
    pub source: String,
    /// The exact bytes read; their sha256 ([`LoadedProfile::digest`]) is `profileSha256` in the
    /// provenance and the profile blob's key in the store.
    pub bytes: Vec<u8>,
    /// The parsed and validated profile.
    pub profile: Profile,
}

impl LoadedProfile {
    /// `name_or_path`: a shipped profile name (test-minimal, front-end, back-end, database,
    /// compute-host) or a path to a TOML file.
    pub fn load(name_or_path: &str) -> Result<Self> {
        let path = Path::new(name_or_path);
        if name_or_path.ends_with(".toml") || path.exists() {
            let bytes = fsx::read(path, "profile")?;
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("profile").to_string();
            return Self::from_bytes(&name, &path.display().to_string(), bytes);
        }
        match BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            Some((n, text)) => Self::from_bytes(n, &format!("builtin:{n}"), text.as_bytes().to_vec()),
            None => Err(Error::Profile {
                path: name_or_path.into(),
                detail: format!(
                    "no such file and not a shipped profile; shipped profiles: {}",
                    BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// Parses and validates a profile from its bytes. `name` becomes the profile name; `source`
    /// only labels errors. Used by `load` and by `patch`, which rebuilds from the profile copy kept
    /// in the store.
    pub fn from_bytes(name: &str, source: &str, bytes: Vec<u8>) -> Result<Self> {
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| Error::Profile { path: source.into(), detail: format!("not UTF-8: {e}") })?;
        let profile: Profile =
            toml::from_str(text).map_err(|e| Error::Profile { path: source.into(), detail: e.to_string() })?;
        profile.validate().map_err(|detail| Error::Profile { path: source.into(), detail })?;
        Ok(Self { name: name.to_string(), source: source.to_string(), bytes, profile })
    }

    /// Hex sha256 of the profile's exact bytes: recorded as `profileSha256` in the provenance, so
    /// `diff` can tell a hardening change from a package change.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(&self.bytes))
    }
}

impl Profile {
    /// Checks what TOML types cannot: role and package names, variant, suite, mirror URLs, unit
    /// names, sysctl keys, absolute SUID paths, and the cross-field rules (ssh port in
    /// `network.tcp`; `firewall` needs nftables, `apparmor` needs apparmor in `packages.include`;
    /// no quotes in `kernel_cmdline`). Returns the first problem as text;
    /// [`LoadedProfile::from_bytes`] turns it into [`Error::Profile`].
    pub fn validate(&self) -> std::result::Result<(), String> {
        let role = &self.image.role;
        if role.is_empty()
            || role.len() > 48
            || !role.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!("image.role {role:?} must be 1-48 characters of a-z, 0-9 and '-'"));
        }
        if !["minbase", "required", "important", "standard", "apt"].contains(&self.image.variant.as_str()) {
            return Err(format!(
                "image.variant {:?} is not one of minbase, required, important, standard, apt",
                self.image.variant
            ));
        }
        if !self.image.suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || self.image.suite.is_empty() {
            return Err(format!("image.suite {:?} is not a suite name", self.image.suite));
        }
        for url in [&self.image.mirror, &self.image.security_mirror] {
            if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("file:/"))
                || url.contains(char::is_whitespace)
            {
                return Err(format!("mirror {url:?} must be an http(s):// or file:/ URL without spaces"));
            }
        }
        if !self.image.initramfs_modules.is_empty() && !self.image.boot {
            return Err("image.initramfs_modules needs image.boot = true".into());
        }
        if let Some(bad) = self.image.initramfs_modules.iter().find(|m| {
            m.is_empty() || !m.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        }) {
            return Err(format!("image.initramfs_modules: {bad:?} is not a module name (a-z, 0-9, '_', '-')"));
        }
        let package_name = |p: &String| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        };
        for p in self.packages.include.iter().chain(&self.packages.exclude) {
            if !package_name(p) {
                return Err(format!("{p:?} is not a Debian package name"));
            }
        }
        for p in &self.packages.include {
            if self.packages.exclude.contains(p) || ALWAYS_FORBIDDEN.contains(&p.as_str()) {
                return Err(format!("package {p} is both included and excluded/forbidden"));
            }
        }
        for unit in self.services.enabled.iter().chain(&self.services.masked) {
            if unit.contains('/') || !unit.contains('.') {
                return Err(format!("{unit:?} is not a systemd unit name like ssh.service"));
            }
        }
        for key in self.hardening.sysctl.keys() {
            if !key.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(format!("sysctl key {key:?} has characters other than a-z, 0-9, '.', '_' and '-'"));
            }
        }
        for v in self.hardening.sysctl.values() {
            if v.contains('\n') {
                return Err("a sysctl value contains a newline".into());
            }
        }
        for path in &self.hardening.suid_allowed {
            if !path.starts_with('/') {
                return Err(format!("suid_allowed entry {path:?} must be an absolute path"));
            }
        }
        if self.ssh.enabled && !self.network.tcp.contains(&self.ssh.port) {
            return Err(format!("ssh is enabled on port {} but network.tcp does not list it", self.ssh.port));
        }
        if self.network.firewall && !self.packages.include.iter().any(|p| p == "nftables") {
            return Err("network.firewall = true needs \"nftables\" in packages.include".into());
        }
        if self.hardening.apparmor && !self.packages.include.iter().any(|p| p == "apparmor") {
            return Err("hardening.apparmor = true needs \"apparmor\" in packages.include".into());
        }
        if self.image.kernel_cmdline.contains(['\n', '"', '\'']) {
            return Err("image.kernel_cmdline may not contain quotes or newlines".into());
        }
        Ok(())
    }

    /// The effective sysctl settings: the baseline, then the profile's own.
    pub fn sysctl(&self) -> BTreeMap<String, String> {
        let mut all = sysctl_baseline();
        all.extend(self.hardening.sysctl.clone());
        all
    }

    /// All packages that must be absent.
    pub fn forbidden_packages(&self) -> Vec<String> {
        let mut all: Vec<String> = ALWAYS_FORBIDDEN.iter().map(|s| s.to_string()).collect();
        all.extend(self.packages.exclude.iter().cloned());
        all.sort();
        all.dedup();
        all
    }
}

/// `*` and `?` glob match (package allowlist patterns, unit names).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_loads_and_validates() {
        for (name, _) in BUILTIN {
            let p = LoadedProfile::load(name).unwrap();
            assert_eq!(&p.profile.image.role, name, "profile {name} must declare role {name}");
            assert_eq!(p.digest().len(), 64);
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let base = include_str!("../profiles/test-minimal.toml");
        let bad = base.replace("role = \"test-minimal\"", "role = \"Bad Role\"");
        let err = LoadedProfile::from_bytes("x", "x.toml", bad.into_bytes()).unwrap_err().to_string();
        assert!(err.contains("image.role"), "{err}");
        let bad = format!("{base}\n[unknown]\nx = 1\n");
        let err = LoadedProfile::from_bytes("x", "x.toml", bad.into_bytes()).unwrap_err().to_string();
        assert!(err.contains("unknown"), "{err}");
    }

    #[test]
    fn globs() {
        assert!(glob_match("lib*", "libc6"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("perl-?ase", "perl-base"));
        assert!(!glob_match("lib*", "perl"));
    }
}
