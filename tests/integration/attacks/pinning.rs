//! EK pinning, resettable PCRs and the measured state (rows H11-H15): each test has a lab of
//! its own (a cloud CA, a TPM vendor CA, a TTP whose policy it makes once the hosts exist),
//! as these rows change what a TTP pins and trusts.

use super::*;

/// A lab for the EK-pinning and measured-state rows (H11-H15): a cloud CA, a TPM vendor CA (swtpm_localca) shared by every
/// TPM, and a TTP whose policy the caller makes once the hosts exist.
struct PinLab {
    dir: tempfile::TempDir,
    pki: LabPki,
    vendor_ca: PathBuf,
}

impl PinLab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = LabPki::create(&dir.path().join("pki")).unwrap();
        let vendor_ca = dir.path().join("tpm-vendor-ca");
        Self { dir, pki, vendor_ca }
    }

    fn host(&self, host_id: &str, ttp_url: &str) -> LabHost {
        LabHost::start(self.dir.path(), &self.pki, host_id, &self.vendor_ca, ttp_url).expect("start a host (swtpm)")
    }

    /// A TPM of the same vendor driven with `identity`'s (already issued) TLS key: what an
    /// attacker who stole that host's key does with a second genuine TPM.
    fn tpm_with_identity(
        &self,
        tpm_name: &str,
        identity: &str,
        ttp_url: &str,
    ) -> (secure_component::host::AttestedHost, secure_component::swtpm::Swtpm) {
        let swtpm = secure_component::swtpm::Swtpm::start_with_ca(
            &self.dir.path().join(tpm_name).join("swtpm"),
            &self.vendor_ca,
        )
        .unwrap();
        let tpm =
            secure_component::host::TpmWorker::start(&swtpm.tcti(), self.dir.path().join(tpm_name).join("sc-state"))
                .unwrap();
        let ttp = self.pki.client(identity, Role::Ttp, ttp_url).unwrap();
        (secure_component::host::AttestedHost { host_id: identity.to_string(), tpm, ttp }, swtpm)
    }

    fn policy(&self, reference_states: Vec<ttp::attestation::ReferenceState>) -> ttp::attestation::AttestationPolicy {
        ttp::attestation::AttestationPolicy {
            trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
                secure_component::swtpm::ca_certificates_der(&self.vendor_ca).unwrap(),
            ),
            reference_states,
            ..Default::default()
        }
    }
}

