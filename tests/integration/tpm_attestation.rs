//! Host attestation against real swtpm instances (one per simulated host, free loopback
//! ports, stopped when the test ends). See docs/TPM.md.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::attest::{EnrollmentProof, PcrSelection};
use protocol::secret::SecretBytes;
use secure_component::swtpm::Swtpm;
use secure_component::tpm::HostTpm;
use ttp::attestation::{
    begin_enrollment, finish_enrollment, reference_state_from_values, seal_key_to_host, verify_quote,
    AttestationPolicy, HostRecord, ReferenceState,
};

/// The machine has two cores: run the TPM tests one at a time so timings mean something.
static SERIAL: Mutex<()> = Mutex::new(());

struct Host {
    tpm: HostTpm,
    swtpm: Swtpm,
    _dir: tempfile::TempDir,
}

fn start_host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&dir.path().join("swtpm")).unwrap();
    let tpm = HostTpm::open(&swtpm.tcti(), &dir.path().join("sc")).unwrap();
    Host { tpm, swtpm, _dir: dir }
}

/// A policy trusting the host's swtpm local CA and allowing its current PCR values as
/// "compute-v1".
fn policy_for(host: &mut Host) -> AttestationPolicy {
    let selection = PcrSelection::default_host();
    let values = host.tpm.read_pcrs(&selection).unwrap();
    AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(host.swtpm.ek_ca_certificates().unwrap()),
        ek_intermediates: vec![],
        ek_crls: Vec::new(),
        reference_states: vec![reference_state_from_values("compute-v1", &selection, &values).unwrap()],
    }
}

fn enroll(host: &mut Host, policy: &AttestationPolicy, host_id: &str) -> ttp::Result<HostRecord> {
    let request = host.tpm.enrollment_request(host_id, &PcrSelection::default_host()).unwrap();
    let (pending, challenge) = begin_enrollment(policy, &request)?;
    let proof = host.tpm.enrollment_proof(&challenge).unwrap();
    finish_enrollment(policy, pending, &proof)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    bytes
}

fn random_secret(n: usize) -> SecretBytes {
    let mut bytes = random_bytes(n);
    SecretBytes::from_slice_wiping(&mut bytes)
}

