//! The trust core end to end ("Keys only for attested TPMs"): a real TTP over mutual TLS
//! with SQLite, compute hosts with their own swtpm, domain managers that sign. Proves the
//! release of exactly the HKDF key to an attested host, every refusal with its own code, its
//! audit record and its place in the owner's viewing history, and a history whose chain
//! detects removed or edited records.
//!
//! Each refusal is its own test with its own domain, on one [`Lab`] shared through
//! `skydd_testkit::shared` (the tests take turns: each checks the TTP's newest audit record).
//! The tests that change what they test on have a part of their own: the PCR test a fourth
//! host, the tampering test a lab of its own.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::messages::{
    ChallengeResponse, HeaderRecord, HistoryResponse, KeyReleaseRequest, KeyReleaseResponse, Registration,
};
use protocol::signing::SignedEnvelope;
use secure_component::key_release::ObtainedKey;
use sha2::{Digest, Sha256};
use skydd::lab::{register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::audit::assert_last_outcome;
use skydd_testkit::independent_key;
use skydd_testkit::refusal::{client_code as code_of_client, ttp_code as code_of_agent};
use skydd_testkit::shared::{at_exit, Shared};
use ttp::attestation::AttestationPolicy;

// ---- the lab -------------------------------------------------------------------------------------

/// A TTP with its policy, three hosts (host-1 and host-2 with EK certificates of the trusted
/// TPM vendor CA, enrolled; host-3 of another vendor CA), cp-1 (which registers domains and
/// places each VM on the host that asks), and the domain managers dm-alice and dm-eve.
struct Lab {
    dir: tempfile::TempDir,
    pki: LabPki,
    ttp: RunningTtp,
    trusted_ek_ca: std::path::PathBuf,
    selection: PcrSelection,
    host1: LabHost,
    host2: LabHost,
    host3: LabHost,
    cp: net::Client,
    op: Operator,
    alice: DomainManager,
    eve: DomainManager,
    alice_client: net::Client,
    eve_client: net::Client,
}

impl Lab {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let pki = LabPki::create(&root.join("pki")).unwrap();
        let (listener, ttp_url) = RunningTtp::bind().await.unwrap();
        let trusted_ek_ca = root.join("tpm-vendor-ca");
        let host1 = LabHost::start(root, &pki, "host-1", &trusted_ek_ca, &ttp_url).unwrap();
        let host2 = LabHost::start(root, &pki, "host-2", &trusted_ek_ca, &ttp_url).unwrap();
        let host3 = LabHost::start(root, &pki, "host-3", &root.join("rogue-vendor-ca"), &ttp_url).unwrap();
        let selection = PcrSelection::default_host();
        let reference = host1.reference_state("compute-v1", &selection).await.unwrap();
        let policy = AttestationPolicy {
            trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
                secure_component::swtpm::ca_certificates_der(&trusted_ek_ca).unwrap(),
            ),
            ek_intermediates: Vec::new(),
            ek_crls: Vec::new(),
            reference_states: vec![reference],
        };
        let ttp = RunningTtp::start(root, &pki, &policy, listener).await.unwrap();
        pki.issue(Role::CloudPlatform, "cp-1").unwrap();
        let cp = pki.client("cp-1", Role::Ttp, &ttp.url).unwrap();
        let op = Operator::of(&pki, "cp-1").unwrap();
        let alice = DomainManager::create(&pki, "dm-alice").unwrap();
        let eve = DomainManager::create(&pki, "dm-eve").unwrap();
        let alice_client = pki.client("dm-alice", Role::Ttp, &ttp.url).unwrap();
        let eve_client = pki.client("dm-eve", Role::Ttp, &ttp.url).unwrap();
        host1.host.enroll(&selection).await.expect("host-1 enrolls");
        host2.host.enroll(&selection).await.expect("host-2 enrolls");
        Self {
            dir,
            pki,
            ttp,
            trusted_ek_ca,
            selection,
            host1,
            host2,
            host3,
            cp,
            op,
            alice,
            eve,
            alice_client,
            eve_client,
        }
    }

    /// A new domain of dm-alice (vm-a rw, vm-b ro), registered by cp-1: its descriptor and
    /// the header of version 1.
    async fn domain(&self) -> (Descriptor, HeaderRecord) {
        let descriptor = self
            .alice
            .new_domain(
                &[("department", "cardiology"), ("classification", "patient-records")],
                &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)],
            )
            .unwrap();
        let header = register(&self.cp, self.alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
        (descriptor, header)
    }

    /// Version 2 of `descriptor`: vm-c added, read-only.
    async fn add_vm_c(&self, descriptor: &Descriptor, header_v1: &HeaderRecord) -> (Descriptor, HeaderRecord) {
        let descriptor_v2 =
            descriptor.next_version(|d| d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Ro })).unwrap();
        let header_v2 = register(
            &self.cp,
            self.alice.sign_descriptor(&descriptor_v2).unwrap(),
            Some(header_v1.registration.clone()),
        )
        .await
        .unwrap();
        (descriptor_v2, header_v2)
    }

    /// The newest audit record is the refusal `code` just seen, and the owner's viewing
    /// history of `domain_id` holds it.
    async fn assert_refusal_recorded(&self, domain_id: &str, code: &str) {
        assert_last_outcome(&self.ttp.service, code);
        let history: HistoryResponse =
            self.alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
        assert!(history.records.iter().any(|r| r.outcome == code), "the history of {domain_id} lacks {code}");
    }
}

