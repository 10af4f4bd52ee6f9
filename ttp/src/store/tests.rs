//! The store on both engines, with replicas: two [`SqlStore`]s over one database (one SQLite
//! file, or one database of the test binary's real PostgreSQL server, testkit's), racing the
//! single-use steps from many threads at once. Exactly one caller wins each race.

use std::sync::{Arc, Barrier};

use protocol::messages::{verify_audit_chain, AUDIT_GENESIS_HASH};
use skydd_testkit::postgres::Postgres;

use super::*;

/// The engines every race runs on.
#[derive(Clone, Copy, Debug)]
enum Engine {
    Sqlite,
    Postgres,
}

const ENGINES: [Engine; 2] = [Engine::Sqlite, Engine::Postgres];

/// A fresh database on `engine` (the SQLite file lives as long as the returned guard).
fn database(engine: Engine) -> (Database, Option<tempfile::TempDir>) {
    match engine {
        Engine::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (Database::Sqlite(dir.path().join("ttp.sqlite")), Some(dir))
        }
        Engine::Postgres => (Database::Postgres { url: Postgres::shared().create_database(), pool_size: 8 }, None),
    }
}

/// Two replicas over one fresh database, with group commit.
fn replicas(engine: Engine) -> ([Arc<SqlStore>; 2], Option<tempfile::TempDir>) {
    let (database, guard) = database(engine);
    let open = || Arc::new(SqlStore::open_database(&database, GroupCommit::On).unwrap());
    ([open(), open()], guard)
}

