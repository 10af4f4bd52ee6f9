//! Every rule of integrity commits and violation reports, on the key-release fixture (the
//! recorded swtpm host, real releases through [`Ttp::release_key`]). Each refusal is checked
//! in the audit chain like the key release's: the last record is the event with the code.

use protocol::domain::{AccessMode, Descriptor};
use protocol::integrity::{IntegrityAnchor, IntegrityCommitRequest, IntegrityViolationReport, ViolationKind};
use protocol::messages::{AuditRecord, Deletion, KeyReleaseRequest};
use protocol::pki::{Identity, Role};
use protocol::signing::SignatureContext;

use super::{ReportWindow, MAX_VIOLATION_REPORTS_PER_MINUTE, VIOLATION_WINDOW_SECS};
use crate::error::Error;
use crate::service::test_support::fixture::{assert_mentions, register, Fixture, HOST, OTHER_VM, OWNER, RO_VM, VM};
use crate::store::now_unix;

fn sc(name: &str) -> Identity {
    Identity { name: name.into(), role: Role::SecureComponent }
}

fn commit(epoch: u64, root: u8) -> IntegrityCommitRequest {
    IntegrityCommitRequest { host_id: HOST.into(), epoch, root: [root; 32], key_generation: 1 }
}

fn last_record(f: &Fixture) -> AuditRecord {
    f.ttp.store().audit_records(None).unwrap().pop().expect("an audit record")
}

/// Asserts the commit is refused with `code` and audited as an `integrity_commit` with it.
fn commit_refused(
    f: &Fixture,
    actor: &Identity,
    domain_id: &str,
    request: &IntegrityCommitRequest,
    code: &str,
) -> Error {
    let error = f.ttp.commit_integrity_root(actor, domain_id, request).expect_err("the commit is refused");
    assert_eq!(error.code(), code, "{error}");
    let record = last_record(f);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("integrity_commit", code));
    assert_eq!(record.message, error.to_string());
    f.ttp.verify_audit_chain().unwrap();
    error
}

fn violation(host_id: &str, kind: ViolationKind, sector: Option<u64>) -> IntegrityViolationReport {
    IntegrityViolationReport { host_id: host_id.into(), vm_id: VM.into(), kind, sector }
}

// ---- commits -------------------------------------------------------------------------------

/// Key generations (docs/PROTOCOL.md "Integrity anchor"): a root is tagged under a generation
/// no older than the newest anchor's and no newer than the domain's. During a rotation the
/// previous generation still commits (a crash settled before the re-encryption), then the new
/// one; after that the previous generation's `K_mac` commits nothing.
#[test]
fn commits_follow_the_key_generation_forward_only() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    let under =
        |epoch: u64, root: u8, key_generation: u64| IntegrityCommitRequest { key_generation, ..commit(epoch, root) };
    f.ttp.commit_integrity_root(&f.host(), &domain, &under(1, 1, 1)).expect("generation 1");
    let ahead = commit_refused(&f, &f.host(), &domain, &under(2, 2, 2), "integrity_epoch_stale");
    assert_mentions(&ahead, "a root tagged under generation 2 cannot be committed");

    f.ttp.store().rotate_domain_key(&domain, 1, 1).unwrap();
    f.ttp.commit_integrity_root(&f.host(), &domain, &under(2, 2, 1)).expect("the previous generation, mid-rotation");
    let moved = f.ttp.commit_integrity_root(&f.host(), &domain, &under(3, 3, 2)).expect("the new generation");
    let anchor = IntegrityAnchor::decode(&moved.anchor.message).unwrap();
    assert_eq!((anchor.epoch, anchor.key_generation), (3, 2), "epochs go on across the rotation");
    assert!(last_record(&f).message.contains("under key generation 2"));
    let again = f.ttp.commit_integrity_root(&f.host(), &domain, &under(3, 3, 2)).expect("a retry");
    assert_eq!(again.anchor, moved.anchor);

    let stale = commit_refused(&f, &f.host(), &domain, &under(4, 4, 1), "integrity_epoch_stale");
    assert_mentions(&stale, "its newest root is tagged under generation 2; a root tagged under generation 1");
}

