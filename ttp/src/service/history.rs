//! A domain's viewing history and the audit chain it is read from (docs/PROTOCOL.md "Audit
//! records", "Audit checkpoints"). A read costs O(this domain's records): each record's own
//! hash is checked, and the TTP's signed checkpoint of the whole chain's head comes with it,
//! so that a reader keeping the last checkpoint it saw detects a log cut short or forked.
//! [`Ttp::verify_audit_chain`] still walks the whole chain, for tools and tests.

use protocol::domain::Descriptor;
use protocol::messages::{verify_audit_chain, AuditCheckpoint, AuditRecord, HistoryResponse, AUDIT_GENESIS_HASH};
use protocol::pki::{Identity, Role};
use protocol::signing::{SignatureContext, SignedEnvelope};

use super::Ttp;
use crate::error::{Error, Result};
use crate::store::now_unix;

/// A checkpoint is signed when the newest is older than this (seconds): readers see the
/// chain's head at most this stale, and the checkpoints table grows by at most one row per
/// interval.
pub const CHECKPOINT_INTERVAL_SECS: u64 = 10;

impl Ttp {
    /// The viewing history of a domain, for its owner and the managers it is shared with.
    pub fn history(&self, actor: &Identity, domain_id: &str) -> Result<HistoryResponse> {
        self.history_since(actor, domain_id, None)
    }

    /// [`Ttp::history`] with the record at `since` (the seq of the reader's last checkpoint),
    /// so the reader can check the log still holds what that checkpoint named.
    pub fn history_since(&self, actor: &Identity, domain_id: &str, since: Option<u64>) -> Result<HistoryResponse> {
        Self::require_role(actor, Role::DomainManager, "read a viewing history")?;
        let domain = self.store.domain(domain_id)?.ok_or_else(|| Error::DomainUnknown(domain_id.to_string()))?;
        let descriptor = Descriptor::decode(&domain.descriptor)?;
        if !descriptor.is_manager(&actor.name) {
            return Err(Error::Forbidden {
                caller: actor.name.clone(),
                action: "read the viewing history",
                detail: format!("only the owner and the managers domain {domain_id} is shared with may"),
            });
        }
        let records = self.store.audit_records(Some(domain_id))?;
        if let Some(edited) = records.iter().find(|record| record.compute_hash() != record.hash) {
            return Err(Error::AuditChainBroken(format!(
                "record {} was edited (its hash does not match its contents)",
                edited.seq
            )));
        }
        self.check_links(&records)?;
        let since = since.map(|seq| self.store.audit_record(seq)).transpose()?.flatten();
        Ok(HistoryResponse { domain_id: domain_id.to_string(), records, checkpoint: self.checkpoint()?, since })
    }

    /// Each of the domain's records must follow the record just before it in the whole chain
    /// (its `prev_hash` is that record's hash): a record removed from the middle, or one put
    /// back in another place, is found while reading only these records and their
    /// predecessors (one lookup by seq each).
    fn check_links(&self, records: &[protocol::messages::AuditRecord]) -> Result<()> {
        let own: std::collections::HashMap<u64, &str> = records.iter().map(|r| (r.seq, r.hash.as_str())).collect();
        for record in records {
            let expected = if record.seq == 1 {
                AUDIT_GENESIS_HASH.to_string()
            } else if let Some(hash) = own.get(&(record.seq - 1)) {
                hash.to_string()
            } else {
                let previous = self.store.audit_record(record.seq - 1)?.ok_or_else(|| {
                    Error::AuditChainBroken(format!("records {} to {} are missing", record.seq - 1, record.seq - 1))
                })?;
                if previous.compute_hash() != previous.hash {
                    return Err(Error::AuditChainBroken(format!(
                        "record {} was edited (its hash does not match its contents)",
                        previous.seq
                    )));
                }
                previous.hash
            };
            if record.prev_hash != expected {
                return Err(Error::AuditChainBroken(format!(
                    "record {} does not follow record {} (its prev_hash is not that record's hash)",
                    record.seq,
                    record.seq - 1
                )));
            }
        }
        Ok(())
    }

    /// The newest signed checkpoint of the chain's head, signing a new one if the newest is
    /// older than [`CHECKPOINT_INTERVAL_SECS`] (or none exists); `None` for an empty log.
    pub fn checkpoint(&self) -> Result<Option<SignedEnvelope>> {
        let now = now_unix();
        if let Some((signed_at, envelope)) = self.store.newest_checkpoint()? {
            if signed_at + CHECKPOINT_INTERVAL_SECS > now {
                return SignedEnvelope::decode(&envelope)
                    .map(Some)
                    .map_err(|e| Error::Store(format!("stored audit checkpoint: {e}")));
            }
        }
        let Some((seq, hash)) = self.store.audit_head()? else { return Ok(None) };
        let checkpoint = AuditCheckpoint { seq, hash, at: now };
        let envelope = self.signing_key.sign_envelope(SignatureContext::AuditCheckpoint, checkpoint.encode());
        self.store.put_checkpoint(seq, now, &envelope.encode())?;
        Ok(Some(envelope))
    }

    /// Verifies the whole audit chain from its genesis.
    pub fn verify_audit_chain(&self) -> Result<usize> {
        verify_whole_audit_chain(&self.store.audit_records(None)?)
    }
}

/// Verifies `records` as the whole audit chain, from its genesis: record 1 first, each record's
/// hash, consecutive numbers, each linked to the one before (`audit_chain_broken` naming the
/// record otherwise). Returns how many records it checked. Removing the newest records is not
/// detectable from the chain alone (docs/PROTOCOL.md "Audit checkpoints").
pub fn verify_whole_audit_chain(records: &[AuditRecord]) -> Result<usize> {
    if let Some(first) = records.first() {
        if first.seq != 1 {
            return Err(Error::AuditChainBroken(format!("records 1 to {} are missing", first.seq - 1)));
        }
    }
    verify_audit_chain(records, Some(AUDIT_GENESIS_HASH)).map_err(|e| Error::AuditChainBroken(e.to_string()))?;
    Ok(records.len())
}
