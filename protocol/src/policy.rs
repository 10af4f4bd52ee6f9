//! The access policy a descriptor may carry (docs/PROTOCOL.md "Access policy"): the Cedar
//! schema every policy is validated against, and the names a policy uses. The protocol crate
//! only carries the text; the TTP parses, validates and evaluates it.

/// The Cedar schema (human-readable syntax) of a Skydd access policy. A key release is one
/// authorization request: principal the requesting VM, action the mode asked for, resource
/// the domain, and a context of what the TTP verified at steps 1 to 5.
pub const SCHEMA: &str = r#"// Skydd access policy schema (docs/PROTOCOL.md "Access policy").
// The VM asking for the key; its id is the entity id: Vm::"vm-a".
entity Vm;
// The domain; its id is the entity id. Metadata entries are tags:
// resource.hasTag("department") && resource.getTag("department") == "cardiology".
entity Domain = {
  owner: String,
  version: Long,
} tags String;

type Host = {
  id: String,
  region?: String,
};

type Image = {
  digest: String,
  role: String,
  version: Long,
};

// Whom the grant's signer acts for and as what (OrBAC's organisation and role), from the
// affiliation extension of its certificate (docs/PKI.md "Affiliation").
type Affiliation = {
  organisation: String,
  role: String,
};

type ReleaseContext = {
  now: Long,
  purpose: String,
  reason: String,
  grant_signer: String,
  grant_signer_affiliation?: Affiliation,
  grant_lifetime_seconds: Long,
  host: Host,
  image?: Image,
};

// A read-only release is decided by attach_ro, a read-write one by attach_rw.
action attach_ro, attach_rw appliesTo {
  principal: Vm,
  resource: Domain,
  context: ReleaseContext,
};
"#;

/// The entity type of the principal (the VM).
pub const VM_TYPE: &str = "Vm";
/// The entity type of the resource (the domain).
pub const DOMAIN_TYPE: &str = "Domain";
/// The action a read-only key release is decided by.
pub const ACTION_ATTACH_RO: &str = "attach_ro";
/// The action a read-write key release is decided by.
pub const ACTION_ATTACH_RW: &str = "attach_rw";

/// A policy that teaches the language: the `domain-manager domain policy set --help` example
/// and the documentation's. Read access during a study's window for treatment; break-glass
/// read access for one named manager with a short grant and a reason; writes only in the EU.
pub const EXAMPLE_POLICY: &str = r#"// Treatment reads during the study (1 Jan 2027 to 1 Jan 2028, unix seconds).
@id("study-window")
permit (principal, action == Action::"attach_ro", resource)
when {
  context.purpose == "treatment" &&
  context.now >= 1798761600 && context.now < 1830297600
};

// Break-glass: dm-er-lead may read in an emergency with a short grant and a reason.
@id("break-glass")
permit (principal, action == Action::"attach_ro", resource)
when {
  context.purpose == "emergency" &&
  context.grant_signer == "dm-er-lead" &&
  context.grant_lifetime_seconds <= 600 &&
  context.reason != ""
};

// Writes only from hosts attested in the EU.
@id("eu-writes")
permit (principal, action == Action::"attach_rw", resource)
when { context.host has region && context.host.region like "eu-*" };
"#;