/// Runs `work(i)` on `n` threads released together; returns the results in order.
fn race<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let start = Barrier::new(n);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (start, work) = (&start, &work);
                scope.spawn(move || {
                    start.wait();
                    work(i)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn domain(version: u64, descriptor: &[u8]) -> DomainRecord {
    DomainRecord {
        domain_id: "0123456789abcdef0123456789abcdef".into(),
        owner: "dm-alice".into(),
        latest_version: version,
        descriptor: descriptor.to_vec(),
        descriptor_hash: [version as u8; 32],
        metadata_hash: [9; 32],
        deleted_at: None,
        master_key_version: 1,
        key_generation: 1,
        previous_master_key_version: None,
    }
}

/// A challenge issued by one replica is redeemed once, at either.
#[test]
fn a_challenge_is_taken_once_across_replicas() {
    for engine in ENGINES {
        let ([a, b], _guard) = replicas(engine);
        for round in 0..10 {
            let id = format!("challenge-{round}");
            a.put_challenge(&id, "compute-1", &[round; 32], now_unix() + 60).unwrap();
            let taken = race(16, |i| [&a, &b][i % 2].take_challenge(&id).unwrap());
            assert_eq!(taken.iter().flatten().count(), 1, "{engine:?} round {round}: {taken:?}");
            assert_eq!(taken.into_iter().flatten().next().unwrap().1, vec![round; 32]);
        }
    }
}

/// A grant is marked used once, at either replica.
#[test]
fn a_grant_is_used_once_across_replicas() {
    for engine in ENGINES {
        let ([a, b], _guard) = replicas(engine);
        for round in 0..10u8 {
            let used = race(16, |i| [&a, &b][i % 2].consume_grant(&[round; 32], now_unix() + 60).unwrap());
            assert_eq!(used.iter().filter(|won| **won).count(), 1, "{engine:?} round {round}: {used:?}");
        }
    }
}

/// Of concurrent updates from version n, one wins and the rest are `version_rollback`; the
/// domain's versions stay monotonic.
#[test]
fn a_version_is_won_once_across_replicas() {
    for engine in ENGINES {
        let ([a, b], _guard) = replicas(engine);
        a.insert_domain(&domain(1, b"v1")).unwrap();
        assert_eq!(b.insert_domain(&domain(1, b"other")).unwrap_err().code(), "version_rollback");
        for version in 2..8u64 {
            let outcomes = race(16, |i| {
                [&a, &b][i % 2].update_domain(&domain(version, format!("v{version} by {i}").as_bytes()), version - 1)
            });
            let winners: Vec<usize> = (0..16).filter(|i| outcomes[*i].is_ok()).collect();
            assert_eq!(winners.len(), 1, "{engine:?} version {version}");
            for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                assert_eq!(refused.code(), "version_rollback", "{refused}");
            }
            let stored = b.domain(&domain(1, b"").domain_id).unwrap().unwrap();
            assert_eq!(stored.latest_version, version);
            assert_eq!(stored.descriptor, format!("v{version} by {}", winners[0]).into_bytes());
        }
    }
}

/// Each domain keeps the K_TTP version it was registered under (an update does not move
/// it), and the store counts live and deleted domains per version, on both engines.
#[test]
fn domains_are_counted_per_master_key_version() {
    for engine in ENGINES {
        let ([a, b], _guard) = replicas(engine);
        let mut record = domain(1, b"v1");
        a.insert_domain(&record).unwrap();
        for (n, version) in [(1u8, 2u32), (2, 2), (3, 2)] {
            record.domain_id = format!("{n:032x}");
            record.master_key_version = version;
            b.insert_domain(&record).unwrap();
        }
        a.update_domain(&DomainRecord { master_key_version: 2, ..domain(2, b"v2") }, 1).unwrap();
        assert_eq!(b.domain(&domain(1, b"").domain_id).unwrap().unwrap().master_key_version, 1, "{engine:?}");
        b.tombstone_domain(&format!("{:032x}", 3), 9).unwrap();
        assert_eq!(
            a.master_key_use().unwrap(),
            vec![
                MasterKeyUse { version: 1, live_domains: 1, deleted_domains: 0 },
                MasterKeyUse { version: 2, live_domains: 2, deleted_domains: 1 },
            ],
            "{engine:?}"
        );
    }
}

/// Appends from both replicas at once form one chain: numbered 1..n without gaps, each
/// record chained to the one before, all of them acknowledged.
#[test]
fn the_audit_chain_keeps_one_order_across_replicas() {
    for engine in ENGINES {
        let ([a, b], _guard) = replicas(engine);
        let appended = race(8, |i| {
            (0..25)
                .map(|n| {
                    let entry = AuditEntry {
                        event: "register".into(),
                        outcome: "ok".into(),
                        message: format!("writer {i} record {n}"),
                        domain_id: Some(format!("domain-{}", i % 3)),
                        ..Default::default()
                    };
                    [&a, &b][i % 2].append_audit(entry).unwrap().seq
                })
                .collect::<Vec<_>>()
        });
        let mut acknowledged: Vec<u64> = appended.into_iter().flatten().collect();
        acknowledged.sort_unstable();
        assert_eq!(acknowledged, (1..=200).collect::<Vec<_>>(), "{engine:?}");
        let records = b.audit_records(None).unwrap();
        assert_eq!(records.len(), 200);
        verify_audit_chain(&records, Some(AUDIT_GENESIS_HASH)).unwrap();
        assert_eq!(a.audit_records(Some("domain-1")).unwrap().len(), 75);
    }
}

/// Replicas starting together on an empty PostgreSQL database migrate it once; a store
/// reopened later finds the schema current, and what was written is kept.
#[test]
fn postgres_schema_is_migrated_once_by_replicas_starting_together() {
    let url = Postgres::shared().create_database();
    let database = Database::Postgres { url, pool_size: 2 };
    let stores = race(4, |_| SqlStore::open_database(&database, GroupCommit::Off).unwrap());
    stores[0].put_host("compute-1", "{}").unwrap();
    drop(stores);
    let reopened = SqlStore::open_database(&database, GroupCommit::On).unwrap();
    assert_eq!(reopened.host("compute-1").unwrap().as_deref(), Some("{}"));
}

/// A batch where one write fails in the store still commits the others: that write runs
/// again alone and fails alone.
#[test]
fn a_failing_write_does_not_take_its_batch_with_it() {
    for engine in ENGINES {
        let ([a, _], _guard) = replicas(engine);
        let outcomes = race(16, |i| {
            let entry = AuditEntry {
                event: "key_release".into(),
                // Every third release names no VM: the store refuses it.
                vm_id: (i % 3 != 0).then(|| "vm-a".to_string()),
                domain_id: Some("d".into()),
                host_id: Some("h".into()),
                ..Default::default()
            };
            a.append_key_release(entry, AccessMode::Rw).map(|(record, _)| record.seq)
        });
        let granted = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(granted, 10, "{engine:?}: {outcomes:?}");
        assert_eq!(a.audit_records(None).unwrap().len(), 10);
    }
}

// ---- two TTP replicas ----------------------------------------------------------------------

mod ttp_replicas {
    use std::sync::Arc;

    use protocol::domain::AccessMode;
    use protocol::messages::RegisterDomainRequest;
    use protocol::pki::{Identity, Role};
    use protocol::signing::SignatureContext;

    use super::{race, Engine, ENGINES};
    use crate::service::test_support::fixture::Fixture;
    use crate::service::Ttp;
    use crate::store::{GroupCommit, SqlStore};

    /// The recorded host's fixture on one replica, and a second replica on the same database.
    fn fixture_and_replica(engine: Engine) -> (Fixture, Ttp, Option<tempfile::TempDir>) {
        let (database, guard) = super::database(engine);
        let open = || Arc::new(SqlStore::open_database(&database, GroupCommit::On).unwrap());
        let fixture = Fixture::on_store(open(), |_| {});
        let replica = fixture.replica(open());
        (fixture, replica, guard)
    }

    /// Exactly one outcome is `Ok`; every other is refused with `code`.
    fn one_wins<T: std::fmt::Debug>(outcomes: &[crate::Result<T>], code: &str, what: &str) {
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{what}: {outcomes:?}");
        for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
            assert_eq!(refused.code(), code, "{what}: {refused}");
        }
    }

    /// The same release request (one challenge, one grant) sent to both replicas at once is
    /// granted once; a grant presented with two fresh challenges is granted once; two
    /// updates from version 1 are registered once. The chain both wrote verifies.
    #[test]
    fn replicas_race_the_same_challenge_grant_and_version() {
        for engine in ENGINES {
            let (f, replica, _guard) = fixture_and_replica(engine);
            let replicas = [&f.ttp, &replica];
            for round in 0..3 {
                let request = f.request();
                let outcomes = race(2, |i| replicas[i].release_key(&f.host(), &request));
                one_wins(&outcomes, "challenge_invalid", &format!("{engine:?} challenge round {round}"));

                let grant = f.grant_with(&f.owner, |_| {});
                let requests = [f.request_with_grant(grant.clone()), f.request_with_grant(grant)];
                let outcomes = race(2, |i| replicas[i].release_key(&f.host(), &requests[i]));
                one_wins(&outcomes, "grant_replayed", &format!("{engine:?} grant round {round}"));
            }

            let cloud = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
            let updates = [AccessMode::Rw, AccessMode::Ro].map(|mode| {
                let v2 = f.descriptor.next_version(|d| d.acl.iter_mut().for_each(|entry| entry.mode = mode)).unwrap();
                RegisterDomainRequest {
                    descriptor: f.owner.sign_envelope(SignatureContext::Descriptor, v2.encode().unwrap()),
                    previous_registration: Some(f.header.registration.clone()),
                }
            });
            let outcomes = race(2, |i| replicas[i].register_domain(&cloud, &updates[i]).map(|r| r.registration));
            one_wins(&outcomes, "version_rollback", &format!("{engine:?} version"));
            assert_eq!(f.ttp.store().domain(&f.descriptor.domain_id).unwrap().unwrap().latest_version, 2);
            assert!(replica.verify_audit_chain().unwrap() >= 13, "{engine:?}");
        }
    }
}

