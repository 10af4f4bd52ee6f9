//! Format-2 integrity (docs/PROTOCOL.md "Integrity anchor"): the secure component holding a
//! domain read-write commits its volume's root with the next epoch, and the TTP signs, stores
//! and audits it in one transaction; any host holding the domain's newest key release may
//! report a sector, tag or tree that does not verify into the viewing history.

use std::collections::HashMap;

use protocol::domain::{validate_name, AccessMode, Descriptor, VolumeFormat};
use protocol::integrity::{
    IntegrityAnchor, IntegrityCommitRequest, IntegrityCommitResponse, IntegrityViolationReport,
    IntegrityViolationResponse, ViolationKind,
};
use protocol::pki::{Identity, Role};
use protocol::refusal::Refusal;
use protocol::signing::SignatureContext;

use super::{invalid_name, Subject, Ttp};
use crate::error::{Error, Result};
use crate::store::{now_unix, LatestRelease, StoredAnchor};

/// Most violation reports one host may file about one domain per window: enough to name every
/// bad sector a scan finds for a while, too few to flood the audit log.
pub const MAX_VIOLATION_REPORTS_PER_MINUTE: u32 = 100;
/// The length of the violation-report window.
pub const VIOLATION_WINDOW_SECS: u64 = 60;

/// Violation reports counted per (domain, host) in fixed windows of
/// [`VIOLATION_WINDOW_SECS`]; counts of older windows are dropped as a new window begins.
#[derive(Default)]
pub(super) struct ReportWindow {
    window: u64,
    counts: HashMap<(String, String), u32>,
}

impl ReportWindow {
    /// Counts one report; `false` once the pair is over the limit in this window.
    fn admit(&mut self, domain_id: &str, host_id: &str, now: u64) -> bool {
        let window = now / VIOLATION_WINDOW_SECS;
        if window != self.window {
            self.window = window;
            self.counts.clear();
        }
        let count = self.counts.entry((domain_id.to_string(), host_id.to_string())).or_insert(0);
        *count = count.saturating_add(1);
        *count <= MAX_VIOLATION_REPORTS_PER_MINUTE
    }
}

/// What an accepted commit does: store a new anchor (with the audit seq of the release it
/// rests on), or answer a retry of the newest one with its anchor.
enum Commit {
    New(StoredAnchor, u64),
    Retried(protocol::signing::SignedEnvelope),
}

impl Ttp {
    /// `POST /v1/domains/{id}/integrity/commits`: the caller (a secure component, for its own
    /// host) holds the domain's newest key release, read-write
    /// (`integrity_commit_forbidden`), and commits exactly the epoch after the newest
    /// (`integrity_epoch_stale`; the very same commit as the newest, from the same host, is a
    /// retry and gets its anchor again). The TTP signs the anchor (context `integrity-anchor`) and
    /// stores it with its `integrity_commit` audit record in one transaction; refusals are
    /// audited too.
    pub fn commit_integrity_root(
        &self,
        actor: &Identity,
        domain_id: &str,
        request: &IntegrityCommitRequest,
    ) -> Result<IntegrityCommitResponse> {
        let subject = self.integrity_subject(domain_id, &request.host_id, None);
        let decide = |_: &mut Subject| {
            let release = self.check_reporter(actor, domain_id, &request.host_id, "commit an integrity root")?;
            self.check_format_2(domain_id)?;
            if release.mode != AccessMode::Rw {
                return Err(Error::IntegrityCommitForbidden(format!(
                    "the newest key release of domain {domain_id} to {} is read-only; only a read-write holder commits roots",
                    request.host_id
                )));
            }
            let stored = self.store.newest_anchor(domain_id)?;
            let retried = stored.as_ref().filter(|s| {
                s.anchor.epoch == request.epoch
                    && s.anchor.root == request.root
                    && s.anchor.host_id == request.host_id
                    && s.anchor.key_generation == request.key_generation
            });
            if let Some(stored) = retried {
                // The same host sending the same commit again (its answer was lost, e.g. the
                // TTP restarted): nothing changes, it gets the anchor it made.
                let message = format!(
                    "integrity root of domain {domain_id} at epoch {} confirmed again to {} (a retried commit)",
                    request.epoch, request.host_id
                );
                return Ok((Commit::Retried(stored.envelope.clone()), message));
            }
            self.check_commit_generation(domain_id, stored.as_ref(), request.key_generation)?;
            let newest = stored.map_or(0, |stored| stored.anchor.epoch);
            if request.epoch != newest.saturating_add(1) {
                return Err(Error::IntegrityEpochStale(format!(
                    "domain {domain_id} is at epoch {newest}, so the next commit is epoch {}, not {}",
                    newest.saturating_add(1),
                    request.epoch
                )));
            }
            let anchor = IntegrityAnchor {
                domain_id: domain_id.to_string(),
                epoch: request.epoch,
                root: request.root,
                host_id: request.host_id.clone(),
                committed_at: now_unix(),
                key_generation: request.key_generation,
            };
            let envelope = self.signing_key.sign_envelope(SignatureContext::IntegrityAnchor, anchor.encode());
            let message = format!(
                "integrity root of domain {domain_id} committed at epoch {} by {} under key generation {}: root {}…",
                anchor.epoch,
                anchor.host_id,
                anchor.key_generation,
                hex::encode(&anchor.root[..8])
            );
            Ok((Commit::New(StoredAnchor { anchor, envelope }, release.audit_seq), message))
        };
        let (envelope, record) =
            self.audited_with("integrity_commit", actor, subject, decide, |commit, entry| match commit {
                Commit::New(stored, release_seq) => {
                    let record = self.store.commit_anchor(&stored, release_seq, entry)?;
                    Ok((stored.envelope, record))
                }
                Commit::Retried(envelope) => Ok((envelope, self.store.append_audit(entry)?)),
            })?;
        Ok(IntegrityCommitResponse { anchor: envelope, audit_seq: record.seq })
    }

