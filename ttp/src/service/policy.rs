//! The owner's access policy (docs/PROTOCOL.md "Access policy"): Cedar text in the signed
//! descriptor, validated against [`protocol::policy::SCHEMA`] when a version is registered
//! (`policy_invalid`), and asked at every key release once the access list allowed it
//! (`policy_denied`). A domain's newest policy is parsed and validated once and kept, so a
//! release does not parse it again.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use protocol::domain::{AccessMode, Descriptor};
use protocol::image::LaunchedImage;
use protocol::pki::Affiliation;
use protocol::policy::{ACTION_ATTACH_RO, ACTION_ATTACH_RW, DOMAIN_TYPE, SCHEMA, VM_TYPE};

use crate::error::{Error, Result};

/// Most domains whose compiled policy is kept; past it the cache starts again empty (a
/// policy is compiled again at its domain's next release).
const MAX_CACHED_POLICIES: usize = 4096;

/// What the TTP verified about a key release by the time the policy is asked: the
/// request's VM and mode, its clock, and the verified grant's signer, purpose, reason and
/// validity (the policy's principal, action and `context`).
#[derive(Debug, Clone, Copy)]
pub struct ReleaseFacts<'a> {
    /// The VM asking (the policy's principal, `Vm::"<id>"`).
    pub vm_id: &'a str,
    /// The mode asked for: `attach_ro` or `attach_rw` decides.
    pub mode: AccessMode,
    /// The TTP's clock, unix seconds (`context.now`).
    pub now: u64,
    /// The grant's purpose of use, empty if it names none (`context.purpose`).
    pub purpose: &'a str,
    /// The grant's reason, possibly empty (`context.reason`).
    pub reason: &'a str,
    /// The manager whose signature on the grant was verified (`context.grant_signer`).
    pub grant_signer: &'a str,
    /// The organisation and role the signer's certificate carries, if any
    /// (`context.grant_signer_affiliation`, docs/PKI.md "Affiliation").
    pub grant_signer_affiliation: Option<&'a Affiliation>,
    /// Seconds the grant is still valid for at `now` (`context.grant_lifetime_seconds`).
    pub grant_lifetime_seconds: u64,
    /// The attested host (`context.host.id`).
    pub host_id: &'a str,
}

/// A permitted release: the ids of the policies that permitted it (their `@id` annotation
/// where they have one), for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permitted {
    /// The deciding policies' ids.
    pub policy_ids: Vec<String>,
}

/// One domain's compiled policy, for the version and descriptor it came from.
struct Compiled {
    version: u64,
    descriptor_hash: [u8; 32],
    policies: Arc<PolicySet>,
}

/// The schema, a validator and every domain's newest compiled policy.
pub struct AccessPolicies {
    validator: Validator,
    authorizer: Authorizer,
    compiled: Mutex<HashMap<String, Compiled>>,
}

