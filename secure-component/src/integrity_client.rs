//! The secure component's side of the TTP's integrity API (docs/PROTOCOL.md "Integrity
//! anchor"): committing a format-2 volume's root after a flush or at detach, checking the
//! anchor the TTP signs back (or returns with a key release), and reporting a sector, tag or
//! tree that does not verify into the domain's viewing history.

use protocol::domain::validate_name;
use protocol::integrity::{
    IntegrityAnchor, IntegrityCommitRequest, IntegrityCommitResponse, IntegrityViolationReport,
    IntegrityViolationResponse, ViolationKind,
};
use protocol::pki::Role;
use protocol::signing::{SignatureContext, SignedEnvelope};

use crate::error::{Error, Result};
use crate::host::ttp_error;

/// A root the TTP accepted: the anchor as checked, the envelope to keep (it is what the next
/// key release returns), and where the commit went in the audit log.
#[derive(Debug, Clone)]
pub struct CommittedAnchor {
    /// The decoded anchor: the domain, epoch and root that were sent, this host, the TTP's time.
    pub anchor: IntegrityAnchor,
    /// The TTP-signed envelope of `anchor`.
    pub envelope: SignedEnvelope,
    /// Sequence number of the commit's `integrity_commit` audit record.
    pub audit_seq: u64,
}

/// Commits `root` at `epoch` (the newest committed + 1, 1 for a volume's first), tagged under
/// `key_generation`'s `K_mac`, for the domain this host holds read-write: `POST /v1/domains/{id}/integrity/commits`. The answer is
/// checked with [`verified_anchor`] (and `trusted_cas`, when given, for the signer) and must
/// name exactly the domain, epoch, root and host sent. A refusal comes back as
/// [`Error::TtpRefused`] with the TTP's code (`integrity_epoch_stale`,
/// `integrity_commit_forbidden`, ...).
pub async fn commit_root(
    ttp: &net::Client,
    domain_id: &str,
    host_id: &str,
    epoch: u64,
    key_generation: u64,
    root: &[u8; 32],
    trusted_cas: Option<&[String]>,
) -> Result<CommittedAnchor> {
    let path = integrity_path(domain_id, "commits")?;
    let body = IntegrityCommitRequest { host_id: host_id.to_string(), epoch, root: *root, key_generation };
    let response: IntegrityCommitResponse =
        ttp.post_json(&path, &body).await.map_err(|e| ttp_error("integrity commit", e))?;
    let anchor = verified_anchor(&response.anchor, domain_id, trusted_cas)?;
    if anchor.epoch != epoch
        || anchor.root != *root
        || anchor.host_id != host_id
        || anchor.key_generation != key_generation
    {
        return Err(Error::Protocol(protocol::Error::malformed(
            "integrity anchor",
            format!(
                "the TTP answered the commit of epoch {epoch} by {host_id} with an anchor of epoch {} by {} and {} root",
                anchor.epoch,
                anchor.host_id,
                if anchor.root == *root { "the same" } else { "another" }
            ),
        )));
    }
    Ok(CommittedAnchor { anchor, envelope: response.anchor, audit_seq: response.audit_seq })
}

/// Reports what did not verify on `domain_id`'s volume opened for `vm_id`:
/// `POST /v1/domains/{id}/integrity/violations`. The TTP appends an `integrity_violation`
/// record to the viewing history; it answers `rate_limited` past its per-minute limit, and
/// `integrity_commit_forbidden` unless this host holds the domain's newest key release.
pub async fn report_violation(
    ttp: &net::Client,
    domain_id: &str,
    host_id: &str,
    vm_id: &str,
    kind: ViolationKind,
    sector: Option<u64>,
) -> Result<IntegrityViolationResponse> {
    let path = integrity_path(domain_id, "violations")?;
    let body = IntegrityViolationReport { host_id: host_id.to_string(), vm_id: vm_id.to_string(), kind, sector };
    ttp.post_json(&path, &body).await.map_err(|e| ttp_error("integrity violation report", e))
}

/// Checks a TTP-signed anchor (a commit's answer, or `KeyReleaseResponse.integrity_anchor`)
/// and decodes it: the signature verifies with the envelope's certificate under context
/// `integrity-anchor`; with `trusted_cas` (PEM roots) that certificate must also chain to one
/// of them and carry the TTP role; and the anchor is `domain_id`'s.
pub fn verified_anchor(
    envelope: &SignedEnvelope,
    domain_id: &str,
    trusted_cas: Option<&[String]>,
) -> Result<IntegrityAnchor> {
    if let Some(trusted_cas) = trusted_cas {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
        let signer = protocol::signing::verify_signer_certificate(&envelope.signer_certificate, trusted_cas, &[], now)?;
        if signer.role != Role::Ttp {
            return Err(Error::Protocol(protocol::Error::Certificate(format!(
                "the integrity anchor is signed by {} with a {} certificate, a ttp certificate is needed",
                signer.name,
                signer.role.as_str()
            ))));
        }
    }
    envelope.verify_signature(SignatureContext::IntegrityAnchor)?;
    let anchor = IntegrityAnchor::decode(&envelope.message)?;
    if anchor.domain_id != domain_id {
        return Err(Error::Protocol(protocol::Error::malformed(
            "integrity anchor",
            format!("the anchor is of domain {}, not of {domain_id}", anchor.domain_id),
        )));
    }
    Ok(anchor)
}

/// `/v1/domains/{id}/integrity/{what}`, for a well-formed domain id only (it goes into a URL).
fn integrity_path(domain_id: &str, what: &str) -> Result<String> {
    validate_name("domain id", domain_id)?;
    Ok(format!("/v1/domains/{domain_id}/integrity/{what}"))
}
