//! The owner's access policy (docs/PROTOCOL.md "Access policy") decided by the real TTP at
//! every key release of the shared cloud (swtpm hosts, the CP forwarding each attach): a time
//! window, a purpose of use, break-glass with and without a reason (its record and the
//! owner's notification), a policy outside the schema refused at update (row X2's sibling),
//! and a policy the cloud platform edits in the header it stores (row X1).

use super::*;

/// The owner's next version of `descriptor` with `policy`; registered through the CP.
async fn with_policy(w: &World, descriptor: &Descriptor, policy: &str) -> Descriptor {
    let next = descriptor.next_version(|d| d.policy = Some(policy.to_string())).unwrap();
    update_domain(&w.alice_cp, &w.alice, &next).await;
    next
}

/// The owner's grant with a purpose and reason, valid `valid_for` seconds.
fn grant_for(
    w: &World,
    domain_id: &str,
    vm: &str,
    mode: AccessMode,
    valid_for: u64,
    purpose: &str,
    reason: &str,
) -> SignedEnvelope {
    w.alice.grant_for_purpose(domain_id, vm, mode, now_unix() + valid_for, purpose, reason)
}

async fn detach(cp: &net::Client, attachment: &Attachment) {
    let _: Attachment = cp.delete_json(&format!("/v1/attachments/{}", attachment.id)).await.expect("detach");
}

/// The owner attaches vm-a read-write with a grant stating no purpose (`why` says what must
/// let it through), and detaches it again.
async fn attach_rw_and_detach(w: &World, domain_id: &str, why: &str) {
    let grant = w.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
    let attached = attach(&w.alice_cp, domain_id, "vm-a", AccessMode::Rw, grant).await.expect(why);
    detach(&w.alice_cp, &attached).await;
}

/// A time window: permitted inside it, `policy_denied` (audited, naming why) outside it.
#[test]
fn a_time_window_policy_permits_inside_and_refuses_outside() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let ttp = w.cloud.ttp.service.clone();
        let now = now_unix();
        let window = |from: u64, to: u64| {
            format!(
                "@id(\"study-window\") permit (principal, action, resource) \
                 when {{ context.now >= {from} && context.now < {to} }};"
            )
        };
        let inside = with_policy(&w, &d.desc_a, &window(now - 3600, now + 3600)).await;
        attach_rw_and_detach(&w, &d.id_a, "inside the window").await;
        let granted = audit_records(&ttp)
            .into_iter()
            .rev()
            .find(|r| r.domain_id.as_deref() == Some(d.id_a.as_str()) && r.event == "key_release")
            .unwrap();
        assert_eq!(granted.outcome, "ok");
        assert!(granted.message.contains("permitted by policy study-window"), "{}", granted.message);

        with_policy(&w, &inside, &window(now - 7200, now - 3600)).await;
        let (message, _) =
            refused_attach(&ttp, &w.alice_cp, &w.alice, &d.id_a, "vm-a", AccessMode::Rw, "policy_denied").await;
        assert!(
            message.contains("denies attach_rw by vm-a on compute-1") && message.contains("no permit policy applies"),
            "{message}"
        );
        assert_in_history(&w.cloud, &d.id_a, "policy_denied").await;
    });
}

/// A purpose policy: treatment is permitted, research is refused by the forbid that names it.
#[test]
fn a_purpose_policy_decides_on_the_signed_purpose() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let ttp = w.cloud.ttp.service.clone();
        let policy = "@id(\"care\") permit (principal, action, resource);\n\
                      @id(\"no-research\") forbid (principal, action, resource) when { context.purpose == \"research\" };";
        with_policy(&w, &d.desc_a, policy).await;
        let before = audit_records(&ttp).len();
        let research = grant_for(&w, &d.id_a, "vm-a", AccessMode::Rw, 300, "research", "cohort 7");
        let message =
            expect_code(attach(&w.alice_cp, &d.id_a, "vm-a", AccessMode::Rw, research).await, "policy_denied");
        assert!(message.contains("for purpose \"research\": forbidden by no-research"), "{message}");
        assert_audited(&ttp, before, "key_release", "policy_denied");

        let treatment = grant_for(&w, &d.id_a, "vm-a", AccessMode::Rw, 300, "treatment", "");
        let attached =
            attach(&w.alice_cp, &d.id_a, "vm-a", AccessMode::Rw, treatment).await.expect("treatment is permitted");
        detach(&w.alice_cp, &attached).await;
    });
}