/// The read-write holder's first commit is epoch 1: the TTP signs the anchor with its own key
/// (context `integrity-anchor`), stores it and audits `integrity_commit` ok naming the epoch
/// and a root prefix.
#[test]
fn first_commit_is_epoch_one_signed_and_audited() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    let response = f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 0xab)).expect("committed");

    response.anchor.verify_signature(SignatureContext::IntegrityAnchor).expect("signed for integrity anchors");
    let signer = protocol::pki::identity_from_certificate(&response.anchor.signer_certificate).unwrap();
    assert_eq!((signer.name.as_str(), signer.role), ("ttp-1", Role::Ttp));
    let anchor = IntegrityAnchor::decode(&response.anchor.message).unwrap();
    assert_eq!(
        (anchor.domain_id.as_str(), anchor.epoch, anchor.root, anchor.host_id.as_str()),
        (domain.as_str(), 1, [0xab; 32], HOST)
    );
    assert!(now_unix().abs_diff(anchor.committed_at) < 5);
    let stored = f.ttp.store().newest_anchor(&domain).unwrap().expect("stored");
    assert_eq!(stored.envelope, response.anchor);

    let record = last_record(&f);
    assert_eq!(record.seq, response.audit_seq);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("integrity_commit", "ok"));
    assert_eq!((record.domain_id.as_deref(), record.host_id.as_deref()), (Some(domain.as_str()), Some(HOST)));
    assert!(record.message.contains("epoch 1") && record.message.contains("abababababababab"), "{}", record.message);
    f.ttp.verify_audit_chain().unwrap();
}

/// Each later commit is the newest + 1 and becomes the newest.
#[test]
fn next_epoch_is_accepted_and_becomes_the_newest() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    for epoch in 1..=3 {
        f.ttp.commit_integrity_root(&f.host(), &domain, &commit(epoch, epoch as u8)).expect("committed");
    }
    let newest = f.ttp.store().newest_anchor(&domain).unwrap().unwrap().anchor;
    assert_eq!((newest.epoch, newest.root), (3, [3; 32]));
}

/// A replayed commit (an epoch already committed) and one that skips ahead are both
/// `integrity_epoch_stale`, naming the epoch expected.
#[test]
fn replayed_or_skipping_commit_is_integrity_epoch_stale() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    let first = f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 1)).unwrap();
    // The same commit again (its answer was lost): the same anchor, and a record saying so.
    let again = f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 1)).unwrap();
    assert_eq!(again.anchor.message, first.anchor.message);
    assert!(last_record(&f).message.contains("a retried commit"), "{:?}", last_record(&f));
    // Epoch 1 with another root (a fork), or an older epoch after epoch 2: refused.
    let error = commit_refused(&f, &f.host(), &domain, &commit(1, 9), "integrity_epoch_stale");
    assert_mentions(&error, "the next commit is epoch 2, not 1");
    f.ttp.commit_integrity_root(&f.host(), &domain, &commit(2, 2)).unwrap();
    commit_refused(&f, &f.host(), &domain, &commit(1, 1), "integrity_epoch_stale");
    commit_refused(&f, &f.host(), &domain, &commit(4, 4), "integrity_epoch_stale");
    let fresh = Fixture::new();
    fresh.release_to(HOST, VM, AccessMode::Rw);
    let error =
        commit_refused(&fresh, &fresh.host(), &fresh.descriptor.domain_id, &commit(0, 0), "integrity_epoch_stale");
    assert_mentions(&error, "epoch 1, not 0");
}

/// No key of the domain was ever released: `integrity_commit_forbidden`.
#[test]
fn commit_without_a_release_is_integrity_commit_forbidden() {
    let f = Fixture::new();
    let error = commit_refused(&f, &f.host(), &f.descriptor.domain_id, &commit(1, 1), "integrity_commit_forbidden");
    assert_mentions(&error, "was ever released");
}

