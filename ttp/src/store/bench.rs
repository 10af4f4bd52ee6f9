//! `Ttp::release_key` decisions per second with 64 concurrent callers on pre-made quotes
//! (the recorded swtpm quote; challenges planted and grants signed before the clock starts),
//! on each store configuration, printed side by side in one run (docs/PERFORMANCE.md
//! "Replicas and group commit"). Ignored by default; run it in release mode:
//!
//! ```text
//! cargo test --release -p ttp --lib store::bench -- --ignored --nocapture
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::messages::KeyReleaseRequest;
use skydd_testkit::postgres::Postgres;

use super::{Database, GroupCommit, SqlStore, TtpStore};
use crate::service::test_support::fixture::Fixture;
use crate::service::Ttp;

const CALLERS: usize = 64;

fn releases_per_config() -> usize {
    std::env::var("SKYDD_BENCH_RELEASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000)
}

/// CPU seconds this process used so far (user + system, from /proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// `n` granted requests, each with its own planted challenge and grant, made on 8 threads.
fn premade(f: &Fixture, n: usize) -> Vec<KeyReleaseRequest> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let makers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let mut made = Vec::new();
                    while next.fetch_add(1, Ordering::SeqCst) < n {
                        made.push(f.request());
                    }
                    made
                })
            })
            .collect();
        makers.into_iter().flat_map(|m| m.join().unwrap()).collect()
    })
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    cpu_share: f64,
    errors: usize,
}

impl Figures {
    /// One row of the printed table.
    fn print(&self, name: &str) {
        println!(
            "{name:<40} {:>8.0} {:>9.1} {:>9.1} {:>7.0}% {:>6}",
            self.per_second,
            self.p50.as_secs_f64() * 1000.0,
            self.p99.as_secs_f64() * 1000.0,
            self.cpu_share * 100.0,
            self.errors
        );
    }
}

/// Runs `n` calls from 64 threads (`call(caller, i)` makes call `i` and says whether it was
/// granted) and measures them.
fn timed_calls(n: usize, call: impl Fn(usize, usize) -> bool + Sync) -> Figures {
    let next = AtomicUsize::new(0);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut latencies: Vec<(Duration, bool)> = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (next, call) = (&next, &call);
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            break;
                        }
                        let t = Instant::now();
                        let ok = call(caller, i);
                        mine.push((t.elapsed(), ok));
                    }
                    mine
                })
            })
            .collect();
        callers.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].0;
    Figures {
        per_second: latencies.len() as f64 / wall.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        cpu_share: (cpu_seconds() - cpu_before) / wall.as_secs_f64() / cpus,
        errors: latencies.iter().filter(|(_, ok)| !ok).count(),
    }
}

/// Runs `requests` through `replicas` (caller i asks replica i mod n) from 64 threads.
fn measure(f: &Fixture, replicas: &[&Ttp], requests: &[KeyReleaseRequest]) -> Figures {
    timed_calls(requests.len(), |caller, i| {
        replicas[caller % replicas.len()].release_key(&f.host(), &requests[i]).is_ok()
    })
}

fn run(name: &str, database: &Database, commit: GroupCommit, replicas: usize) {
    run_with(name, database, commit, replicas, false)
}

/// As [`run`]; `forgetting` checks every signed object from scratch (no memory of verified
/// certificates and signatures: the peer of the signer checks' memory).
fn run_with(name: &str, database: &Database, commit: GroupCommit, replicas: usize, forgetting: bool) {
    let open = || -> Arc<dyn TtpStore> { Arc::new(SqlStore::open_database(database, commit).unwrap()) };
    let mut f = Fixture::on_store(open(), |_| {});
    if forgetting {
        f.ttp = f.ttp.forgetting_signers();
    }
    let others: Vec<Ttp> = (1..replicas).map(|_| f.replica(open())).collect();
    let mut all: Vec<&Ttp> = vec![&f.ttp];
    all.extend(others.iter());
    let warm = premade(&f, CALLERS);
    measure(&f, &all, &warm);
    let requests = premade(&f, releases_per_config());
    let figures = measure(&f, &all, &requests);
    f.ttp.verify_audit_chain().unwrap();
    figures.print(name);
}