/// Organisation and role (OrBAC): reads only by cardiologists of the cardiology clinic. The
/// TTP reads each grant signer's organisation and role from the affiliation extension of its
/// verified certificate (docs/PKI.md "Affiliation"): the owner (no affiliation) and a manager
/// of the right clinic in another role are refused, the cardiologist is permitted.
#[test]
fn an_organisation_and_role_policy_decides_on_the_signers_certificate() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        attach_rw_and_detach(&w, &d.id_a, "the owner formats the volume before any policy").await;
        let ttp = w.cloud.ttp.service.clone();
        let pki = &w.cloud.pki;
        let cp_url = w.cloud.cp_url.clone();
        let clinic = "Karolinska Cardiology";
        let mut managers = Vec::new();
        for (name, role) in [("dm-cardio-1", "cardiologist"), ("dm-billing-1", "billing")] {
            let affiliation = protocol::pki::Affiliation::new(clinic, role).unwrap();
            pki.issue_affiliated(name, &affiliation).unwrap();
            managers.push((signer(pki, name), pki.client(name, Role::CloudPlatform, &cp_url).unwrap()));
        }
        let policy = "@id(\"cardiologists\") permit (principal, action == Action::\"attach_ro\", resource) \
                      when { context has grant_signer_affiliation && \
                             context.grant_signer_affiliation.organisation == \"Karolinska Cardiology\" && \
                             context.grant_signer_affiliation.role == \"cardiologist\" };";
        let shared =
            d.desc_a.next_version(|d| d.shared_with = vec!["dm-cardio-1".into(), "dm-billing-1".into()]).unwrap();
        update_domain(&w.alice_cp, &w.alice, &shared).await;
        with_policy(&w, &shared, policy).await;

        let owners = w.alice.grant(&d.id_a, "vm-b", AccessMode::Ro, 300);
        let message = expect_code(attach(&w.alice_cp, &d.id_a, "vm-b", AccessMode::Ro, owners).await, "policy_denied");
        assert!(message.contains("no permit policy applies"), "{message}");
        let (billing, billing_cp) = &managers[1];
        let before = audit_records(&ttp).len();
        let grant = billing.grant(&d.id_a, "vm-b", AccessMode::Ro, 300);
        expect_code(attach(billing_cp, &d.id_a, "vm-b", AccessMode::Ro, grant).await, "policy_denied");
        assert_audited(&ttp, before, "key_release", "policy_denied");

        let (cardiologist, cardiologist_cp) = &managers[0];
        let grant = cardiologist.grant(&d.id_a, "vm-b", AccessMode::Ro, 300);
        let attached =
            attach(cardiologist_cp, &d.id_a, "vm-b", AccessMode::Ro, grant).await.expect("a cardiologist may read");
        detach(cardiologist_cp, &attached).await;
        let granted = audit_records(&ttp)
            .into_iter()
            .rev()
            .find(|r| r.domain_id.as_deref() == Some(d.id_a.as_str()) && r.event == "key_release" && r.outcome == "ok")
            .unwrap();
        assert!(granted.message.contains("permitted by policy cardiologists"), "{}", granted.message);
    });
}

