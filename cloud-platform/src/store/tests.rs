//! The store against its contract on both engines (SQLite in memory, and a database of the
//! test binary's real PostgreSQL server, testkit's): filters, paging, statuses, pending
//! updates, and two replicas racing one domain id.

use std::sync::{Arc, Barrier};

use skydd_sql::Database;
use skydd_testkit::postgres::Postgres;

use super::*;
use protocol::cloud::MAX_PAGE_LIMIT;
use protocol::domain::AccessMode;
use protocol::refusal::Refusal;

use crate::error::{Error, Result};
use AttachmentStatus::{Attached, Detached, Detaching};

fn domain(id: &str, owner: &str, shared: &[&str]) -> DomainRecord {
    DomainRecord {
        id: id.into(),
        owner: owner.into(),
        shared_with: shared.iter().map(|s| s.to_string()).collect(),
        version: 1,
        size_bytes: 4096,
        created_at: 10,
        volume_path: PathBuf::from(format!("/v/{id}.vol")),
        deleted_at: None,
    }
}

fn attachment(id: &str, domain_id: &str, vm: &str, status: AttachmentStatus) -> Attachment {
    Attachment {
        id: id.into(),
        domain_id: domain_id.into(),
        instance_id: vm.into(),
        host: "h1".into(),
        mode: AccessMode::Ro,
        device: "/dev/loop0".into(),
        mount_path: "/m".into(),
        version: 1,
        status,
    }
}

#[test]
fn domains_filtered_by_manager_and_paginated() {
    for (engine, s) in stores() {
        eprintln!("{engine}");
        domains_filtered_by_manager_and_paginated_on(s);
    }
}