impl AccessPolicies {
    /// Parses the schema of [`protocol::policy::SCHEMA`] (a failure is a bug of this build,
    /// reported as `Error::Config`).
    pub fn new() -> Result<Self> {
        let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| Error::Config(format!("the access policy schema does not parse: {e}")))?;
        Ok(Self {
            validator: Validator::new(schema),
            authorizer: Authorizer::new(),
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// Parses `text` and validates it against the schema in strict mode; `policy_invalid`
    /// naming Cedar's errors (with each policy's id) otherwise.
    pub fn compile(&self, text: &str) -> Result<PolicySet> {
        let policies = PolicySet::from_str(text).map_err(|errors| {
            let details: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            Error::PolicyInvalid(format!("the access policy does not parse: {}", details.join("; ")))
        })?;
        let result = self.validator.validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let details: Vec<String> = result
                .validation_errors()
                .map(|e| format!("{} ({})", e, display_id(&policies, e.policy_id())))
                .collect();
            return Err(Error::PolicyInvalid(format!(
                "the access policy does not validate against the schema (docs/PROTOCOL.md \"Access policy\"): {}",
                details.join("; ")
            )));
        }
        Ok(policies)
    }

    /// The registration check: a descriptor's policy, if it has one, parses and validates.
    pub fn check_descriptor(&self, descriptor: &Descriptor) -> Result<()> {
        if let Some(text) = &descriptor.policy {
            self.compile(text).map_err(|e| match e {
                Error::PolicyInvalid(detail) => Error::PolicyInvalid(format!(
                    "version {} of domain {}: {detail}",
                    descriptor.version, descriptor.domain_id
                )),
                other => other,
            })?;
        }
        Ok(())
    }

    /// The policy's decision on one key release, for a descriptor the access list already
    /// allowed: `Ok(None)` when the descriptor has no policy (the access list alone decides),
    /// `Ok(Some(..))` naming the permitting policies, or `policy_denied` naming the forbid
    /// policies that decided (or saying that none permitted). `host_region` is the attested
    /// region of the host (docs/TPM.md "Location") and `image` the image the VM was launched
    /// from, bound to the quote (docs/PROTOCOL.md "Trusted launch"), when known
    /// (`context.host.region`, `context.image.{digest, role, version}`).
    pub fn decide(
        &self,
        descriptor: &Descriptor,
        descriptor_hash: &[u8; 32],
        facts: &ReleaseFacts<'_>,
        host_region: Option<&str>,
        image: Option<&LaunchedImage>,
    ) -> Result<Option<Permitted>> {
        let Some(text) = &descriptor.policy else { return Ok(None) };
        let policies = self.compiled_policy(descriptor, descriptor_hash, text)?;
        let action = match facts.mode {
            AccessMode::Ro => ACTION_ATTACH_RO,
            AccessMode::Rw => ACTION_ATTACH_RW,
        };
        let vm = uid(VM_TYPE, facts.vm_id)?;
        let domain = uid(DOMAIN_TYPE, &descriptor.domain_id)?;
        let request =
            Request::new(vm.clone(), uid("Action", action)?, domain.clone(), context(facts, host_region, image)?, None)
                .map_err(|e| internal(format!("the request: {e}")))?;
        let entities = entities(vm, domain, descriptor)?;
        let response = self.authorizer.is_authorized(&request, &policies, &entities);
        let deciding: Vec<String> = response.diagnostics().reason().map(|id| display_id(&policies, id)).collect();
        if response.decision() == Decision::Allow {
            return Ok(Some(Permitted { policy_ids: deciding }));
        }
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        let why = if deciding.is_empty() {
            "no permit policy applies".to_string()
        } else {
            format!("forbidden by {}", deciding.join(", "))
        };
        let errors = if errors.is_empty() {
            String::new()
        } else {
            format!(" (policies that failed to evaluate, as not applying: {})", errors.join("; "))
        };
        Err(Error::PolicyDenied(format!(
            "the access policy of domain {} version {} denies {action} by {} on {} for purpose {:?}: {why}{errors}",
            descriptor.domain_id, descriptor.version, facts.vm_id, facts.host_id, facts.purpose
        )))
    }

    /// The domain's compiled policy for this version, compiled now if it is not kept yet.
    fn compiled_policy(
        &self,
        descriptor: &Descriptor,
        descriptor_hash: &[u8; 32],
        text: &str,
    ) -> Result<Arc<PolicySet>> {
        let kept = |compiled: &HashMap<String, Compiled>| {
            compiled
                .get(&descriptor.domain_id)
                .filter(|c| c.version == descriptor.version && c.descriptor_hash == *descriptor_hash)
                .map(|c| c.policies.clone())
        };
        if let Some(policies) = kept(&self.lock()) {
            return Ok(policies);
        }
        // Compiled outside the lock: a long policy must not hold up other domains' releases.
        let policies = Arc::new(self.compile(text)?);
        let mut compiled = self.lock();
        if compiled.len() >= MAX_CACHED_POLICIES && !compiled.contains_key(&descriptor.domain_id) {
            compiled.clear();
        }
        compiled.insert(
            descriptor.domain_id.clone(),
            Compiled { version: descriptor.version, descriptor_hash: *descriptor_hash, policies: policies.clone() },
        );
        Ok(policies)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Compiled>> {
        // The map holds only finished compilations: one left by a panicking thread is sound.
        self.compiled.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A policy's `@id` annotation if it has one, else Cedar's id (`policy0`, ...).
fn display_id(policies: &PolicySet, id: &PolicyId) -> String {
    policies.annotation(id, "id").map_or_else(|| id.to_string(), str::to_string)
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid> {
    let type_name =
        EntityTypeName::from_str(type_name).map_err(|e| internal(format!("entity type {type_name}: {e}")))?;
    Ok(EntityUid::from_type_name_and_id(type_name, EntityId::new(id)))
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_string())
}

fn long(value: u64) -> RestrictedExpression {
    // Cedar's Long is i64; a u64 beyond it (a clock or lifetime that far off) saturates.
    RestrictedExpression::new_long(i64::try_from(value).unwrap_or(i64::MAX))
}

fn record(fields: Vec<(&str, RestrictedExpression)>) -> Result<RestrictedExpression> {
    RestrictedExpression::new_record(fields.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| internal(format!("a context record: {e}")))
}

/// `context` of docs/PROTOCOL.md "Access policy".
fn context(facts: &ReleaseFacts<'_>, host_region: Option<&str>, image: Option<&LaunchedImage>) -> Result<Context> {
    let mut host = vec![("id", string(facts.host_id))];
    if let Some(region) = host_region {
        host.push(("region", string(region)));
    }
    let mut pairs = vec![
        ("now", long(facts.now)),
        ("purpose", string(facts.purpose)),
        ("reason", string(facts.reason)),
        ("grant_signer", string(facts.grant_signer)),
        ("grant_lifetime_seconds", long(facts.grant_lifetime_seconds)),
        ("host", record(host)?),
    ];
    if let Some(affiliation) = facts.grant_signer_affiliation {
        let fields = vec![("organisation", string(&affiliation.organisation)), ("role", string(&affiliation.role))];
        pairs.push(("grant_signer_affiliation", record(fields)?));
    }
    if let Some(image) = image {
        let fields =
            vec![("digest", string(&image.sha256)), ("role", string(&image.role)), ("version", long(image.version))];
        pairs.push(("image", record(fields)?));
    }
    Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| internal(format!("the request context: {e}")))
}

/// The VM (no attributes) and the domain (owner, version, its metadata as tags).
fn entities(vm: EntityUid, domain: EntityUid, descriptor: &Descriptor) -> Result<Entities> {
    let domain = Entity::new_with_tags(
        domain,
        [("owner".to_string(), string(&descriptor.owner)), ("version".to_string(), long(descriptor.version))],
        [],
        descriptor.metadata.iter().map(|(key, value)| (key.clone(), string(value))),
    )
    .map_err(|e| internal(format!("the domain entity: {e}")))?;
    Entities::from_entities([Entity::with_uid(vm), domain], None).map_err(|e| internal(format!("the entities: {e}")))
}

/// A failure to build a request from values the TTP verified: a bug, not a refusal.
fn internal(detail: String) -> Error {
    Error::Config(format!("access policy evaluation: {detail}"))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bench;
