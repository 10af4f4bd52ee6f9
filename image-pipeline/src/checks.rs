//! Automated security tests, run after every build and patch on the finished root tree. Any
//! violation fails the pipeline; all results (passes too) go into the provenance record.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{fsx, Result};
use crate::harden::{NFTABLES_FILE, PIPELINE_UNITS, SYSCTL_FILE};
use crate::profile::{glob_match, Profile};
use crate::tree::{self, at};

/// The result of one security check, recorded in the provenance whether it passed or not, so an
/// auditor sees the inventories behind a pass too.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckResult {
    /// Check name, e.g. "services", "sshd configuration", "SUID/SGID inventory"; prefixes each
    /// violation.
    pub name: String,
    /// True exactly when `violations` is empty.
    pub passed: bool,
    /// What was looked at (inventories, effective settings).
    pub findings: Vec<String>,
    /// Why it failed; empty when passed.
    pub violations: Vec<String>,
}

impl CheckResult {
    fn new(name: &str, findings: Vec<String>, violations: Vec<String>) -> Self {
        Self { name: name.into(), passed: violations.is_empty(), findings, violations }
    }
}

/// What `oscap-chroot` reported for the profile's SCAP content. Recorded but not enforced: Debian
/// 12's ssg-debian has no bookworm content (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OscapResult {
    /// `pass`, `fail` (some rule failed), `not-applicable` (the content's CPE platform does not
    /// match, every rule `notapplicable`), `skipped` (content or oscap-chroot missing) or `error`.
    pub status: String,
    /// Path of the SCAP datastream evaluated.
    pub datastream: String,
    /// XCCDF profile id evaluated.
    pub profile: String,
    /// Number of rules per result (`pass`, `fail`, `notapplicable`, ...).
    pub counts: BTreeMap<String, usize>,
    /// Ids of the rules whose result was `fail`.
    pub failed_rules: Vec<String>,
    /// Why the status is what it is when it is not `pass`/`fail` (e.g. the Debian 12 content gap);
    /// empty otherwise.
    pub note: String,
}

/// All security test results of one build; the `tests` of the provenance's `skydd` record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestReport {
    /// The pipeline's own checks, in a fixed order; these are the enforced gate.
    pub checks: Vec<CheckResult>,
    /// The OpenSCAP result; `None` when the profile has no `[oscap]` or OpenSCAP was turned off.
    pub oscap: Option<OscapResult>,
}

impl TestReport {
    /// Whether every check passed (OpenSCAP is not part of the verdict). A failing report keeps a
    /// build out of the store and makes `verify` refuse the record.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// Every violation as `CHECK: DETAIL`, for error messages and the `ChecksFailed` summary.
    pub fn violations(&self) -> Vec<String> {
        self.checks.iter().flat_map(|c| c.violations.iter().map(move |v| format!("{}: {v}", c.name))).collect()
    }
}

/// Runs every check on the unpacked tree at `root` against `profile` (and OpenSCAP when `oscap` is
/// true and the profile has `[oscap]`): services, listening sockets and firewall, sshd
/// configuration, SUID/SGID inventory, package allowlist, world-writable files, passwords, sysctl
/// baseline, AppArmor. Errors only when the tree cannot be read; violations go into the report.
pub fn run_all(root: &Path, profile: &Profile, oscap: bool) -> Result<TestReport> {
    let installed: Vec<String> = crate::debian::installed_packages(root)?.into_iter().map(|(n, _, _)| n).collect();
    let checks = vec![
        check_services(root, profile)?,
        check_sockets(root, profile, &installed)?,
        check_sshd(root, profile)?,
        check_suid(root, profile)?,
        check_packages(profile, &installed),
        check_world_writable(root)?,
        check_passwords(root)?,
        check_sysctl(root, profile)?,
        check_apparmor(root, profile, &installed)?,
    ];
    let oscap = match (&profile.oscap, oscap) {
        (Some(section), true) => Some(run_oscap(root, &section.datastream, &section.profile)),
        _ => None,
    };
    Ok(TestReport { checks, oscap })
}

fn check_services(root: &Path, profile: &Profile) -> Result<CheckResult> {
    let enabled = tree::enabled_units(root)?;
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    for (unit, by) in &enabled {
        findings.push(format!("enabled: {unit} ({by})"));
        if !profile.services.enabled.contains(unit) && !PIPELINE_UNITS.contains(&unit.as_str()) {
            violations.push(format!("{unit} is enabled ({by}) but the profile does not list it"));
        }
    }
    for unit in &profile.services.enabled {
        if !enabled.iter().any(|(u, _)| u == unit) {
            violations.push(format!("the profile needs {unit} enabled, but it is not (is its package installed?)"));
        }
    }
    for unit in &profile.services.masked {
        if !tree::is_masked(root, unit) {
            violations.push(format!("{unit} should be masked"));
        }
    }
    Ok(CheckResult::new("services", findings, violations))
}