fn ek_of(record: &AuditRecord) -> Vec<String> {
    record
        .message
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_hexdigit()))
        .filter(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

/// H11–H13: a second genuine TPM claiming an enrolled host, one host per EK, and the
/// operator's audited replacement of a host's TPM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_genuine_tpm_claiming_a_host() {
    let lab = PinLab::new();
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let compute1 = lab.host("compute-1", &url);
    let selection = PcrSelection::default_host();
    let policy = lab.policy(vec![compute1.reference_state("compute-v1", &selection).await.unwrap()]);
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &policy, listener).await.unwrap();
    let ttp = running.service.clone();

    let enrolled = compute1.host.enroll(&selection).await.expect("compute-1 enrolls its own TPM");
    let ek1 = enrolled.ek_fingerprint.clone();
    let first = audit_records(&ttp).last().unwrap().clone();
    assert_eq!((first.event.as_str(), first.outcome.as_str()), ("enroll", "ok"));
    assert!(first.message.contains(&ek1), "the enrollment record names the EK: {}", first.message);

    // H11: compute-1's TLS key and a DIFFERENT genuine TPM of the same vendor.
    let (rogue, _rogue_tpm) = lab.tpm_with_identity("rogue-tpm", "compute-1", &url);
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(rogue.enroll(&selection).await), "ek_pinned");
    let audit = assert_audited_n(&ttp, before, 2, "enroll", "ek_pinned");
    let named = ek_of(&audit);
    assert_eq!(named.len(), 2, "the refusal names the pinned and the presented EK: {}", audit.message);
    assert_eq!(named[0], ek1);
    assert_ne!(named[1], ek1);
    let ek2 = named[1].clone();
    // The real compute-1 is not locked out: its record still names its EK and its quotes verify.
    let record: ttp::attestation::HostRecord =
        serde_json::from_str(&ttp.store().host("compute-1").unwrap().unwrap()).unwrap();
    assert_eq!(record.ek_fingerprint, ek1);
    let challenge: ChallengeResponse = compute1.host.ttp.post_json("/v1/challenges", &()).await.unwrap();
    let nonce = challenge.nonce.clone();
    let quote = compute1.host.tpm.run(move |t| t.quote(&nonce)).await.unwrap();
    ttp::attestation::verify_quote(&record, &policy, &quote, &challenge.nonce)
        .expect("compute-1's own TPM still attests");

    // H12: the rogue TPM enrolls honestly as compute-9, then tries compute-1 again after the
    // operator allowed compute-1 a new TPM: one TPM is one host.
    lab.pki.issue(Role::SecureComponent, "compute-9").unwrap();
    let compute9 = secure_component::host::AttestedHost {
        host_id: "compute-9".into(),
        tpm: rogue.tpm.clone(),
        ttp: lab.pki.client("compute-9", Role::Ttp, &url).unwrap(),
    };
    let as9 = compute9.enroll(&selection).await.expect("the second TPM enrolls under its own host id");
    assert_eq!(as9.ek_fingerprint, ek2);
    let before = audit_records(&ttp).len();
    let replace =
        ttp.allow_host_replacement("operator:test", "compute-1").expect("the operator marks compute-1 replaceable");
    assert_eq!(
        (replace.event.as_str(), replace.outcome.as_str(), replace.host_id.as_deref()),
        ("host_replace", "ok", Some("compute-1"))
    );
    assert!(replace.message.contains(&ek1), "{}", replace.message);
    assert_eq!(enroll_code(rogue.enroll(&selection).await), "ek_in_use");
    let audit = assert_audited_n(&ttp, before, 3, "enroll", "ek_in_use");
    assert!(audit.message.contains("compute-9"), "{}", audit.message);

    // H13: the operator's replacement is used by a new TPM, once; the record names both EKs.
    let (replacement, _replacement_tpm) = lab.tpm_with_identity("replacement-tpm", "compute-1", &url);
    let before = audit_records(&ttp).len();
    let replaced = replacement.enroll(&selection).await.expect("the approved replacement TPM enrolls");
    let audit = assert_audited_n(&ttp, before, 2, "enroll", "ok");
    assert!(
        audit.message.contains(&ek1)
            && audit.message.contains(&replaced.ek_fingerprint)
            && audit.message.contains("replacing"),
        "{}",
        audit.message
    );
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(compute1.host.enroll(&selection).await), "ek_pinned", "the mark is used up");
    assert_audited_n(&ttp, before, 2, "enroll", "ek_pinned");
    // An unknown host cannot be marked.
    let err = ttp.allow_host_replacement("operator:test", "compute-404").unwrap_err();
    assert_eq!(err.code(), "host_unknown");
    assert_eq!(audit_records(&ttp).last().unwrap().outcome, "host_unknown", "a refused replacement is audited too");
    ttp.verify_audit_chain().unwrap();
    running.stop().await;
}

/// H14: a resettable PCR (16 debug, 23 application) is refused in the TTP's policy (it does
/// not start) and in an enrollment's selection. (Under swtpm `tpm2_pcrreset 16` succeeds
/// without authorisation, so a value in it proves nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pcr_16_reset_is_refused_in_policy_and_selection() {
    let lab = PinLab::new();
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let host = lab.host("compute-1", &url);
    let with_16 = PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, 16] };
    let values = host
        .host
        .tpm
        .run({
            let s = with_16.clone();
            move |t| t.read_pcrs(&s)
        })
        .await
        .unwrap();
    let state_16 =
        ttp::attestation::ReferenceState { name: "debug".into(), selection: with_16.clone(), pcr_values: values };
    let err = RunningTtp::start(lab.dir.path(), &lab.pki, &lab.policy(vec![state_16]), listener)
        .await
        .err()
        .expect("the TTP refuses a policy with PCR 16");
    let err = err.downcast_ref::<ttp::Error>().expect("a TTP error");
    assert_eq!(err.code(), "pcr_resettable", "{err}");
    assert!(err.to_string().contains("PCR 16"), "{err}");

    let (listener, url2) = RunningTtp::bind().await.unwrap();
    let good = host.reference_state("compute-v1", &PcrSelection::default_host()).await.unwrap();
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &lab.policy(vec![good]), listener).await.unwrap();
    let ttp = running.service.clone();
    let agent = secure_component::host::AttestedHost {
        host_id: "compute-1".into(),
        tpm: host.host.tpm.clone(),
        ttp: lab.pki.client("compute-1", Role::Ttp, &url2).unwrap(),
    };
    let before = audit_records(&ttp).len();
    for pcr in [16u8, 23] {
        let selection = PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, pcr] };
        assert_eq!(enroll_code(agent.enroll(&selection).await), "pcr_resettable");
    }
    let audit = assert_audited_n(&ttp, before, 2, "enroll_begin", "pcr_resettable");
    assert!(audit.message.contains("PCR 23"), "{}", audit.message);
    agent.enroll(&PcrSelection::default_host()).await.expect("the default selection (no resettable PCR) enrolls");
    running.stop().await;
}