fn domains_filtered_by_manager_and_paginated_on(s: SqlStore) {
    for i in 0..5 {
        s.insert_domain(&domain(&format!("d{i}"), "alice", if i == 3 { &["bob"] } else { &[] })).unwrap();
    }
    s.insert_domain(&domain("e0", "bob", &[])).unwrap();
    assert_eq!(s.insert_domain(&domain("d0", "x", &[])).unwrap_err().code(), "domain_exists");
    let page = Page::new(Some(2), None).unwrap();
    let (rows, next) = page.finish(s.domains_for("alice", &page).unwrap(), |d| &d.id);
    assert_eq!(rows.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d0", "d1"]);
    assert_eq!(next.as_deref(), Some("d1"));
    let page = Page::new(Some(2), Some("d3".into())).unwrap();
    let (rows, next) = page.finish(s.domains_for("alice", &page).unwrap(), |d| &d.id);
    assert_eq!(rows.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["d4"]);
    assert_eq!(next, None);
    let page = Page::new(None, None).unwrap();
    let bob: Vec<_> = s.domains_for("bob", &page).unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(bob, ["d3", "e0"]);
    s.update_domain("d3", 2, &[]).unwrap();
    let bob: Vec<_> = s.domains_for("bob", &page).unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(bob, ["e0"]);
    s.mark_domain_deleted("e0", 20).unwrap();
    assert!(s.domains_for("bob", &page).unwrap().is_empty());
    assert_eq!(s.domain("e0").unwrap().unwrap().deleted_at, Some(20));
    assert_eq!(s.update_domain("e0", 2, &[]).unwrap_err().code(), "domain_unknown");
    assert_eq!(Page::new(Some(0), None).unwrap_err().code(), "bad_request");
    assert_eq!(Page::new(Some(10_000), None).unwrap().limit, MAX_PAGE_LIMIT);
}

#[test]
fn attachments_by_domain_status_and_manager() {
    for (engine, s) in stores() {
        eprintln!("{engine}");
        attachments_by_domain_status_and_manager_on(s);
    }
}

fn attachments_by_domain_status_and_manager_on(s: SqlStore) {
    s.insert_domain(&domain("d1", "alice", &["bob"])).unwrap();
    s.insert_domain(&domain("d2", "carol", &[])).unwrap();
    s.insert_attachment(&attachment("a1", "d1", "vm-a", Attached), 1).unwrap();
    s.insert_attachment(&attachment("a2", "d1", "vm-b", Detached), 1).unwrap();
    s.insert_attachment(&attachment("a3", "d2", "vm-c", Attached), 1).unwrap();
    let page = Page::new(None, None).unwrap();
    let ids = |f: AttachmentFilter| s.attachments(&f, &page).unwrap().into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(ids(AttachmentFilter::default()), ["a1", "a2", "a3"]);
    assert_eq!(ids(AttachmentFilter { manager: Some("bob".into()), domain_id: None }), ["a1", "a2"]);
    assert_eq!(ids(AttachmentFilter { manager: Some("carol".into()), domain_id: None }), ["a3"]);
    assert_eq!(ids(AttachmentFilter { manager: None, domain_id: Some("d2".into()) }), ["a3"]);
    assert_eq!(s.open_attachments_of_domain("d1").unwrap().len(), 1);
    assert_eq!(s.open_attachments_of_domain("d1").unwrap()[0].id, "a1", "vm-b's detached one is not open");
    s.set_attachment_status("a1", Detaching).unwrap();
    assert_eq!(s.open_attachments_of_domain("d1").unwrap()[0].status, Detaching);
    s.set_attachment_status("a1", Detached).unwrap();
    assert!(s.open_attachments_of_domain("d1").unwrap().is_empty());
    assert_eq!(s.attachment("a1").unwrap().unwrap().status, Detached);
}

fn pending(domain_id: &str, version: u64) -> PendingUpdate {
    PendingUpdate {
        domain_id: domain_id.into(),
        version,
        descriptor: protocol::signing::SignedEnvelope {
            message: vec![version as u8; 3],
            signature: vec![7; 64],
            signer_certificate: vec![1, 2],
        },
        recorded_at: 30,
    }
}

#[test]
fn pending_updates_end_with_the_header_version_or_the_deletion() {
    for (engine, s) in stores() {
        eprintln!("{engine}");
        pending_updates_end_with_the_header_version_or_the_deletion_on(s);
    }
}

fn pending_updates_end_with_the_header_version_or_the_deletion_on(s: SqlStore) {
    s.insert_domain(&domain("d1", "alice", &[])).unwrap();
    s.insert_domain(&domain("d2", "alice", &[])).unwrap();
    assert_eq!(s.pending_update("d1").unwrap(), None);
    s.record_pending_update(&pending("d1", 2)).unwrap();
    s.record_pending_update(&pending("d2", 2)).unwrap();
    assert_eq!(s.pending_update("d1").unwrap(), Some(pending("d1", 2)));
    // A newer write-ahead replaces the older one (the older one was refused or superseded).
    s.record_pending_update(&pending("d1", 3)).unwrap();
    assert_eq!(s.pending_updates().unwrap(), vec![pending("d1", 3), pending("d2", 2)]);
    // Writing an older header leaves the pending update; writing its version ends it.
    s.update_domain("d1", 2, &[]).unwrap();
    assert_eq!(s.pending_update("d1").unwrap(), Some(pending("d1", 3)));
    s.update_domain("d1", 3, &["bob".into()]).unwrap();
    assert_eq!(s.pending_update("d1").unwrap(), None);
    s.mark_domain_deleted("d2", 40).unwrap();
    assert!(s.pending_updates().unwrap().is_empty());
    s.record_pending_update(&pending("d1", 4)).unwrap();
    s.drop_pending_update("d1").unwrap();
    assert_eq!(s.pending_update("d1").unwrap(), None);
    // Only domains the CP stores can have one.
    assert_eq!(s.record_pending_update(&pending("nope", 2)).unwrap_err().code(), "store_error");
}

/// A fresh store on each engine.
fn stores() -> [(&'static str, SqlStore); 2] {
    [("sqlite", SqlStore::in_memory().unwrap()), ("postgres", postgres_replicas(1).remove(0))]
}

/// `n` stores (replicas) over one fresh PostgreSQL database.
fn postgres_replicas(n: usize) -> Vec<SqlStore> {
    let database = Database::Postgres { url: Postgres::shared().create_database(), pool_size: 4 };
    (0..n).map(|_| SqlStore::open_database(&database).unwrap()).collect()
}

#[test]
fn two_replicas_racing_one_domain_id_and_one_update_have_one_winner_each() {
    let replicas: Vec<Arc<SqlStore>> = postgres_replicas(2).into_iter().map(Arc::new).collect();
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (store, barrier) = (replicas[i % 2].clone(), barrier.clone());
                scope.spawn(move || {
                    barrier.wait();
                    store.insert_domain(&domain("raced", &format!("owner-{i}"), &[]))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(matches!(refused, Error::Conflict { code: Refusal::DomainExists, .. }), "{refused}");
    }
    // The winner's record is whole on the other replica: owner and managers agree.
    let stored = replicas[1].domain("raced").unwrap().unwrap();
    assert!(stored.owner.starts_with("owner-"));
    replicas[0].update_domain("raced", 2, &["bob".into()]).unwrap();
    assert_eq!(replicas[1].domain("raced").unwrap().unwrap().shared_with, vec!["bob".to_string()]);
}

/// A service drops its store on a tokio worker at shutdown. `postgres::Client` closes its
/// connection by blocking on a runtime of its own, which panicked there (seen in the release
/// CI's PostgreSQL rerun of the API tests); the pool now closes idle connections on a plain
/// thread.
#[test]
fn a_postgres_store_dropped_on_a_tokio_worker_closes_without_a_panic() {
    let store = postgres_replicas(1).pop().unwrap();
    store.insert_domain(&domain("d-drop", "dm-alice", &[])).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
    let dropped = runtime.block_on(async move { tokio::spawn(async move { drop(store) }).await });
    assert!(dropped.is_ok(), "dropping the store on a tokio worker panicked: {dropped:?}");
}