static LAB: OnceLock<Shared<Lab>> = OnceLock::new();

extern "C" fn stop_the_lab() {
    if let Some(lab) = LAB.get() {
        lab.stop(|lab| async move {
            lab.ttp.stop().await;
            drop(lab.dir);
        });
    }
}

/// Runs one test on the shared lab, in its turn.
fn run<F: std::future::Future<Output = ()>>(test: impl FnOnce(Arc<Lab>) -> F) {
    LAB.get_or_init(|| {
        at_exit(stop_the_lab);
        Shared::start(Lab::start())
    })
    .run(test);
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
        launched_image: None,
    };
    (request, challenge)
}

// ---- releases ------------------------------------------------------------------------------------

/// 20 enrollments of host-1, then 20 releases to vm-a rw on host-1: each key equals K
/// computed independently (OpenSSL's HKDF); the median times are printed (docs/PERFORMANCE.md).
#[test]
fn an_attested_host_gets_exactly_the_hkdf_key() {
    run(|lab| async move {
        let mut enroll_times = Vec::new();
        for _ in 0..20 {
            let started = Instant::now();
            let result = lab.host1.host.enroll(&lab.selection).await.expect("host-1 enrolls");
            enroll_times.push(started.elapsed());
            assert_eq!(result.reference_state, "compute-v1");
        }
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = descriptor.domain_id.clone();
        let registration_v1 = Registration::decode(&header_v1.registration.message).unwrap();
        assert_eq!(registration_v1.version, 1);
        let master = lab.ttp.master_key_from_custodians(1).unwrap().expose().to_vec();
        let expected_key = independent_key(&master, &registration_v1, &domain_id, &descriptor.metadata_hash());
        let expected_mac_key = protocol::kdf::derive_sector_mac_key(
            &protocol::secret::SecretBytes::from_slice_wiping(&mut master.clone()),
            &registration_v1.nonce_r,
            &domain_id,
            &descriptor.metadata_hash(),
            &descriptor.cipher_spec,
        )
        .unwrap();
        let mut release_times = Vec::new();
        for _ in 0..20 {
            let grant = lab.alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
            let started = Instant::now();
            let ObtainedKey { key, response, .. } = lab
                .op
                .obtain_key(&lab.host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw)
                .await
                .expect("key released");
            release_times.push(started.elapsed());
            // A release wraps K || K_mac (docs/PROTOCOL.md "Key derivation"); K_mac's own
            // derivation is checked against OpenSSL's HKDF in protocol::kdf's tests.
            assert_eq!(key.len(), protocol::kdf::RELEASED_KEYS_BYTES);
            assert_eq!(&key.expose()[..64], expected_key.as_slice(), "the secure component must end up with exactly K");
            assert_eq!(&key.expose()[64..], expected_mac_key.expose(), "and with exactly K_mac");
            assert_eq!(response.version, 1);
        }
        assert_last_outcome(&lab.ttp.service, "ok");
        // The metadata hash in the key is H(meta) of the descriptor as registered.
        assert_eq!(registration_v1.metadata_hash, <[u8; 32]>::from(Sha256::digest(descriptor.metadata_encoding())));
        let enroll_median = median(&mut enroll_times);
        let release_median = median(&mut release_times);
        println!("MEASURED enrollment (TPM key creation + TTP checks over mTLS), median of 20: {enroll_median:?}");
        println!(
            "MEASURED key release (challenge + quote + release + TPM decrypt over mTLS), median of 20: {release_median:?}"
        );
    });
}

