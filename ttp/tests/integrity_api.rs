//! The integrity API end to end: a real TTP served over mutual TLS (`ttp::server::serve`) and
//! the secure component's own client (`secure_component::integrity_client`). The key release
//! that makes compute-1 the read-write holder is written through the TTP's store as
//! `Ttp::release_key` writes it (a real release needs TPM evidence; the unit tests in
//! `ttp/src/service/integrity/tests.rs` do those on recorded swtpm vectors).

use std::sync::Arc;
use std::time::Duration;

use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::integrity::{IntegrityAnchor, ViolationKind};
use protocol::messages::RegisterDomainRequest;
use protocol::pki::{Identity, Role};
use protocol::secret::SecretBytes;
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use secure_component::integrity_client::{commit_root, report_violation, verified_anchor};
use skydd_ca::{CertificateAuthority, Validity};
use ttp::attestation::AttestationPolicy;
use ttp::service::Ttp;
use ttp::store::{AuditEntry, SqlStore, TtpStore};

mod support;
use support::{identity_files, Ca};

fn signing_key(ca: &Ca, role: Role, name: &str) -> SignatureKey {
    let issued = CertificateAuthority::issue(&ca.0, &ca.1, role, name, Validity::Days(5)).unwrap();
    let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
    SignatureKey::from_pem(&issued.key_pem, der).unwrap()
}

/// Commits over HTTPS are checked by the client against the TTP's CA; a replay comes back as
/// the TTP's `integrity_epoch_stale`; a violation report lands in the owner's history; the
/// anchor a key release returns is the newest commit's.
#[tokio::test]
async fn secure_component_commits_roots_and_reports_violations_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cloud-ca").unwrap();
    let ttp_files = identity_files(dir.path(), &ca, Role::Ttp, "ttp-1");
    let sc_files = identity_files(dir.path(), &ca, Role::SecureComponent, "compute-1");
    let store: Arc<dyn TtpStore> = Arc::new(SqlStore::open(&dir.path().join("ttp.db")).unwrap());
    let ttp = Arc::new(
        Ttp::new(
            SecretBytes::from_slice_wiping(&mut [7u8; 32]),
            signing_key(&ca, Role::Ttp, "ttp-1"),
            vec![ca.0.clone()],
            AttestationPolicy::default(),
            store,
        )
        .unwrap(),
    );

    // A domain owned by dm-alice, and compute-1 holding its newest release read-write.
    let owner = signing_key(&ca, Role::DomainManager, "dm-alice");
    let acl = vec![AclEntry { vm_id: "vm-a".into(), mode: AccessMode::Rw }];
    let mut descriptor = Descriptor::new("dm-alice", Default::default(), acl).unwrap();
    descriptor.volume_format = protocol::domain::VolumeFormat::V2;
    let domain = descriptor.domain_id.clone();
    let signed = owner.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap());
    let cloud = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
    ttp.register_domain(&cloud, &RegisterDomainRequest { descriptor: signed, previous_registration: None }).unwrap();
    let release = AuditEntry {
        at: ttp::store::now_unix(),
        event: "key_release".into(),
        outcome: "ok".into(),
        message: "key released".into(),
        domain_id: Some(domain.clone()),
        host_id: Some("compute-1".into()),
        vm_id: Some("vm-a".into()),
        actor: "compute-1".into(),
    };
    ttp.store().append_key_release(release.clone(), AccessMode::Rw).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let tls = ttp_files.server_tls(&[Role::SecureComponent]).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(ttp::server::serve(listener, ttp.clone(), tls, shutdown.clone()));
    let client = net::Client::from_files(&url, &sc_files, Role::Ttp, Duration::from_secs(10)).unwrap();
    let cas = [ca.0.clone()];

    let first = commit_root(&client, &domain, "compute-1", 1, 1, &[0x11; 32], Some(&cas)).await.expect("epoch 1");
    assert_eq!((first.anchor.epoch, first.anchor.root, first.anchor.host_id.as_str()), (1, [0x11; 32], "compute-1"));
    let second = commit_root(&client, &domain, "compute-1", 2, 1, &[0x22; 32], Some(&cas)).await.expect("epoch 2");

    // The very same commit again (its answer was lost) gets the same anchor back...
    let retried = commit_root(&client, &domain, "compute-1", 2, 1, &[0x22; 32], Some(&cas)).await.expect("a retry");
    assert_eq!(retried.envelope.message, second.envelope.message);
    // ...but epoch 2 with another root (a fork) or an older epoch (a replay) is refused.
    let replay = commit_root(&client, &domain, "compute-1", 2, 1, &[0x99; 32], Some(&cas)).await.unwrap_err();
    match &replay {
        secure_component::Error::TtpRefused { step, status, code, message } => {
            assert_eq!((*step, *status, code.as_str()), ("integrity commit", 409, "integrity_epoch_stale"));
            assert!(message.contains("the next commit is epoch 3, not 2"), "{message}");
        }
        other => panic!("expected the TTP's refusal, got {other}"),
    }
    let forged = commit_root(&client, &domain, "compute-2", 3, 1, &[0x33; 32], None).await.unwrap_err();
    assert_eq!(forged.refusal().code(), "forbidden", "{forged}");

    let report = report_violation(&client, &domain, "compute-1", "vm-a", ViolationKind::SectorTag, Some(1234))
        .await
        .expect("reported");

    // The next release (written as release_key writes it) returns the newest anchor.
    let (_, anchor) = ttp.store().append_key_release(release, AccessMode::Ro).unwrap();
    let returned: SignedEnvelope = anchor.expect("an anchor").envelope;
    assert_eq!(returned, second.envelope);
    let decoded: IntegrityAnchor = verified_anchor(&returned, &domain, Some(&cas)).unwrap();
    assert_eq!(decoded.epoch, 2);
    let after_ro = commit_root(&client, &domain, "compute-1", 3, 1, &[0x33; 32], None).await.unwrap_err();
    assert_eq!(after_ro.refusal().code(), "integrity_commit_forbidden", "{after_ro}");

    let history = ttp.history(&Identity { name: "dm-alice".into(), role: Role::DomainManager }, &domain).unwrap();
    let record = history.records.iter().find(|r| r.seq == report.audit_seq).expect("in the history");
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("integrity_violation", "integrity_violation"));
    assert!(record.message.starts_with("sector 1234: ciphertext does not match its tag"), "{}", record.message);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// The client's anchor check: the TTP's signature under a trusted CA, the TTP role, the
