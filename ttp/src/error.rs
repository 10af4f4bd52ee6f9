//! The one error type of the TTP library. Every refusal carries a stable code (used in the
//! audit log, in JSON error bodies and by clients) and a message naming what failed.

use protocol::refusal::Refusal;
use thiserror::Error;

/// Every way a TTP request can be refused or fail. [`Error::code`] gives the stable code;
/// [`Error::refusal`] gives both and the HTTP status (docs/PROTOCOL.md "Error codes").
#[derive(Debug, Error)]
pub enum Error {
    // ---- requests ------------------------------------------------------------------------
    /// A malformed body or object (400 `bad_request`); the text names the field.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller's role or name may not do this (403 `forbidden`), e.g. a host enrolling
    /// under another host's id.
    #[error("caller {caller} may not {action}: {detail}")]
    Forbidden {
        /// The caller's certificate name.
        caller: String,
        /// What it tried, e.g. "enroll a host".
        action: &'static str,
        /// Why it may not, for a person.
        detail: String,
    },

    // ---- host enrollment (attestation/) --------------------------------------------------
    /// The EK certificate does not chain to a configured TPM vendor root, or its TCG
    /// extensions are wrong (403 `ek_untrusted`; docs/TPM.md "EK certificate checks").
    #[error("EK certificate is not trusted: {0}")]
    EkUntrusted(String),
    /// The EK certificate chains only to an EK CA the attestation policy trusts for other
    /// hosts (a partner cloud's vendor root limited to named hosts: 403
    /// `ek_root_not_for_host`; docs/PKI.md "A partner cloud's host").
    #[error("EK certificate is not trusted for this host: {0}")]
    EkRootNotForHost(String),
    /// The EK public area is not the default EK template with the certificate's key
    /// (403 `ek_mismatch`).
    #[error("EK public key does not match the EK certificate: {0}")]
    EkMismatch(String),
    /// The activated secret is not the credential: the AK is not in the TPM that holds the
    /// EK (403 `credential_failed`; docs/TPM.md "MakeCredential").
    #[error("credential activation failed, the AK is not in the EK's TPM: {0}")]
    CredentialFailed(String),
    /// The Certify of the binding key is invalid, or the key is not a fixedTPM, decrypt-only,
    /// policy-only RSA-2048 key (403 `binding_key_invalid`).
    #[error("binding key is not acceptable: {0}")]
    BindingKeyInvalid(String),
    /// The binding key's authPolicy is not PolicyPCR of an allowed reference state
    /// (403 `binding_policy_untrusted`).
    #[error("binding key policy is not a trusted PCR policy: {0}")]
    BindingPolicyUntrusted(String),
    /// The host is pinned to another EK (its first enrollment's) and no operator marked it
    /// for replacement (403 `ek_pinned`); the text names the pinned and the presented EK
    /// fingerprints (docs/TPM.md "EK pinning").
    #[error("EK is pinned: {0}")]
    EkPinned(String),
    /// The EK is already enrolled under another host id: one host per EK (403 `ek_in_use`).
    #[error("EK is in use: {0}")]
    EkInUse(String),
    /// A PCR selection, reference state or quote names a PCR that locality 0 can reset (16,
    /// 23), whose value proves nothing (400 `pcr_resettable`; at start-up it stops the TTP).
    #[error("resettable PCR: {0}")]
    PcrResettable(String),
    /// A host claims a region its reference state does not pin in the location PCR
    /// (403 `host_region_unattested`).
    #[error("{0}")]
    HostRegionUnattested(String),
    /// The host has not enrolled (404 `host_unknown`); carries the host id.
    #[error("host {0} is not enrolled")]
    HostUnknown(String),

    // ---- quotes ----------------------------------------------------------------------------
    /// The quote's signature by the host's AK, its magic or its type is wrong
    /// (403 `quote_invalid`).
    #[error("quote is invalid: {0}")]
    QuoteInvalid(String),
    /// A challenge or enrollment id that is unknown, expired, already used, another host's,
    /// or not the nonce the quote signed (403 `challenge_invalid`).
    #[error("challenge is unknown, expired or already used: {0}")]
    ChallengeInvalid(String),
    /// The quoted PCRs differ from the host's reference state; names the PCRs that differ
    /// (403 `pcr_mismatch`).
    #[error("host state is not trusted: {0}")]
    PcrMismatch(String),