/// vm-c, added in version 2, gets the key on host-2: the same key (same r, same metadata).
#[test]
fn a_new_version_keeps_the_key() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = descriptor.domain_id.clone();
        let grant = lab.alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let ObtainedKey { key: key_v1, .. } =
            lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await.expect("vm-a");
        let (_, header_v2) = lab.add_vm_c(&descriptor, &header_v1).await;
        let grant = lab.alice.grant(&domain_id, "vm-c", AccessMode::Ro, 300);
        let ObtainedKey { key: key_v2, .. } = lab
            .op
            .obtain_key(&lab.host2.host, &header_v2, &grant, "vm-c", AccessMode::Ro)
            .await
            .expect("vm-c gets the key");
        assert_eq!(key_v2.expose(), key_v1.expose(), "a new version keeps the key (same r, same metadata)");
    });
}

/// A repeated registration of the newest version (a CP that crashed before writing its
/// header) gets the same r.
#[test]
fn a_repeated_registration_of_the_newest_version_gets_the_same_r() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let (descriptor_v2, header_v2) = lab.add_vm_c(&descriptor, &header_v1).await;
        let again =
            register(&lab.cp, lab.alice.sign_descriptor(&descriptor_v2).unwrap(), Some(header_v1.registration.clone()))
                .await
                .expect("idempotent repeat");
        let first = Registration::decode(&header_v2.registration.message).unwrap();
        let repeat = Registration::decode(&again.registration.message).unwrap();
        assert_eq!(
            (repeat.version, repeat.nonce_r, repeat.descriptor_hash),
            (first.version, first.nonce_r, first.descriptor_hash)
        );
    });
}

// ---- refusals at enrollment ------------------------------------------------------------------------

/// An AK that is not in the EK's TPM: TPM B holds the AK but not the EK the credential was
/// made for, so it cannot activate it and can only guess the secret.
#[test]
fn an_ak_not_in_the_eks_tpm_is_refused() {
    run(|lab| async move {
        let from_a = lab
            .host1
            .host
            .tpm
            .run(|tpm| tpm.enrollment_request("host-1", &PcrSelection::default_host()))
            .await
            .unwrap();
        let from_b = lab
            .host2
            .host
            .tpm
            .run(|tpm| tpm.enrollment_request("host-1", &PcrSelection::default_host()))
            .await
            .unwrap();
        let mut forged = from_a.clone();
        forged.ak_public = from_b.ak_public.clone();
        forged.binding_public = from_b.binding_public.clone();
        let challenge: protocol::attest::CredentialChallenge =
            lab.host1.host.ttp.post_json("/v1/enrollments", &forged).await.unwrap();
        let challenge_for_b = challenge.clone();
        let activation = lab.host2.host.tpm.run(move |tpm| tpm.activate_credential(&challenge_for_b)).await;
        assert!(activation.is_err(), "TPM B must not be able to activate a credential made for TPM A's EK");
        let nonce = challenge.certify_nonce.clone();
        let (certify_attest, certify_signature) =
            lab.host2.host.tpm.run(move |tpm| tpm.certify_binding_key(&nonce)).await.unwrap();
        let proof = protocol::attest::EnrollmentProof {
            enrollment_id: challenge.enrollment_id.clone(),
            activated_secret: rand::random::<[u8; 32]>().to_vec(),
            certify_attest,
            certify_signature,
        };
        let refused: Result<serde_json::Value, _> = lab.host1.host.ttp.post_json("/v1/enrollments/proof", &proof).await;
        assert_eq!(code_of_client(refused), "credential_failed");
        assert_last_outcome(&lab.ttp.service, "credential_failed");
    });
}

