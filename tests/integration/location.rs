//! Location (docs/TPM.md "Location"): a host's region counts only when its configuration
//! claims it AND its measured start-up put that region's measurement into PCR 12, pinned by
//! the host's reference state. Real TTP, a swtpm per host, one test (~5 s):
//!
//! - a host measured in eu-north that claims eu-north enrolls with that attested region, and
//!   gets keys while PCR 12 holds it; once PCR 12 changes, quotes fail (`pcr_mismatch`) and
//!   its TPM would not decrypt a key;
//! - a host measured in us-east that claims eu-north, and a host whose reference state does
//!   not select PCR 12 at all, are refused `host_region_unattested`, audited;
//! - an owner's "EU only" access policy (docs/PROTOCOL.md "Access policy") permits host-eu
//!   and refuses the host without an attested region, `policy_denied`.

use net::Role;
use protocol::attest::{PcrSelection, LOCATION_PCR, MEASURED_STATE_PCR};
use protocol::domain::AccessMode;
use skydd::lab::{register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::audit::{assert_last_outcome, records};
use skydd_testkit::refusal::ttp_code;
use ttp::attestation::AttestationPolicy;

#[test]
fn a_region_counts_only_when_the_measured_start_up_pins_it() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(scenario());
}

async fn measure_location(host: &LabHost, region: &'static str) {
    host.host.tpm.run(move |tpm| secure_component::measure::extend_location(tpm, region)).await.unwrap();
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = LabPki::create(&root.join("pki")).unwrap();
    let (listener, ttp_url) = RunningTtp::bind().await.unwrap();
    let ek_ca = root.join("tpm-vendor-ca");
    let in_eu = LabHost::start(root, &pki, "host-eu", &ek_ca, &ttp_url).unwrap();
    let in_us = LabHost::start(root, &pki, "host-us", &ek_ca, &ttp_url).unwrap();
    let unmeasured = LabHost::start(root, &pki, "host-plain", &ek_ca, &ttp_url).unwrap();
    // Each host's start-up measures its location before its secure component runs.
    measure_location(&in_eu, "eu-north").await;
    measure_location(&in_us, "us-east").await;
    let with_location =
        PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, MEASURED_STATE_PCR, LOCATION_PCR] };
    let default = PcrSelection::default_host();
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![
            in_eu.reference_state("compute-eu-north", &with_location).await.unwrap(),
            in_us.reference_state("compute-us-east", &with_location).await.unwrap(),
            unmeasured.reference_state("compute-no-location", &default).await.unwrap(),
        ],
    };
    let ttp = RunningTtp::start(root, &pki, &policy, listener).await.unwrap();

    // Claimed and measured alike: enrolled with the attested region.
    let enrolled = in_eu.host.enroll_in_region(&with_location, Some("eu-north")).await.expect("host-eu enrolls");
    assert_eq!(enrolled.reference_state, "compute-eu-north");
    let record = records(&ttp.service).pop().unwrap();
    assert!(record.message.contains("attested region eu-north"), "{}", record.message);

    // Claims it does not attest: refused, audited.
    let result = in_us.host.enroll_in_region(&with_location, Some("eu-north")).await;
    assert_eq!(ttp_code(result), "host_region_unattested");
    let record = records(&ttp.service).pop().unwrap();
    assert_last_outcome(&ttp.service, "host_region_unattested");
    assert!(record.message.contains("pins PCR 12") && record.message.contains("compute-us-east"), "{}", record.message);
    let result = unmeasured.host.enroll_in_region(&default, Some("eu-north")).await;
    assert_eq!(ttp_code(result), "host_region_unattested");
    let record = records(&ttp.service).pop().unwrap();
    assert!(record.message.contains("does not select PCR 12"), "{}", record.message);
    // Without a claim, the same hosts enroll (with no region to offer a policy).
    in_us.host.enroll(&with_location).await.expect("host-us enrolls without a region");
    unmeasured.host.enroll(&default).await.expect("host-plain enrolls without a region");

    // The region is bound to the key: host-eu gets keys while PCR 12 holds eu-north.
    pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let cp = pki.client("cp-1", Role::Ttp, &ttp.url).unwrap();
    let op = Operator::of(&pki, "cp-1").unwrap();
    let alice = DomainManager::create(&pki, "dm-alice").unwrap();
    let descriptor = alice.new_domain(&[("jurisdiction", "eu")], &[("vm-a", AccessMode::Rw)]).unwrap();
    let header = register(&cp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    op.obtain_key(&in_eu.host, &header, &grant, "vm-a", AccessMode::Rw).await.expect("host-eu gets the key");

    // An owner's "EU only" policy reads the attested region: host-eu is permitted, host-us
    // (enrolled without a region it could prove) is refused policy_denied, audited.
    let mut eu_only = alice.new_domain(&[("jurisdiction", "eu")], &[("vm-a", AccessMode::Rw)]).unwrap();
    eu_only.policy = Some(
        r#"@id("eu-only") permit (principal, action, resource)
           when { context.host has region && context.host.region like "eu-*" };"#
            .into(),
    );
    let eu_header = register(&cp, alice.sign_descriptor(&eu_only).unwrap(), None).await.unwrap();
    let grant = alice.grant(&eu_only.domain_id, "vm-a", AccessMode::Rw, 300);
    op.obtain_key(&in_eu.host, &eu_header, &grant, "vm-a", AccessMode::Rw).await.expect("permitted in eu-north");
    let record = records(&ttp.service).pop().unwrap();
    assert!(record.message.contains("permitted by policy eu-only"), "{}", record.message);
    let grant = alice.grant(&eu_only.domain_id, "vm-a", AccessMode::Rw, 300);
    let result = op.obtain_key(&in_us.host, &eu_header, &grant, "vm-a", AccessMode::Rw).await;
    assert_eq!(ttp_code(result), "policy_denied");
    assert_last_outcome(&ttp.service, "policy_denied");
    // Another location measurement (the host moved, or its start-up was altered): refused.
    measure_location(&in_eu, "us-east").await;
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let result = op.obtain_key(&in_eu.host, &header, &grant, "vm-a", AccessMode::Rw).await;
    assert_eq!(ttp_code(result), "pcr_mismatch");
    ttp.stop().await;
}