/// The newest release to this host is read-only: `integrity_commit_forbidden`.
#[test]
fn commit_after_a_read_only_release_is_integrity_commit_forbidden() {
    let f = Fixture::new();
    f.release_to(HOST, RO_VM, AccessMode::Ro);
    let error = commit_refused(&f, &f.host(), &f.descriptor.domain_id, &commit(1, 1), "integrity_commit_forbidden");
    assert_mentions(&error, "is read-only");
}

/// A read-write holder whose release was superseded by a later one to another host may no
/// longer commit; the new holder continues at the next epoch.
#[test]
fn commit_superseded_by_a_release_to_another_host_is_integrity_commit_forbidden() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 1)).unwrap();
    f.enroll_twin("compute-2");
    let response = f.release_to("compute-2", OTHER_VM, AccessMode::Rw);
    assert_eq!(IntegrityAnchor::decode(&response.integrity_anchor.unwrap().message).unwrap().epoch, 1);

    let error = commit_refused(&f, &f.host(), &domain, &commit(2, 2), "integrity_commit_forbidden");
    assert_mentions(&error, "went to compute-2 (for vm-b), not to compute-1");
    let next = IntegrityCommitRequest { host_id: "compute-2".into(), ..commit(2, 2) };
    f.ttp.commit_integrity_root(&sc("compute-2"), &domain, &next).expect("the new holder commits epoch 2");
}

/// A commit that lost the race to a newer release fails the store's compare-and-set.
#[test]
fn store_refuses_a_commit_for_a_superseded_release() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    let first = f.release_to(HOST, VM, AccessMode::Rw);
    f.release_to(HOST, VM, AccessMode::Rw);
    let anchor = IntegrityAnchor {
        domain_id: domain,
        epoch: 1,
        root: [1; 32],
        host_id: HOST.into(),
        committed_at: 1,
        key_generation: 1,
    };
    let envelope = f.key(Role::Ttp, "ttp-1").sign_envelope(SignatureContext::IntegrityAnchor, anchor.encode());
    let stored = crate::store::StoredAnchor { anchor, envelope };
    let error = f.ttp.store().commit_anchor(&stored, first.audit_seq, Default::default()).unwrap_err();
    assert_eq!(error.code(), "integrity_commit_forbidden", "{error}");
}

/// The body names another host than the caller's certificate: `forbidden`; a cloud-platform
/// certificate: `forbidden`.
#[test]
fn commit_for_another_host_or_by_another_role_is_forbidden() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    let error = commit_refused(&f, &sc("compute-2"), &domain, &commit(1, 1), "forbidden");
    assert_mentions(&error, "claims host compute-1");
    let cloud = Identity { name: HOST.into(), role: Role::CloudPlatform };
    commit_refused(&f, &cloud, &domain, &commit(1, 1), "forbidden");
}

/// An unknown domain is `domain_unknown`, a deleted one `domain_deleted`.
#[test]
fn commit_to_an_unknown_or_deleted_domain_is_refused() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    commit_refused(&f, &f.host(), "0123456789abcdef0123456789abcdef", &commit(1, 1), "domain_unknown");
    f.release_to(HOST, VM, AccessMode::Rw);
    let deletion = Deletion { domain_id: domain.clone(), requested_at: now_unix() };
    f.ttp.delete_domain(&f.host(), &f.owner.sign_envelope(SignatureContext::Deletion, deletion.encode())).unwrap();
    commit_refused(&f, &f.host(), &domain, &commit(1, 1), "domain_deleted");
}

/// A malformed domain id in the path is `bad_request`, audited without it.
#[test]
fn malformed_domain_id_is_bad_request_audited_without_it() {
    let f = Fixture::new();
    commit_refused(&f, &f.host(), "no such\ndomain", &commit(1, 1), "bad_request");
    assert_eq!(last_record(&f).domain_id, None);
}