/// An EK certificate from a CA the TTP does not trust (host-3).
#[test]
fn an_ek_certificate_from_an_untrusted_ca_is_refused() {
    run(|lab| async move {
        assert_eq!(code_of_agent(lab.host3.host.enroll(&lab.selection).await), "ek_untrusted");
        assert_last_outcome(&lab.ttp.service, "ek_untrusted");
    });
}

// ---- refusals at key release -----------------------------------------------------------------------

/// A challenge used twice.
#[test]
fn a_reused_challenge_is_refused() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        let (request, _) = manual_request(&lab.op, &lab.host1, &header_v1, &grant, "vm-a", AccessMode::Rw, None).await;
        let _: KeyReleaseResponse =
            lab.host1.host.ttp.post_json("/v1/key-releases", &request).await.expect("first use succeeds");
        let replay: Result<KeyReleaseResponse, _> = lab.host1.host.ttp.post_json("/v1/key-releases", &request).await;
        assert_eq!(code_of_client(replay), "challenge_invalid");
        lab.assert_refusal_recorded(domain_id, "challenge_invalid").await;
    });
}

/// A grant used before, with a fresh challenge and quote (a grant is single-use); a refused
/// release does not use a grant up.
#[test]
fn a_used_grant_is_refused() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let (op, host1) = (&lab.op, &lab.host1.host);
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        op.obtain_key(host1, &header_v1, &grant, "vm-a", AccessMode::Rw).await.expect("the first use releases the key");
        let replay = op.obtain_key(host1, &header_v1, &grant, "vm-a", AccessMode::Rw).await;
        assert_eq!(code_of_agent(replay), "grant_replayed");
        lab.assert_refusal_recorded(domain_id, "grant_replayed").await;
        // After a refusal for the mode, the same grant still works for what it allows.
        let grant = lab.alice.grant(domain_id, "vm-b", AccessMode::Ro, 300);
        assert_eq!(
            code_of_agent(op.obtain_key(host1, &header_v1, &grant, "vm-b", AccessMode::Rw).await),
            "mode_not_permitted"
        );
        op.obtain_key(host1, &header_v1, &grant, "vm-b", AccessMode::Ro).await.expect("an unused grant still works");
    });
}

/// A quote over a stale challenge's nonce.
#[test]
fn a_quote_over_a_stale_challenge_is_refused() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let stale: ChallengeResponse = lab.host1.host.ttp.post_json("/v1/challenges", &()).await.unwrap();
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        let (request, _) =
            manual_request(&lab.op, &lab.host1, &header_v1, &grant, "vm-a", AccessMode::Rw, Some(&stale)).await;
        let refused: Result<KeyReleaseResponse, _> = lab.host1.host.ttp.post_json("/v1/key-releases", &request).await;
        assert_eq!(code_of_client(refused), "challenge_invalid");
        lab.assert_refusal_recorded(domain_id, "challenge_invalid").await;
    });
}