    // ---- domains ---------------------------------------------------------------------------
    /// The signature or signer certificate of a descriptor or deletion is invalid (chain,
    /// validity, revocation, role, or signer ≠ owner; 403 `descriptor_signature_invalid`).
    #[error("descriptor signature is invalid: {0}")]
    DescriptorSignatureInvalid(String),
    /// An update or deletion by someone other than the domain's owner (403 `owner_mismatch`).
    #[error("{0}")]
    OwnerMismatch(String),
    /// A version not newer than the newest registered one, or an update based on an older
    /// registration (409 `version_rollback`).
    #[error("{0}")]
    VersionRollback(String),
    /// No domain with this id is registered (404 `domain_unknown`).
    #[error("domain {0} is not registered")]
    DomainUnknown(String),
    /// The domain has been deleted (tombstone); its key is never released again
    /// (410 `domain_deleted`).
    #[error("domain {0} has been deleted")]
    DomainDeleted(String),
    /// The header's registration is not signed by a TTP or is not of this descriptor
    /// (403 `registration_mismatch`).
    #[error("registration does not match: {0}")]
    RegistrationMismatch(String),
    /// A descriptor's access policy does not parse or does not validate against the schema
    /// (400 `policy_invalid`); the message names Cedar's errors.
    #[error("{0}")]
    PolicyInvalid(String),

    // ---- access ----------------------------------------------------------------------------
    /// The VM is not in the domain's access list (403 `vm_not_in_acl`).
    #[error("{0}")]
    VmNotInAcl(String),
    /// The VM's ACL mode does not cover the requested mode, e.g. `rw` asked, `ro` listed
    /// (403 `mode_not_permitted`).
    #[error("{0}")]
    ModeNotPermitted(String),
    /// The VM's launched image is not on the TTP's image allowlist, or none was reported
    /// while one is configured (403 `image_not_allowed`).
    #[error("{0}")]
    ImageNotAllowed(String),
    /// The domain's access policy does not permit the release (403 `policy_denied`); the
    /// message names the deciding policies.
    #[error("{0}")]
    PolicyDenied(String),
    /// A break-glass release (purpose `emergency`) whose grant gives no reason (403
    /// `break_glass_reason_missing`), whatever the policy says.
    #[error("{0}")]
    BreakGlassReasonMissing(String),
    /// The mount grant's `expires_at` has passed (403 `grant_expired`).
    #[error("mount grant expired: {0}")]
    GrantExpired(String),
    /// The mount grant is valid for longer than `MAX_GRANT_VALIDITY_SECS` from now (403
    /// `grant_too_long`): its single-use mark could not be kept until it expires.
    #[error("mount grant valid for too long: {0}")]
    GrantTooLong(String),
    /// A mount grant authorizes one key release; this one was used before.
    #[error("mount grant already used: {0}")]
    GrantReplayed(String),
    /// The mount grant's signature or signer certificate is invalid, or its issuer is not
    /// the signer (403 `grant_signature_invalid`).
    #[error("mount grant signature is invalid: {0}")]
    GrantSignatureInvalid(String),
    /// The grant's signer is neither the owner nor a manager the domain is shared with
    /// (403 `grant_signer_not_authorized`).
    #[error("{0}")]
    GrantSignerNotAuthorized(String),
    /// The grant is for another domain or VM, or a narrower mode than requested
    /// (403 `grant_mismatch`).
    #[error("mount grant does not match the request: {0}")]
    GrantMismatch(String),

    /// The placement is not signed by a trusted cloud-platform certificate, or is too old
    /// or from the future (403 `placement_invalid`; docs/PROTOCOL.md "Placement").
    #[error("placement is invalid: {0}")]
    PlacementInvalid(String),
    /// The placement names another VM, another host than the one asking, or another grant
    /// (403 `placement_mismatch`): the cloud platform did not place this VM on this host.
    #[error("placement does not match the request: {0}")]
    PlacementMismatch(String),

    // ---- format-2 integrity (service/integrity.rs) -------------------------------------------
    /// An integrity root commit whose epoch is not the newest + 1 (409 `integrity_epoch_stale`):
    /// a replayed commit, or one from a fork of the volume.
    #[error("integrity commit refused: {0}")]
    IntegrityEpochStale(String),
    /// An integrity commit or violation report from a host that does not hold the domain's
    /// newest key release (read-write, for a commit) (403 `integrity_commit_forbidden`).
    #[error("integrity commit or report refused: {0}")]
    IntegrityCommitForbidden(String),
    /// A key release other than read-write while the domain's key is being rotated, or a
    /// release for a format-2 header that records a rotation (409 `key_rotation_in_progress`;
    /// docs/PROTOCOL.md "Key rotation").
    #[error("key rotation in progress: {0}")]
    KeyRotationInProgress(String),
    /// Too many integrity violation reports for one domain from one host in a minute
    /// (429 `rate_limited`): the audit log is not a place to flood.
    #[error("{0}")]
    RateLimited(String),

