//! What a test that drives a real host needs, as a thin layer over
//! `secure_component::prerequisites` (the one place that knows how to check each need and
//! which Debian package brings it). A missing need fails the test, naming it: a test that
//! returned early would count as passed.

pub use secure_component::prerequisites::{require, Need};

/// A TTP with real TPMs: root (swtpm's state and sockets) and swtpm.
pub const ATTESTED_HOST: &[Need] = &[Need::Root, Need::Swtpm];

/// The userspace volume engine without a TPM: root, FUSE and loop devices.
pub const USERSPACE_VOLUME: &[Need] = &[Need::Root, Need::Fuse, Need::LoopDevices];

/// A secure component's whole data path: root, swtpm, FUSE and loop devices.
pub const USERSPACE_HOST: &[Need] = Need::USERSPACE_HOST;