/// H15: the measured state. A host's start-up extends PCR 11 with the secure component's
/// binary and configuration; the reference state is computed from the build. A host whose
/// binary was replaced cannot enroll, and a host that was enrolled and reboots with a
/// replaced binary is refused at release, and its TPM refuses to decrypt a key released
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_secure_component_binary() {
    use secure_component::measure::{self, Measurement};
    let lab = PinLab::new();
    let binary = std::env::current_exe().unwrap();
    let config = b"# secure-component.toml of the measured hosts\nttp_url = \"https://ttp.example\"\n".to_vec();
    let replaced = lab.dir.path().join("secure-component-replaced");
    std::fs::copy(&binary, &replaced).unwrap();
    {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&replaced)
            .unwrap()
            .write_all(b"\x00a patched secure component")
            .unwrap();
    }
    // The reference state from the build: no host is read.
    let expected = Measurement::of(&binary, &config).unwrap();
    let state = skydd::lab::measured_reference_state("compute-measured", &expected);
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let good = lab.host("compute-1", &url);
    let policy = lab.policy(vec![state]);
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &policy, listener).await.unwrap();
    let ttp = running.service.clone();
    let selection = PcrSelection::default_host();

    // A host measured with the expected binary enrolls; one with the replaced binary cannot.
    good.host.tpm.run(move |t| measure::extend(t, &expected)).await.unwrap();
    let enrolled = good.host.enroll(&selection).await.expect("the measured host enrolls");
    assert_eq!(enrolled.reference_state, "compute-measured");
    let bad = lab.host("compute-2", &url);
    let bad_measurement = Measurement::of(&replaced, &config).unwrap();
    assert_ne!(bad_measurement.binary, expected.binary);
    bad.host.tpm.run(move |t| measure::extend(t, &bad_measurement)).await.unwrap();
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(bad.host.enroll(&selection).await), "binding_policy_untrusted");
    assert_audited_n(&ttp, before, 2, "enroll", "binding_policy_untrusted");
    // A changed configuration is a changed state too.
    assert_ne!(
        Measurement::of(&binary, b"ttp_url = \"https://rogue.example\"\n").unwrap().pcr_value(),
        expected.pcr_value()
    );

    // A key released to the good host while it runs the expected binary.
    lab.pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let cp = lab.pki.client("cp-1", Role::Ttp, &url).unwrap();
    let alice = DomainManager::create(&lab.pki, "dm-alice").unwrap();
    let descriptor = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
    let header = skydd::lab::register(&cp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let operator = Operator::of(&lab.pki, "cp-1").unwrap();
    let earlier = operator
        .request_release(&good.host, &header, &grant, "vm-a", AccessMode::Rw)
        .await
        .expect("released to the measured host");

    // The host reboots (its swtpm restarts: PCRs reset) and starts the replaced binary.
    drop(good);
    let rebooted = lab.host("compute-1", &url);
    rebooted.host.tpm.run(move |t| measure::extend(t, &bad_measurement)).await.unwrap();
    let before = audit_records(&ttp).len();
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let refused = operator.obtain_key(&rebooted.host, &header, &grant, "vm-a", AccessMode::Rw).await;
    let message = match refused {
        Err(secure_component::Error::TtpRefused { code, message, .. }) => {
            assert_eq!(code, "pcr_mismatch", "{message}");
            message
        }
        other => panic!("expected pcr_mismatch, got {:?}", other.map(|k| k.response.audit_seq)),
    };
    assert!(message.contains("PCR 11"), "{message}");
    assert_audited(&ttp, before, "key_release", "pcr_mismatch");
    let wrapped = earlier.wrapped_key.clone();
    let decrypted = rebooted.host.tpm.run(move |t| t.decrypt_released_key(&wrapped)).await;
    assert!(
        matches!(decrypted, Err(secure_component::Error::BindingKeyRefused(_))),
        "the TPM must refuse: {:?}",
        decrypted.map(|k| k.len())
    );
    running.stop().await;
}