/// A forged descriptor signature at key release; a descriptor naming dm-alice as owner signed
/// by dm-eve at registration.
#[test]
fn a_forged_descriptor_signature_is_refused() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let mut forged = header_v1.clone();
        let last = forged.descriptor.signature.len() - 2;
        forged.descriptor.signature[last] ^= 0x55;
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        assert_eq!(
            code_of_agent(lab.op.obtain_key(&lab.host1.host, &forged, &grant, "vm-a", AccessMode::Rw).await),
            "descriptor_signature_invalid"
        );
        lab.assert_refusal_recorded(domain_id, "descriptor_signature_invalid").await;
        let mut stolen =
            descriptor.next_version(|d| d.acl.push(AclEntry { vm_id: "vm-eve".into(), mode: AccessMode::Rw })).unwrap();
        stolen.owner = "dm-alice".into();
        let refused =
            register(&lab.cp, lab.eve.sign_descriptor(&stolen).unwrap(), Some(header_v1.registration.clone())).await;
        assert_eq!(code_of_client(refused), "descriptor_signature_invalid");
        assert_last_outcome(&lab.ttp.service, "descriptor_signature_invalid");
        let history: HistoryResponse =
            lab.alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
        let forgeries = history.records.iter().filter(|r| r.outcome == "descriptor_signature_invalid").count();
        assert_eq!(forgeries, 2, "both forgeries are in the domain's history");
    });
}

/// A descriptor older than the newest registered version, at key release and at registration.
#[test]
fn a_descriptor_older_than_the_newest_is_refused() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let (descriptor_v2, _) = lab.add_vm_c(&descriptor, &header_v1).await;
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        assert_eq!(
            code_of_agent(lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await),
            "version_rollback"
        );
        lab.assert_refusal_recorded(domain_id, "version_rollback").await;
        let previous = Some(header_v1.registration.clone());
        let replayed = register(&lab.cp, lab.alice.sign_descriptor(&descriptor).unwrap(), previous.clone()).await;
        assert_eq!(code_of_client(replayed), "version_rollback");
        let stale_base = descriptor_v2.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
        let mut based_on_v1 = stale_base.clone();
        based_on_v1.version = 3;
        let refused = register(&lab.cp, lab.alice.sign_descriptor(&based_on_v1).unwrap(), previous).await;
        assert_eq!(code_of_client(refused), "version_rollback");
        assert_last_outcome(&lab.ttp.service, "version_rollback");
    });
}

/// One grant of dm-alice's domain (version 2) refused with `code`: the VM, the modes or the
/// signer do not match what the descriptor allows.
async fn refused_grant(
    lab: &Lab,
    signer: &DomainManager,
    vm: &str,
    grant_mode: AccessMode,
    asked: AccessMode,
    expires: i64,
    code: &str,
) {
    let (descriptor, header_v1) = lab.domain().await;
    let domain_id = &descriptor.domain_id;
    let (_, header_v2) = lab.add_vm_c(&descriptor, &header_v1).await;
    let grant = signer.grant(domain_id, vm, grant_mode, expires);
    assert_eq!(code_of_agent(lab.op.obtain_key(&lab.host1.host, &header_v2, &grant, vm, asked).await), code);
    lab.assert_refusal_recorded(domain_id, code).await;
}

/// A VM not in the access list.
#[test]
fn a_vm_not_in_the_acl_is_refused() {
    run(|lab| async move {
        refused_grant(&lab, &lab.alice, "vm-z", AccessMode::Ro, AccessMode::Ro, 300, "vm_not_in_acl").await;
    });
}

/// A read-only VM asking for read-write.
#[test]
fn a_read_only_vm_asking_for_read_write_is_refused() {
    run(|lab| async move {
        refused_grant(&lab, &lab.alice, "vm-b", AccessMode::Rw, AccessMode::Rw, 300, "mode_not_permitted").await;
    });
}

/// A read-only grant used for read-write.
#[test]
fn a_read_only_grant_used_for_read_write_is_refused() {
    run(|lab| async move {
        refused_grant(&lab, &lab.alice, "vm-a", AccessMode::Ro, AccessMode::Rw, 300, "grant_mismatch").await;
    });
}

/// An expired grant.
#[test]
fn an_expired_grant_is_refused() {
    run(|lab| async move {
        refused_grant(&lab, &lab.alice, "vm-a", AccessMode::Rw, AccessMode::Rw, -5, "grant_expired").await;
    });
}

/// A grant signed by someone the descriptor does not name.
#[test]
fn a_grant_by_a_signer_the_descriptor_does_not_name_is_refused() {
    run(|lab| async move {
        refused_grant(&lab, &lab.eve, "vm-a", AccessMode::Rw, AccessMode::Rw, 300, "grant_signer_not_authorized").await;
    });
}