#[test]
fn enroll_quote_release_and_refuse_after_pcr_change() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut host = start_host();
    let swtpm_pid = host.swtpm.pid().unwrap();
    let ca = Swtpm::ek_ca_certificates(&host.swtpm).unwrap();
    assert_eq!(ca.len(), 2, "root + issuer");
    let policy = {
        let selection = PcrSelection::default_host();
        let values = host.tpm.read_pcrs(&selection).unwrap();
        assert_eq!(values.len(), 9);
        AttestationPolicy {
            trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(ca),
            ek_intermediates: vec![],
            ek_crls: Vec::new(),
            reference_states: vec![reference_state_from_values("compute-v1", &selection, &values).unwrap()],
        }
    };

    // Enrollment end to end.
    let record = enroll(&mut host, &policy, "compute-1").unwrap();
    assert_eq!(record.host_id, "compute-1");
    assert_eq!(record.reference_state, "compute-v1");
    assert_eq!(record.ek_fingerprint.len(), 64);
    assert!(record.tpm_description.contains("model swtpm"), "{}", record.tpm_description);
    // The record survives the TTP's store (JSON).
    let record: HostRecord = serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
    // The TPM's trial-session PolicyPCR digest equals the TTP's software one.
    let tpm_policy = host.tpm.pcr_policy_digest(&PcrSelection::default_host()).unwrap();
    let state = &policy.reference_states[0];
    assert_eq!(tpm_policy, ttp::attestation::policy_pcr_digest(&state.selection, &state.pcr_values).unwrap());

    // A quote over a fresh nonce verifies.
    let nonce = random_bytes(32);
    let evidence = host.tpm.quote(&nonce).unwrap();
    verify_quote(&record, &policy, &evidence, &nonce).unwrap();

    // A quote checked against another nonce is refused.
    let err = verify_quote(&record, &policy, &evidence, &random_bytes(32)).unwrap_err();
    assert!(matches!(err, ttp::Error::ChallengeInvalid(_)), "{err}");
    assert_eq!(err.code(), "challenge_invalid");

    // A tampered quote is refused.
    let mut tampered = evidence.clone();
    let last = tampered.attest.len() - 1;
    tampered.attest[last] ^= 1;
    let err = verify_quote(&record, &policy, &tampered, &nonce).unwrap_err();
    assert!(matches!(err, ttp::Error::QuoteInvalid(_)), "{err}");

    // Key release round trip: 64 random bytes exactly.
    let key = random_secret(64);
    let sealed = seal_key_to_host(&record, &key).unwrap();
    let released = host.tpm.decrypt_released_key(&sealed).unwrap();
    assert_eq!(released.expose(), key.expose());

    // A restarted secure component reloads its keys from the state directory.
    let state_dir = host._dir.path().join("sc");
    host.tpm = HostTpm::open(&host.swtpm.tcti(), &state_dir).unwrap();
    assert!(host.tpm.is_enrolled());
    let sealed_before = seal_key_to_host(&record, &key).unwrap();
    assert_eq!(host.tpm.decrypt_released_key(&sealed_before).unwrap().expose(), key.expose());

    // The host's measured state changes.
    host.tpm.extend_pcr(11, b"an untrusted update").unwrap();
    let nonce = random_bytes(32);
    let evidence = host.tpm.quote(&nonce).unwrap();
    let err = verify_quote(&record, &policy, &evidence, &nonce).unwrap_err();
    assert!(matches!(err, ttp::Error::PcrMismatch(_)), "{err}");
    assert_eq!(err.code(), "pcr_mismatch");
    assert!(err.to_string().contains("PCR 11 differs from reference state 'compute-v1'"), "{err}");

    // ... and the TPM itself refuses to decrypt a key sealed before the change.
    let err = host.tpm.decrypt_released_key(&sealed_before).unwrap_err();
    assert!(matches!(err, secure_component::Error::BindingKeyRefused(_)), "{err}");
    assert!(err.to_string().contains("PCR policy not satisfied"), "{err}");

    // swtpm is stopped and reaped when the host goes away.
    drop(host);
    assert!(!Path::new(&format!("/proc/{swtpm_pid}")).exists(), "swtpm {swtpm_pid} still running");
}

#[test]
fn ek_certificate_from_untrusted_ca_is_refused() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut host = start_host();
    // A self-made CA the policy trusts instead of the host's swtpm local CA.
    let mut policy = policy_for(&mut host);
    policy.trusted_ek_roots = ttp::attestation::EkRoot::every_host_each(vec![self_made_ca()]);
    let err = enroll(&mut host, &policy, "compute-1").unwrap_err();
    assert!(matches!(err, ttp::Error::EkUntrusted(_)), "{err}");
    assert_eq!(err.code(), "ek_untrusted");
    assert!(err.to_string().contains("does not chain to a trusted EK CA"), "{err}");

    // Another swtpm's local CA is just as untrusted.
    let other = start_host();
    policy.trusted_ek_roots = ttp::attestation::EkRoot::every_host_each(other.swtpm.ek_ca_certificates().unwrap());
    let err = enroll(&mut host, &policy, "compute-1").unwrap_err();
    assert!(matches!(err, ttp::Error::EkUntrusted(_)), "{err}");
}

