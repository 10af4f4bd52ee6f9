//! The demo's story as an automated test: runs `skydd demo` (the README's first command's
//! main job) and checks that every step ran and did what it claims. The story itself
//! (src/story.rs) fails on any deviation; this test checks its output too.
//!
//! One test, run twice in a row so the two never compete for the cores: with qemu guests
//! (the default: the `demo-vm` image from image-pipeline, built once and cached under
//! target/guest-images, launched through trusted launch) and with `--no-vms` (directories).

use std::process::Command;
use std::time::Instant;

/// What both modes print.
const EVERY_MODE: &[&str] = &[
    "compute-1: enrolled",
    "compute-2: enrolled",
    "[1] dm-alice creates a domain",
    "vm-b reads what vm-a wrote",
    "refused by the kernel: Read-only file system",
    "refused (single_writer): domain",
    "does not contain the record's text anywhere",
    "refused (vm_not_in_acl): vm-b is not in the access list of domain",
    "refused (mode_not_permitted): vm-c has ro access",
    "dm-bob's read-only grant was accepted",
    "key_release         vm_not_in_acl",
    "vm-b's read fails: Input/output error",
    "integrity_violation by compute-2",
    "refused (integrity_rollback): integrity violation (rollback)",
    "vm-a reads the record with the allergy",
    "Demo complete in ",
    "every step did what it claims.",
];

/// What only the run with guests prints: the story inside them, and trusted launch.
const WITH_GUESTS: &[&str] = &[
    "compute-1: launched vm-a from demo-vm@",
    "compute-2: launched vm-c from demo-vm@",
    "vm-c booted; its guest agent answered",
    "hot-plugged it into vm-a's guest",
    "inside the guest: mkfs.ext4, mount /dev/vd",
    "vm-b reads what vm-a wrote (85 bytes) through its own mapping on compute-2, in its guest",
    "(its guest kernel, writing a file)",
    "(dd oflag=direct) is refused too: dd: error writing '/dev/vd",
    "Input/output error (in its guest: cat: ",
    "compute-2's launcher refused: image not allowed: ",
    "is not on the allowlist issued",
    "the TTP's audit log holds #",
    "launch image_not_allowed: compute-2 refused to launch vm-x (image_not_allowed) from image tampered-demo-vm.raw, sha256 ",
    "refused (image_not_allowed): vm-x on compute-2 reports no launched image",
    "key_release         image_not_allowed",
];

fn demo(args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_skydd"));
    // The demo runs for minutes: it must not keep another test's TPM connection open.
    secure_component::tpm::close_inherited_fds_on_exec(&mut command);
    let started = Instant::now();
    let output = command.arg("demo").args(args).env("TSS2_LOG", "all+none").output().expect("run skydd demo");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    println!("skydd demo {args:?}: {:.1} s", started.elapsed().as_secs_f64());
    assert!(output.status.success(), "skydd demo {args:?} failed:\n{stderr}");
    stdout
}

#[test]
fn skydd_demo_tells_the_whole_story() {
    let with_guests = demo(&[]);
    for expected in EVERY_MODE.iter().chain(WITH_GUESTS) {
        assert!(with_guests.contains(expected), "the demo with guests lacks {expected:?}");
    }
    let with_directories = demo(&["--no-vms"]);
    for expected in EVERY_MODE {
        assert!(with_directories.contains(expected), "the demo with --no-vms lacks {expected:?}");
    }
    assert!(!with_directories.contains("launched vm-a"), "--no-vms launched a guest");
}
