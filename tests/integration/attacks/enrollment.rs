//! Compute hosts at enrollment: two extra TPMs of the trusted vendor per test, whose
//! enrollment requests are forged from each other's parts (rows H3-H9).

use super::*;

/// Two extra hosts with TPMs of the trusted vendor, named `host-x-TAG` and `host-y-TAG` (a pair
/// of its own for each test), and their enrollment requests.
struct Enrollers {
    host_x: LabHost,
    host_y: LabHost,
    /// host-x's enrollment request (its EK, AK and binding key).
    rx: EnrollmentRequest,
    /// host-y's enrollment request.
    ry: EnrollmentRequest,
    selection: PcrSelection,
}

impl Enrollers {
    async fn start(w: &World, tag: &str) -> Self {
        let cloud = &w.cloud;
        let extra = cloud.dir.join("extra").join(tag);
        let vendor_ca = cloud.dir.join("tpm-vendor-ca");
        let (x, y) = (format!("host-x-{tag}"), format!("host-y-{tag}"));
        let host_x = LabHost::start(&extra, &cloud.pki, &x, &vendor_ca, &cloud.ttp.url).expect("start host-x (swtpm)");
        let host_y = LabHost::start(&extra, &cloud.pki, &y, &vendor_ca, &cloud.ttp.url).expect("start host-y (swtpm)");
        let selection = PcrSelection::default_host();
        let request_of = |host: &LabHost, name: String| {
            let (tpm, selection) = (host.host.tpm.clone(), selection.clone());
            async move { tpm.run(move |t| t.enrollment_request(&name, &selection)).await.unwrap() }
        };
        let rx = request_of(&host_x, x).await;
        let ry = request_of(&host_y, y).await;
        Self { host_x, host_y, rx, ry, selection }
    }
}

async fn begin(host: &LabHost, request: &EnrollmentRequest) -> CredentialChallenge {
    host.host.ttp.post_json("/v1/enrollments", request).await.expect("the first enrollment step is accepted")
}

/// `host` enrolls with the `forged` request: the first step is accepted, the proof refused
/// with `code`; both steps audited. Returns the refusal's message.
async fn refused_enrollment(ttp: &ttp::service::Ttp, host: &LabHost, forged: &EnrollmentRequest, code: &str) -> String {
    let before = audit_records(ttp).len();
    let challenge = begin(host, forged).await;
    let proof = proof_of(host, &challenge).await;
    let message =
        expect_code(host.host.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await, code);
    assert_audited_n(ttp, before, 2, "enroll", code);
    message
}

async fn proof_of(host: &LabHost, challenge: &CredentialChallenge) -> EnrollmentProof {
    let challenge = challenge.clone();
    host.host.tpm.run(move |t| t.enrollment_proof(&challenge)).await.unwrap()
}

/// H3: a compute host enrolls with another host's binding key.
#[test]
fn h3_another_hosts_binding_key_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h3").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, rx, ry, .. } = e;
        // H3: host-x's EK and AK, host-y's binding key.
        let mut forged = rx.clone();
        forged.binding_public = ry.binding_public.clone();
        let message = refused_enrollment(&ttp, &host_x, &forged, "binding_key_invalid").await;
        assert!(message.contains("certified object"), "{message}");
    });
}

/// H4: a compute host enrolls a software RSA key marshalled as TPMT_PUBLIC.
#[test]
fn h4_a_software_binding_key_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h4").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, rx, .. } = e;
        // H4: a software RSA-2048 key (OpenSSL) in the TPM key's TPMT_PUBLIC (same attributes
        // and policy, modulus replaced): the AK can only certify the key that is in its TPM.
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let mut software = rx.binding_public.clone();
        let n = software.len();
        assert_eq!(&software[n - 258..n - 256], &[1, 0], "TPMT_PUBLIC ends with unique = TPM2B of a 256-byte modulus");
        software[n - 256..].copy_from_slice(&rsa.n().to_vec_padded(256).unwrap());
        let mut forged = rx.clone();
        forged.binding_public = software;
        let message = refused_enrollment(&ttp, &host_x, &forged, "binding_key_invalid").await;
        assert!(message.contains("certified object"), "{message}");
    });
}

