//! The one error type of the TTP library. Every refusal carries a stable code (used in the
//! audit log, in JSON error bodies and by clients) and a message naming what failed.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    // ---- requests ------------------------------------------------------------------------
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("caller {caller} may not {action}: {detail}")]
    Forbidden { caller: String, action: &'static str, detail: String },

    // ---- host enrollment (attestation.rs) --------------------------------------------------
    #[error("EK certificate is not trusted: {0}")]
    EkUntrusted(String),
    #[error("EK public key does not match the EK certificate: {0}")]
    EkMismatch(String),
    #[error("credential activation failed, the AK is not in the EK's TPM: {0}")]
    CredentialFailed(String),
    #[error("binding key is not acceptable: {0}")]
    BindingKeyInvalid(String),
    #[error("binding key policy is not a trusted PCR policy: {0}")]
    BindingPolicyUntrusted(String),
    #[error("host {0} is not enrolled")]
    HostUnknown(String),

    // ---- quotes ----------------------------------------------------------------------------
    #[error("quote is invalid: {0}")]
    QuoteInvalid(String),
    #[error("challenge is unknown, expired or already used: {0}")]
    ChallengeInvalid(String),
    #[error("host state is not trusted: {0}")]
    PcrMismatch(String),

    // ---- domains ---------------------------------------------------------------------------
    #[error("descriptor signature is invalid: {0}")]
    DescriptorSignatureInvalid(String),
    #[error("{0}")]
    OwnerMismatch(String),
    #[error("{0}")]
    VersionRollback(String),
    #[error("domain {0} is not registered")]
    DomainUnknown(String),
    #[error("domain {0} has been deleted")]
    DomainDeleted(String),
    #[error("registration does not match: {0}")]
    RegistrationMismatch(String),

    // ---- access ----------------------------------------------------------------------------
    #[error("{0}")]
    VmNotInAcl(String),
    #[error("{0}")]
    ModeNotPermitted(String),
    #[error("mount grant expired: {0}")]
    GrantExpired(String),
    /// A mount grant authorizes one key release; this one was used before.
    #[error("mount grant already used: {0}")]
    GrantReplayed(String),
    #[error("mount grant signature is invalid: {0}")]
    GrantSignatureInvalid(String),
    #[error("{0}")]
    GrantSignerNotAuthorized(String),
    #[error("mount grant does not match the request: {0}")]
    GrantMismatch(String),

    // ---- audit and store -------------------------------------------------------------------
    #[error("audit chain is broken: {0}")]
    AuditChainBroken(String),
    #[error("store: {0}")]
    Store(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The stable machine-readable code of this error (docs/PROTOCOL.md, "Error codes").
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Forbidden { .. } => "forbidden",
            Error::EkUntrusted(_) => "ek_untrusted",
            Error::EkMismatch(_) => "ek_mismatch",
            Error::CredentialFailed(_) => "credential_failed",
            Error::BindingKeyInvalid(_) => "binding_key_invalid",
            Error::BindingPolicyUntrusted(_) => "binding_policy_untrusted",
            Error::HostUnknown(_) => "host_unknown",
            Error::QuoteInvalid(_) => "quote_invalid",
            Error::ChallengeInvalid(_) => "challenge_invalid",
            Error::PcrMismatch(_) => "pcr_mismatch",
            Error::DescriptorSignatureInvalid(_) => "descriptor_signature_invalid",
            Error::OwnerMismatch(_) => "owner_mismatch",
            Error::VersionRollback(_) => "version_rollback",
            Error::DomainUnknown(_) => "domain_unknown",
            Error::DomainDeleted(_) => "domain_deleted",
            Error::RegistrationMismatch(_) => "registration_mismatch",
            Error::VmNotInAcl(_) => "vm_not_in_acl",
            Error::ModeNotPermitted(_) => "mode_not_permitted",
            Error::GrantExpired(_) => "grant_expired",
            Error::GrantReplayed(_) => "grant_replayed",
            Error::GrantSignatureInvalid(_) => "grant_signature_invalid",
            Error::GrantSignerNotAuthorized(_) => "grant_signer_not_authorized",
            Error::GrantMismatch(_) => "grant_mismatch",
            Error::AuditChainBroken(_) => "audit_chain_broken",
            Error::Store(_) => "store",
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Protocol(protocol::Error::BadSignature { .. }) => "bad_signature",
            Error::Protocol(_) => "bad_request",
        }
    }
}
