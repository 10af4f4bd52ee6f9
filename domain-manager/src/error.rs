//! The one error type of the domain-manager library. Messages say what was wrong and what
//! to do next.

use protocol::refusal::Refusal;
use thiserror::Error;

/// Everything the domain-manager library can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration file or the certificate and key it names are missing, unreadable
    /// or wrong (e.g. not a domain-manager certificate); the text says which.
    #[error("configuration: {0}")]
    Config(String),
    /// The request itself makes no sense (unknown domain id format, sharing twice, detaching
    /// what is not attached); refused here before any party is asked.
    #[error("{0}")]
    Usage(String),
    /// A party refused; `hint` says what the domain manager can do about it.
    #[error("{party} refused ({code}): {message}{hint}")]
    Refused {
        /// Who refused: "cloud platform" or "TTP".
        party: &'static str,
        /// The refusal code of the error body (docs/PROTOCOL.md, "Error codes").
        code: String,
        /// The party's own explanation.
        message: String,
        /// "\n  what to do: ..." for codes with a known remedy, else empty.
        hint: String,
    },
    /// A party could not be reached or answered something that is not an error body
    /// (TLS failure, connection refused, malformed response).
    #[error("{party}: {detail}")]
    Unreachable {
        /// Which party: "cloud platform" or "TTP".
        party: &'static str,
        /// What went wrong, from the HTTP client.
        detail: String,
    },
    /// Building, signing or verifying a protocol message failed (e.g. a descriptor the
    /// cloud platform returned does not carry its owner's valid signature).
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

/// `Result` with the domain manager's [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The refusal code, if a party refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(crate) fn from_net(party: &'static str, error: net::Error) -> Self {
        match error {
            net::Error::Api { code, message, .. } => {
                let hint = hint_for(&code);
                Error::Refused {
                    party,
                    code,
                    message,
                    hint: if hint.is_empty() { String::new() } else { format!("\n  what to do: {hint}") },
                }
            }
            other => Error::Unreachable { party, detail: other.to_string() },
        }
    }
}

/// What a domain manager can do about each refusal (docs/PROTOCOL.md, "Error codes").
fn hint_for(code: &str) -> &'static str {
    let Some(refusal) = Refusal::from_code(code) else { return "" };
    match refusal {
        Refusal::VmNotInAcl => "add the VM first: `domain-manager domain grant DOMAIN --vm VM:ro` (or :rw)",
        Refusal::ModeNotPermitted => "the VM's access is read-only; attach with `--mode ro`, or grant rw with `domain grant DOMAIN --vm VM:rw`",
        Refusal::GrantMismatch => "attach with the same mode the grant allows",
        Refusal::GrantTooLong => "attach with --valid-for of at most 3600 s (a grant is meant for one attach, now)",
        Refusal::SingleWriter => "a domain is attached read-write once and alone: detach the attachment named above first (`domain-manager vm list`)",
        Refusal::GrantReplayed => "a grant is good for one attach and this one was used before; `attach` signs a new one each time — if you did not reuse it, someone replayed it: report this",
        Refusal::GrantExpired => "retry: a new grant is signed for every attach (check this machine's clock)",
        Refusal::GrantSignerNotAuthorized => "only the owner or a manager the domain is shared with can attach it; ask the owner to `domain share DOMAIN --with YOU`",
        Refusal::PlacementInvalid | Refusal::PlacementMismatch => "the key was asked for from a host the cloud operator did not place the VM on (or with a stale placement); retry the attach, and report this to the cloud operator if it repeats",
        Refusal::PcrMismatch => "the compute host's measured state changed since enrollment; the cloud operator must investigate and re-enroll it after an approved update",
        Refusal::VersionRollback => "someone changed the domain meanwhile: run `domain show DOMAIN` and retry",
        Refusal::DomainDeleted => "the domain was deleted; its key can never be derived again",
        Refusal::OwnerMismatch | Refusal::Forbidden => "only the domain's owner (or, where allowed, a manager it is shared with) may do this",
        Refusal::HostUnknown => "the VM's compute host is not enrolled with the TTP; ask the cloud operator",
        Refusal::DescriptorSignatureInvalid => "the descriptor was not signed by its owner: the cloud platform may have altered it; report this",
        Refusal::TtpUnreachable => "the cloud platform could not reach the TTP; a grant, revoke, share or key rotation it accepted is finished when the TTP is back: `domain show DOMAIN` tells when it is in force",
        Refusal::PolicyInvalid => "fix the policy as Cedar's error above says (`domain policy set --help` shows the schema and an example); the version before stays in force",
        Refusal::PolicyDenied => "the domain's access policy does not permit this attach: see `domain policy show DOMAIN`, and attach with the --purpose (and --reason) it asks for",
        Refusal::BreakGlassReasonMissing => "an emergency (break-glass) attach needs `--reason \"...\"`; the owner is notified of it",
        Refusal::AuditChainBroken => "the TTP's audit log was tampered with; report this to the TTP operator at once",
        Refusal::KeyRotationInProgress => "the domain's key is being rotated: attach it read-write once (`attach DOMAIN --vm VM --mode rw`) to finish the re-encryption, then read-only attaches and new rotations are served again",
        _ => "",
    }
}