#[test]
fn ak_from_another_tpm_fails_credential_activation() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut a = start_host();
    let mut b = start_host();
    let policy = policy_for(&mut a);
    // B claims A's EK (certificate and public) with its own AK and binding key.
    let request_a = a.tpm.enrollment_request("compute-a", &PcrSelection::default_host()).unwrap();
    let mut request = b.tpm.enrollment_request("compute-b", &PcrSelection::default_host()).unwrap();
    request.ek_certificate = request_a.ek_certificate;
    request.ek_public = request_a.ek_public;
    let (pending, challenge) = begin_enrollment(&policy, &request).unwrap();

    // B's TPM cannot activate a credential made for A's EK ...
    let err = b.tpm.activate_credential(&challenge).unwrap_err();
    assert!(err.to_string().contains("ActivateCredential"), "{err}");
    // ... so whatever B answers, the TTP refuses it.
    let (certify_attest, certify_signature) = b.tpm.certify_binding_key(&challenge.certify_nonce).unwrap();
    let proof = EnrollmentProof {
        enrollment_id: challenge.enrollment_id.clone(),
        activated_secret: random_bytes(32),
        certify_attest,
        certify_signature,
    };
    let err = finish_enrollment(&policy, pending, &proof).unwrap_err();
    assert!(matches!(err, ttp::Error::CredentialFailed(_)), "{err}");
    assert_eq!(err.code(), "credential_failed");
    assert!(err.to_string().contains("AK is not in the EK's TPM"), "{err}");
}

#[test]
fn binding_key_for_other_pcr_values_is_untrusted() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut host = start_host();
    let mut policy = policy_for(&mut host);
    // The operator's reference states expect other values (e.g. another firmware).
    for (name, fill) in [("compute-v2", 0xaa_u8), ("compute-v3", 0xbb)] {
        let mut state: ReferenceState = policy.reference_states[0].clone();
        state.name = name.into();
        for (index, value) in state.pcr_values.iter_mut() {
            if *index == 0 {
                *value = vec![fill; 32];
            }
        }
        policy.reference_states.push(state);
    }
    policy.reference_states.remove(0);
    let err = enroll(&mut host, &policy, "compute-1").unwrap_err();
    assert!(matches!(err, ttp::Error::BindingPolicyUntrusted(_)), "{err}");
    assert_eq!(err.code(), "binding_policy_untrusted");
    assert!(err.to_string().contains("tried 'compute-v2', 'compute-v3'"), "{err}");
}

#[test]
fn timings_enrollment_and_key_release() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut host = start_host();
    let policy = policy_for(&mut host);

    let mut enrollments = Vec::new();
    let mut steps = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut record = None;
    for _ in 0..20 {
        let t0 = Instant::now();
        let request = host.tpm.enrollment_request("compute-1", &PcrSelection::default_host()).unwrap();
        let t1 = Instant::now();
        let (pending, challenge) = begin_enrollment(&policy, &request).unwrap();
        let t2 = Instant::now();
        let proof = host.tpm.enrollment_proof(&challenge).unwrap();
        let t3 = Instant::now();
        record = Some(finish_enrollment(&policy, pending, &proof).unwrap());
        let t4 = Instant::now();
        enrollments.push(t4 - t0);
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3].into_iter().enumerate() {
            steps[i].push(d);
        }
    }
    let record = record.unwrap();
    println!(
        "TIMING enrollment (request+challenge+activate+certify+finish) median of 20: {:?}",
        median(&mut enrollments)
    );
    for (name, samples) in [
        "enrollment_request (SC: EK cert, EK, PolicyPCR trial, create AK + binding key)",
        "begin_enrollment (TTP: EK chain, MakeCredential)",
        "enrollment_proof (SC: ActivateCredential + Certify)",
        "finish_enrollment (TTP: checks, PolicyPCR digests)",
    ]
    .iter()
    .zip(steps.iter_mut())
    {
        println!("TIMING   {name}: median {:?}", median(samples));
    }

    let mut releases = Vec::new();
    let mut parts = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..20 {
        let key = random_secret(64);
        let nonce = random_bytes(32);
        let t0 = Instant::now();
        let evidence = host.tpm.quote(&nonce).unwrap();
        let t1 = Instant::now();
        verify_quote(&record, &policy, &evidence, &nonce).unwrap();
        let t2 = Instant::now();
        let sealed = seal_key_to_host(&record, &key).unwrap();
        let t3 = Instant::now();
        let released = host.tpm.decrypt_released_key(&sealed).unwrap();
        let t4 = Instant::now();
        assert!(released.ct_eq(key.expose()));
        releases.push(t4 - t0);
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3].into_iter().enumerate() {
            parts[i].push(d);
        }
    }
    println!("TIMING key release (quote+verify+seal+decrypt) median of 20: {:?}", median(&mut releases));
    for (name, samples) in
        ["quote (SC, TPM)", "verify_quote (TTP)", "seal (TTP)", "decrypt (SC, TPM)"].iter().zip(parts.iter_mut())
    {
        println!("TIMING   {name}: median {:?}", median(samples));
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A self-signed RSA CA made with openssl, unrelated to any TPM.
fn self_made_ca() -> Vec<u8> {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;
    use openssl::x509::extension::BasicConstraints;
    use openssl::x509::{X509NameBuilder, X509};
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "not-a-tpm-vendor").unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap()).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(365).unwrap()).unwrap();
    cert.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    cert.build().to_der().unwrap()
}