/// The next key release carries the newest signed anchor (none before the first commit), and
/// only that domain's.
#[test]
fn next_key_release_returns_the_newest_anchor() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    assert!(f.release_to(HOST, VM, AccessMode::Rw).integrity_anchor.is_none());
    f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 1)).unwrap();
    let second = f.ttp.commit_integrity_root(&f.host(), &domain, &commit(2, 2)).unwrap();

    let response = f.release_to(HOST, RO_VM, AccessMode::Ro);
    assert_eq!(response.integrity_anchor.as_ref(), Some(&second.anchor));
    let record = f.ttp.store().audit_records(None).unwrap().into_iter().find(|r| r.seq == response.audit_seq).unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", "ok"));

    let other = Descriptor::new(OWNER, Default::default(), f.descriptor.acl.clone()).unwrap();
    register(&f.ttp, &f.owner, &other, None);
    assert!(f.ttp.store().newest_anchor(&other.domain_id).unwrap().is_none());
}

// ---- violation reports -----------------------------------------------------------------------

/// A holder's report is an `integrity_violation` record naming host, VM, kind and sector, and
/// the owner's viewing history shows it after the commits.
#[test]
fn violation_report_is_audited_and_in_the_history() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    f.ttp.commit_integrity_root(&f.host(), &domain, &commit(1, 1)).unwrap();
    let response = f
        .ttp
        .report_integrity_violation(&f.host(), &domain, &violation(HOST, ViolationKind::SectorTag, Some(1234)))
        .expect("reported");
    f.ttp.report_integrity_violation(&f.host(), &domain, &violation(HOST, ViolationKind::Rollback, None)).unwrap();

    let owner = Identity { name: OWNER.into(), role: Role::DomainManager };
    let history = f.ttp.history(&owner, &domain).unwrap().records;
    let events: Vec<_> = history.iter().map(|r| (r.event.as_str(), r.outcome.as_str())).collect();
    assert_eq!(
        events,
        [
            ("register", "ok"),
            ("key_release", "ok"),
            ("integrity_commit", "ok"),
            ("integrity_violation", "integrity_violation"),
            ("integrity_violation", "integrity_violation")
        ]
    );
    let report = &history[3];
    assert_eq!(report.seq, response.audit_seq);
    assert_eq!(
        (report.host_id.as_deref(), report.vm_id.as_deref(), report.actor.as_str()),
        (Some(HOST), Some(VM), HOST)
    );
    assert!(
        report.message.starts_with("sector 1234: ciphertext does not match its tag (sector_tag)"),
        "{}",
        report.message
    );
    assert!(history[4].message.starts_with("volume: volume holds an older committed state"), "{}", history[4].message);
}

/// A host that does not hold the newest release (none, or superseded) cannot write into the
/// history: `integrity_commit_forbidden`, audited.
#[test]
fn violation_report_from_a_non_holder_is_integrity_commit_forbidden() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    let report = violation(HOST, ViolationKind::Tree, None);
    let error = f.ttp.report_integrity_violation(&f.host(), &domain, &report).unwrap_err();
    assert_eq!(error.code(), "integrity_commit_forbidden");
    f.release_to(HOST, VM, AccessMode::Rw);
    f.enroll_twin("compute-2");
    f.release_to("compute-2", OTHER_VM, AccessMode::Ro);
    let error = f.ttp.report_integrity_violation(&f.host(), &domain, &report).unwrap_err();
    assert_eq!(error.code(), "integrity_commit_forbidden");
    let record = last_record(&f);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("integrity_violation", "integrity_commit_forbidden"));
    let from_reader = violation("compute-2", ViolationKind::Tree, None);
    f.ttp.report_integrity_violation(&sc("compute-2"), &domain, &from_reader).expect("a read-only holder reports");
}

