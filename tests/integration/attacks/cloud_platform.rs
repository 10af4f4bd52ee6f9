//! A malicious cloud platform: it stores the volumes and their headers and forwards every
//! attach, so it edits, splices, swaps, replays and points elsewhere (rows C1-C7, C11-C13).

use super::*;

/// C1: the cloud platform edits the ACL in a volume header, keeping the owner's signature.
#[test]
fn c1_an_acl_edited_in_the_header_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { desc_a, view_a, id_a, path_a, .. } = d;
        // C1: the ACL edited in the header (vm-c added), the owner's signature kept.
        let mut edited = desc_a.clone();
        edited.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw });
        let mut header = view_a.header.clone();
        header.descriptor.message = edited.encode().unwrap();
        plant_header(&path_a, &header);
        let (message, audit) =
            refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-c", AccessMode::Rw, "descriptor_signature_invalid")
                .await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "descriptor_signature_invalid").await;
        assert_eq!(audit.domain_id.as_deref(), Some(id_a.as_str()));
        println!("   {message}");
        plant_header(&path_a, &view_a.header); // the honest header back in force
    });
}

/// C4: the cloud platform splices domain B's registration under domain A's descriptor.
#[test]
fn c4_a_spliced_registration_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { view_a, view_b, id_a, path_a, .. } = d;
        // C4: domain B's registration spliced under domain A's descriptor.
        let mut spliced = view_a.header.clone();
        spliced.registration = view_b.header.registration.clone();
        plant_header(&path_a, &spliced);
        refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-a", AccessMode::Rw, "registration_mismatch").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "registration_mismatch").await;
    });
}

/// C5: the cloud platform forges a registration with its own key.
#[test]
fn c5_a_registration_the_cp_signs_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let Domains { view_a, id_a, path_a, .. } = d;
        // C5: a registration the CP signs itself (claiming any r it likes).
        let cp_signer = signer(pki, "cloud-platform");
        let mut forged = Registration::decode(&view_a.header.registration.message).unwrap();
        forged.nonce_r = [0x42; 32];
        let mut header = view_a.header.clone();
        header.registration = cp_signer.key.sign_envelope(SignatureContext::Registration, forged.encode());
        plant_header(&path_a, &header);
        let (message, _) =
            refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-a", AccessMode::Rw, "registration_mismatch").await;
        assert!(message.contains("cloud-platform"), "{message}");
    });
}

/// C13: a registration signed by another TTP-role certificate of the same CA.
#[test]
fn c13_a_registration_signed_by_another_ttp_identity_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let Domains { view_a, id_a, path_a, .. } = d;
        // C13: a registration signed by another certificate with the TTP role from
        // the cloud's own CA (a second TTP identity, e.g. a decommissioned or test TTP). It
        // carries r, so accepting it would let its holder re-key or shred the domain.
        pki.issue(Role::Ttp, "ttp-2").unwrap();
        let other_ttp = signer(pki, "ttp-2");
        let mut forged = Registration::decode(&view_a.header.registration.message).unwrap();
        forged.nonce_r = [0x43; 32];
        let mut header = view_a.header.clone();
        header.registration = other_ttp.key.sign_envelope(SignatureContext::Registration, forged.encode());
        plant_header(&path_a, &header);
        let (message, _) =
            refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-a", AccessMode::Rw, "registration_mismatch").await;
        assert!(
            message.contains("ttp-2") && message.contains("neither this TTP nor a configured replica"),
            "{message}"
        );
        plant_header(&path_a, &view_a.header);
    });
}

/// C3: the cloud platform swaps domain B's whole header into domain A's volume.
#[test]
fn c3_another_domains_header_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { view_a, view_b, id_a, id_b, path_a, .. } = d;
        // C3: domain B's whole (valid) header in domain A's volume; vm-a is in both ACLs.
        plant_header(&path_a, &view_b.header);
        let (message, _) =
            refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-a", AccessMode::Rw, "grant_mismatch").await;
        assert!(message.contains(&id_a) && message.contains(&id_b), "{message}");
        plant_header(&path_a, &view_a.header);
    });
}

/// C7: the cloud platform re-uses the owner's grant for vm-a to attach vm-b.
#[test]
fn c7_a_grant_for_another_vm_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { id_a, .. } = d;
        // C7: the owner's grant for vm-a used for vm-b (in the ACL, ro).
        let before = audit_records(&ttp).len();
        expect_code(
            attach(&alice_cp, &id_a, "vm-b", AccessMode::Ro, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "grant_mismatch",
        );
        let audit = assert_audited(&ttp, before, "key_release", "grant_mismatch");
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "grant_mismatch").await;
        assert_eq!(audit.vm_id.as_deref(), Some("vm-b"));
    });
}