/// A deleted domain: dm-eve may not delete it, its owner may; then no key is released.
#[test]
fn a_deleted_domain_is_refused() {
    run(|lab| async move {
        let (alice, eve, cp) = (&lab.alice, &lab.eve, &lab.cp);
        let doomed = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
        let doomed_header = register(cp, alice.sign_descriptor(&doomed).unwrap(), None).await.unwrap();
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
            code_of_agent(lab.op.obtain_key(&lab.host1.host, &doomed_header, &grant, "vm-a", AccessMode::Rw).await),
            "domain_deleted"
        );
        assert_last_outcome(&lab.ttp.service, "domain_deleted");
    });
}

/// A PCR extended after enrollment: the TTP refuses the quote, the TPM refuses to decrypt a
/// key released before. On host-4, a host of this test's own (its PCRs stay changed).
#[test]
fn a_pcr_extended_after_enrollment_is_refused() {
    run(|lab| async move {
        let host4 =
            LabHost::start(&lab.dir.path().join("pcr"), &lab.pki, "host-4", &lab.trusted_ek_ca, &lab.ttp.url).unwrap();
        host4.host.enroll(&lab.selection).await.expect("host-4 enrolls");
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        let grant = lab.alice.grant(domain_id, "vm-b", AccessMode::Ro, 300);
        let earlier = lab
            .op
            .request_release(&host4.host, &header_v1, &grant, "vm-b", AccessMode::Ro)
            .await
            .expect("released while trusted");
        host4.host.tpm.run(|tpm| tpm.extend_pcr(11, b"an unapproved kernel module")).await.unwrap();
        assert_eq!(
            code_of_agent(lab.op.obtain_key(&host4.host, &header_v1, &grant, "vm-b", AccessMode::Ro).await),
            "pcr_mismatch"
        );
        lab.assert_refusal_recorded(domain_id, "pcr_mismatch").await;
        let wrapped = earlier.wrapped_key.clone();
        let decrypted = host4.host.tpm.run(move |tpm| tpm.decrypt_released_key(&wrapped)).await;
        let error = decrypted.expect_err("the TPM must refuse to decrypt after the PCR changed");
        println!("  the TPM refused: {error}");
    });
}

// ---- the viewing history ---------------------------------------------------------------------------

/// dm-alice reads the domain's viewing history, in order, with its releases and refusals;
/// dm-eve may not read it.
#[test]
fn the_viewing_history_is_the_owners_and_in_order() {
    run(|lab| async move {
        let (descriptor, header_v1) = lab.domain().await;
        let domain_id = &descriptor.domain_id;
        for _ in 0..3 {
            let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
            lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await.expect("released");
        }
        let grant = lab.alice.grant(domain_id, "vm-z", AccessMode::Ro, 300);
        let refused = lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, "vm-z", AccessMode::Ro).await;
        assert_eq!(code_of_agent(refused), "vm_not_in_acl");
        let history: HistoryResponse =
            lab.alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
        let outcomes: Vec<&str> = history.records.iter().map(|r| r.outcome.as_str()).collect();
        println!("  outcomes: {outcomes:?}");
        assert!(history.records.windows(2).all(|w| w[0].seq < w[1].seq), "records in order");
        assert_eq!(history.records.iter().filter(|r| r.event == "key_release" && r.outcome == "ok").count(), 3);
        assert_eq!(outcomes.last(), Some(&"vm_not_in_acl"));
        let refused = lab.eve_client.get_json::<HistoryResponse>(&format!("/v1/domains/{domain_id}/history")).await;
        assert_eq!(code_of_client(refused), "forbidden");
    });
}