/// Past the limit in one window a host's reports are `rate_limited` and not written.
#[test]
fn violation_reports_past_the_limit_are_rate_limited_and_not_audited() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    // A window boundary between reports would reset the count; start just after one.
    while now_unix() % VIOLATION_WINDOW_SECS > VIOLATION_WINDOW_SECS - 10 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for sector in 0..u64::from(MAX_VIOLATION_REPORTS_PER_MINUTE) {
        let report = violation(HOST, ViolationKind::SectorTag, Some(sector));
        f.ttp.report_integrity_violation(&f.host(), &domain, &report).expect("within the limit");
    }
    let report = violation(HOST, ViolationKind::SectorTag, Some(7));
    let error = f.ttp.report_integrity_violation(&f.host(), &domain, &report).unwrap_err();
    assert_eq!(error.code(), "rate_limited");
    assert_eq!(error.refusal().http_status(), 429);
    let written = f.ttp.store().audit_records(Some(&domain)).unwrap();
    let reports = written.iter().filter(|r| r.event == "integrity_violation").count();
    assert_eq!(reports, MAX_VIOLATION_REPORTS_PER_MINUTE as usize);
}

/// The count is per domain and host, and a new window starts from zero.
#[test]
fn report_window_counts_per_domain_and_host_and_resets() {
    let mut window = ReportWindow::default();
    let now = 600;
    for _ in 0..MAX_VIOLATION_REPORTS_PER_MINUTE {
        assert!(window.admit("d", "h", now));
    }
    assert!(!window.admit("d", "h", now + 1));
    assert!(window.admit("d", "other-host", now + 1));
    assert!(window.admit("other-domain", "h", now + 1));
    assert!(window.admit("d", "h", now + VIOLATION_WINDOW_SECS));
}

#[test]
fn commit_for_a_format_1_domain_is_integrity_commit_forbidden() {
    let f = Fixture::new();
    let acl = vec![protocol::domain::AclEntry { vm_id: VM.into(), mode: AccessMode::Rw }];
    let descriptor = Descriptor::new(OWNER, Default::default(), acl).unwrap();
    let header = register(&f.ttp, &f.owner, &descriptor, None);
    let grant = f.grant_with(&f.owner, |grant| grant.domain_id = descriptor.domain_id.clone());
    let request = KeyReleaseRequest { header, ..f.request_with_grant(grant) };
    f.release(&request).expect("released");
    let error = f.ttp.commit_integrity_root(&f.host(), &descriptor.domain_id, &commit(1, 1)).unwrap_err();
    assert_eq!(error.code(), "integrity_commit_forbidden");
    assert_mentions(&error, "is format 1");
}

/// Once format 2, always: a new version cannot take the domain back to format 1.
#[test]
fn a_format_2_domain_cannot_go_back_to_format_1() {
    let f = Fixture::new();
    let mut older = f.descriptor.clone();
    older.version += 1;
    older.volume_format = protocol::domain::VolumeFormat::V1;
    let cloud = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
    let signed = f.owner.sign_envelope(SignatureContext::Descriptor, older.encode().unwrap());
    let request = protocol::messages::RegisterDomainRequest {
        descriptor: signed,
        previous_registration: Some(f.header.registration.clone()),
    };
    let error = f.ttp.register_domain(&cloud, &request).unwrap_err();
    assert_mentions(&error, "cannot make it format 1");
}

/// How many root commits one TTP decides per second (each checked, signed, stored and audited
/// in one transaction; the fixture's store is in memory, so this is the TTP's own cost without
/// the disk's fsync): `cargo test -p ttp --release commits_per_second -- --ignored --nocapture`.
/// A figure, not a check (docs/PERFORMANCE.md "Format 2").
#[test]
#[ignore]
fn commits_per_second() {
    let f = Fixture::new();
    let domain = f.descriptor.domain_id.clone();
    f.release_to(HOST, VM, AccessMode::Rw);
    let started = std::time::Instant::now();
    let mut epoch = 0u64;
    while started.elapsed() < std::time::Duration::from_secs(3) {
        epoch += 1;
        f.ttp.commit_integrity_root(&f.host(), &domain, &commit(epoch, epoch as u8)).unwrap();
    }
    println!(
        "{epoch} root commits in {:.1?}: {:.0}/s",
        started.elapsed(),
        epoch as f64 / started.elapsed().as_secs_f64()
    );
}
