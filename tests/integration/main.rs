//! The root crate's integration tests, in one test binary (one link instead of one per file):
//! each module is one concern, each `#[test]` stands alone (its own domains, VMs and
//! identities; no test depends on another having run first).
//!
//! Modules that re-execute this binary as a child process (crash_consistency, key_hygiene,
//! secure_component_agent) start it with `--exact MODULE::CHILD_TEST`; the child test does
//! nothing unless its environment variable is set.
//!
//! Two targets stay separate: `tests/load.rs` (a load test that wants the machine to itself)
//! and `tests/dmcrypt_qemu.rs` (dm-crypt inside a qemu VM, about 10 minutes under TCG).

mod attacks;
mod cli_refusals;
mod crash_consistency;
mod demo_story;
mod federation;
mod format2;
mod interrupted_updates;
mod key_hygiene;
mod key_rotation;
mod location;
mod secure_component_agent;
mod tpm_attestation;
mod trust_core;
mod trusted_launch;
mod volume_userspace;
