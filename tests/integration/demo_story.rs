//! The demo's story as an automated test: runs `skydd demo` (the README's first command's
//! main job) and checks that every step ran and did what it claims. The story itself
//! (src/story.rs) fails on any deviation; this test checks its output too.

use std::process::Command;

#[test]
fn skydd_demo_tells_the_whole_story() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_skydd"));
    // The demo runs for a minute: it must not keep another test's TPM connection open.
    secure_component::tpm::close_inherited_fds_on_exec(&mut command);
    let output = command.arg("demo").env("TSS2_LOG", "all+none").output().expect("run skydd demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "skydd demo failed:\n{stderr}");
    for expected in [
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
        "Demo complete: every step did what it claims.",
    ] {
        assert!(stdout.contains(expected), "the demo output lacks {expected:?}");
    }
}
