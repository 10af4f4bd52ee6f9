//! A real PostgreSQL server for tests (Debian's postgresql-15, installed by
//! scripts/install-deps.sh): `initdb` into a fresh directory and `postgres` on a free
//! loopback port, as the unprivileged user `nobody` when the tests run as root (PostgreSQL
//! refuses to run as root). One server per test binary ([`Postgres::shared`]), each test on a
//! database of its own ([`Postgres::create_database`]); the server stops when the test binary
//! exits (an exit hook, and the parent-death signal if the binary is killed).
//!
//! Nothing is mocked: the stores under test speak to this server over TCP as they would in
//! production. A missing PostgreSQL is a failure that says how to install it, never a skip.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running (or stopped, between [`Postgres::stop`] and [`Postgres::start_again`]) server.
pub struct Postgres {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    /// The uid and gid the server runs as (`nobody` when the tests run as root).
    user: Option<(u32, u32)>,
    /// The server's pid and the thread that started it and waits for it (the parent-death
    /// signal follows that thread, so it lives exactly as long as the server).
    server: Mutex<Option<(u32, JoinHandle<()>)>>,
    databases: AtomicUsize,
}

static SHARED: OnceLock<Postgres> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(server) = SHARED.get() {
        server.stop();
        let _ = std::fs::remove_dir_all(&server.root);
    }
}

/// The directory of PostgreSQL's server binaries: `SKYDD_PG_BIN`, or the newest
/// /usr/lib/postgresql/N/bin.
fn server_binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKYDD_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): \
             run scripts/install-deps.sh (apt-get install postgresql) or set SKYDD_PG_BIN"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

impl Postgres {
    /// The server of this test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        SHARED.get_or_init(|| {
            crate::shared::at_exit(stop_shared);
            Postgres::start()
        })
    }

    /// Initializes a cluster in a new directory and starts its server.
    pub fn start() -> Postgres {
        let bin = server_binaries();
        let root = std::env::temp_dir().join(format!("skydd-pg-{}-{}", std::process::id(), free_port()));
        let data = root.join("data");
        std::fs::create_dir_all(&data).expect("create the PostgreSQL directory");
        // SAFETY: geteuid has no preconditions.
        let user = (unsafe { libc::geteuid() } == 0).then_some((65534, 65534));
        if let Some((uid, gid)) = user {
            for dir in [&root, &data] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("give the PostgreSQL directory to nobody");
            }
        }
        let server =
            Postgres { bin, root, port: free_port(), user, server: Mutex::new(None), databases: AtomicUsize::new(0) };
        let status = server
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed ({status}) in {}", data.display());
        server.start_again();
        server
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(&self.root);
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts the server (again, after [`Postgres::stop`]) on the same port and data, and
    /// waits until it accepts connections.
    pub fn start_again(&self) {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.root.join("server.log")).map(Stdio::from).unwrap_or(Stdio::null()));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only this child:
        // a test binary killed before its exit hook runs still takes its server down.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }
        let (started, pid) = std::sync::mpsc::channel();
        let keeper = std::thread::spawn(move || {
            let mut child = command.spawn().expect("start postgres");
            started.send(child.id()).expect("the starter waits");
            let _ = child.wait();
        });
        let pid = pid.recv().expect("postgres started");
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some((pid, keeper));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections within 30 s; see {}",
                self.root.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown: open connections are closed, committed data kept).
    pub fn stop(&self) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pid, keeper)) = server.take() {
            // SAFETY: kill with a pid this process spawned; its keeper has not reaped it yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
            let _ = keeper.join();
        }
    }

    /// The server's data directory and log (`server.log`).
    pub fn directory(&self) -> &Path {
        &self.root
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let status = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", &name])
            .status()
            .expect("run createdb");
        assert!(status.success(), "createdb {name} failed ({status})");
        self.url(&name)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}
