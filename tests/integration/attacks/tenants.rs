//! Tenants against each other (docs/SECURITY-TESTING.md, "Tenant isolation"): moving another
//! tenant's VM, listing the operator's topology, refusals that name another owner (I2, I8),
//! two writers of one volume (I3), a quota (I4), a grant valid forever (I5), VM ids that are
//! path components (I6).

use super::*;

/// I2 and I8: a tenant re-registers another tenant's VM on another host (I2), lists the
/// hosts and instances of every tenant (I8a), reads a domain that is not its own and must not
/// learn its owner from the refusal (I8b).
#[test]
fn i2_i8_a_tenant_cannot_move_list_or_name_another_tenant() {
    run(|w| async move {
        let World { cloud, alice, alice_cp, bob_cp, .. } = w;
        let operator = cloud.pki.client("cloud-platform", Role::CloudPlatform, &cloud.cp_url).unwrap();
        // I2: a tenant moves another tenant's VM to a host of its choosing.
        let message = expect_code(
            bob_cp
                .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "compute-2".into() })
                .await,
            "forbidden",
        );
        let placed: InstanceList = operator.get_json("/v1/instances").await.unwrap();
        let vm_a = placed.instances.iter().find(|i| i.id == "vm-a").expect("vm-a is placed");
        assert_eq!(vm_a.host, "compute-1", "vm-a moved: {message}");
        // I8a: the topology is the operator's.
        expect_code(bob_cp.get_json::<serde_json::Value>("/v1/hosts").await, "forbidden");
        expect_code(bob_cp.get_json::<serde_json::Value>("/v1/instances").await, "forbidden");
        // I8b: refusals name neither another tenant's owner nor its objects.
        let (unshared, _) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Ro)]).await;
        let message = expect_code(
            bob_cp.get_json::<DomainView>(&format!("/v1/domains/{}", unshared.domain_id)).await,
            "forbidden",
        );
        assert!(!message.contains("dm-alice"), "the refusal names the owner: {message}");
    });
}

/// I3: two writers (or a reader beside a writer) of one ext4 volume.
#[test]
fn i3_a_second_writer_is_refused() {
    run(|w| async move {
        let World { alice, alice_cp, .. } = w;
        let (desc_c, _) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Rw)]).await;
        let id_c = desc_c.domain_id.clone();
        let first = attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, alice.grant(&id_c, "vm-a", AccessMode::Rw, 300))
            .await
            .expect("the first rw attach");
        let message = expect_code(
            attach(&alice_cp, &id_c, "vm-b", AccessMode::Rw, alice.grant(&id_c, "vm-b", AccessMode::Rw, 300)).await,
            "single_writer",
        );
        assert!(message.contains(&first.id), "the refusal names the attachment to detach: {message}");
        expect_code(
            attach(&alice_cp, &id_c, "vm-b", AccessMode::Ro, alice.grant(&id_c, "vm-b", AccessMode::Ro, 300)).await,
            "single_writer",
        );
        let _: Attachment = alice_cp.delete_json(&format!("/v1/attachments/{}", first.id)).await.expect("detach vm-a");
        // Alone again, a rw attach is served.
        let second = attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, alice.grant(&id_c, "vm-a", AccessMode::Rw, 300))
            .await
            .expect("rw once the other attachment is gone");
        let _: Attachment = alice_cp.delete_json(&format!("/v1/attachments/{}", second.id)).await.expect("detach vm-a");
    });
}

/// I5: a grant that never expires (its used mark would be purged at once).
#[test]
fn i5_a_grant_valid_forever_is_refused() {
    run(|w| async move {
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let (desc_c, _) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Rw)]).await;
        let id_c = desc_c.domain_id.clone();
        let before = audit_records(&ttp).len();
        let forever = alice.grant_until(&id_c, "vm-a", AccessMode::Rw, 9_300_000_000_000_000_000);
        expect_code(attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, forever).await, "grant_too_long");
        assert_audited(&ttp, before, "key_release", "grant_too_long");
    });
}

/// I4: one owner promising away the provider's disk (sparse 1 TiB volumes). The owner is
/// dm-erin, a manager no other test uses: her quota stays used up.
#[test]
fn i4_a_quota_exceeded_is_refused() {
    run(|w| async move {
        let cloud = &w.cloud;
        let erin = signer(&cloud.pki, "dm-erin");
        let erin_cp = cloud.pki.client("dm-erin", Role::CloudPlatform, &cloud.cp_url).unwrap();
        let create = |size_bytes: u64| {
            let descriptor = erin.new_domain(&[("department", "quota")], &[("vm-c", AccessMode::Ro)]).unwrap();
            let request = CreateDomainRequest { descriptor: erin.sign_descriptor(&descriptor).unwrap(), size_bytes };
            let erin_cp = &erin_cp;
            async move { erin_cp.post_json::<_, DomainView>("/v1/domains", &request).await }
        };
        let quota = ::cloud_platform::config::Quota::default();
        let tib = 1u64 << 40;
        for _ in 0..quota.max_bytes / tib {
            create(tib).await.expect("within the quota");
        }
        let message = expect_code(create(16 << 20).await, "quota_exceeded");
        assert!(message.contains("dm-erin"), "{message}");
    });
}

/// I6: names that are path components never get a key released: refused at placement.
#[test]
fn i6_vm_ids_that_are_path_components_are_refused() {
    run(|w| async move {
        let cloud = &w.cloud;
        let operator = cloud.pki.client("cloud-platform", Role::CloudPlatform, &cloud.cp_url).unwrap();
        for bad in ["..", ".", "-x"] {
            expect_code(
                operator
                    .post_json::<_, Instance>("/v1/instances", &Instance { id: bad.into(), host: "compute-1".into() })
                    .await,
                "bad_request",
            );
        }
    });
}