/// A CRL of the EK's issuing CA, made with `openssl ca -gencrl` over an index that lists
/// `revoked_serial` (or nothing), signed with swtpm_localca's issuer key. DER.
fn ek_crl(ca_dir: &Path, work: &Path, revoked_serial: Option<&str>) -> Vec<u8> {
    std::fs::create_dir_all(work).unwrap();
    let index = match revoked_serial {
        Some(serial) => format!("R\t351231235959Z\t240101000000Z\t{serial}\tunknown\t/CN=revoked EK\n"),
        None => String::new(),
    };
    std::fs::write(work.join("index.txt"), index).unwrap();
    std::fs::write(work.join("crlnumber"), "01\n").unwrap();
    let config = format!(
        "[ca]\ndefault_ca = ek\n[ek]\ndatabase = {0}/index.txt\ncrlnumber = {0}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 1\n",
        work.display()
    );
    std::fs::write(work.join("ca.cnf"), config).unwrap();
    let out = work.join("crl.pem");
    let status = std::process::Command::new("openssl")
        .args(["ca", "-gencrl", "-batch", "-config"])
        .arg(work.join("ca.cnf"))
        .arg("-keyfile")
        .arg(ca_dir.join("signkey.pem"))
        .arg("-cert")
        .arg(ca_dir.join("issuercert.pem"))
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "openssl ca -gencrl: {}", String::from_utf8_lossy(&status.stderr));
    openssl::x509::X509Crl::from_pem(&std::fs::read(&out).unwrap()).unwrap().to_der().unwrap()
}

/// Issue 21: a configured CRL of the EK CA is checked: an EK certificate it lists is refused
/// (`ek_untrusted`, "revoked"), one it does not list enrolls.
#[test]
fn ek_certificate_revoked_by_a_configured_crl_is_refused() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut host = start_host();
    let mut policy = policy_for(&mut host);
    let request = host.tpm.enrollment_request("compute-1", &PcrSelection::default_host()).unwrap();
    let ek = openssl::x509::X509::from_der(&request.ek_certificate).unwrap();
    let mut serial = ek.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_string();
    if serial.len() % 2 == 1 {
        serial.insert(0, '0');
    }
    let ca_dir = host._dir.path().join("swtpm").join("localca");
    let work = host._dir.path().join("crl");

    policy.ek_crls = vec![ek_crl(&ca_dir, &work.join("revoking"), Some(&serial))];
    let err = begin_enrollment(&policy, &request).unwrap_err();
    assert_eq!(err.code(), "ek_untrusted", "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");

    policy.ek_crls = vec![ek_crl(&ca_dir, &work.join("empty"), None)];
    enroll(&mut host, &policy, "compute-1").expect("an EK certificate the CRL does not list enrolls");
}