fn check_sockets(root: &Path, profile: &Profile, installed: &[String]) -> Result<CheckResult> {
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    // Socket units that systemd would listen on.
    for (unit, _) in tree::enabled_units(root)?.into_iter().filter(|(u, _)| u.ends_with(".socket")) {
        let Some((_, host)) = tree::find_unit(root, &unit) else { continue };
        let text = fsx::read_string(&host, "socket unit")?;
        for key in ["ListenStream", "ListenDatagram", "ListenSequentialPacket"] {
            for value in tree::unit_values(&text, key) {
                findings.push(format!("{unit}: {key}={value}"));
                if value.starts_with('/') || value.starts_with('@') {
                    continue;
                }
                let port = value.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                let allowed = if key == "ListenDatagram" { &profile.network.udp } else { &profile.network.tcp };
                match port {
                    Some(p) if allowed.contains(&p) => {}
                    _ => violations.push(format!("{unit} listens on {value} ({key}), not a port of this role")),
                }
            }
        }
    }
    // sshd's listening port.
    for port in sshd_effective(root)?.get("port").cloned().unwrap_or_default() {
        findings.push(format!("sshd Port {port}"));
        if !port.parse::<u16>().is_ok_and(|p| profile.network.tcp.contains(&p)) {
            violations.push(format!("sshd listens on port {port}, not a port of this role"));
        }
    }
    // Firewall rules must allow exactly the role's ports.
    let nft = std::fs::read_to_string(at(root, NFTABLES_FILE)).unwrap_or_default();
    let ports_in = |proto: &str| -> Vec<u16> {
        nft.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{proto} dport {{")))
            .flat_map(|rest| {
                rest.split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|p| p.trim().parse().ok())
                    .collect::<Vec<u16>>()
            })
            .collect()
    };
    for (proto, expected) in [("tcp", &profile.network.tcp), ("udp", &profile.network.udp)] {
        let mut want = expected.clone();
        want.sort();
        want.dedup();
        let got = ports_in(proto);
        findings.push(format!("nftables accepts {proto} {got:?}"));
        if got != want {
            violations.push(format!("{NFTABLES_FILE} accepts {proto} {got:?}, the profile says {want:?}"));
        }
    }
    if !nft.contains("policy drop") {
        violations.push(format!("{NFTABLES_FILE} has no default-drop input policy"));
    }
    if profile.network.firewall {
        if !installed.iter().any(|p| p == "nftables") {
            violations.push("the profile requires a firewall but nftables is not installed".into());
        }
        if !tree::enabled_units(root)?.iter().any(|(u, _)| u == "nftables.service") {
            violations.push("the profile requires a firewall but nftables.service is not enabled".into());
        }
    }
    Ok(CheckResult::new("listening sockets and firewall", findings, violations))
}

/// sshd's effective settings from the files in the image: sshd_config with its Include
/// directives expanded in place, first value of each keyword wins (as sshd reads them).
pub fn sshd_effective(root: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let main = at(root, "/etc/ssh/sshd_config");
    if !main.exists() {
        return Ok(settings);
    }
    let mut lines = Vec::new();
    read_sshd_lines(root, &main, &mut lines, 0)?;
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(2, |c: char| c.is_whitespace() || c == '=');
        let key = parts.next().unwrap_or("").to_ascii_lowercase();
        let value = parts.next().unwrap_or("").trim().to_string();
        if key == "match" {
            break; // settings after Match apply conditionally; the global ones are done.
        }
        if key == "port" || key == "listenaddress" {
            // Multiple Port lines add up, but only from the first file that sets any.
            settings.entry(key).or_default().push(value);
        } else {
            settings.entry(key).or_insert_with(|| vec![value]);
        }
    }
    Ok(settings)
}

fn read_sshd_lines(root: &Path, file: &Path, out: &mut Vec<String>, depth: usize) -> Result<()> {
    if depth > 4 {
        return Ok(());
    }
    let text = fsx::read_string(file, "sshd configuration")?;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.to_ascii_lowercase().starts_with("include ") {
            for pattern in trimmed[8..].split_whitespace() {
                let pattern =
                    if pattern.starts_with('/') { pattern.to_string() } else { format!("/etc/ssh/{pattern}") };
                let (dir, file_glob) = pattern.rsplit_once('/').unwrap_or(("/etc/ssh", &pattern));
                let Ok(read) = std::fs::read_dir(at(root, dir)) else { continue };
                let mut names: Vec<String> =
                    read.filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string))).collect();
                names.sort();
                for name in names.into_iter().filter(|n| glob_match(file_glob, n)) {
                    read_sshd_lines(root, &at(root, &format!("{dir}/{name}")), out, depth + 1)?;
                }
            }
        } else {
            out.push(line.to_string());
        }
    }
    Ok(())
}

