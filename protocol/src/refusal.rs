//! The one vocabulary of refusals and failures every Skydd service answers with
//! (docs/PROTOCOL.md, "Error codes"): each [`Refusal`] has its stable `code`, the string of the
//! JSON error body `{"code", "message"}` that clients branch on, and its HTTP status.
//!
//! Every party maps its own error type onto this enum, and the domain manager's hints match
//! on it, so a code is spelled once, here. A test checks the table in docs/PROTOCOL.md
//! against [`Refusal::ALL`].

use std::fmt;

macro_rules! refusals {
    ($( $(#[$doc:meta])* $variant:ident => $code:literal, $status:literal; )*) => {
        /// A refusal or failure code, with its HTTP status (docs/PROTOCOL.md "Error codes").
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $( $(#[$doc])* $variant, )*
        }

        impl Refusal {
            /// Every code, in the order of the table in docs/PROTOCOL.md.
            pub const ALL: &'static [Refusal] = &[$(Refusal::$variant),*];

            /// The stable code of the JSON error body, e.g. `vm_not_in_acl`.
            pub const fn code(self) -> &'static str {
                match self { $(Refusal::$variant => $code,)* }
            }

            /// The HTTP status a service answers this refusal with.
            pub const fn http_status(self) -> u16 {
                match self { $(Refusal::$variant => $status,)* }
            }
        }
    };
}

refusals! {
    // ---- any service -----------------------------------------------------------------------
    /// A malformed body, object or id; the message names the field.
    BadRequest => "bad_request", 400;
    /// A signature in the request does not verify, or is high-S (not canonical).
    BadSignature => "bad_signature", 400;
    /// The caller's role or name may not do this.
    Forbidden => "forbidden", 403;
    /// One identity holds more connections than the service allows (`net::ServeOptions`).
    TooManyConnections => "too_many_connections", 429;
    /// One identity sends requests faster than the service allows (`Retry-After` says when).
    RateLimited => "rate_limited", 429;
    /// A service's database failed or holds an unreadable record.
    StoreError => "store_error", 500;
    /// A service's configuration or a file it names is unusable.
    ConfigError => "config_error", 500;
    /// A file could not be read or written.
    IoError => "io_error", 500;
    /// A request handler failed unexpectedly (a panic or a cancelled task).
    Internal => "internal", 500;

    // ---- TTP: host enrollment and attestation ----------------------------------------------
    /// The EK certificate does not chain to a trusted TPM vendor root (or its TCG extensions are wrong).
    EkUntrusted => "ek_untrusted", 403;
    /// The EK certificate chains only to a TPM vendor root the attestation policy trusts for other named hosts.
    EkRootNotForHost => "ek_root_not_for_host", 403;
    /// The EK public key differs from the EK certificate's.
    EkMismatch => "ek_mismatch", 403;
    /// The AK is not in the EK's TPM (the credential was not activated).
    CredentialFailed => "credential_failed", 403;
    /// The Certify of the binding key is invalid, or its attributes are wrong.
    BindingKeyInvalid => "binding_key_invalid", 403;
    /// The binding key's policy is not PolicyPCR of an allowed reference state.
    BindingPolicyUntrusted => "binding_policy_untrusted", 403;
    /// The host is pinned to another EK and no operator allowed a replacement.
    EkPinned => "ek_pinned", 403;
    /// The EK is already enrolled under another host id.
    EkInUse => "ek_in_use", 403;
    /// A selection, reference state or quote names a PCR that locality 0 can reset (16, 23).
    PcrResettable => "pcr_resettable", 400;
    /// A host claims a region its reference state does not pin in the location PCR.
    HostRegionUnattested => "host_region_unattested", 403;
    /// The host is not enrolled (TTP) or not registered (cloud platform).
    HostUnknown => "host_unknown", 404;
    /// The quote's signature or structure is invalid.
    QuoteInvalid => "quote_invalid", 403;
    /// The challenge is unknown, expired, reused, another host's, or not the quoted nonce.
    ChallengeInvalid => "challenge_invalid", 403;
    /// The quoted PCRs differ from the host's reference state.
    PcrMismatch => "pcr_mismatch", 403;

    // ---- TTP: domains ------------------------------------------------------------------------
    /// A descriptor's (or deletion's) signature or signer is invalid.
    DescriptorSignatureInvalid => "descriptor_signature_invalid", 403;
    /// An update or deletion by someone other than the owner.
    OwnerMismatch => "owner_mismatch", 403;
    /// A version not newer than the newest, or an update based on an old registration.
    VersionRollback => "version_rollback", 409;
    /// The domain is not registered.
    DomainUnknown => "domain_unknown", 404;
    /// The domain was deleted (crypto-shredded).
    DomainDeleted => "domain_deleted", 410;
    /// The registration is not this TTP's (or a configured replica's), or not of this descriptor.
    RegistrationMismatch => "registration_mismatch", 403;
    /// A descriptor's access policy does not parse or does not validate against the schema.
    PolicyInvalid => "policy_invalid", 400;

    // ---- TTP: key release ----------------------------------------------------------------
    /// The VM is not in the access list.
    VmNotInAcl => "vm_not_in_acl", 403;
    /// The VM's access-list mode does not cover the request.
    ModeNotPermitted => "mode_not_permitted", 403;
    /// The VM was not launched from an image on the signed allowlist (none reported, or a
    /// digest the list does not hold): refused by the TTP at key release and by the secure
    /// component at launch.
    ImageNotAllowed => "image_not_allowed", 403;
    /// The domain's access policy does not permit this release (the message names the deciding policies).
    PolicyDenied => "policy_denied", 403;
    /// A release for purpose `emergency` (break-glass) whose grant gives no reason.
    BreakGlassReasonMissing => "break_glass_reason_missing", 403;
    /// The mount grant expired.
    GrantExpired => "grant_expired", 403;
    /// The mount grant is valid for longer than `MAX_GRANT_VALIDITY_SECS` from now.
    GrantTooLong => "grant_too_long", 403;
    /// The mount grant was used for a key release before (a grant is single-use).
    GrantReplayed => "grant_replayed", 403;
    /// The grant's signature is invalid or its issuer is not its signer.
    GrantSignatureInvalid => "grant_signature_invalid", 403;
    /// The grant's signer is neither the owner nor a manager the domain is shared with.
    GrantSignerNotAuthorized => "grant_signer_not_authorized", 403;
    /// The grant is for another domain or VM, or a narrower mode.
    GrantMismatch => "grant_mismatch", 403;
    /// The placement is not signed by a trusted cloud-platform certificate, is too old or dated ahead.
    PlacementInvalid => "placement_invalid", 403;
    /// The placement names another VM, another host than the one asking, or another grant.
    PlacementMismatch => "placement_mismatch", 403;
    /// The audit log was edited or records were removed.
    AuditChainBroken => "audit_chain_broken", 500;

    // ---- TTP and secure component: format-2 integrity ----------------------------------------
    /// An integrity root commit names an epoch that is not the next one (a replayed or forked commit).
    IntegrityEpochStale => "integrity_epoch_stale", 409;
    /// An integrity root commit or report from a host that does not hold the domain's newest key release.
    IntegrityCommitForbidden => "integrity_commit_forbidden", 403;
    /// A format-2 volume's sector, tag or hash tree does not verify: the provider altered it.
    IntegrityViolation => "integrity_violation", 409;
    /// A format-2 volume is older than the root the TTP last committed (a rollback).
    IntegrityRollback => "integrity_rollback", 409;
    /// This backend cannot keep a format-2 volume's integrity in this mode (it refuses rather
    /// than drop integrity silently).
    IntegrityUnsupported => "integrity_unsupported", 409;
    /// The domain's key is being rotated: only a read-write attach (which finishes the
    /// re-encryption) is served until it ends, and no second rotation starts before then.
    KeyRotationInProgress => "key_rotation_in_progress", 409;

    // ---- cloud platform ----------------------------------------------------------------------
    /// A volume size that is not a positive multiple of 4096 or above the configured limit.
    InvalidSize => "invalid_size", 400;
    /// Creating the domain would take its owner past the quota of domains or bytes.
    QuotaExceeded => "quota_exceeded", 403;
    /// The instance (VM) is not registered.
    InstanceUnknown => "instance_unknown", 404;
    /// A domain with this id exists already.
    DomainExists => "domain_exists", 409;
    /// The domain is attached to this VM already (or an earlier attach is being settled).
    AlreadyAttached => "already_attached", 409;
    /// A second read-write attachment of a domain, or a read-only one beside a read-write one.
    SingleWriter => "single_writer", 409;
    /// The TTP could not be reached.
    TtpUnreachable => "ttp_unreachable", 502;
    /// A compute host's secure component could not be reached.
    HostUnreachable => "host_unreachable", 502;

    // ---- secure component -------------------------------------------------------------
    /// No attachment with this id (on this host, or at the cloud platform).
    AttachmentUnknown => "attachment_unknown", 404;
    /// The attachment id, or the domain for that VM, is attached on this host already.
    AttachmentConflict => "attachment_conflict", 409;
    /// The host's TPM refused to decrypt the released key (its PCRs changed since enrollment).
    BindingKeyRefused => "binding_key_refused", 403;
    /// A TPM command failed.
    TpmFailed => "tpm_failed", 500;
    /// A volume could not be created, opened, read, written or destroyed.
    VolumeFailed => "volume_failed", 500;
    /// The hypervisor driver could not give the device to the VM or take it back.
    HypervisorFailed => "hypervisor_failed", 500;
    /// The host lacks what the secure component needs (a kernel feature, a tool).
    HostUnprepared => "host_unprepared", 500;
}

impl Refusal {
    /// The refusal of `code`, if it is one of [`Refusal::ALL`].
    pub fn from_code(code: &str) -> Option<Refusal> {
        Refusal::ALL.iter().copied().find(|r| r.code() == code)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for refusal in Refusal::ALL {
            assert!(seen.insert(refusal.code()), "{} twice", refusal.code());
            assert_eq!(Refusal::from_code(refusal.code()), Some(*refusal));
            assert!((400..600).contains(&refusal.http_status()), "{refusal}");
        }
        assert_eq!(Refusal::from_code("no_such_code"), None);
    }

    /// The table of docs/PROTOCOL.md "Error codes" lists exactly these codes, with these
    /// statuses, in this order.
    #[test]
    fn the_documented_table_is_this_enum() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let section = doc.split("## Error codes").nth(1).expect("docs/PROTOCOL.md has an \"Error codes\" section");
        let rows: Vec<(String, u16)> = section
            .lines()
            .skip_while(|line| !line.starts_with("| `"))
            .take_while(|line| line.starts_with("| `"))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let code = cells[1].trim_matches('`').to_string();
                let status = cells[2].parse().unwrap_or_else(|_| panic!("a status in: {line}"));
                (code, status)
            })
            .collect();
        let expected: Vec<(String, u16)> =
            Refusal::ALL.iter().map(|r| (r.code().to_string(), r.http_status())).collect();
        assert_eq!(rows, expected, "docs/PROTOCOL.md \"Error codes\" and protocol::refusal::Refusal differ");
    }
}