/// An edited record and a removed record of the audit chain are detected. On a lab of its
/// own: the chain stays broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_or_removed_audit_record_is_detected() {
    let lab = Lab::start().await;
    let (descriptor, header_v1) = lab.domain().await;
    let domain_id = &descriptor.domain_id;
    // Records after the victim: removing the newest record leaves no gap to detect.
    for vm in ["vm-a", "vm-z", "vm-a", "vm-a", "vm-a"] {
        let grant = lab.alice.grant(domain_id, vm, AccessMode::Rw, 300);
        let _ = lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, vm, AccessMode::Rw).await;
    }
    let alice_client = &lab.alice_client;
    let history: HistoryResponse = alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
    assert!(history.records.len() >= 6, "{:?}", history.records);
    let db = rusqlite::Connection::open(lab.ttp.data_dir.join("ttp.sqlite")).unwrap();
    let victim = history.records[3].seq as i64;
    let original: String = db.query_row("SELECT record FROM audit WHERE seq = ?1", [victim], |r| r.get(0)).unwrap();
    let edited = original.replacen("\"outcome\":\"", "\"outcome\":\"x", 1);
    assert_ne!(edited, original);
    db.execute("UPDATE audit SET record = ?1 WHERE seq = ?2", rusqlite::params![edited, victim]).unwrap();
    let broken = alice_client.get_json::<HistoryResponse>(&format!("/v1/domains/{domain_id}/history")).await;
    assert_eq!(code_of_client(broken), "audit_chain_broken");
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
    lab.ttp.stop().await;
}

/// The domain manager keeps the TTP's last signed audit checkpoint it saw (docs/PROTOCOL.md
/// "Audit checkpoints"). Someone with the TTP database's keys deletes the newest records and
/// every stored checkpoint: the chain from genesis still verifies, so the TTP itself and a
/// reader without a checkpoint see nothing wrong, but the manager's next `domain history`
/// is refused (`audit_chain_broken`, "cut short"). On a lab of its own: the log stays cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_manager_detects_a_log_cut_short_after_its_last_read() {
    let lab = Lab::start().await;
    let (descriptor, header_v1) = lab.domain().await;
    let domain_id = &descriptor.domain_id;
    for _ in 0..4 {
        let grant = lab.alice.grant(domain_id, "vm-a", AccessMode::Rw, 300);
        lab.op.obtain_key(&lab.host1.host, &header_v1, &grant, "vm-a", AccessMode::Rw).await.unwrap();
    }
    let tls = net::TlsFiles::in_dir(&lab.pki.dir, "dm-alice");
    let config = domain_manager::config::DmConfig {
        cloud_platform_url: lab.ttp.url.clone(),
        ttp_url: lab.ttp.url.clone(),
        ca: tls.ca,
        crl: tls.crl,
        cert: tls.cert,
        key: tls.key,
    };
    let manager = domain_manager::ops::DomainManager::connect(&config).unwrap();
    let seen = manager.history(domain_id).await.expect("the first read keeps a checkpoint");
    let releases = seen.records.iter().filter(|r| r.event == "key_release").count();
    assert_eq!(releases, 4, "{:?}", seen.records);
    let kept = config.cert.with_file_name(domain_manager::ops::CHECKPOINT_FILE);
    assert!(kept.exists(), "no checkpoint kept at {}", kept.display());
    let head = seen.records.last().unwrap().seq as i64;

    // The cut: the last two key releases and every checkpoint.
    let db = rusqlite::Connection::open(lab.ttp.data_dir.join("ttp.sqlite")).unwrap();
    db.execute("DELETE FROM audit WHERE seq >= ?1", [head - 1]).unwrap();
    db.execute("DELETE FROM audit_checkpoints", []).unwrap();
    let unchecked: HistoryResponse =
        lab.alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.expect("the cut chain verifies");
    assert_eq!(unchecked.records.iter().filter(|r| r.event == "key_release").count(), 2);

    let refused = manager.history(domain_id).await.expect_err("a log cut short after the last read");
    assert_eq!(refused.code(), Some("audit_chain_broken"), "{refused}");
    let text = refused.to_string();
    assert!(text.contains("cut short") && text.contains(&kept.display().to_string()), "{text}");
    println!("domain history after the cut: {text}");
    lab.ttp.stop().await;
}