fn check_sshd(root: &Path, profile: &Profile) -> Result<CheckResult> {
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    let present = at(root, "/usr/sbin/sshd").exists();
    if !present {
        if profile.ssh.enabled {
            violations.push("the profile enables ssh but sshd is not installed".into());
        }
        return Ok(CheckResult::new("sshd configuration", vec!["sshd not installed".into()], violations));
    }
    let settings = sshd_effective(root)?;
    let expect = [
        ("permitrootlogin", "no"),
        ("passwordauthentication", "no"),
        ("kbdinteractiveauthentication", "no"),
        ("permitemptypasswords", "no"),
        ("x11forwarding", "no"),
    ];
    for (key, want) in expect {
        let got = settings.get(key).and_then(|v| v.first()).map(|s| s.to_ascii_lowercase());
        findings.push(format!("{key} = {}", got.as_deref().unwrap_or("(default)")));
        let ok = match (key, got.as_deref()) {
            (_, Some(v)) => v == want,
            ("permitemptypasswords", None) | ("x11forwarding", None) => true,
            _ => false,
        };
        if !ok {
            violations
                .push(format!("{key} is {} but must be {want}", got.as_deref().unwrap_or("unset (sshd default)")));
        }
    }
    if let Ok(read) = std::fs::read_dir(at(root, "/etc/ssh")) {
        let mut keys: Vec<String> = read
            .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string)))
            .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
            .collect();
        keys.sort();
        for key in keys {
            violations.push(format!(
                "/etc/ssh/{key}: a host private key is baked into the image (every clone would share it)"
            ));
        }
    }
    let sshd_enabled = tree::enabled_units(root)?.iter().any(|(u, _)| u == "ssh.service" || u == "sshd.service");
    if !profile.ssh.enabled && sshd_enabled {
        violations.push("ssh.service is enabled but the profile disables ssh".into());
    }
    Ok(CheckResult::new("sshd configuration", findings, violations))
}

fn check_suid(root: &Path, profile: &Profile) -> Result<CheckResult> {
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    for entry in tree::walk(root)? {
        let mode = entry.meta.permissions().mode();
        if entry.meta.is_file() && mode & 0o6000 != 0 {
            let kind = match (mode & 0o4000 != 0, mode & 0o2000 != 0) {
                (true, true) => "SUID+SGID",
                (true, false) => "SUID",
                _ => "SGID",
            };
            findings.push(format!("{} {kind} {:04o}", entry.image_path, mode & 0o7777));
            if !profile.hardening.suid_allowed.contains(&entry.image_path) {
                violations.push(format!("{} is {kind} but not in the profile's suid_allowed", entry.image_path));
            }
        }
    }
    Ok(CheckResult::new("SUID/SGID inventory", findings, violations))
}

fn check_packages(profile: &Profile, installed: &[String]) -> CheckResult {
    let mut violations = Vec::new();
    for p in profile.forbidden_packages() {
        if installed.contains(&p) {
            violations.push(format!("{p} is installed but forbidden for this role"));
        }
    }
    if !profile.packages.allow.is_empty() {
        for p in installed {
            if !profile.packages.allow.iter().any(|pat| glob_match(pat, p)) {
                violations.push(format!("{p} is installed but matches no pattern of packages.allow"));
            }
        }
    }
    for p in &profile.packages.include {
        if !installed.contains(p) {
            violations.push(format!("{p} is in packages.include but not installed"));
        }
    }
    CheckResult::new("package allowlist", vec![format!("{} packages installed", installed.len())], violations)
}

fn check_world_writable(root: &Path) -> Result<CheckResult> {
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    for entry in tree::walk(root)? {
        let mode = entry.meta.permissions().mode();
        // Device nodes (/dev/null, /dev/tty, ...) are world-writable by design.
        if !(entry.meta.is_file() || entry.meta.is_dir()) || mode & 0o002 == 0 {
            continue;
        }
        if entry.meta.is_dir() {
            if mode & 0o1000 != 0 {
                findings.push(format!("{} world-writable with sticky bit {:04o}", entry.image_path, mode & 0o7777));
            } else {
                violations.push(format!("{} is a world-writable directory without the sticky bit", entry.image_path));
            }
        } else {
            violations.push(format!("{} is world-writable ({:04o})", entry.image_path, mode & 0o7777));
        }
    }
    Ok(CheckResult::new("world-writable files", findings, violations))
}