/// X2 and break-glass: an emergency release without a reason is refused whatever the policy
/// (audited as `break_glass_release`); with one it is released, recorded with its reason,
/// and the owner's history announces it.
#[test]
fn x2_break_glass_needs_a_reason_and_the_owner_is_notified() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let ttp = w.cloud.ttp.service.clone();
        let policy = "@id(\"break-glass\") permit (principal, action == Action::\"attach_ro\", resource) \
                      when { context.purpose == \"emergency\" && context.grant_signer == \"dm-alice\" && \
                             context.grant_lifetime_seconds <= 300 && context.reason != \"\" };";
        // A read-only attach needs a file system: one read-write attach makes it.
        attach_rw_and_detach(&w, &d.id_a, "the first read-write attach").await;
        with_policy(&w, &d.desc_a, policy).await;

        let before = audit_records(&ttp).len();
        let no_reason = grant_for(&w, &d.id_a, "vm-b", AccessMode::Ro, 120, "emergency", "");
        let message = expect_code(
            attach(&w.alice_cp, &d.id_a, "vm-b", AccessMode::Ro, no_reason).await,
            "break_glass_reason_missing",
        );
        assert!(message.contains("gives no reason"), "{message}");
        assert_audited(&ttp, before, "break_glass_release", "break_glass_reason_missing");

        // A grant valid longer than the policy's 300 s is the policy's to refuse.
        let long = grant_for(&w, &d.id_a, "vm-b", AccessMode::Ro, 900, "emergency", "ward round");
        expect_code(attach(&w.alice_cp, &d.id_a, "vm-b", AccessMode::Ro, long).await, "policy_denied");

        let reason = "unconscious patient in ER bay 3, no consent possible";
        let grant = grant_for(&w, &d.id_a, "vm-b", AccessMode::Ro, 120, "emergency", reason);
        let attached =
            attach(&w.alice_cp, &d.id_a, "vm-b", AccessMode::Ro, grant).await.expect("break-glass with a reason");
        let alice_ttp = w.cloud.pki.client("dm-alice", Role::Ttp, &w.cloud.ttp.url).unwrap();
        let history: HistoryResponse = alice_ttp.get_json(&format!("/v1/domains/{}/history", d.id_a)).await.unwrap();
        let record = history
            .records
            .iter()
            .rev()
            .find(|r| r.event == "break_glass_release" && r.outcome == "ok")
            .expect("the break-glass record");
        assert!(record.message.ends_with(&format!("reason: {reason}")), "{}", record.message);
        let shown = domain_manager::render::history(&history);
        let notice = format!(
            "BREAK-GLASS: vm-b read domain {} on host compute-2 at {} (UTC s), by manager dm-alice: {reason}",
            d.id_a, record.at
        );
        assert!(shown.starts_with(&notice), "{shown}");
        println!("   {notice}");
        detach(&w.alice_cp, &attached).await;
    });
}

/// A policy outside the schema is refused at update (`policy_invalid`, naming Cedar's error,
/// audited); the domain stays at its version.
#[test]
fn a_policy_that_fails_schema_validation_is_refused_at_update() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let ttp = w.cloud.ttp.service.clone();
        let next = d
            .desc_a
            .next_version(|x| {
                x.policy = Some("permit (principal, action, resource) when { principal.ward == \"icu\" };".into())
            })
            .unwrap();
        let before = audit_records(&ttp).len();
        let result: Result<DomainView, net::Error> = w
            .alice_cp
            .put_json(
                &format!("/v1/domains/{}/descriptor", d.id_a),
                &UpdateDomainRequest { descriptor: w.alice.sign_descriptor(&next).unwrap() },
            )
            .await;
        let message = expect_code(result, "policy_invalid");
        assert!(message.contains("does not validate against the schema") && message.contains("ward"), "{message}");
        assert_audited(&ttp, before, "register", "policy_invalid");
        // Version 1 is still in force: the owner's attach goes on.
        attach_rw_and_detach(&w, &d.id_a, "version 1 in force").await;
    });
}

