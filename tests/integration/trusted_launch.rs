//! Trusted launch (docs/PROTOCOL.md "Trusted launch"), with the real parts: a TTP with an
//! image allowlist signed by the pipeline's `image-pipeline` certificate, a host with its own
//! swtpm, the secure component's launcher starting real qemu (TCG) processes.
//!
//! - The launcher starts a VM from an allowlisted image only: an unlisted image, one others
//!   can write, and a symbolic link are refused before qemu runs; the host's report of a
//!   refusal (`POST /v1/launches`) is a `launch` record in the TTP's audit chain.
//! - The TTP releases a key to a VM the host reports as launched from an allowlisted image
//!   (the report covered by the quote), and refuses, with `image_not_allowed` in the owner's
//!   viewing history: no report, an unlisted image, a listed digest under another version.
//! - A report the quote does not cover (the quote over the bare nonce, or over another image)
//!   is refused as `challenge_invalid`: nobody on the way can swap the image.
//!
//! One test, one lab (the scenarios run in order); about 10 s.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::AccessMode;
use protocol::dsse::SignerTrust;
use protocol::image::{AllowList, AllowListEntry, LaunchedImage, ALLOWLIST_KIND, ALLOWLIST_PAYLOAD_TYPE};
use protocol::messages::{ChallengeResponse, HistoryResponse, KeyReleaseRequest};
use secure_component::config::{HypervisorChoice, LaunchConfig};
use secure_component::launch::{LaunchRequest, Launcher};
use sha2::{Digest, Sha256};
use skydd::lab::{loopback_agent_config, register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::audit::assert_last_outcome;
use skydd_testkit::refusal::{expect_code, ttp_code};
use ttp::attestation::AttestationPolicy;
use ttp::config::TrustedLaunchConfig;

/// A read-only image file of random bytes (qemu finds nothing to boot in it and waits in its
/// firmware, which is all a launch test needs), and its hex SHA-256.
fn image(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    (path, hex::encode(Sha256::digest(&bytes)))
}

fn entry(role: &str, version: u64, raw_sha256: &str) -> AllowListEntry {
    AllowListEntry {
        role: role.into(),
        version,
        raw_sha256: raw_sha256.into(),
        qcow2_sha256: "0".repeat(64),
        provenance_sha256: "1".repeat(64),
        promoted_at: "2026-11-30T12:00:00Z".into(),
    }
}

#[test]
fn only_vms_launched_from_allowlisted_images_get_keys() {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(scenario());
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = LabPki::create(&root.join("pki")).unwrap();

    // The pipeline signs an allowlist holding web@3.
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (web_v3, web_v3_sha) = image(&images, "web-v3.raw");
    let (rogue, rogue_sha) = image(&images, "rogue.raw");
    let list = AllowList {
        kind: ALLOWLIST_KIND.into(),
        issued_at: "2026-11-30T12:00:00Z".into(),
        issuer: "image-pipeline".into(),
        images: vec![entry("web", 3, &web_v3_sha)],
    };
    let pipeline = pki.issue(Role::CloudPlatform, "image-pipeline").unwrap().load().unwrap().signature_key().unwrap();
    let envelope = pipeline.sign_dsse(ALLOWLIST_PAYLOAD_TYPE, &serde_json::to_vec(&list).unwrap());
    let allowlist_path = root.join("allowlist.dsse.json");
    std::fs::write(&allowlist_path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
    // Signed by another cloud-platform identity, the same list is refused.
    let imposter = pki.issue(Role::CloudPlatform, "cp-1").unwrap().load().unwrap().signature_key().unwrap();
    let forged =
        serde_json::to_vec(&imposter.sign_dsse(ALLOWLIST_PAYLOAD_TYPE, &serde_json::to_vec(&list).unwrap())).unwrap();
    let trust = SignerTrust {
        roots: vec![protocol::pki::TrustedRoot::any_role(pki.ca_pem())],
        crl_pems: Vec::new(),
        signer_name: "image-pipeline".into(),
        now_unix: protocol_now(),
    };
    assert_eq!(protocol::image::verify_allowlist(&std::fs::read(&allowlist_path).unwrap(), &trust).unwrap(), list);
    let error = protocol::image::verify_allowlist(&forged, &trust).unwrap_err().to_string();
    assert!(error.contains("must be signed by image-pipeline"), "{error}");
    // A partner cloud's root, trusted for domain managers only, cannot vouch for an
    // "image-pipeline" signer of its own issuing (docs/PKI.md "Federation").
    let partner = LabPki::create_named(&root.join("partner-pki"), "partner-ca").unwrap();
    let partner_signer =
        partner.issue(Role::CloudPlatform, "image-pipeline").unwrap().load().unwrap().signature_key().unwrap();
    let partner_list =
        serde_json::to_vec(&partner_signer.sign_dsse(ALLOWLIST_PAYLOAD_TYPE, &serde_json::to_vec(&list).unwrap()))
            .unwrap();
    let federated = SignerTrust {
        roots: vec![
            protocol::pki::TrustedRoot::any_role(pki.ca_pem()),
            protocol::pki::TrustedRoot::limited(
                partner.ca_pem(),
                vec![protocol::pki::RoleAllowance::role(Role::DomainManager)],
            ),
        ],
        ..trust.clone()
    };
    let error = protocol::image::verify_allowlist(&partner_list, &federated).unwrap_err().to_string();
    assert!(error.contains("may issue only domain-manager"), "{error}");

    // A TTP that releases keys only to VMs launched from allowlisted images, one host.
    let (listener, ttp_url) = RunningTtp::bind().await.unwrap();
    let ek_ca = root.join("tpm-vendor-ca");
    let host = LabHost::start(root, &pki, "host-1", &ek_ca, &ttp_url).unwrap();
    let selection = PcrSelection::default_host();
    let policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&ek_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![host.reference_state("compute-v1", &selection).await.unwrap()],
    };
    let trusted_launch = TrustedLaunchConfig { allowlist: allowlist_path.clone(), signer: "image-pipeline".into() };
    let ttp = RunningTtp::start_with_trusted_launch(root, &pki, &policy, listener, trusted_launch).await.unwrap();
    host.host.enroll(&selection).await.expect("host-1 enrolls");
    let op = Operator::create(&pki, "cp-ops").unwrap();
    let cp = pki.client("cp-ops", Role::Ttp, &ttp.url).unwrap();
    let alice = DomainManager::create(&pki, "dm-alice").unwrap();
    let alice_client = pki.client("dm-alice", Role::Ttp, &ttp.url).unwrap();
    let descriptor = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
    let header = register(&cp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let domain_id = descriptor.domain_id.clone();

    // The host's launcher, configured as an operator would: [launch] with the same list.
    let tls = pki.issue(Role::SecureComponent, "host-1").unwrap();
    let mut config = loopback_agent_config(root, "host-1", host.swtpm.tcti(), &ttp.url, &tls);
    config.hypervisor = HypervisorChoice::Qemu;
    config.launch = Some(LaunchConfig {
        allowlist: allowlist_path.clone(),
        signer: "image-pipeline".into(),
        qemu: "qemu-system-x86_64".into(),
        accel: "tcg".into(),
        firmware: None,
    });
    let material = tls.load().unwrap();
    let launcher = Launcher::from_config(&config, &material).unwrap().expect("[launch] is configured");
    let launch = |vm_id: &str, image: &Path| LaunchRequest {
        vm_id: vm_id.into(),
        image: image.to_path_buf(),
        memory_mib: 128,
        cpus: 1,
    };

    // Refused at launch: unlisted, writable by others, a symbolic link. No qemu runs.
    let refused = |result: secure_component::Result<_>| match result {
        Err(e @ secure_component::Error::ImageNotAllowed(_)) => e.to_string(),
        other => panic!("expected image_not_allowed, got {other:?}"),
    };
    let (outcome, report) = launcher.launch_reported(&launch("vm-rogue", &rogue));
    let message = refused(outcome);
    assert!(message.contains(&rogue_sha) && message.contains("not on the allowlist"), "{message}");
    // Reported over mutual TLS as the host, the refusal is a `launch` record at the TTP.
    let report = report.expect("a refused launch is reported");
    let seq = secure_component::launch::report_to_ttp(&host.host.ttp, &report).await.expect("the TTP records it");
    let record = skydd_testkit::audit::records(&ttp.service).pop().unwrap();
    assert_eq!((record.seq, record.event.as_str(), record.outcome.as_str()), (seq, "launch", "image_not_allowed"));
    assert_eq!((record.host_id.as_deref(), record.vm_id.as_deref()), (Some("host-1"), Some("vm-rogue")));
    assert!(record.message.contains(&format!("from image rogue.raw, sha256 {rogue_sha}")), "{}", record.message);
    ttp.service.verify_audit_chain().unwrap();
    let writable = images.join("web-v3-writable.raw");
    std::fs::copy(&web_v3, &writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).unwrap();
    let message = refused(launcher.launch(&launch("vm-w", &writable)));
    assert!(message.contains("lets others write it"), "{message}");
    let link = images.join("web-link.raw");
    std::os::unix::fs::symlink(&web_v3, &link).unwrap();
    let message = refused(launcher.launch(&launch("vm-l", &link)));
    assert!(message.contains("symbolic links are not followed"), "{message}");
    assert!(launcher.list().is_empty(), "no VM may run after refused launches");

    // Launched from web@3: a qemu process whose QMP monitor answers, booted on that file.
    let vm = launcher.launch(&launch("vm-a", &web_v3)).expect("web@3 launches");
    assert_eq!(vm.image, LaunchedImage { sha256: web_v3_sha.clone(), role: "web".into(), version: 3 });
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("file=/dev/fdset/1"), "qemu runs on the checked descriptor");
    // qemu keeps the descriptor it was given (in its fd set, under another number).
    let open_files: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .collect();
    assert!(open_files.contains(&web_v3), "qemu holds the checked file open: {open_files:?}");
    assert!(vm.qmp.exists());
    let launched = launcher.image_of("vm-a").expect("vm-a is running");

    // Released: the report is in the quote and on the TTP's list; the audit names the image.
    let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
    let obtained = op
        .obtain_key_launched(&host.host, &header, &grant, "vm-a", AccessMode::Rw, Some(&launched))
        .await
        .expect("a VM launched from web@3 gets the key");
    assert_eq!(obtained.key.len(), protocol::kdf::RELEASED_KEYS_BYTES);
    assert_last_outcome(&ttp.service, "ok");
    let history: HistoryResponse = alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
    let release = history.records.iter().rev().find(|r| r.event == "key_release").unwrap();
    assert!(release.message.contains(&format!("image web@3 (sha256 {web_v3_sha})")), "{}", release.message);

    // An owner's policy reads the launched image: "web at version 4 or newer" refuses web@3.
    let mut newer_only = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
    newer_only.policy = Some(
        r#"@id("web-4-or-newer") permit (principal, action, resource)
           when { context has image && context.image.role == "web" && context.image.version >= 4 };"#
            .into(),
    );
    let newer_header = register(&cp, alice.sign_descriptor(&newer_only).unwrap(), None).await.unwrap();
    let grant = alice.grant(&newer_only.domain_id, "vm-a", AccessMode::Rw, 300);
    let result =
        op.obtain_key_launched(&host.host, &newer_header, &grant, "vm-a", AccessMode::Rw, Some(&launched)).await;
    assert_eq!(ttp_code(result), "policy_denied");

    // Refused at the TTP, each audited as image_not_allowed in the owner's history.
    let before = history.records.len();
    let cases: [(&str, Option<LaunchedImage>, &str); 3] = [
        ("no launched image", None, "reports no launched image"),
        (
            "an unlisted image",
            Some(LaunchedImage { sha256: rogue_sha.clone(), role: "web".into(), version: 3 }),
            "is not on the allowlist",
        ),
        (
            "a listed digest under another version",
            Some(LaunchedImage { version: 4, ..launched.clone() }),
            "is web@3 on the allowlist, but was reported as web@4",
        ),
    ];
    for (what, image, expected) in &cases {
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let result = op.obtain_key_launched(&host.host, &header, &grant, "vm-a", AccessMode::Rw, image.as_ref()).await;
        assert_eq!(ttp_code(result), "image_not_allowed", "{what}");
        let last = skydd_testkit::audit::records(&ttp.service).pop().unwrap();
        assert!(last.message.contains(expected), "{what}: {}", last.message);
    }
    let history: HistoryResponse = alice_client.get_json(&format!("/v1/domains/{domain_id}/history")).await.unwrap();
    let refusals = history.records[before..].iter().filter(|r| r.outcome == "image_not_allowed").count();
    assert_eq!(refusals, cases.len(), "each refusal is in the owner's viewing history");

    // A report the quote does not cover: swapped on the way, it is refused.
    for quoted in [None, Some(LaunchedImage { sha256: rogue_sha.clone(), ..launched.clone() })] {
        let challenge: ChallengeResponse = host.host.ttp.post_json("/v1/challenges", &()).await.unwrap();
        let data = protocol::image::quote_qualifying_data(&challenge.nonce, quoted.as_ref()).unwrap();
        let quote = host.host.tpm.run(move |tpm| tpm.quote(&data)).await.unwrap();
        let grant = alice.grant(&domain_id, "vm-a", AccessMode::Rw, 300);
        let request = KeyReleaseRequest {
            host_id: "host-1".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            header: header.clone(),
            grant: grant.clone(),
            placement: op.place("vm-a", "host-1", &grant),
            challenge_id: challenge.challenge_id,
            quote,
            launched_image: Some(launched.clone()),
        };
        let result: Result<serde_json::Value, _> = host.host.ttp.post_json("/v1/key-releases", &request).await;
        let message = expect_code(result, "challenge_invalid");
        assert!(message.contains("does not cover the launched image"), "{message}");
    }

    // Stopped, the VM is no longer one this host launched: no report, no key.
    launcher.stop("vm-a").unwrap();
    assert!(launcher.image_of("vm-a").is_none());
    assert!(!Path::new(&format!("/proc/{}", vm.pid)).exists(), "qemu exited");
    drop(launcher);
    ttp.stop().await;
}

fn protocol_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
