//! A domain's viewing history and the audit chain it is read from (docs/PROTOCOL.md "Audit
//! records"): every read verifies the whole chain first.

use protocol::domain::Descriptor;
use protocol::messages::{verify_audit_chain, HistoryResponse, AUDIT_GENESIS_HASH};
use protocol::pki::{Identity, Role};

use super::Ttp;
use crate::error::{Error, Result};

impl Ttp {
    /// The viewing history of a domain, for its owner and the managers it is shared with.
    /// The whole chain is verified first: a removed or edited record is reported.
    pub fn history(&self, actor: &Identity, domain_id: &str) -> Result<HistoryResponse> {
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
        self.verify_audit_chain()?;
        Ok(HistoryResponse { domain_id: domain_id.to_string(), records: self.store.audit_records(Some(domain_id))? })
    }

    /// Verifies the whole audit chain from its genesis.
    pub fn verify_audit_chain(&self) -> Result<usize> {
        let records = self.store.audit_records(None)?;
        if let Some(first) = records.first() {
            if first.seq != 1 {
                return Err(Error::AuditChainBroken(format!("records 1 to {} are missing", first.seq - 1)));
            }
        }
        verify_audit_chain(&records, Some(AUDIT_GENESIS_HASH)).map_err(|e| Error::AuditChainBroken(e.to_string()))?;
        Ok(records.len())
    }
}
