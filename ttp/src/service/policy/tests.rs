//! The access policy: compiling under the schema, each context field's decision, the
//! cache, and the key release with a policy and break-glass, on the recorded swtpm host.

use protocol::domain::AccessMode;
use protocol::image::LaunchedImage;
use protocol::messages::{KeyReleaseRequest, PURPOSE_EMERGENCY};
use protocol::pki::{Affiliation, Identity, Role};

use super::*;
use crate::service::test_support::fixture::{assert_mentions, Fixture, OWNER, VM};
use crate::store::now_unix;

fn facts<'a>(mode: AccessMode, now: u64, purpose: &'a str, reason: &'a str, lifetime: u64) -> ReleaseFacts<'a> {
    ReleaseFacts {
        vm_id: "vm-a",
        mode,
        now,
        purpose,
        reason,
        grant_signer: "dm-alice",
        grant_signer_affiliation: None,
        grant_lifetime_seconds: lifetime,
        host_id: "compute-1",
    }
}

fn descriptor_with(policy: &str) -> Descriptor {
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("department".to_string(), "cardiology".to_string());
    let acl = vec![protocol::domain::AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }];
    let mut descriptor = Descriptor::new("dm-alice", metadata, acl).unwrap();
    descriptor.policy = Some(policy.to_string());
    descriptor
}

fn decide(
    policy: &str,
    facts: &ReleaseFacts<'_>,
    region: Option<&str>,
    image: Option<&str>,
) -> Result<Option<Permitted>> {
    let policies = AccessPolicies::new().unwrap();
    let descriptor = descriptor_with(policy);
    let image = image.map(|digest| LaunchedImage { sha256: digest.into(), role: "web".into(), version: 3 });
    policies.decide(&descriptor, &[0; 32], facts, region, image.as_ref())
}

#[test]
fn the_schema_parses_and_the_documented_example_validates() {
    let policies = AccessPolicies::new().unwrap();
    policies.compile(protocol::policy::EXAMPLE_POLICY).unwrap();
    let (schema, _) = Schema::from_cedarschema_str(protocol::policy::SCHEMA).unwrap();
    let actions = schema.action_entities().unwrap();
    assert_eq!(actions.iter().count(), 2, "attach_ro and attach_rw");
}

#[test]
fn a_policy_that_does_not_parse_is_policy_invalid_naming_cedars_error() {
    let error = AccessPolicies::new().unwrap().compile("permit(principal, action, resource) when {").unwrap_err();
    assert_eq!(error.code(), "policy_invalid");
    assert_mentions(&error, "does not parse");
}

#[test]
fn a_policy_outside_the_schema_is_policy_invalid_naming_the_attribute_and_policy() {
    let text = r#"@id("by-ward") permit(principal, action, resource) when { principal.ward == "icu" };"#;
    let error = AccessPolicies::new().unwrap().compile(text).unwrap_err();
    assert_eq!(error.code(), "policy_invalid");
    assert_mentions(&error, "does not validate against the schema");
    assert_mentions(&error, "ward");
    assert_mentions(&error, "by-ward");
    // An optional field used without `has` is a type error in strict mode.
    let unguarded = r#"permit(principal, action, resource) when { context.host.region == "eu-north" };"#;
    assert_eq!(AccessPolicies::new().unwrap().compile(unguarded).unwrap_err().code(), "policy_invalid");
}

#[test]
fn a_time_window_permits_inside_and_denies_outside() {
    let policy = r#"@id("study") permit(principal, action == Action::"attach_ro", resource)
        when { context.now >= 1000 && context.now < 2000 };"#;
    let inside = decide(policy, &facts(AccessMode::Ro, 1500, "", "", 60), None, None).unwrap();
    assert_eq!(inside, Some(Permitted { policy_ids: vec!["study".into()] }));
    for now in [999, 2000] {
        let error = decide(policy, &facts(AccessMode::Ro, now, "", "", 60), None, None).unwrap_err();
        assert_eq!(error.code(), "policy_denied");
        assert_mentions(&error, "no permit policy applies");
    }
    // The window permits attach_ro only: a read-write release is denied.
    let error = decide(policy, &facts(AccessMode::Rw, 1500, "", "", 60), None, None).unwrap_err();
    assert_mentions(&error, "denies attach_rw by vm-a");
}