/// C12: the cloud platform replays a grant it forwarded once, after the owner detached the VM.
#[test]
fn c12_a_replayed_grant_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { id_a, .. } = d;
        // C12: a grant the CP forwarded once, kept and replayed after the owner detached the VM.
        let grant = alice.grant(&id_a, "vm-a", AccessMode::Rw, 300);
        let attached = attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, grant.clone())
            .await
            .expect("the owner's attach with a fresh grant");
        let detached: Attachment =
            alice_cp.delete_json(&format!("/v1/attachments/{}", attached.id)).await.expect("the owner detaches");
        assert_eq!(detached.status, protocol::cloud::AttachmentStatus::Detached);
        let before = audit_records(&ttp).len();
        let message = expect_code(attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, grant).await, "grant_replayed");
        assert!(message.contains("used for a key release before"), "{message}");
        assert_audited(&ttp, before, "key_release", "grant_replayed");
    });
}

/// C6: the cloud platform bumps the version of an owner-signed descriptor and registers it.
#[test]
fn c6_a_version_bumped_by_the_cp_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, cp_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { desc_a, view_a, .. } = d;
        // C6: the CP bumps the version of the owner-signed descriptor and registers it itself.
        let mut bumped = desc_a.clone();
        bumped.version = 2;
        bumped.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw });
        let envelope = SignedEnvelope { message: bumped.encode().unwrap(), ..view_a.header.descriptor.clone() };
        let before = audit_records(&ttp).len();
        let request = RegisterDomainRequest {
            descriptor: envelope,
            previous_registration: Some(view_a.header.registration.clone()),
        };
        expect_code(
            cp_ttp.post_json::<_, RegisterDomainResponse>("/v1/domains", &request).await,
            "descriptor_signature_invalid",
        );
        assert_audited(&ttp, before, "register", "descriptor_signature_invalid");
    });
}

/// C2: the cloud platform replays the old header after a revoke.
#[test]
fn c2_a_rolled_back_header_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Domains { desc_a, view_a, id_a, path_a, .. } = d;
        // C2: revoke vm-b (version 2), then the CP puts version 1 back in force.
        let v2 = desc_a.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
        let view_v2 = update_domain(&alice_cp, &alice, &v2).await;
        assert_eq!(view_v2.version, 2);
        plant_header(&path_a, &view_a.header);
        let (message, _) =
            refused_attach(&ttp, &alice_cp, &alice, &id_a, "vm-b", AccessMode::Ro, "version_rollback").await;
        assert!(message.contains("version 2"), "{message}");
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "version_rollback").await;
        plant_header(&path_a, &view_v2.header);
    });
}

/// C11: the cloud platform points the secure component at another file with domain A's header.
#[test]
fn c11_the_sc_refuses_another_file_for_a_volume() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, op, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, id_b, header_a, grant_a, .. } = d;
        // C11: the CP sends a valid attach (the header in force on domain A's volume, the
        // owner's grant) but points the secure component at another file on the host.
        let decoy = cloud.dir.join("host-file.img");
        let pattern: Vec<u8> = (0..(format::DATA_OFFSET as usize + (4 << 20))).map(|i| (i % 251) as u8).collect();
        std::fs::write(&decoy, &pattern).unwrap();
        let cp_sc = pki.client("cloud-platform", Role::SecureComponent, &compute1.agent_url).unwrap();
        let before = audit_records(&ttp).len();
        let request = protocol::cloud::AgentAttachRequest {
            attachment_id: "attack-c11".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            header: header_a.clone(),
            grant: alice.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            placement: op.place("vm-a", "compute-1", &grant_a),
            volume_path: decoy.to_string_lossy().into_owned(),
        };
        let result = cp_sc.post_json::<_, protocol::cloud::AgentAttachment>("/v1/attachments", &request).await;
        if result.is_ok() {
            let _ = cp_sc.delete_json::<serde_json::Value>("/v1/attachments/attack-c11").await;
        }
        let after = std::fs::read(&decoy).unwrap();
        assert!(
            after == pattern,
            "the secure component wrote to a host file the CP pointed it at ({:?})",
            result.as_ref().map(|a| &a.device)
        );
        let message = expect_code(result, "bad_request");
        assert!(message.contains("host-file.img"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before, "no key is released for a volume that does not hold the header");
        // The same with domain B's volume (a Skydd volume, another domain's header).
        let request = protocol::cloud::AgentAttachRequest {
            volume_path: volume_path(&cloud, &id_b).to_string_lossy().into_owned(),
            ..request
        };
        expect_code(
            cp_sc.post_json::<_, protocol::cloud::AgentAttachment>("/v1/attachments", &request).await,
            "bad_request",
        );
        assert_eq!(audit_records(&ttp).len(), before);
    });
}