// ---- audit checkpoints ---------------------------------------------------------------------

mod checkpoints {
    use std::sync::Arc;

    use protocol::messages::AuditCheckpoint;
    use protocol::pki::{Identity, Role};
    use protocol::signing::SignatureContext;

    use super::{Engine, ENGINES};
    use crate::service::test_support::fixture::{Fixture, OWNER, VM};
    use crate::store::{AccessMode, GroupCommit, SqlStore, TtpStore};

    fn owner() -> Identity {
        Identity { name: OWNER.into(), role: Role::DomainManager }
    }

    /// The checkpoint of a history read, its signature checked.
    fn checkpoint_of(f: &Fixture, since: Option<u64>) -> (AuditCheckpoint, Option<protocol::messages::AuditRecord>) {
        let history = f.ttp.history_since(&owner(), &f.descriptor.domain_id, since).unwrap();
        let envelope = history.checkpoint.expect("a checkpoint");
        envelope.verify_signature(SignatureContext::AuditCheckpoint).unwrap();
        (AuditCheckpoint::decode(&envelope.message).unwrap(), history.since)
    }

    fn fixture(engine: Engine) -> (Fixture, Arc<SqlStore>, Option<tempfile::TempDir>) {
        let (database, guard) = super::database(engine);
        let store = Arc::new(SqlStore::open_database(&database, GroupCommit::On).unwrap());
        (Fixture::on_store(store.clone(), |_| {}), store, guard)
    }