/// X1: the cloud platform widens the policy in the header it stores, keeping the owner's
/// signature: `descriptor_signature_invalid` (audited).
#[test]
fn x1_a_policy_edited_by_the_cp_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let ttp = w.cloud.ttp.service.clone();
        let strict = with_policy(&w, &d.desc_a, "@id(\"never\") forbid (principal, action, resource);").await;
        let view: DomainView = w.alice_cp.get_json(&format!("/v1/domains/{}", d.id_a)).await.unwrap();
        let mut edited = strict.clone();
        edited.policy = Some("permit (principal, action, resource);".into());
        let mut header = view.header.clone();
        header.descriptor.message = edited.encode().unwrap();
        plant_header(&d.path_a, &header);
        let (message, _) = refused_attach(
            &ttp,
            &w.alice_cp,
            &w.alice,
            &d.id_a,
            "vm-a",
            AccessMode::Rw,
            "descriptor_signature_invalid",
        )
        .await;
        assert_in_history(&w.cloud, &d.id_a, "descriptor_signature_invalid").await;
        println!("   {message}");
        plant_header(&d.path_a, &view.header);
        // The owner's own policy in force refuses as it says.
        refused_attach(&ttp, &w.alice_cp, &w.alice, &d.id_a, "vm-a", AccessMode::Rw, "policy_denied").await;
    });
}

/// What `domain-manager domain policy set|show`, `attach --purpose --reason` and `domain
/// history` run (the CLI's library, over mutual TLS to the shared cloud): the refusals read
/// with what to do, and the history of a break-glass release starts with its notice.
#[test]
fn the_domain_manager_sets_and_shows_a_policy_and_attaches_for_a_purpose() {
    run(|w| async move {
        use domain_manager::config::DmConfig;
        use domain_manager::ops::{parse_acl_entry, DomainManager as Dm};
        let alice = Dm::connect(&DmConfig::load(&w.cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
        let acl = vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-b:ro").unwrap()];
        let id = alice.create(Default::default(), acl, Vec::new(), 16 << 20).await.unwrap().id;
        let formatted = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await.expect("the first read-write attach");
        alice.detach_attachment(&formatted.id).await.unwrap();

        let refused =
            alice.set_policy(&id, Some("permit (principal, action, resource) when { context.ward };".into())).await;
        let text = refused.expect_err("outside the schema").to_string();
        assert!(text.contains("policy_invalid") && text.contains("ward") && text.contains("what to do:"), "{text}");
        assert_eq!(alice.policy(&id).await.unwrap(), None, "the version before stays in force");

        let policy =
            "@id(\"treatment\") permit (principal, action, resource) when { context.purpose == \"treatment\" };\n\
                      @id(\"break-glass\") permit (principal, action == Action::\"attach_ro\", resource) \
                      when { context.purpose == \"emergency\" && context.reason != \"\" };";
        alice.set_policy(&id, Some(policy.into())).await.unwrap();
        assert_eq!(alice.policy(&id).await.unwrap().as_deref(), Some(policy));

        let local = alice.attach_for_purpose(&id, "vm-b", AccessMode::Ro, 120, "emergency", "").await;
        assert!(local.expect_err("refused before signing").to_string().contains("needs --reason"));
        let denied = alice.attach_for_purpose(&id, "vm-a", AccessMode::Rw, 300, "research", "").await;
        let text = denied.expect_err("research is not permitted").to_string();
        assert!(text.contains("policy_denied") && text.contains("domain policy show"), "{text}");
        let attached = alice.attach_for_purpose(&id, "vm-a", AccessMode::Rw, 300, "treatment", "").await.unwrap();
        alice.detach_attachment(&attached.id).await.unwrap();

        let glass = alice
            .attach_for_purpose(&id, "vm-b", AccessMode::Ro, 120, "emergency", "sepsis, chart needed now")
            .await
            .unwrap();
        let shown = domain_manager::render::history(&alice.history(&id).await.unwrap());
        assert!(shown.starts_with(&format!("BREAK-GLASS: vm-b read domain {id} on host compute-2 at ")), "{shown}");
        assert!(shown.lines().next().unwrap().ends_with("by manager dm-alice: sepsis, chart needed now"), "{shown}");
        alice.detach_attachment(&glass.id).await.unwrap();
    });
}
