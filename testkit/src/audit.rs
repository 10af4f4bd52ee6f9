//! Assertions on the TTP's audit log: a refusal the TTP decides is recorded, chained, with
//! the event and outcome the attack must produce (docs/PROTOCOL.md, "Audit records").
//!
//! The log is one hash chain for the whole TTP, so counting "the records this attack added"
//! is only meaningful while no other test writes to the same TTP: tests that share one TTP
//! take turns (see `tests/integration/attacks/mod.rs`).

use protocol::messages::AuditRecord;
use ttp::service::Ttp;

/// Every record of the TTP's audit log, oldest first.
pub fn records(ttp: &Ttp) -> Vec<AuditRecord> {
    ttp.store().audit_records(None).expect("read the audit log")
}

/// The attack added exactly one record, the newest, of `event` with outcome `code`, in the
/// chain; returns it.
pub fn assert_audited(ttp: &Ttp, before: usize, event: &str, code: &str) -> AuditRecord {
    assert_audited_n(ttp, before, 1, event, code)
}

/// As [`assert_audited`], when the attack added `added` records (e.g. an accepted first
/// enrollment step before the refused second one).
pub fn assert_audited_n(ttp: &Ttp, before: usize, added: usize, event: &str, code: &str) -> AuditRecord {
    let records = records(ttp);
    assert_eq!(records.len(), before + added, "{added} audit record(s) for the attack; newest: {:?}", records.last());
    let last = records.last().expect("an audit record").clone();
    assert_eq!((last.event.as_str(), last.outcome.as_str()), (event, code), "newest audit record: {last:?}");
    assert_eq!(last.hash, last.compute_hash(), "the record is in the chain");
    last
}

/// The newest audit record has outcome `code` (the refusal just seen).
pub fn assert_last_outcome(ttp: &Ttp, code: &str) {
    let records = records(ttp);
    let last = records.last().expect("an audit record");
    assert_eq!(last.outcome, code, "newest audit record: {last:?}");
}
