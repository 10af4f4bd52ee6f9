//! Launch reports on the key-release fixture (the recorded swtpm host [`HOST`] enrolled): an
//! accepted report is a `launch` record with the host's outcome, a refused one a
//! `launch_report` record with the TTP's code, and the chain verifies after either.

use protocol::image::LaunchReport;
use protocol::messages::AuditRecord;
use protocol::pki::{Identity, Role};

use crate::service::test_support::fixture::{assert_mentions, Fixture, HOST};

const TAMPERED_DIGEST: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

fn last_record(f: &Fixture) -> AuditRecord {
    f.ttp.store().audit_records(None).unwrap().pop().expect("an audit record")
}

fn tampered_launch() -> LaunchReport {
    LaunchReport::new(
        "vm-x",
        Some(TAMPERED_DIGEST.into()),
        Some("tampered-demo-vm.raw"),
        "image_not_allowed",
        "image not allowed: /srv/images/tampered-demo-vm.raw: sha256 5e5e… is not on the allowlist",
    )
}

/// The case that matters: a host refused a tampered image, and the TTP's chain now says so,
/// naming the host (from its certificate), the VM, the outcome and the digest.
#[test]
fn a_refused_launch_is_a_launch_record_in_the_chain() {
    let f = Fixture::new();
    let before = f.ttp.verify_audit_chain().unwrap();
    let answer = f.ttp.report_launch(&f.host(), &tampered_launch()).expect("the report is accepted");
    let record = last_record(&f);
    assert_eq!(record.seq, answer.audit_seq);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("launch", "image_not_allowed"));
    assert_eq!(record.host_id.as_deref(), Some(HOST));
    assert_eq!(record.vm_id.as_deref(), Some("vm-x"));
    assert_eq!(record.domain_id, None);
    assert_eq!(record.actor, HOST);
    assert!(
        record.message.starts_with(&format!(
            "{HOST} refused to launch vm-x (image_not_allowed) from image tampered-demo-vm.raw, sha256 {TAMPERED_DIGEST}: image not allowed"
        )),
        "{}",
        record.message
    );
    assert_eq!(f.ttp.verify_audit_chain().unwrap(), before + 1);

    let started = LaunchReport::new("vm-a", Some("ab".repeat(32)), Some("demo-vm.raw"), "ok", "launched demo-vm@1");
    f.ttp.report_launch(&f.host(), &started).unwrap();
    let record = last_record(&f);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("launch", "ok"));
    assert!(record.message.starts_with(&format!("{HOST} launched vm-a from image demo-vm.raw")), "{}", record.message);
    f.ttp.verify_audit_chain().unwrap();
}

/// A caller that is not an enrolled host cannot put launches on the record: a secure
/// component that never enrolled is `host_unknown`, another role `forbidden`. Each refusal
/// is a `launch_report` record without host or VM, and writes no `launch` record.
#[test]
fn only_an_enrolled_host_reports_launches() {
    let f = Fixture::new();
    let stranger = Identity { name: "compute-9".into(), role: Role::SecureComponent };
    let error = f.ttp.report_launch(&stranger, &tampered_launch()).expect_err("not enrolled");
    assert_eq!(error.code(), "host_unknown");
    assert_mentions(&error, "host compute-9 is not enrolled");
    let record = last_record(&f);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("launch_report", "host_unknown"));
    assert_eq!((record.host_id.as_deref(), record.vm_id.as_deref(), record.actor.as_str()), (None, None, "compute-9"));

    // A cloud platform named like the host is not the host.
    let platform = Identity { name: HOST.into(), role: Role::CloudPlatform };
    let error = f.ttp.report_launch(&platform, &tampered_launch()).expect_err("not a secure component");
    assert_eq!(error.code(), "forbidden");
    assert_eq!(last_record(&f).outcome, "forbidden");

    let records = f.ttp.store().audit_records(None).unwrap();
    assert!(records.iter().all(|r| r.event != "launch"), "a refused report wrote a launch record");
    f.ttp.verify_audit_chain().unwrap();
}

/// A malformed report from the enrolled host is refused with the field at fault; its record
/// names the host but not the VM it claimed.
#[test]
fn a_malformed_report_is_refused_and_names_no_vm() {
    let f = Fixture::new();
    let bad = LaunchReport { vm_id: "vm x".into(), ..tampered_launch() };
    let error = f.ttp.report_launch(&f.host(), &bad).expect_err("a malformed VM id");
    assert_eq!(error.code(), "bad_request");
    assert_mentions(&error, "vm_id (4 bytes) is not 1 to 64 characters");
    let record = last_record(&f);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("launch_report", "bad_request"));
    assert_eq!((record.host_id.as_deref(), record.vm_id.as_deref()), (Some(HOST), None));

    let bad = LaunchReport { image_digest: Some("not hex".into()), ..tampered_launch() };
    let error = f.ttp.report_launch(&f.host(), &bad).expect_err("a malformed digest");
    assert_mentions(&error, "image_digest (7 bytes) is not 64 lowercase hex characters");
    f.ttp.verify_audit_chain().unwrap();
}