    /// `POST /v1/domains/{id}/integrity/violations`: a host holding the domain's newest key
    /// release reports what did not verify; appended to the viewing history as an
    /// `integrity_violation` record with outcome `integrity_violation`, naming the kind and
    /// the sector. At most [`MAX_VIOLATION_REPORTS_PER_MINUTE`] per domain and host in a window
    /// (`rate_limited`, not audited: the limit exists to keep the log from flooding).
    pub fn report_integrity_violation(
        &self,
        actor: &Identity,
        domain_id: &str,
        report: &IntegrityViolationReport,
    ) -> Result<IntegrityViolationResponse> {
        // Malformed ids share one counter: they are refused, but each refusal is a record.
        let counted_domain = if validate_name("domain id", domain_id).is_ok() { domain_id } else { "(malformed id)" };
        let admitted = self
            .violation_reports
            .lock()
            .map_err(|_| Error::Store("violation report counter poisoned by an earlier panic".into()))?
            .admit(counted_domain, &actor.name, now_unix());
        if !admitted {
            return Err(Error::RateLimited(format!(
                "{} filed more than {MAX_VIOLATION_REPORTS_PER_MINUTE} integrity violation reports about domain \
                 {counted_domain} in {VIOLATION_WINDOW_SECS} s; try again later",
                actor.name
            )));
        }
        let subject = self.integrity_subject(domain_id, &report.host_id, Some(&report.vm_id));
        let decide = |_: &mut Subject| {
            if validate_name("vm id", &report.vm_id).is_err() {
                return Err(Error::BadRequest(invalid_name("vm_id", &report.vm_id)));
            }
            self.check_reporter(actor, domain_id, &report.host_id, "report an integrity violation")?;
            Ok(((), violation_message(report)))
        };
        let ((), record) = self.audited_with("integrity_violation", actor, subject, decide, |(), mut entry| {
            entry.outcome = Refusal::IntegrityViolation.code().to_string();
            Ok(((), self.store.append_audit(entry)?))
        })?;
        Ok(IntegrityViolationResponse { audit_seq: record.seq })
    }

