//! One expensive fixture (an all-in-one cloud, a TTP with its TPMs) shared by many tests that
//! each stand alone.
//!
//! The fixture is started once, on first use, on a tokio runtime of its own, so it outlives
//! the test that happened to start it; each test runs its async body on that runtime. Tests
//! of one fixture take turns: the fixture's TTP keeps one audit chain, and a test that counts
//! the records its attack adds must be the only one adding records meanwhile. Each test still
//! makes its own domains and identities, so no test depends on another having run first.
//!
//! Statics are never dropped: a test module registers a hook with [`at_exit`] that calls
//! [`Shared::stop`], so the fixture's swtpm processes and servers end with the test binary.
//!
//! ```ignore
//! static LAB: OnceLock<Shared<Lab>> = OnceLock::new();
//! extern "C" fn stop_lab() {
//!     if let Some(lab) = LAB.get() { lab.stop(|lab| lab.stop()) }
//! }
//! fn lab() -> &'static Shared<Lab> {
//!     LAB.get_or_init(|| { at_exit(stop_lab); Shared::start(Lab::start()) })
//! }
//! #[test]
//! fn a_refusal() { lab().run(|lab| async move { /* ... */ }) }
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fixture of type `T`, its runtime and its turn.
pub struct Shared<T> {
    runtime: tokio::runtime::Runtime,
    value: Mutex<Option<Arc<T>>>,
    turn: Mutex<()>,
}

impl<T> Shared<T> {
    /// Starts the fixture with `start` on a new multi-thread runtime (2 workers).
    pub fn start(start: impl Future<Output = T>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the shared fixture");
        let value = runtime.block_on(start);
        Self { runtime, value: Mutex::new(Some(Arc::new(value))), turn: Mutex::new(()) }
    }

    /// Runs `test` with the fixture on the fixture's runtime, while no other test of this
    /// fixture runs. A test that panicked before does not stop the next one (the lock's
    /// poison is ignored: each test starts from what it makes itself).
    pub fn run<Fut: Future<Output = ()>>(&self, test: impl FnOnce(Arc<T>) -> Fut) {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        let value = self.value.lock().unwrap_or_else(|p| p.into_inner()).clone().expect("the fixture is running");
        self.runtime.block_on(test(value));
    }

    /// Takes the fixture and runs `stop` with it on the fixture's runtime, for at most 10 s
    /// (the fixture is dropped then at the latest). Does nothing while a test still holds it.
    pub fn stop<Fut: Future<Output = ()>>(&self, stop: impl FnOnce(T) -> Fut) {
        let value = self.value.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(value) = value.and_then(|v| Arc::try_unwrap(v).ok()) {
            self.runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), stop(value)).await;
            });
        }
    }
}

/// Registers `hook` to run when the test binary exits (after the last test, also when a
/// test failed).
pub fn at_exit(hook: extern "C" fn()) {
    // SAFETY: atexit takes a plain `extern "C" fn()` without arguments, which `hook` is; it
    // only stores the pointer.
    let registered = unsafe { libc::atexit(hook) };
    assert_eq!(registered, 0, "atexit refused the hook");
}
