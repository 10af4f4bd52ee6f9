//! Test support for Skydd's integration tests (`tests/integration/` and the separate
//! targets beside it): the pieces every cross-party test needs and that were written once
//! per test file before.
//!
//! - [`cleanup`]: a guard that takes down the mounts, loop devices and child process a
//!   failed test leaves behind.
//! - [`kdf`]: the volume key recomputed with OpenSSL's HKDF, independently of
//!   `protocol::kdf`, to check what the TTP released.
//! - [`refusal`] and [`audit`]: assertions on a refused call (its code, its status) and on
//!   the TTP's audit record of it.
//! - [`prerequisites`]: what a test that drives a real host needs (root, swtpm, FUSE, loop
//!   devices), checked with a message that names the missing piece; never a silent skip.
//! - [`postgres`]: a real PostgreSQL server per test binary, for the stores' replica tests.
//! - [`shared`]: one expensive fixture (a cloud, a TTP with TPMs) shared by tests that each
//!   stand alone, on a runtime of its own.
//!
//! The loopback lab itself (`skydd::lab`) stays in the root crate: the all-in-one cloud of
//! the demo is built from it.
//!
//! The binary `skydd-guest-agent` is the test agent run inside the qemu VM of the dm-crypt
//! tests (`tests/qemu/mod.rs` builds it and puts it into the guest's initramfs).

#![warn(missing_docs)]

pub mod audit;
pub mod cleanup;
pub mod kdf;
pub mod postgres;
pub mod prerequisites;
pub mod refusal;
pub mod shared;

pub use cleanup::Cleanup;
pub use kdf::independent_key;

/// Seconds since the Unix epoch, as the TTP's clock counts them (grant expiries, placement
/// times).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("the clock is after 1970").as_secs()
}
