//! Domain managers against each other: one tenant attaching, granting, reading, changing or
//! deleting another owner's domain (rows D1-D11).

use super::*;

/// D1: a domain manager attaches another owner's domain through the CP.
#[test]
fn d1_attaching_another_owners_domain_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, bob, bob_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { id_a, .. } = d;
        // D1: bob attaches alice's domain (not shared with him).
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&bob_cp, &id_a, "vm-a", AccessMode::Rw, bob.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "forbidden",
        );
        assert!(message.contains("dm-bob"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before, "the CP refuses before the TTP is asked");
    });
}

/// D9: a domain manager reads another owner's viewing history.
#[test]
fn d9_reading_another_owners_history_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { bob_ttp, .. } = w;
        let id_a = d.id_a;
        // D9: bob reads alice's viewing history at the TTP.
        expect_code(bob_ttp.get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history")).await, "forbidden");
    });
}

/// D7: a domain manager grants a mount of a domain it does not manage.
#[test]
fn d7_a_grant_for_a_domain_not_managed_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, bob, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, .. } = d;
        // D7: bob grants a mount of alice's domain; the CP is bypassed (compute-1 asks directly).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &header_a,
            &bob.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        refused_release(&ttp, &c1_ttp, &request, "grant_signer_not_authorized").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "grant_signer_not_authorized").await;
    });
}

/// D8: a domain manager signs a grant that names another issuer.
#[test]
fn d8_a_grant_naming_another_issuer_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, bob, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, .. } = d;
        // D8: bob signs a grant that names alice as its issuer.
        let grant = protocol::messages::MountGrant {
            domain_id: id_a.clone(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            expires_at: now_unix() + 300,
            nonce: rand::random(),
            issuer: "dm-alice".into(),
            purpose: String::new(),
            reason: String::new(),
        };
        let forged = bob.key.sign_envelope(SignatureContext::MountGrant, grant.encode());
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &forged, &challenge, quote);
        refused_release(&ttp, &c1_ttp, &request, "grant_signature_invalid").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "grant_signature_invalid").await;
    });
}

/// D10: a domain manager calls the TTP's key release with its certificate.
#[test]
fn d10_a_domain_manager_at_the_key_release_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, bob_ttp, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { header_a, grant_a, .. } = d;
        // D10: a domain-manager certificate at the key-release endpoint.
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(&op, "dm-bob", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        refused_release(&ttp, &bob_ttp, &request, "forbidden").await;
    });
}

/// D5 and D6: a descriptor naming another owner, through the CP (D5) and registered directly (D6); one descriptor for both.
#[test]
fn d5_d6_a_domain_naming_another_owner_is_refused() {
    run(|w| async move {
        let World { cloud, alice, bob, bob_cp, cp_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        // D5: bob creates a domain naming alice as its owner, through the CP.
        let descriptor = alice.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let before = audit_records(&ttp).len();
        let request = CreateDomainRequest {
            descriptor: bob.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap()),
            size_bytes: 1 << 20,
        };
        expect_code(bob_cp.post_json::<_, DomainView>("/v1/domains", &request).await, "owner_mismatch");
        assert_eq!(audit_records(&ttp).len(), before);
        // D6: the same descriptor registered directly at the TTP by a CP identity.
        let register = RegisterDomainRequest { descriptor: request.descriptor.clone(), previous_registration: None };
        expect_code(
            cp_ttp.post_json::<_, RegisterDomainResponse>("/v1/domains", &register).await,
            "descriptor_signature_invalid",
        );
        assert_audited(&ttp, before, "register", "descriptor_signature_invalid");
    });
}

/// D11: a domain manager creates a domain with an existing domain's id.
#[test]
fn d11_a_domain_with_an_existing_id_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { bob, bob_cp, .. } = w;
        let Domains { id_b, .. } = d;
        // D11: bob creates a domain with the id of alice's domain.
        let mut squat = bob.new_domain(&[], &[("vm-b", AccessMode::Rw)]).unwrap();
        squat.domain_id = id_b.clone();
        let request = CreateDomainRequest { descriptor: bob.sign_descriptor(&squat).unwrap(), size_bytes: 1 << 20 };
        expect_code(bob_cp.post_json::<_, DomainView>("/v1/domains", &request).await, "domain_exists");
    });
}

/// D2, D3 and D4: a manager a domain is shared with changes its ACL (D2), deletes it through the CP (D3) and at the TTP (D4); one sharing for the three.
#[test]
fn d2_d3_d4_a_shared_manager_cannot_change_or_delete() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, bob, alice_cp, bob_cp, bob_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { desc_b, id_b, .. } = d;
        // Domain B is shared with bob: he may see and attach it, not change or delete it.
        let shared = desc_b.next_version(|d| d.shared_with.push("dm-bob".into())).unwrap();
        update_domain(&alice_cp, &alice, &shared).await;
        let _: DomainView = bob_cp.get_json(&format!("/v1/domains/{id_b}")).await.expect("shared with bob");
        // D2: bob adds his VM to the ACL.
        let grab =
            shared.next_version(|d| d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw })).unwrap();
        let before = audit_records(&ttp).len();
        let result = bob_cp
            .put_json::<_, DomainView>(
                &format!("/v1/domains/{id_b}/descriptor"),
                &UpdateDomainRequest {
                    descriptor: bob.key.sign_envelope(SignatureContext::Descriptor, grab.encode().unwrap()),
                },
            )
            .await;
        let message = expect_code(result, "owner_mismatch");
        assert!(message.contains("dm-alice") && message.contains("dm-bob"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before);
        // D3: bob deletes it through the CP.
        let result = bob_cp.request_json_delete(&id_b, &bob).await;
        expect_code(result, "owner_mismatch");
        assert_eq!(audit_records(&ttp).len(), before);
        // D4: bob's signed deletion sent straight to the TTP.
        let result = bob_ttp
            .post_json::<_, serde_json::Value>(
                &format!("/v1/domains/{id_b}/delete"),
                &DeleteDomainRequest { deletion: bob.deletion(&id_b) },
            )
            .await;
        let message = expect_code(result, "owner_mismatch");
        assert!(message.contains("dm-alice"), "{message}");
        assert_audited(&ttp, before, "delete", "owner_mismatch");
        let _: DomainView = alice_cp.get_json(&format!("/v1/domains/{id_b}")).await.expect("domain B survives");
    });
}