/// Prints one line per configuration: decisions/s, p50 and p99 latency, the TTP process's
/// share of all cores, refused decisions (must be 0).
#[test]
#[ignore = "a benchmark: run in release mode with --ignored --nocapture"]
fn release_key_decisions_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = |name: &str| Database::Sqlite(dir.path().join(name));
    let postgres = || Database::Postgres { url: Postgres::shared().create_database(), pool_size: 16 };
    println!(
        "Ttp::release_key, {CALLERS} callers, {} releases per configuration, {} cores",
        releases_per_config(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("{:<40} {:>8} {:>9} {:>9} {:>8} {:>6}", "configuration", "per s", "p50 ms", "p99 ms", "TTP CPU", "errors");
    run_with("SQLite, group commit, signers afresh", &sqlite("p.sqlite"), GroupCommit::On, 1, true);
    run("SQLite, one commit per write", &sqlite("a.sqlite"), GroupCommit::Off, 1);
    run("SQLite, group commit", &sqlite("b.sqlite"), GroupCommit::On, 1);
    run("PostgreSQL, 1 replica, one commit/write", &postgres(), GroupCommit::Off, 1);
    run("PostgreSQL, 1 replica, group commit", &postgres(), GroupCommit::On, 1);
    run("PostgreSQL, 2 replicas, group commit", &postgres(), GroupCommit::On, 2);
}

/// The median time of 21 history reads of a domain with 10 records, in a log of `filler`
/// other records.
fn history_read_time(database: &Database, filler: i64, postgres: bool) -> Duration {
    let store = Arc::new(SqlStore::open_database(database, GroupCommit::On).unwrap());
    let f = Fixture::on_store(store.clone(), |_| {});
    let fill = if postgres {
        "INSERT INTO audit (seq, domain_id, record, hash)
         SELECT i, 'other', '{}', 'filler' FROM generate_series(?1::BIGINT, ?2::BIGINT) AS i"
    } else {
        "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
         INSERT INTO audit (seq, domain_id, record, hash) SELECT i, 'other', '{}', 'filler' FROM n"
    };
    store.write(move |tx| Ok(tx.execute(fill, &[2i64.into(), (filler + 1).into()])?)).unwrap();
    if postgres {
        // What autovacuum does after a bulk load in production: fresh planner statistics.
        store.write(|tx| Ok(tx.execute("ANALYZE audit", &[])?)).unwrap();
    }
    for _ in 0..9 {
        f.release_to(
            crate::service::test_support::fixture::HOST,
            crate::service::test_support::fixture::VM,
            protocol::domain::AccessMode::Rw,
        );
    }
    let owner = protocol::pki::Identity {
        name: crate::service::test_support::fixture::OWNER.into(),
        role: protocol::pki::Role::DomainManager,
    };
    let mut times: Vec<Duration> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let history = f.ttp.history_since(&owner, &f.descriptor.domain_id, Some(1)).unwrap();
            assert_eq!(history.records.len(), 10);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[10]
}

/// History read time for a domain with 10 records in a log of 1,000 vs 1,000,000 records,
/// on both engines (goal: ratio ≤ 2).
#[test]
#[ignore = "a benchmark: run in release mode with --ignored --nocapture"]
fn history_read_time_is_o_of_the_domain() {
    let dir = tempfile::tempdir().unwrap();
    for postgres in [false, true] {
        let database = |name: &str| match postgres {
            false => Database::Sqlite(dir.path().join(name)),
            true => Database::Postgres { url: Postgres::shared().create_database(), pool_size: 4 },
        };
        let small = history_read_time(&database("small.sqlite"), 1_000, postgres);
        let large = history_read_time(&database("large.sqlite"), 1_000_000, postgres);
        println!(
            "{:<10} history of 10 records: log of 1,000: {:.2} ms; log of 1,000,000: {:.2} ms; ratio {:.2}",
            if postgres { "PostgreSQL" } else { "SQLite" },
            small.as_secs_f64() * 1000.0,
            large.as_secs_f64() * 1000.0,
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
}

/// The store's share of a decision alone: `commit_key_release` (challenge used up, grant
/// marked, audit record and newest release, one write) from 64 callers, on challenges planted
/// before the clock starts; what each configuration could carry if checking a decision cost
/// nothing.
fn store_commits_per_second(database: &Database, commit: GroupCommit, replicas: usize) -> Figures {
    let stores: Vec<SqlStore> = (0..replicas).map(|_| SqlStore::open_database(database, commit).unwrap()).collect();
    let n = releases_per_config() * 2;
    for i in 0..n {
        stores[0].put_challenge(&format!("c{i}"), "h", &[0; 32], super::now_unix() + 600).unwrap();
    }
    timed_calls(n, |caller, i| {
        let mut grant_hash = [0u8; 32];
        grant_hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let spent =
            super::SpentTokens { challenge_id: format!("c{i}"), grant_hash, grant_expires_at: super::now_unix() + 600 };
        let entry = super::AuditEntry {
            event: "key_release".into(),
            outcome: "ok".into(),
            domain_id: Some(format!("d{}", i % 100)),
            host_id: Some("h".into()),
            vm_id: Some("v".into()),
            ..Default::default()
        };
        stores[caller % replicas].commit_key_release(&spent, entry, protocol::domain::AccessMode::Rw).is_ok()
    })
}

/// The store alone, per configuration (see [`store_commits_per_second`]).
#[test]
#[ignore = "a benchmark: run in release mode with --ignored --nocapture"]
fn store_commits_of_granted_releases_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = |name: &str| Database::Sqlite(dir.path().join(name));
    let postgres = || Database::Postgres { url: Postgres::shared().create_database(), pool_size: 16 };
    println!("store.commit_key_release, {CALLERS} callers, {} commits per configuration", releases_per_config() * 2);
    println!("{:<40} {:>8} {:>9} {:>9} {:>8} {:>6}", "configuration", "per s", "p50 ms", "p99 ms", "TTP CPU", "errors");
    let configurations: [(&str, Database, GroupCommit, usize); 5] = [
        ("SQLite, one commit per write (today)", sqlite("a.sqlite"), GroupCommit::Off, 1),
        ("SQLite, group commit", sqlite("b.sqlite"), GroupCommit::On, 1),
        ("PostgreSQL, 1 replica, one commit/write", postgres(), GroupCommit::Off, 1),
        ("PostgreSQL, 1 replica, group commit", postgres(), GroupCommit::On, 1),
        ("PostgreSQL, 2 replicas, group commit", postgres(), GroupCommit::On, 2),
    ];
    for (name, database, commit, replicas) in configurations {
        store_commits_per_second(&database, commit, replicas).print(name);
    }
}
