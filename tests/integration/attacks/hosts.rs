//! Compute hosts at the TTP's key release: one host asking as another, quotes and challenges
//! that are not its own (C8-C10, H1, H10), measured state that changed (H2), and the CP's
//! placement of the VM on the host (P1-P4).

use super::*;

/// C8: compute host B forwards an attach, asking for a key as host A.
#[test]
fn c8_a_host_asking_as_another_host_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c2_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute2 = &cloud.hosts[1];
        let Domains { id_a, header_a, grant_a, .. } = d;
        // C8: compute-2 asks for a key claiming to be compute-1 (an attach forwarded to it).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let (_, audit) = refused_release(&ttp, &c2_ttp, &request, "forbidden").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "forbidden").await;
        assert_eq!(audit.actor, "compute-2");
    });
}

/// C9: compute host B sends host A's quote over its own challenge.
#[test]
fn c9_another_hosts_quote_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c2_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, grant_a, .. } = d;
        // C9: compute-2 sends compute-1's quote over compute-2's own challenge.
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        refused_release(&ttp, &c2_ttp, &request, "quote_invalid").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "quote_invalid").await;
    });
}

/// C10: compute host B uses a challenge issued to host A.
#[test]
fn c10_another_hosts_challenge_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c1_ttp, c2_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, grant_a, .. } = d;
        // C10: compute-2 uses a challenge issued to compute-1 (with compute-1's quote).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let (message, _) = refused_release(&ttp, &c2_ttp, &request, "challenge_invalid").await;
        assert!(message.contains("compute-1"), "{message}");
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "challenge_invalid").await;
    });
}

/// H1: a compute host replays an old quote with a fresh challenge id.
#[test]
fn h1_an_old_quote_with_a_fresh_challenge_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { header_a, grant_a, .. } = d;
        // H1: an old quote (over an earlier nonce) with a fresh challenge id.
        let old: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let old_quote = quote_for(compute1, &old.nonce).await;
        let fresh: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &fresh, old_quote);
        refused_release(&ttp, &c1_ttp, &request, "challenge_invalid").await;
    });
}

/// H10: an unenrolled host asks for a challenge and a key release.
#[test]
fn h10_an_unenrolled_host_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c1_ttp, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, grant_a, .. } = d;
        // H10: a secure-component certificate of a host that never enrolled.
        pki.issue(Role::SecureComponent, "host-ghost").unwrap();
        let ghost = pki.client("host-ghost", Role::Ttp, &cloud.ttp.url).unwrap();
        expect_code(ghost.post_json::<_, ChallengeResponse>("/v1/challenges", &()).await, "host_unknown");
        let borrowed: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &borrowed.nonce).await;
        let request = release_request(&op, "host-ghost", "vm-a", AccessMode::Rw, &header_a, &grant_a, &borrowed, quote);
        refused_release(&ttp, &ghost, &request, "host_unknown").await;
        // The owner sees the refusal in the viewing history of the domain.
        assert_in_history(&cloud, &id_a, "host_unknown").await;
    });
}

/// P1: compute host B asks for vm-a's key with the CP's placement of vm-a on host A.
#[test]
fn p1_another_hosts_placement_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c2_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute2 = &cloud.hosts[1];
        let Domains { header_a, grant_a, .. } = d;
        // P1 (was observation O1): compute-2, attested and enrolled, asks for vm-a's key with
        // the placement the CP made for vm-a on compute-1 (an attach it intercepted).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let mut request =
            release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        request.placement = op.place("vm-a", "compute-1", &grant_a);
        let (message, audit) = refused_release(&ttp, &c2_ttp, &request, "placement_mismatch").await;
        assert!(message.contains("compute-1") && message.contains("compute-2"), "{message}");
        assert_eq!((audit.host_id.as_deref(), audit.vm_id.as_deref()), (Some("compute-2"), Some("vm-a")));
    });
}

/// P2: a domain manager signs a placement itself.
#[test]
fn p2_a_placement_signed_by_a_tenant_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c2_ttp, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let compute2 = &cloud.hosts[1];
        let Domains { header_a, grant_a, .. } = d;
        // P2: a tenant signs the placement itself (dm-bob places vm-a on compute-2).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let mut request =
            release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let tenant = Operator::of(pki, "dm-bob").unwrap();
        request.placement = tenant.place("vm-a", "compute-2", &grant_a);
        let (message, _) = refused_release(&ttp, &c2_ttp, &request, "placement_invalid").await;
        assert!(message.contains("dm-bob") && message.contains("cloud-platform"), "{message}");
    });
}

/// P3: a CP placement made for another grant.
#[test]
fn p3_a_placement_for_another_grant_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, alice, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_b, header_a, grant_a, .. } = d;
        // P3: the CP's placement of vm-a on compute-1, made for another grant.
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let mut request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let other_grant = alice.grant(&id_b, "vm-a", AccessMode::Rw, 300);
        request.placement = op.place("vm-a", "compute-1", &other_grant);
        let (message, _) = refused_release(&ttp, &c1_ttp, &request, "placement_mismatch").await;
        assert!(message.contains("another grant"), "{message}");
    });
}

/// P4: a CP placement older than 300 s.
#[test]
fn p4_a_stale_placement_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c1_ttp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { header_a, grant_a, .. } = d;
        // P4: a placement held back past its age limit (the VM may have moved since).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let mut request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let stale = now_unix() - protocol::messages::MAX_PLACEMENT_AGE_SECS - 60;
        request.placement = op.place_at("vm-a", "compute-1", &grant_a, stale);
        let (message, _) = refused_release(&ttp, &c1_ttp, &request, "placement_invalid").await;
        assert!(message.contains("s old"), "{message}");
    });
}
/// H2: a compute host's PCRs change after enrollment (an unapproved module); an attach through
/// the CP is refused. The host is compute-3, which runs only vm-h2: its measured state stays
/// changed for the rest of the run, and no other test attaches there.
#[test]
fn h2_changed_pcrs_after_enrollment_are_refused() {
    run(|w| async move {
        let World { cloud, alice, alice_cp, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let compute3 = &cloud.hosts[2];
        assert_eq!(compute3.id, "compute-3");
        let (desc_c, _) = create_domain(&alice_cp, &alice, &[("vm-h2", AccessMode::Rw)]).await;
        compute3.service.attested_host().tpm.run(|t| t.extend_pcr(11, b"unapproved kernel module")).await.unwrap();
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(
                &alice_cp,
                &desc_c.domain_id,
                "vm-h2",
                AccessMode::Rw,
                alice.grant(&desc_c.domain_id, "vm-h2", AccessMode::Rw, 300),
            )
            .await,
            "pcr_mismatch",
        );
        assert!(message.contains("PCR 11"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "pcr_mismatch");
        assert_eq!(audit.host_id.as_deref(), Some("compute-3"));
    });
}