#[test]
fn a_forbid_is_named_in_the_denial() {
    let policy = r#"permit(principal, action, resource);
        @id("no-research") forbid(principal, action, resource) when { context.purpose == "research" };"#;
    decide(policy, &facts(AccessMode::Rw, 1, "treatment", "", 60), None, None).unwrap();
    let error = decide(policy, &facts(AccessMode::Rw, 1, "research", "", 60), None, None).unwrap_err();
    assert_mentions(&error, "forbidden by no-research");
}

#[test]
fn region_image_metadata_and_signer_reach_the_policy() {
    let policy = r#"@id("eu") permit(principal == Vm::"vm-a", action, resource)
        when { context.host has region && context.host.region like "eu-*" &&
               context has image && context.image.digest == "sha256:aa" &&
               context.image.role == "web" && context.image.version >= 3 &&
               resource.hasTag("department") && resource.getTag("department") == "cardiology" &&
               resource.owner == "dm-alice" && context.grant_signer == "dm-alice" };"#;
    let f = facts(AccessMode::Rw, 1, "", "", 60);
    decide(policy, &f, Some("eu-north-1"), Some("sha256:aa")).unwrap().expect("permitted");
    for (region, image) in [(None, Some("sha256:aa")), (Some("us-east-1"), Some("sha256:aa")), (Some("eu-west"), None)]
    {
        assert_eq!(decide(policy, &f, region, image).unwrap_err().code(), "policy_denied", "{region:?} {image:?}");
    }
}

#[test]
fn the_signers_organisation_and_role_reach_the_policy_and_a_signer_without_them_is_denied() {
    let policy = r#"@id("cardiologists") permit(principal, action == Action::"attach_ro", resource)
        when { context has grant_signer_affiliation &&
               context.grant_signer_affiliation.organisation == "Karolinska Cardiology" &&
               context.grant_signer_affiliation.role == "cardiologist" };"#;
    let cardiologist = Affiliation::new("Karolinska Cardiology", "cardiologist").unwrap();
    let billing = Affiliation::new("Karolinska Cardiology", "billing").unwrap();
    let elsewhere = Affiliation::new("St Erik", "cardiologist").unwrap();
    let with =
        |affiliation| ReleaseFacts { grant_signer_affiliation: affiliation, ..facts(AccessMode::Ro, 1, "", "", 60) };
    let permitted = decide(policy, &with(Some(&cardiologist)), None, None).unwrap().expect("permitted");
    assert_eq!(permitted.policy_ids, ["cardiologists"]);
    for affiliation in [None, Some(&billing), Some(&elsewhere)] {
        let error = decide(policy, &with(affiliation), None, None).unwrap_err();
        assert_eq!(error.code(), "policy_denied", "{affiliation:?}");
    }
    // Strict validation: reading it without `has` is refused at registration.
    let unguarded = r#"permit(principal, action, resource) when { context.grant_signer_affiliation.role == "x" };"#;
    assert_eq!(AccessPolicies::new().unwrap().compile(unguarded).unwrap_err().code(), "policy_invalid");
}

#[test]
fn no_policy_leaves_the_decision_to_the_access_list() {
    let mut descriptor = descriptor_with("permit(principal, action, resource);");
    descriptor.policy = None;
    let decided =
        AccessPolicies::new().unwrap().decide(&descriptor, &[0; 32], &facts(AccessMode::Rw, 1, "", "", 1), None, None);
    assert_eq!(decided.unwrap(), None);
}

#[test]
fn a_domains_policy_is_compiled_once_per_version() {
    let policies = AccessPolicies::new().unwrap();
    let descriptor = descriptor_with("permit(principal, action, resource);");
    let first = policies.compiled_policy(&descriptor, &[1; 32], descriptor.policy.as_deref().unwrap()).unwrap();
    let again = policies.compiled_policy(&descriptor, &[1; 32], descriptor.policy.as_deref().unwrap()).unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    let next = descriptor.next_version(|_| {}).unwrap();
    let other = policies.compiled_policy(&next, &[2; 32], next.policy.as_deref().unwrap()).unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
}