    /// A later read extends the last checkpoint; a log cut short after it, or cut and
    /// written on (a fork), fails the reader's check, whatever the TTP signs afterwards.
    #[test]
    fn a_truncated_or_forked_log_fails_the_readers_check() {
        for engine in ENGINES {
            let (f, store, _guard) = fixture(engine);
            f.release_to(crate::service::test_support::fixture::HOST, VM, AccessMode::Rw);
            let (first, _) = checkpoint_of(&f, None);
            assert_eq!(first.seq, store.audit_head().unwrap().unwrap().0);
            let (again, since) = checkpoint_of(&f, Some(first.seq));
            first.check_successor(&again, since.as_ref()).unwrap();

            // Someone with the database's keys deletes the tail and the checkpoints.
            store
                .write(move |tx| {
                    tx.execute("DELETE FROM audit WHERE seq >= ?1", &[(first.seq as i64).into()])?;
                    Ok(tx.execute("DELETE FROM audit_checkpoints", &[])?)
                })
                .unwrap();
            let (cut, since) = checkpoint_of(&f, Some(first.seq));
            let error = first.check_successor(&cut, since.as_ref()).unwrap_err().to_string();
            assert!(error.contains("cut short"), "{engine:?}: {error}");

            // ... and writes on past the old head: the record at its seq differs.
            for _ in 0..3 {
                f.release_to(crate::service::test_support::fixture::HOST, VM, AccessMode::Ro);
            }
            store.write(|tx| Ok(tx.execute("DELETE FROM audit_checkpoints", &[])?)).unwrap();
            let (forked, since) = checkpoint_of(&f, Some(first.seq));
            assert!(forked.seq > first.seq);
            let error = first.check_successor(&forked, since.as_ref()).unwrap_err().to_string();
            assert!(error.contains("forked"), "{engine:?}: {error}");
        }
    }
}

/// A PostgreSQL restart: the store reconnects on its own (a broken pooled connection is
/// dropped, a new one opened) and keeps what was committed before. Its own server, so the
/// shared one stays up for the other tests.
#[test]
fn the_store_reconnects_after_a_postgres_restart() {
    let server = Postgres::start();
    let database = Database::Postgres { url: server.create_database(), pool_size: 4 };
    let store = SqlStore::open_database(&database, GroupCommit::On).unwrap();
    store.put_host("compute-1", "{}").unwrap();
    server.stop();
    assert!(store.host("compute-1").is_err(), "answered with the server down");
    server.start_again();
    // The first call on a connection the restart broke may fail; the store must be back
    // within a few, without being reopened.
    let answered = (0..5).find_map(|_| store.host("compute-1").ok());
    assert_eq!(answered.flatten().as_deref(), Some("{}"));
    store.put_host("compute-2", "{}").unwrap();
    server.stop();
    let _ = std::fs::remove_dir_all(server.directory());
}
