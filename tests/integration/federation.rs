//! Sharing a domain with a partner cloud's VM (docs/PKI.md "Federation", "A partner cloud's
//! host"): two clouds, each with its own CA. Cloud A runs the TTP and places the VM (its
//! cloud platform's key signs the placement: the ciphertext stays with A and is read through
//! A's side); cloud B contributes one compute host, `b-compute-07`, with its own TPM (of
//! another vendor CA) and a certificate of B's CA.
//!
//! A's TTP trusts B's root for exactly that host (role secure-component, name
//! `b-compute-07`) and B's host trusts A's root for exactly A's TTP (role ttp, name
//! `ttp-1`); A's attestation policy lists B's TPM vendor root and B's host's measured
//! state. B's host enrolls at A's TTP, gets the key of A's owner's domain sealed to its TPM,
//! reads a sector A wrote, and is refused as soon as A's owner takes the VM out of the ACL.
//! What B's root may not do is refused too: another B host, and a placement signed by B's
//! cloud platform.
//!
//! The second test runs the whole attach: the all-in-one cloud A with a host lent by B
//! (`skydd::cloud::PartnerHosts`), A's owner's manager attaches through A's cloud platform,
//! which calls B's secure component, which asks A's TTP and mounts the volume for vm-b.

use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager as Manager};
use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::AccessMode;
use protocol::messages::Registration;
use protocol::pki::RoleAllowance;
use protocol::secret::SecretBytes;
use secure_component::key_release::ObtainedKey;
use skydd::cloud::{AllInOne, Layout, PartnerHosts};
use skydd::lab::{register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::independent_key;
use skydd_testkit::refusal::ttp_code;
use skydd_volume::xts::XtsEngine;
use ttp::attestation::AttestationPolicy;

#[test]
fn a_partner_clouds_host_gets_an_owners_domain_and_loses_it_at_once_on_revoke() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (dir.path().join("cloud-a"), dir.path().join("cloud-b"));
        let mut pki_a = LabPki::create_named(&a_dir.join("pki"), "Cloud A CA").unwrap();
        let mut pki_b = LabPki::create_named(&b_dir.join("pki"), "Cloud B CA").unwrap();
        pki_a.trust(&pki_b, vec![RoleAllowance::named(Role::SecureComponent, &["b-compute-07"]).unwrap()]);
        pki_b.trust(&pki_a, vec![RoleAllowance::named(Role::Ttp, &["ttp-1"]).unwrap()]);

        // Cloud B's host, configured to ask A's TTP; its TPM is of B's vendor.
        let (listener, ttp_a_url) = RunningTtp::bind().await.unwrap();
        let b_vendor = b_dir.join("tpm-vendor-ca");
        let b_host = LabHost::start(&b_dir, &pki_b, "b-compute-07", &b_vendor, &ttp_a_url).unwrap();
        let selection = PcrSelection::default_host();
        let b_state = b_host.reference_state("b-compute-07-measured", &selection).await.unwrap();

        // Cloud A's TTP: B's vendor root and B's host's state are enrolled for this host.
        let policy = AttestationPolicy {
            trusted_ek_roots: secure_component::swtpm::ca_certificates_der(&b_vendor).unwrap(),
            ek_intermediates: Vec::new(),
            ek_crls: Vec::new(),
            reference_states: vec![b_state],
        };
        let ttp_a = RunningTtp::start(&a_dir, &pki_a, &policy, listener).await.unwrap();
        pki_a.issue(Role::CloudPlatform, "cloud-platform").unwrap();
        let cp_a = pki_a.client("cloud-platform", Role::Ttp, &ttp_a.url).unwrap();
        let placer_a = Operator::of(&pki_a, "cloud-platform").unwrap();
        let alice = DomainManager::create(&pki_a, "dm-alice").unwrap();

        // B's host enrolls at A's TTP (over TLS that each side's root limit lets through).
        let enrolled = b_host.host.enroll(&selection).await.expect("B's host enrolls at A's TTP");
        assert_eq!(enrolled.reference_state, "b-compute-07-measured");

        // A's owner shares a domain with vm-b, which A's operator placed on B's host.
        let descriptor = alice.new_domain(&[("department", "oncology")], &[("vm-b", AccessMode::Rw)]).unwrap();
        let domain_id = descriptor.domain_id.clone();
        let header_v1 = register(&cp_a, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
        let registration = Registration::decode(&header_v1.registration.message).unwrap();
        let master = ttp_a.master_key_from_custodians(1).unwrap().expose().to_vec();
        let expected = independent_key(&master, &registration, &domain_id, &descriptor.metadata_hash());

        // Cloud A wrote a sector of the volume with K; the ciphertext is what B's host reads.
        let plaintext: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut sector = plaintext.clone();
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut expected.clone()))
            .unwrap()
            .encrypt_sectors(0, &mut sector)
            .unwrap();
        assert_ne!(sector, plaintext);

        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let ObtainedKey { key, response, .. } = placer_a
            .obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw)
            .await
            .expect("B's host gets the key, sealed to its TPM");
        assert_eq!(response.version, 1);
        assert_eq!(&key.expose()[..64], expected.as_slice(), "B's host holds exactly K");
        let mut released = key.expose()[..64].to_vec();
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut released))
            .unwrap()
            .decrypt_sectors(0, &mut sector)
            .unwrap();
        assert_eq!(sector, plaintext, "B's host reads what A wrote");

        // B's root may not issue another host, nor a cloud platform that places VMs here.
        let other = LabHost::start(&b_dir, &pki_b, "b-compute-08", &b_vendor, &ttp_a.url).unwrap();
        let refused = other.host.enroll(&selection).await.expect_err("another B host is refused in TLS");
        assert!(refused.to_string().contains("its role is not accepted there"), "{refused}");
        pki_b.issue(Role::CloudPlatform, "cloud-platform").unwrap();
        let placer_b = Operator::of(&pki_b, "cloud-platform").unwrap();
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_b.obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "placement_invalid");

        // A's owner revokes: version 2 without vm-b. B's very next request is refused.
        let descriptor_v2 = descriptor.next_version(|d| d.acl.clear()).unwrap();
        let header_v2 =
            register(&cp_a, alice.sign_descriptor(&descriptor_v2).unwrap(), Some(header_v1.registration.clone()))
                .await
                .unwrap();
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_a.obtain_key(&b_host.host, &header_v2, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "vm_not_in_acl");
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_a.obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "version_rollback", "the header of before the revoke is refused too");

        ttp_a.stop().await;
    });
}

