//! What a compute host must offer the secure component, checked in one place: the service
//! and every test that drives a real host (swtpm, FUSE, loop devices) ask here, and a missing
//! piece is an error that names it and the Debian package that brings it — never a silent
//! skip (a test that returns early when the host lacks something would count as passed).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// One thing a host must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0: loop devices, mounts and FUSE with `allow_other` need it.
    Root,
    /// The `swtpm` TPM emulator (Debian `swtpm`, `swtpm-tools`).
    Swtpm,
    /// `/dev/fuse` (the `fuse` kernel module; Debian `fuse3` for the tools).
    Fuse,
    /// `/dev/loop-control` (the `loop` kernel module).
    LoopDevices,
    /// `gcore` from gdb, to take core dumps of a running process (Debian `gdb`).
    Gcore,
}

impl Need {
    /// The secure component's own data path: a userspace-engine host with a TPM.
    pub const USERSPACE_HOST: &'static [Need] = &[Need::Root, Need::Swtpm, Need::Fuse, Need::LoopDevices];

    fn present(self) -> bool {
        match self {
            Need::Root => effective_uid_is_root(),
            Need::Swtpm => runs("swtpm", &["--version"]),
            Need::Fuse => Path::new("/dev/fuse").exists(),
            Need::LoopDevices => Path::new("/dev/loop-control").exists(),
            Need::Gcore => runs("sh", &["-c", "command -v gcore"]),
        }
    }

    fn how_to_get(self) -> &'static str {
        match self {
            Need::Root => "root (run as root: loop devices and mounts need it)",
            Need::Swtpm => "swtpm (apt-get install swtpm swtpm-tools)",
            Need::Fuse => "/dev/fuse (modprobe fuse; apt-get install fuse3)",
            Need::LoopDevices => "/dev/loop-control (modprobe loop)",
            Need::Gcore => "gcore (apt-get install gdb)",
        }
    }
}

/// Ok when every need is met; otherwise an error listing each missing one and how to get it.
pub fn check(needs: &[Need]) -> Result<()> {
    check_with(needs, Need::present)
}

fn check_with(needs: &[Need], present: impl Fn(Need) -> bool) -> Result<()> {
    let missing: Vec<&str> = needs.iter().filter(|n| !present(**n)).map(|n| n.how_to_get()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Prerequisites(missing.join("; ")))
}

/// For tests that drive a real host: panics, naming what is missing, when a need is not met
/// (`scripts/install-deps.sh` installs all of them).
pub fn require(needs: &[Need]) {
    if let Err(e) = check(needs) {
        panic!("{e} (scripts/install-deps.sh installs them; this test never skips)");
    }
}

fn effective_uid_is_root() -> bool {
    // /proc/self/status "Uid:" is real, effective, saved, fs; the effective one decides.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_need_is_named_with_how_to_get_it() {
        let message = check_with(&[Need::Root, Need::Swtpm, Need::Fuse], |n| n == Need::Root)
            .expect_err("swtpm and FUSE are missing")
            .to_string();
        assert!(message.contains("apt-get install swtpm"), "{message}");
        assert!(message.contains("/dev/fuse"), "{message}");
        assert!(!message.contains("run as root"), "root is present but named: {message}");
        assert!(check_with(&[Need::Swtpm], |_| true).is_ok());
    }
}