    /// A root is tagged under one key generation (docs/FORMAT.md "Key rotation of a format-2
    /// volume"): never an older one than the newest anchor's (a host still holding a rotated-out
    /// `K_mac` cannot take the anchor back), never a newer one than the domain's. During a
    /// rotation both the previous generation (settling a crash before the re-encryption) and
    /// the new one (the tree rebuilt under the new key) are accepted, in that order.
    fn check_commit_generation(&self, domain_id: &str, newest: Option<&StoredAnchor>, generation: u64) -> Result<()> {
        let domain = self.store.domain(domain_id)?.ok_or_else(|| Error::DomainUnknown(domain_id.to_string()))?;
        let anchored = newest.map_or(1, |stored| stored.anchor.key_generation);
        if generation < anchored || generation > domain.key_generation {
            return Err(Error::IntegrityEpochStale(format!(
                "domain {domain_id} is at key generation {} and its newest root is tagged under generation {anchored}; \
                 a root tagged under generation {generation} cannot be committed",
                domain.key_generation
            )));
        }
        Ok(())
    }

    /// The audit subject of a commit or report: only ids that are well-formed.
    fn integrity_subject(&self, domain_id: &str, host_id: &str, vm_id: Option<&str>) -> Subject {
        Subject {
            domain_id: validate_name("domain id", domain_id).is_ok().then(|| domain_id.to_string()),
            host_id: validate_name("host id", host_id).is_ok().then(|| host_id.to_string()),
            vm_id: vm_id.filter(|vm| validate_name("vm id", vm).is_ok()).map(str::to_string),
        }
    }

    /// The checks a commit and a report share: well-formed ids, a secure component acting for
    /// its own host, a registered domain that is not deleted, and the caller holds the
    /// domain's newest key release (`integrity_commit_forbidden`). Returns that release.
    /// A root commit needs a format-2 domain (a format-1 one has no tree to anchor).
    fn check_format_2(&self, domain_id: &str) -> Result<()> {
        if let Some(domain) = self.store.domain(domain_id)? {
            if Descriptor::decode(&domain.descriptor)?.volume_format != VolumeFormat::V2 {
                return Err(Error::IntegrityCommitForbidden(format!(
                    "domain {domain_id} is format 1: its owner has not made it format 2, so it has no integrity root"
                )));
            }
        }
        Ok(())
    }

    fn check_reporter(
        &self,
        actor: &Identity,
        domain_id: &str,
        host_id: &str,
        action: &'static str,
    ) -> Result<LatestRelease> {
        if validate_name("domain id", domain_id).is_err() {
            return Err(Error::BadRequest(invalid_name("domain id", domain_id)));
        }
        if validate_name("host id", host_id).is_err() {
            return Err(Error::BadRequest(invalid_name("host_id", host_id)));
        }
        Self::require_role(actor, Role::SecureComponent, action)?;
        if actor.name != host_id {
            return Err(Error::Forbidden {
                caller: actor.name.clone(),
                action,
                detail: format!("the request claims host {host_id}"),
            });
        }
        let domain = self.store.domain(domain_id)?.ok_or_else(|| Error::DomainUnknown(domain_id.to_string()))?;
        if domain.deleted_at.is_some() {
            return Err(Error::DomainDeleted(domain_id.to_string()));
        }
        match self.store.latest_release(domain_id)? {
            None => Err(Error::IntegrityCommitForbidden(format!(
                "no key of domain {domain_id} was ever released, so {host_id} holds none"
            ))),
            Some(release) if release.host_id != host_id => Err(Error::IntegrityCommitForbidden(format!(
                "the newest key release of domain {domain_id} went to {} (for {}), not to {host_id}",
                release.host_id, release.vm_id
            ))),
            Some(release) => Ok(release),
        }
    }
}

/// "sector 1234: ciphertext does not match its tag (sector_tag)": where, what, and the kind's
/// stable name.
fn violation_message(report: &IntegrityViolationReport) -> String {
    let what = match report.kind {
        ViolationKind::SectorTag => "ciphertext does not match its tag",
        ViolationKind::TagBlock => "tag block does not match the hash tree",
        ViolationKind::Tree => "hash tree or integrity superblock does not give the anchored root",
        ViolationKind::Rollback => "volume holds an older committed state than the anchor",
        ViolationKind::Truncated => "volume is shorter than its format-2 layout",
    };
    let place = report.sector.map_or_else(|| "volume".to_string(), |sector| format!("sector {sector}"));
    format!("{place}: {what} ({}), reported by {} for {}", report.kind.as_str(), report.host_id, report.vm_id)
}

#[cfg(test)]
mod tests;
