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

use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::AccessMode;
use protocol::messages::Registration;
use protocol::pki::RoleAllowance;
use protocol::secret::SecretBytes;
use secure_component::key_release::ObtainedKey;
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
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut released)).unwrap().decrypt_sectors(0, &mut sector).unwrap();
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
        let header_v2 = register(
            &cp_a,
            alice.sign_descriptor(&descriptor_v2).unwrap(),
            Some(header_v1.registration.clone()),
        )
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