fn check_passwords(root: &Path) -> Result<CheckResult> {
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    let shadow = fsx::read_string(&at(root, "/etc/shadow"), "/etc/shadow")?;
    for line in shadow.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 2 {
            continue;
        }
        if fields[1].is_empty() {
            violations.push(format!("account {} has an empty password", fields[0]));
        } else if !(fields[1].starts_with('!') || fields[1].starts_with('*')) {
            violations.push(format!(
                "account {} has a password set in the image (default passwords are not allowed)",
                fields[0]
            ));
        }
    }
    findings.push(format!("{} accounts in /etc/shadow, all locked", shadow.lines().count()));
    let passwd = fsx::read_string(&at(root, "/etc/passwd"), "/etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 1 && fields[1] != "x" {
            violations.push(format!("account {} has a password field in /etc/passwd instead of x", fields[0]));
        }
    }
    Ok(CheckResult::new("empty and default passwords", findings, violations))
}

fn check_sysctl(root: &Path, profile: &Profile) -> Result<CheckResult> {
    let text = std::fs::read_to_string(at(root, SYSCTL_FILE)).unwrap_or_default();
    let mut violations = Vec::new();
    for (k, v) in profile.sysctl() {
        if !text.lines().any(|l| l.trim() == format!("{k} = {v}")) {
            violations.push(format!("{SYSCTL_FILE} does not set {k} = {v}"));
        }
    }
    Ok(CheckResult::new("sysctl baseline", vec![format!("{} settings required", profile.sysctl().len())], violations))
}

fn check_apparmor(root: &Path, profile: &Profile, installed: &[String]) -> Result<CheckResult> {
    if !profile.hardening.apparmor {
        return Ok(CheckResult::new("AppArmor", vec!["not required by this profile".into()], vec![]));
    }
    let mut findings = Vec::new();
    let mut violations = Vec::new();
    if !installed.iter().any(|p| p == "apparmor") {
        violations.push("AppArmor is required but the apparmor package is not installed".into());
    }
    let dir = at(root, "/etc/apparmor.d");
    if let Ok(read) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = read.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if text.contains("flags=(complain") {
                violations.push(format!("AppArmor profile {name} is in complain mode"));
            } else {
                findings.push(format!("profile {name} enforcing"));
            }
        }
    }
    if std::fs::read_dir(dir.join("force-complain")).map(|mut r| r.next().is_some()).unwrap_or(false) {
        violations.push("/etc/apparmor.d/force-complain is not empty".into());
    }
    if profile.image.boot && !tree::enabled_units(root)?.iter().any(|(u, _)| u == "apparmor.service") {
        violations.push("apparmor.service is not enabled".into());
    }
    Ok(CheckResult::new("AppArmor", findings, violations))
}

/// OpenSCAP over the tree with oscap-chroot. Results are recorded; "fail" rules are kept in
/// the record for the reviewer (the checks above are the enforced gate).
pub fn run_oscap(root: &Path, datastream: &str, profile: &str) -> OscapResult {
    let mut result = OscapResult {
        status: String::new(),
        datastream: datastream.into(),
        profile: profile.into(),
        counts: BTreeMap::new(),
        failed_rules: Vec::new(),
        note: String::new(),
    };
    if !Path::new(datastream).exists() {
        result.status = "skipped".into();
        result.note = format!("{datastream} is not installed (Debian package ssg-debian)");
        return result;
    }
    let output = Command::new("oscap-chroot")
        .arg(root)
        .args(["xccdf", "eval", "--profile", profile])
        .arg(datastream)
        .env("LC_ALL", "C")
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            result.status = "skipped".into();
            result.note = format!("oscap-chroot could not run ({e}); install openscap-utils");
            return result;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let mut rule = String::new();
    for line in text.lines() {
        // oscap separates label and value with "\r\t" (it redraws the line on a terminal).
        let value = |label: &str| line.strip_prefix(label).filter(|r| r.starts_with(['\r', '\t'])).map(str::trim);
        if let Some(r) = value("Rule") {
            rule = r.to_string();
        } else if let Some(r) = value("Result") {
            let r = r.trim().to_string();
            if r == "fail" {
                result.failed_rules.push(rule.clone());
            }
            *result.counts.entry(r).or_default() += 1;
        }
    }
    // oscap exits 2 when some rule failed; other non-zero codes are errors.
    let code = output.status.code().unwrap_or(-1);
    let total: usize = result.counts.values().sum();
    let applicable = total - result.counts.get("notapplicable").copied().unwrap_or(0);
    if total == 0 {
        result.status = "error".into();
        result.note = format!(
            "oscap-chroot (exit {code}) reported no rule results: {}",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        );
    } else if code != 0 && code != 2 {
        result.status = "error".into();
        result.note = format!(
            "oscap-chroot exited {code}: {}",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        );
    } else if total > 0 && applicable == 0 {
        result.status = "not-applicable".into();
        result.note = "the SCAP content's platform (CPE) does not match this image: all rules not applicable (ssg-debian in Debian 12 ships Debian 10/11 content only)".into();
    } else {
        result.status = if result.failed_rules.is_empty() { "pass".into() } else { "fail".into() };
    }
    result
}