/// H5: a compute host enrolls with a Certify signed by another TPM's AK.
#[test]
fn h5_a_certify_by_another_tpm_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h5").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, host_y, rx, .. } = e;
        // H5: the credential activated in host-x's TPM, the Certify made by host-y's AK.
        let before = audit_records(&ttp).len();
        let challenge = begin(&host_x, &rx).await;
        let for_x = challenge.clone();
        let secret = host_x.host.tpm.run(move |t| t.activate_credential(&for_x)).await.unwrap();
        let nonce = challenge.certify_nonce.clone();
        let (certify_attest, certify_signature) =
            host_y.host.tpm.run(move |t| t.certify_binding_key(&nonce)).await.unwrap();
        let proof = EnrollmentProof {
            enrollment_id: challenge.enrollment_id.clone(),
            activated_secret: secret.expose().to_vec(),
            certify_attest,
            certify_signature,
        };
        expect_code(
            host_x.host.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "binding_key_invalid",
        );
        assert_audited_n(&ttp, before, 2, "enroll", "binding_key_invalid");
    });
}

/// H6: a compute host replays a Certify from an earlier enrollment.
#[test]
fn h6_a_replayed_certify_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h6").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, rx, .. } = e;
        // H6: the Certify of an earlier enrollment (another certify nonce) replayed.
        let before = audit_records(&ttp).len();
        let first = begin(&host_x, &rx).await;
        let second = begin(&host_x, &rx).await;
        let old = proof_of(&host_x, &first).await;
        let for_x = second.clone();
        let secret = host_x.host.tpm.run(move |t| t.activate_credential(&for_x)).await.unwrap();
        let proof = EnrollmentProof {
            enrollment_id: second.enrollment_id.clone(),
            activated_secret: secret.expose().to_vec(),
            ..old
        };
        let message = expect_code(
            host_x.host.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "challenge_invalid",
        );
        assert!(message.contains("replayed"), "{message}");
        assert_audited_n(&ttp, before, 3, "enroll", "challenge_invalid");
    });
}

/// H7: a compute host presents another TPM's EK public beside its EK certificate.
#[test]
fn h7_another_tpms_ek_public_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h7").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, rx, ry, .. } = e;
        // H7: host-x's EK certificate beside host-y's EK public.
        let mut forged = rx.clone();
        forged.ek_public = ry.ek_public.clone();
        let before = audit_records(&ttp).len();
        expect_code(
            host_x.host.ttp.post_json::<_, CredentialChallenge>("/v1/enrollments", &forged).await,
            "ek_mismatch",
        );
        assert_audited(&ttp, before, "enroll_begin", "ek_mismatch");
    });
}

/// H8: a compute host enrolls under another host's name.
#[test]
fn h8_enrolling_under_another_hosts_name_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h8").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, ry, .. } = e;
        // H8: host-x enrolls host-y's TPM under host-y's name.
        let before = audit_records(&ttp).len();
        expect_code(host_x.host.ttp.post_json::<_, CredentialChallenge>("/v1/enrollments", &ry).await, "forbidden");
        let audit = assert_audited(&ttp, before, "enroll_begin", "forbidden");
        assert_eq!(audit.actor, host_x.host.host_id);
    });
}

/// H9: a compute host enrolls a binding key bound to untrusted PCR values.
#[test]
fn h9_a_binding_key_bound_to_untrusted_pcrs_is_refused() {
    run(|w| async move {
        let e = Enrollers::start(&w, "h9").await;
        let World { cloud, .. } = w;
        let ttp = cloud.ttp.service.clone();
        let Enrollers { host_x, selection, .. } = e;
        // H9: host-x boots an unapproved module, then enrolls: its binding key's PolicyPCR
        // is over values no reference state allows.
        host_x.host.tpm.run(|t| t.extend_pcr(11, b"unapproved kernel module")).await.unwrap();
        let before = audit_records(&ttp).len();
        assert_eq!(enroll_code(host_x.host.enroll(&selection).await), "binding_policy_untrusted");
        assert_audited_n(&ttp, before, 2, "enroll", "binding_policy_untrusted");
    });
}