// ---- through the TTP's key release ----------------------------------------------------------

fn emergency_request(f: &Fixture, reason: &str) -> KeyReleaseRequest {
    let grant = f.grant_with(&f.owner, |g| {
        g.mode = AccessMode::Ro;
        g.purpose = PURPOSE_EMERGENCY.into();
        g.reason = reason.into();
        g.expires_at = now_unix() + 120;
    });
    KeyReleaseRequest { mode: AccessMode::Ro, ..f.request_with_grant(grant) }
}

const BREAK_GLASS_POLICY: &str = r#"@id("treatment") permit(principal, action, resource) when { context.purpose == "treatment" };
@id("break-glass") permit(principal, action == Action::"attach_ro", resource)
  when { context.purpose == "emergency" && context.grant_signer == "dm-alice" &&
         context.grant_lifetime_seconds <= 300 && context.reason != "" };"#;

#[test]
fn registration_refuses_a_policy_outside_the_schema_and_audits_it() {
    let f = Fixture::new();
    let next = f
        .descriptor
        .next_version(|d| d.policy = Some("permit(principal, action, resource) when { context.ward == 1 };".into()))
        .unwrap();
    let signed = f.owner.sign_envelope(protocol::signing::SignatureContext::Descriptor, next.encode().unwrap());
    let request = protocol::messages::RegisterDomainRequest {
        descriptor: signed,
        previous_registration: Some(f.header.registration.clone()),
    };
    let cloud = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
    let error = f.ttp.register_domain(&cloud, &request).unwrap_err();
    assert_eq!(error.code(), "policy_invalid");
    assert_mentions(&error, &format!("version 2 of domain {}", f.descriptor.domain_id));
    assert_mentions(&error, "ward");
    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("register", "policy_invalid"));
    // The domain stays at version 1: releases of it go on.
    f.release(&f.request()).unwrap();
}

#[test]
fn purpose_decides_and_a_denial_is_audited_with_the_deciding_policies() {
    let mut f = Fixture::new();
    f.set_policy(Some(BREAK_GLASS_POLICY));
    let research = f.request_with_grant(f.grant_with(&f.owner, |g| g.purpose = "research".into()));
    let error = f.refused(&research, "policy_denied");
    assert_mentions(&error, "for purpose \"research\": no permit policy applies");
    let treatment = f.request_with_grant(f.grant_with(&f.owner, |g| g.purpose = "treatment".into()));
    f.release(&treatment).unwrap();
    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", "ok"));
    assert!(record.message.contains("permitted by policy treatment, purpose treatment"), "{}", record.message);
}

#[test]
fn break_glass_needs_a_reason_whatever_the_policy_and_leaves_its_own_record() {
    let mut f = Fixture::new();
    // Without a policy the access list would allow it: the reason is still required.
    let error = f.release(&emergency_request(&f, " ")).unwrap_err();
    assert_eq!(error.code(), "break_glass_reason_missing");
    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("break_glass_release", "break_glass_reason_missing"));

    f.set_policy(Some(BREAK_GLASS_POLICY));
    f.release(&emergency_request(&f, "patient unconscious in ER bay 3")).unwrap();
    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("break_glass_release", "ok"));
    assert!(record.message.ends_with("reason: patient unconscious in ER bay 3"), "{}", record.message);
    assert!(record.message.contains(&format!("grant by {OWNER}")) && record.message.contains(VM));

    // A break-glass grant valid longer than the policy allows is denied by the policy.
    let long = f.grant_with(&f.owner, |g| {
        g.mode = AccessMode::Ro;
        g.purpose = PURPOSE_EMERGENCY.into();
        g.reason = "ward round".into();
        g.expires_at = now_unix() + 900;
    });
    let error = f.release(&KeyReleaseRequest { mode: AccessMode::Ro, ..f.request_with_grant(long) }).unwrap_err();
    assert_eq!(error.code(), "policy_denied");
    f.ttp.verify_audit_chain().unwrap();
}