    // ---- audit and store -------------------------------------------------------------------
    /// The audit log was edited, relinked or has records missing (500 `audit_chain_broken`;
    /// docs/PROTOCOL.md "Audit records").
    #[error("audit chain is broken: {0}")]
    AuditChainBroken(String),
    /// The SQLite store failed or holds an unreadable record (500 `store_error`).
    #[error("store: {0}")]
    Store(String),
    /// The configuration or a file it names is unusable (500 `config_error`); stops start-up.
    #[error("configuration: {0}")]
    Config(String),
    /// K_TTP could not be unsealed, split, combined or found (500 `config_error`); the text
    /// says what to do (docs/OPERATOR.md "Master key custodians"). Never names key bytes.
    #[error("master key: {0}")]
    MasterKey(String),
    /// The TPM refuses the sealed K_TTP because the host's PCRs changed; names the PCRs and
    /// points at `ttp unseal` (500 `config_error`; stops start-up).
    #[error("master key: {0}")]
    MasterKeySealedToOtherState(String),
    /// A file could not be read or written (500 `io_error`).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A protocol object failed to decode or verify: `bad_signature` (400) for a signature
    /// that does not verify, `bad_request` (400) for anything else.
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

/// Result with the TTP [`enum@Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The stable machine-readable code of this error (docs/PROTOCOL.md, "Error codes").
    pub fn code(&self) -> &'static str {
        self.refusal().code()
    }

    /// What this error is in the shared vocabulary: its code and HTTP status.
    pub fn refusal(&self) -> Refusal {
        match self {
            Error::BadRequest(_) => Refusal::BadRequest,
            Error::Forbidden { .. } => Refusal::Forbidden,
            Error::EkUntrusted(_) => Refusal::EkUntrusted,
            Error::EkRootNotForHost(_) => Refusal::EkRootNotForHost,
            Error::EkMismatch(_) => Refusal::EkMismatch,
            Error::CredentialFailed(_) => Refusal::CredentialFailed,
            Error::BindingKeyInvalid(_) => Refusal::BindingKeyInvalid,
            Error::BindingPolicyUntrusted(_) => Refusal::BindingPolicyUntrusted,
            Error::EkPinned(_) => Refusal::EkPinned,
            Error::EkInUse(_) => Refusal::EkInUse,
            Error::PcrResettable(_) => Refusal::PcrResettable,
            Error::HostRegionUnattested(_) => Refusal::HostRegionUnattested,
            Error::HostUnknown(_) => Refusal::HostUnknown,
            Error::QuoteInvalid(_) => Refusal::QuoteInvalid,
            Error::ChallengeInvalid(_) => Refusal::ChallengeInvalid,
            Error::PcrMismatch(_) => Refusal::PcrMismatch,
            Error::DescriptorSignatureInvalid(_) => Refusal::DescriptorSignatureInvalid,
            Error::OwnerMismatch(_) => Refusal::OwnerMismatch,
            Error::VersionRollback(_) => Refusal::VersionRollback,
            Error::DomainUnknown(_) => Refusal::DomainUnknown,
            Error::DomainDeleted(_) => Refusal::DomainDeleted,
            Error::RegistrationMismatch(_) => Refusal::RegistrationMismatch,
            Error::PolicyInvalid(_) => Refusal::PolicyInvalid,
            Error::PolicyDenied(_) => Refusal::PolicyDenied,
            Error::BreakGlassReasonMissing(_) => Refusal::BreakGlassReasonMissing,
            Error::VmNotInAcl(_) => Refusal::VmNotInAcl,
            Error::ImageNotAllowed(_) => Refusal::ImageNotAllowed,
            Error::ModeNotPermitted(_) => Refusal::ModeNotPermitted,
            Error::GrantExpired(_) => Refusal::GrantExpired,
            Error::GrantReplayed(_) => Refusal::GrantReplayed,
            Error::GrantTooLong(_) => Refusal::GrantTooLong,
            Error::GrantSignatureInvalid(_) => Refusal::GrantSignatureInvalid,
            Error::GrantSignerNotAuthorized(_) => Refusal::GrantSignerNotAuthorized,
            Error::GrantMismatch(_) => Refusal::GrantMismatch,
            Error::PlacementInvalid(_) => Refusal::PlacementInvalid,
            Error::PlacementMismatch(_) => Refusal::PlacementMismatch,
            Error::IntegrityEpochStale(_) => Refusal::IntegrityEpochStale,
            Error::IntegrityCommitForbidden(_) => Refusal::IntegrityCommitForbidden,
            Error::KeyRotationInProgress(_) => Refusal::KeyRotationInProgress,
            Error::RateLimited(_) => Refusal::RateLimited,
            Error::AuditChainBroken(_) => Refusal::AuditChainBroken,
            Error::Store(_) => Refusal::StoreError,
            Error::Config(_) | Error::MasterKey(_) | Error::MasterKeySealedToOtherState(_) => Refusal::ConfigError,
            Error::Io { .. } => Refusal::IoError,
            Error::Protocol(protocol::Error::BadSignature { .. } | protocol::Error::NonCanonicalSignature { .. }) => {
                Refusal::BadSignature
            }
            Error::Protocol(_) => Refusal::BadRequest,
        }
    }
}

/// The database layer's failures are the store's (`store_error`) or, for a malformed
/// `database_url`, the configuration's.
#[cfg(feature = "service")]
impl From<skydd_sql::Error> for Error {
    fn from(e: skydd_sql::Error) -> Self {
        match e {
            skydd_sql::Error::Store(message) => Error::Store(message),
            skydd_sql::Error::Config(message) => Error::Config(message),
        }
    }
}