/// domain; a tampered message or a host's signature is refused.
#[test]
fn anchor_check_refuses_other_domains_signers_and_tampering() {
    let ca = CertificateAuthority::generate("cloud-ca").unwrap();
    let cas = [ca.0.clone()];
    let anchor = IntegrityAnchor {
        domain_id: "00112233445566778899aabbccddeeff".into(),
        epoch: 3,
        root: [4; 32],
        host_id: "compute-1".into(),
        committed_at: 1_700_000_000,
        key_generation: 1,
    };
    let envelope =
        signing_key(&ca, Role::Ttp, "ttp-1").sign_envelope(SignatureContext::IntegrityAnchor, anchor.encode());
    assert_eq!(verified_anchor(&envelope, &anchor.domain_id, Some(&cas)).unwrap(), anchor);
    assert_eq!(verified_anchor(&envelope, &anchor.domain_id, None).unwrap(), anchor);
    let other = verified_anchor(&envelope, "ffeeddccbbaa99887766554433221100", Some(&cas)).unwrap_err();
    assert!(other.to_string().contains("not of ffeeddccbbaa99887766554433221100"), "{other}");

    let by_a_host = signing_key(&ca, Role::SecureComponent, "compute-1")
        .sign_envelope(SignatureContext::IntegrityAnchor, anchor.encode());
    let error = verified_anchor(&by_a_host, &anchor.domain_id, Some(&cas)).unwrap_err();
    assert!(error.to_string().contains("a ttp certificate is needed"), "{error}");

    let stranger = CertificateAuthority::generate("other-ca").unwrap();
    let foreign =
        signing_key(&stranger, Role::Ttp, "ttp-1").sign_envelope(SignatureContext::IntegrityAnchor, anchor.encode());
    assert!(verified_anchor(&foreign, &anchor.domain_id, Some(&cas)).is_err(), "another CA's TTP");

    let tampered = SignedEnvelope { message: IntegrityAnchor { epoch: 4, ..anchor.clone() }.encode(), ..envelope };
    assert!(verified_anchor(&tampered, &anchor.domain_id, None).is_err());
}