/// Cloud A: compute-1 (vm-a) and dm-alice; cloud B lends b-compute-07, where A's vm-b runs.
const LAYOUT: Layout<'static> = Layout { hosts: &[("compute-1", &["vm-a"])], managers: &["dm-alice"] };
const LENT: PartnerHosts<'static> = PartnerHosts { ca_name: "Cloud B CA", hosts: &[("b-compute-07", &["vm-b"])] };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_shares_a_domain_with_a_vm_on_a_host_lent_by_a_partner_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let cloud =
        AllInOne::start_with_partner(dir.path(), &LAYOUT, &LENT, &mut |line| println!(".. {line}")).await.unwrap();
    let lent = cloud.hosts.iter().find(|h| h.id == "b-compute-07").expect("the lent host runs");
    // Its certificate is cloud B's: A's CA never issued it.
    assert!(cloud.partner_pki.as_ref().unwrap().dir.join("b-compute-07.pem").exists());
    assert!(!cloud.pki.dir.join("b-compute-07.pem").exists());
    let alice = Manager::connect(&DmConfig::load(&cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let acl = vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-b:ro").unwrap()];
    let domain = alice.create(Default::default(), acl, vec![], 32 << 20).await.unwrap();

    // vm-a, on A's own host, writes a record.
    alice.attach(&domain.id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    let record = cloud.vm_mount("vm-a", &domain.id, &LAYOUT).unwrap().join("record.txt");
    std::fs::write(&record, "oncology, written in cloud A\n").unwrap();
    alice.detach(&domain.id, "vm-a").await.unwrap();

    // vm-b, on the host cloud B lent, reads it: the key went to B's TPM through A's TTP.
    let attached = alice.attach(&domain.id, "vm-b", AccessMode::Ro, 300).await.unwrap();
    assert_eq!(attached.host, "b-compute-07");
    let on_b = lent.vm_root.join("vm-b").join(&domain.id).join("record.txt");
    assert_eq!(std::fs::read_to_string(&on_b).unwrap(), "oncology, written in cloud A\n");
    alice.detach(&domain.id, "vm-b").await.unwrap();
    let history = alice.history(&domain.id).await.unwrap().records;
    assert!(history.iter().any(|r| r.event == "key_release" && r.host_id.as_deref() == Some("b-compute-07")));

    // A's owner revokes vm-b: its next attach is refused by A's TTP.
    alice.revoke(&domain.id, "vm-b").await.unwrap();
    let refused = alice.attach(&domain.id, "vm-b", AccessMode::Ro, 300).await.unwrap_err();
    assert_eq!(refused.code(), Some("vm_not_in_acl"), "{refused}");

    cloud.stop().await;
}
