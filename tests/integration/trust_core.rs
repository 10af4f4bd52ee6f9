//! The trust core end to end (issue: "Keys only for attested TPMs"): a real TTP over mutual
//! TLS with SQLite, compute hosts with their own swtpm, domain managers that sign. Proves
//! the release of exactly the HKDF key to an attested host, every refusal with its own code
//! and audit record, and a history whose chain detects removed or edited records.

use std::time::{Duration, Instant};

use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::AccessMode;
use protocol::messages::{
    ChallengeResponse, HeaderRecord, HistoryResponse, KeyReleaseRequest, KeyReleaseResponse, Registration,
};
use protocol::signing::SignedEnvelope;
use secure_component::key_release::ObtainedKey;
use sha2::{Digest, Sha256};
use skydd::lab::{register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::independent_key;
use ttp::attestation::AttestationPolicy;

/// The refusal code of a failed call, from either the agent or a raw client.
fn code_of_agent<T: std::fmt::Debug>(result: Result<T, secure_component::Error>) -> String {
    match result {
        Err(secure_component::Error::TtpRefused { code, message, .. }) => {
            println!("  refused ({code}): {message}");
            code
        }
        other => panic!("expected a TTP refusal, got {other:?}"),
    }
}

fn code_of_client<T: std::fmt::Debug>(result: Result<T, net::Error>) -> String {
    match result {
        Err(net::Error::Api { code, message, .. }) => {
            println!("  refused ({code}): {message}");
            code
        }
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

/// The newest audit record must be the refusal just seen.
fn assert_last_audit(ttp: &RunningTtp, code: &str) {
    let records = ttp.service.store().audit_records(None).expect("read audit");
    let last = records.last().expect("an audit record");
    assert_eq!(last.outcome, code, "newest audit record: {last:?}");
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A key-release request built by hand, so tests can replay or mismatch its parts.
async fn manual_request(
    op: &Operator,
    host: &LabHost,
    header: &HeaderRecord,
    grant: &SignedEnvelope,
    vm: &str,
    mode: AccessMode,
    quote_nonce_of: Option<&ChallengeResponse>,
) -> (KeyReleaseRequest, ChallengeResponse) {
    let challenge: ChallengeResponse = host.host.ttp.post_json("/v1/challenges", &()).await.unwrap();
    let nonce = quote_nonce_of.unwrap_or(&challenge).nonce.clone();
    let quote = host.host.tpm.run(move |tpm| tpm.quote(&nonce)).await.unwrap();
    let request = KeyReleaseRequest {
        host_id: host.host.host_id.clone(),
        vm_id: vm.into(),
        mode,
        header: header.clone(),
        grant: grant.clone(),
        placement: op.place(vm, &host.host.host_id, grant),
        challenge_id: challenge.challenge_id.clone(),
        quote,
    };
    (request, challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_core_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = LabPki::create(&root.join("pki")).unwrap();
    let (listener, ttp_url) = RunningTtp::bind().await.unwrap();

    // Hosts 1 and 2 get EK certificates from the trusted TPM vendor CA; host 3 from another.
    let trusted_ek_ca = root.join("tpm-vendor-ca");
    let host1 = LabHost::start(root, &pki, "host-1", &trusted_ek_ca, &ttp_url).unwrap();
    let host2 = LabHost::start(root, &pki, "host-2", &trusted_ek_ca, &ttp_url).unwrap();
    let host3 = LabHost::start(root, &pki, "host-3", &root.join("rogue-vendor-ca"), &ttp_url).unwrap();

    let selection = PcrSelection::default_host();
    let reference = host1.reference_state("compute-v1", &selection).await.unwrap();
    let policy = AttestationPolicy {
        trusted_ek_roots: secure_component::swtpm::ca_certificates_der(&trusted_ek_ca).unwrap(),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![reference],
    };
    let ttp = RunningTtp::start(root, &pki, &policy, listener).await.unwrap();

    pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let cp = pki.client("cp-1", Role::Ttp, &ttp.url).unwrap();
    // cp-1 also places each VM on the host that asks (the cloud platform's part of an attach).
    let op = Operator::of(&pki, "cp-1").unwrap();
    let alice = DomainManager::create(&pki, "dm-alice").unwrap();
    let eve = DomainManager::create(&pki, "dm-eve").unwrap();
    let alice_client = pki.client("dm-alice", Role::Ttp, &ttp.url).unwrap();
    let eve_client = pki.client("dm-eve", Role::Ttp, &ttp.url).unwrap();

    println!("refusal: an AK that is not in the EK's TPM");
    {
        let from_a =
            host1.host.tpm.run(|tpm| tpm.enrollment_request("host-1", &PcrSelection::default_host())).await.unwrap();
        let from_b =
            host2.host.tpm.run(|tpm| tpm.enrollment_request("host-1", &PcrSelection::default_host())).await.unwrap();
        let mut forged = from_a.clone();
        forged.ak_public = from_b.ak_public.clone();
        forged.binding_public = from_b.binding_public.clone();
        let challenge: protocol::attest::CredentialChallenge =
            host1.host.ttp.post_json("/v1/enrollments", &forged).await.unwrap();
        // TPM B holds the AK but not the EK the credential was made for: it cannot activate.
        let challenge_for_b = challenge.clone();
        let activation = host2.host.tpm.run(move |tpm| tpm.activate_credential(&challenge_for_b)).await;
        assert!(activation.is_err(), "TPM B must not be able to activate a credential made for TPM A's EK");
        // So the attacker can only guess the secret.
        let nonce = challenge.certify_nonce.clone();
        let (certify_attest, certify_signature) =
            host2.host.tpm.run(move |tpm| tpm.certify_binding_key(&nonce)).await.unwrap();
        let proof = protocol::attest::EnrollmentProof {
            enrollment_id: challenge.enrollment_id.clone(),
            activated_secret: rand::random::<[u8; 32]>().to_vec(),
            certify_attest,
            certify_signature,
        };
        let refused: Result<serde_json::Value, _> = host1.host.ttp.post_json("/v1/enrollments/proof", &proof).await;
        assert_eq!(code_of_client(refused), "credential_failed");
        assert_last_audit(&ttp, "credential_failed");
    }

    println!("refusal: an EK certificate from an untrusted CA");
    assert_eq!(code_of_agent(host3.host.enroll(&selection).await), "ek_untrusted");
    assert_last_audit(&ttp, "ek_untrusted");

    println!("enrollment: 20 enrollments of host-1, then host-2");
    let mut enroll_times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let result = host1.host.enroll(&selection).await.expect("host-1 enrolls");
        enroll_times.push(started.elapsed());
        assert_eq!(result.reference_state, "compute-v1");
    }
    host2.host.enroll(&selection).await.expect("host-2 enrolls");

    println!("domain: dm-alice creates a domain (vm-a rw, vm-b ro), cp-1 registers it");
    let descriptor = alice
        .new_domain(
            &[("department", "cardiology"), ("classification", "patient-records")],
            &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)],
        )
        .unwrap();
    let domain_id = descriptor.domain_id.clone();
    let header_v1 = register(&cp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let registration_v1 = Registration::decode(&header_v1.registration.message).unwrap();
    assert_eq!(registration_v1.version, 1);

    println!("release: vm-a rw on host-1; the key equals an independent HKDF");
    let master = std::fs::read(ttp.data_dir.join("master.key")).unwrap();
    let expected_key = independent_key(&master, &registration_v1, &domain_id, &descriptor.metadata_hash());
    let mut release_times = Vec::new();
    for _ in 0..20 {
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let started = Instant::now();
        let ObtainedKey { key, response, .. } =
            op.obtain_key(&host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await.expect("key released");
        release_times.push(started.elapsed());
        assert_eq!(key.expose(), expected_key.as_slice(), "the secure component must end up with exactly K");
        assert_eq!(response.version, 1);
    }
    assert_last_audit(&ttp, "ok");
    // The metadata hash in the key is H(meta) of the descriptor as registered.
    assert_eq!(registration_v1.metadata_hash, <[u8; 32]>::from(Sha256::digest(descriptor.metadata_encoding())));

    println!("refusal: a reused challenge");
    {
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let (request, _) = manual_request(&op, &host1, &header_v1, &grant, "vm-a", AccessMode::Rw, None).await;
        let _: KeyReleaseResponse =
            host1.host.ttp.post_json("/v1/key-releases", &request).await.expect("first use succeeds");
        let replay: Result<KeyReleaseResponse, _> = host1.host.ttp.post_json("/v1/key-releases", &request).await;
        assert_eq!(code_of_client(replay), "challenge_invalid");
        assert_last_audit(&ttp, "challenge_invalid");
    }

    println!("refusal: a grant used before, with a fresh challenge and quote (a grant is single-use)");
    {
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        op.obtain_key(&host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw)
            .await
            .expect("the first use releases the key");
        let replay = op.obtain_key(&host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await;
        assert_eq!(code_of_agent(replay), "grant_replayed");
        assert_last_audit(&ttp, "grant_replayed");
        // A refused release does not use a grant up: after a refusal for the mode, the same
        // grant still works for what it allows.
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Ro, 300);
        assert_eq!(
            code_of_agent(op.obtain_key(&host1.host, &header_v1, &grant, "vm-b", AccessMode::Rw).await),
            "mode_not_permitted"
        );
        op.obtain_key(&host1.host, &header_v1, &grant, "vm-b", AccessMode::Ro)
            .await
            .expect("an unused grant still works");
    }

    println!("refusal: a quote over a stale challenge's nonce");
    {
        let stale: ChallengeResponse = host1.host.ttp.post_json("/v1/challenges", &()).await.unwrap();
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let (request, _) = manual_request(&op, &host1, &header_v1, &grant, "vm-a", AccessMode::Rw, Some(&stale)).await;
        let refused: Result<KeyReleaseResponse, _> = host1.host.ttp.post_json("/v1/key-releases", &request).await;
        assert_eq!(code_of_client(refused), "challenge_invalid");
        assert_last_audit(&ttp, "challenge_invalid");
    }

    println!("refusal: a forged descriptor signature");
    {
        let mut forged = header_v1.clone();
        let last = forged.descriptor.signature.len() - 2;
        forged.descriptor.signature[last] ^= 0x55;
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        assert_eq!(
            code_of_agent(op.obtain_key(&host1.host, &forged, &grant, "vm-a", AccessMode::Rw).await),
            "descriptor_signature_invalid"
        );
        assert_last_audit(&ttp, "descriptor_signature_invalid");
        // Eve signs a descriptor that names Alice as owner.
        let mut stolen = descriptor
            .next_version(|d| d.acl.push(protocol::domain::AclEntry { vm_id: "vm-eve".into(), mode: AccessMode::Rw }))
            .unwrap();
        stolen.owner = "dm-alice".into();
        let refused = register(&cp, eve.sign_descriptor(&stolen).unwrap(), Some(header_v1.registration.clone())).await;
        assert_eq!(code_of_client(refused), "descriptor_signature_invalid");
        assert_last_audit(&ttp, "descriptor_signature_invalid");
    }

    println!("grant: dm-alice adds vm-c (version 2)");
    let descriptor_v2 = descriptor
        .next_version(|d| d.acl.push(protocol::domain::AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Ro }))
        .unwrap();
    let header_v2 = register(&cp, alice.sign_descriptor(&descriptor_v2).unwrap(), Some(header_v1.registration.clone()))
        .await
        .unwrap();

    println!(
        "a repeated registration of the newest version (a CP that crashed before writing its header) gets the same r"
    );
    {
        let again = register(&cp, alice.sign_descriptor(&descriptor_v2).unwrap(), Some(header_v1.registration.clone()))
            .await
            .expect("idempotent repeat");
        let first = Registration::decode(&header_v2.registration.message).unwrap();
        let repeat = Registration::decode(&again.registration.message).unwrap();
        assert_eq!(
            (repeat.version, repeat.nonce_r, repeat.descriptor_hash),
            (first.version, first.nonce_r, first.descriptor_hash)
        );
    }

    println!("refusal: a descriptor older than the newest registered version");
    {
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        assert_eq!(
            code_of_agent(op.obtain_key(&host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await),
            "version_rollback"
        );
        assert_last_audit(&ttp, "version_rollback");
        let replayed =
            register(&cp, alice.sign_descriptor(&descriptor).unwrap(), Some(header_v1.registration.clone())).await;
        assert_eq!(code_of_client(replayed), "version_rollback");
        let stale_base = descriptor_v2.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
        let mut based_on_v1 = stale_base.clone();
        based_on_v1.version = 3;
        let refused =
            register(&cp, alice.sign_descriptor(&based_on_v1).unwrap(), Some(header_v1.registration.clone())).await;
        assert_eq!(code_of_client(refused), "version_rollback");
        assert_last_audit(&ttp, "version_rollback");
    }

    println!("refusal: a VM not in the access list");
    let grant = alice.grant(&domain_id, "vm-z", AccessMode::Ro, 300);
    assert_eq!(
        code_of_agent(op.obtain_key(&host1.host, &header_v2, &grant, "vm-z", AccessMode::Ro).await),
        "vm_not_in_acl"
    );
    assert_last_audit(&ttp, "vm_not_in_acl");

    println!("refusal: a read-only VM asking for read-write");
    let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
    assert_eq!(
        code_of_agent(op.obtain_key(&host1.host, &header_v2, &grant, "vm-b", AccessMode::Rw).await),
        "mode_not_permitted"
    );
    assert_last_audit(&ttp, "mode_not_permitted");

    println!("refusal: a read-only grant used for read-write");
    let grant = alice.grant(&domain_id, "vm-a", AccessMode::Ro, 300);
    assert_eq!(
        code_of_agent(op.obtain_key(&host1.host, &header_v2, &grant, "vm-a", AccessMode::Rw).await),
        "grant_mismatch"
    );
    assert_last_audit(&ttp, "grant_mismatch");

    println!("refusal: an expired grant");
    let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, -5);
    assert_eq!(
        code_of_agent(op.obtain_key(&host1.host, &header_v2, &grant, "vm-a", AccessMode::Rw).await),
        "grant_expired"
    );
    assert_last_audit(&ttp, "grant_expired");

    println!("refusal: a grant signed by someone the descriptor does not name");
    let grant = eve.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
    assert_eq!(
        code_of_agent(op.obtain_key(&host1.host, &header_v2, &grant, "vm-a", AccessMode::Rw).await),
        "grant_signer_not_authorized"
    );
    assert_last_audit(&ttp, "grant_signer_not_authorized");

    println!("release: vm-c (added in version 2) on host-2");
    let grant = alice.grant(&domain_id, "vm-c", AccessMode::Ro, 300);
    let ObtainedKey { key: key_v2, .. } =
        op.obtain_key(&host2.host, &header_v2, &grant, "vm-c", AccessMode::Ro).await.expect("vm-c gets the key");
    assert_eq!(key_v2.expose(), expected_key.as_slice(), "a new version keeps the key (same r, same metadata)");

    println!("refusal: a deleted domain");
    {
        let doomed = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
        let doomed_header = register(&cp, alice.sign_descriptor(&doomed).unwrap(), None).await.unwrap();
        let eve_delete: Result<serde_json::Value, _> = cp
            .post_json(
                &format!("/v1/domains/{}/delete", doomed.domain_id),
                &protocol::messages::DeleteDomainRequest { deletion: eve.deletion(&doomed.domain_id) },
            )
            .await;
        assert_eq!(code_of_client(eve_delete), "owner_mismatch");
        let _: serde_json::Value = cp
            .post_json(
                &format!("/v1/domains/{}/delete", doomed.domain_id),
                &protocol::messages::DeleteDomainRequest { deletion: alice.deletion(&doomed.domain_id) },
            )
            .await
            .expect("the owner deletes");
        let grant = alice.grant(&doomed.domain_id, "vm-a", AccessMode::Rw, 300);
        assert_eq!(
            code_of_agent(op.obtain_key(&host1.host, &doomed_header, &grant, "vm-a", AccessMode::Rw).await),
            "domain_deleted"
        );
        assert_last_audit(&ttp, "domain_deleted");
    }

    println!("refusal: PCR extended after enrollment (the TTP refuses the quote, the TPM refuses the old blob)");
    {
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Ro, 300);
        let earlier = op
            .request_release(&host2.host, &header_v2, &grant, "vm-b", AccessMode::Ro)
            .await
            .expect("released while trusted");
        host2.host.tpm.run(|tpm| tpm.extend_pcr(11, b"an unapproved kernel module")).await.unwrap();
        assert_eq!(
            code_of_agent(op.obtain_key(&host2.host, &header_v2, &grant, "vm-b", AccessMode::Ro).await),
            "pcr_mismatch"
        );
        assert_last_audit(&ttp, "pcr_mismatch");
        let wrapped = earlier.wrapped_key.clone();
        let decrypted = host2.host.tpm.run(move |tpm| tpm.decrypt_released_key(&wrapped)).await;
        let error = decrypted.expect_err("the TPM must refuse to decrypt after the PCR changed");
        println!("  the TPM refused: {error}");
    }

    println!("history: dm-alice reads the domain's viewing history, in order");
    let history: HistoryResponse = alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
    let outcomes: Vec<&str> = history.records.iter().map(|r| r.outcome.as_str()).collect();
    println!("  outcomes: {outcomes:?}");
    assert!(history.records.windows(2).all(|w| w[0].seq < w[1].seq), "records in order");
    assert_eq!(
        outcomes.iter().filter(|o| **o == "descriptor_signature_invalid").count(),
        2,
        "both forgeries are in the domain's history"
    );
    for code in [
        "ok",
        "challenge_invalid",
        "descriptor_signature_invalid",
        "version_rollback",
        "vm_not_in_acl",
        "mode_not_permitted",
        "grant_mismatch",
        "grant_expired",
        "grant_replayed",
        "grant_signer_not_authorized",
        "pcr_mismatch",
    ] {
        assert!(outcomes.contains(&code), "history lacks a {code} record");
    }
    assert_eq!(history.records.iter().filter(|r| r.event == "key_release" && r.outcome == "ok").count(), 25);
    let refused = eve_client.get_json::<HistoryResponse>(&format!("/v1/domains/{domain_id}/history")).await;
    assert_eq!(code_of_client(refused), "forbidden");

    println!("history: an edited record and a removed record are detected");
    {
        let db = rusqlite::Connection::open(ttp.data_dir.join("ttp.sqlite")).unwrap();
        let victim = history.records[3].seq as i64;
        let original: String = db.query_row("SELECT record FROM audit WHERE seq = ?1", [victim], |r| r.get(0)).unwrap();
        let edited = original.replacen("\"outcome\":\"", "\"outcome\":\"x", 1);
        assert_ne!(edited, original);
        db.execute("UPDATE audit SET record = ?1 WHERE seq = ?2", rusqlite::params![edited, victim]).unwrap();
        let broken = alice_client.get_json::<HistoryResponse>(&format!("/v1/domains/{domain_id}/history")).await;
        let code = code_of_client(broken);
        assert_eq!(code, "audit_chain_broken");
        db.execute("UPDATE audit SET record = ?1 WHERE seq = ?2", rusqlite::params![original, victim]).unwrap();
        let _: HistoryResponse =
            alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.expect("restored chain verifies");

        db.execute("DELETE FROM audit WHERE seq = ?1", [victim]).unwrap();
        let broken = alice_client.get_json::<HistoryResponse>(&format!("/v1/domains/{domain_id}/history")).await;
        match broken {
            Err(net::Error::Api { code, message, .. }) => {
                assert_eq!(code, "audit_chain_broken");
                assert!(message.contains(&format!("records {victim} to {victim} are missing")), "{message}");
            }
            other => panic!("a removed record must be detected, got {other:?}"),
        }
    }

    let enroll_median = median(&mut enroll_times);
    let release_median = median(&mut release_times);
    println!("MEASURED enrollment (TPM key creation + TTP checks over mTLS), median of 20: {enroll_median:?}");
    println!(
        "MEASURED key release (challenge + quote + release + TPM decrypt over mTLS), median of 20: {release_median:?}"
    );
    ttp.stop().await;
    drop((host1, host2, host3));
}
