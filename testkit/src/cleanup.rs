//! A guard that leaves the host as a failed test found it: on drop it kills the test's child
//! process (if any), lazily unmounts everything mounted under the test's directory and
//! detaches the loop devices backed by files under it, so a panic does not leave mounts
//! under a deleted temporary directory.

use std::path::PathBuf;
use std::process::{Child, Command};

/// Takes down, on drop, what a test left under `root` (and its child process).
pub struct Cleanup {
    /// The test's directory: mounts and loop devices whose paths contain it are removed.
    pub root: PathBuf,
    /// A child process of the test, killed and reaped first.
    pub child: Option<Child>,
}

impl Cleanup {
    /// A guard for the mounts and loop devices under `root`, with no child process yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), child: None }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let root = self.root.to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for line in mounts.lines().rev().filter(|l| l.contains(&root)) {
            if let Some(point) = line.split(' ').nth(1) {
                let _ = Command::new("umount").arg("-l").arg(point.replace("\\040", " ")).status();
            }
        }
        if let Ok(out) = Command::new("losetup").arg("-a").output() {
            for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&root)) {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
    }
}
