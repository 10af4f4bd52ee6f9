//! The image pipeline end to end, for real: Debian's archive through mmdebstrap, the
//! test-minimal profile, a cloud CA signing key, and for archival a loopback TTP with an
//! swtpm-backed secure component (skydd::lab).
//!
//! build → verify → a 1-byte tamper refused (image and record) → bit-identical rebuild →
//! patch (with the security archive) → diff → promote → signed allowlist → archive →
//! restore (byte-identical) → destroy (domain deleted at the TTP, copies gone, record kept).
//!
//! The .deb cache is kept under target/ so repeated runs download nothing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image_pipeline::archive::{self, KeySource, TtpKeySource};
use image_pipeline::build::{BuildOptions, PROVENANCE_NAME, RAW_NAME};
use image_pipeline::pipeline;
use image_pipeline::profile::LoadedProfile;
use image_pipeline::provenance::{self, Signer, TrustPolicy};
use image_pipeline::store::{self, Status, Store};
use net::Role;
use protocol::attest::PcrSelection;
use skydd::lab::{DomainManager, LabHost, LabPki, RunningTtp};
use ttp::attestation::AttestationPolicy;

fn apt_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("image-pipeline-apt-cache")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn options(out: &Path, updates: bool) -> BuildOptions {
    let mut opts = BuildOptions::new(LoadedProfile::load("test-minimal").unwrap(), out.to_path_buf());
    opts.apt_cache = apt_cache();
    opts.updates = updates;
    opts.source_date_epoch = None;
    opts
}

fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
}

fn expect_refusal<T: std::fmt::Debug>(result: image_pipeline::Result<T>, needle: &str) -> String {
    match result {
        Err(e @ image_pipeline::Error::VerifyRefused { .. }) => {
            let text = e.to_string();
            println!("  refused: {text}");
            assert!(text.contains(needle), "refusal should mention {needle:?}: {text}");
            text
        }
        other => panic!("expected a verification refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pipeline_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // The cloud CA and the pipeline's signing identity (cloud-platform "image-pipeline").
    let pki = LabPki::create(&root.join("pki")).unwrap();
    let files = pki.issue(Role::CloudPlatform, "image-pipeline").unwrap();
    let signer = Signer::from_files(&files.key, &files.cert).unwrap();
    let policy = TrustPolicy {
        roots: vec![protocol::pki::TrustedRoot::any_role(pki.ca_pem())],
        crl_pems: Vec::new(),
        signer_name: "image-pipeline".into(),
        now_unix: now(),
    };
    let store = Store::open(&root.join("store")).unwrap();

    println!("build test-minimal@1 (point release only, no -updates/-security)");
    let out1 = root.join("build-1");
    let started = Instant::now();
    let v1 = pipeline::build_signed(&options(&out1, false), &signer, Some(&store), None).unwrap();
    let build_time = started.elapsed();
    let r1 = v1.record.clone().unwrap();
    println!(
        "  built {} in {:.1}s: raw {} bytes (sha256 {}), qcow2 {} bytes, {} packages",
        r1.id(),
        build_time.as_secs_f64(),
        r1.raw_size,
        &r1.raw_sha256[..16],
        r1.qcow2_size,
        r1.packages
    );
    for s in &v1.result.steps {
        println!("    step {:<16} {:>6} ms {}", s.name, s.duration_ms, s.status);
    }
    assert_eq!(r1.version, 1);
    assert!(v1.result.tests.passed());
    let oscap = v1.result.tests.oscap.clone().expect("oscap ran");
    println!("  oscap-chroot: {} {:?} {}", oscap.status, oscap.counts, oscap.note);

    println!("verify: the stored version and the build directory");
    let verified = store.verify(&r1, &policy, false).unwrap();
    assert_eq!(verified.signer.name, "image-pipeline");
    provenance::verify(&std::fs::read(out1.join(PROVENANCE_NAME)).unwrap(), &out1, &policy).unwrap();
    let statement = &verified.statement;
    assert_eq!(statement.predicate_type, provenance::PREDICATE_TYPE);
    assert!(statement.predicate.build_definition.resolved_dependencies.iter().any(|d| d.uri.ends_with("/InRelease")));
    assert!(statement
        .predicate
        .build_definition
        .resolved_dependencies
        .iter()
        .any(|d| d.uri.starts_with("pkg:deb/debian/openssh-server@")));
    assert!(statement.predicate.skydd.releases.iter().all(|r| r.signed_by.contains("Good signature")));

    println!("tamper: one byte of the image, then one byte of the record");
    flip_byte(&out1.join(RAW_NAME), 1024 * 1024 + 4096);
    expect_refusal(
        provenance::verify(&std::fs::read(out1.join(PROVENANCE_NAME)).unwrap(), &out1, &policy),
        "the image was changed",
    );
    flip_byte(&out1.join(RAW_NAME), 1024 * 1024 + 4096);
    let mut envelope = std::fs::read(out1.join(PROVENANCE_NAME)).unwrap();
    let at = envelope.windows(10).position(|w| w == b"\"payload\":").unwrap() + 40;
    envelope[at] = if envelope[at] == b'A' { b'B' } else { b'A' };
    expect_refusal(provenance::verify(&envelope, &out1, &policy), "signature");
    // A record signed by an identity that is not the pipeline's is refused too.
    let other = pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let forger = Signer::from_files(&other.key, &other.cert).unwrap();
    let forged = serde_json::to_vec(&forger.sign(&v1.statement).unwrap()).unwrap();
    expect_refusal(provenance::verify(&forged, &out1, &policy), "must be signed by image-pipeline");

    println!("rebuild: same profile and packages must give the same bits");
    let out_rebuild = root.join("rebuild");
    let again = pipeline::build_signed(&options(&out_rebuild, false), &signer, None, None).unwrap();
    println!("  v1 raw {} / rebuild raw {}", r1.raw_sha256, again.result.raw_sha256);
    println!("  v1 qcow2 {} / rebuild qcow2 {}", r1.qcow2_sha256, again.result.qcow2_sha256);
    assert_eq!(again.result.raw_sha256, r1.raw_sha256, "raw image is not bit-identical on rebuild");
    assert_eq!(again.result.qcow2_sha256, r1.qcow2_sha256, "qcow2 image is not bit-identical on rebuild");
    drop(again);
    std::fs::remove_dir_all(&out_rebuild).unwrap();

    println!("patch test-minimal (with bookworm-updates and -security)");
    let started = Instant::now();
    let v2 =
        pipeline::patch(&store, "test-minimal", &signer, &options(&root.join("unused"), true), &root.join("build-2"))
            .unwrap();
    let patch_time = started.elapsed();
    let r2 = v2.record.clone().unwrap();
    println!("  {} in {:.1}s, parent {:?}; changes:", r2.id(), patch_time.as_secs_f64(), r2.parent);
    for c in &r2.changes {
        println!("    {c}");
    }
    assert_eq!(r2.version, 2);
    assert_eq!(r2.parent.as_deref(), Some("test-minimal@1"));
    assert!(!r2.changes.is_empty());
    store.verify(&r2, &policy, false).unwrap();

    println!("diff test-minimal@1 test-minimal@2");
    let diff = store::diff_statements(&store.statement(&r1).unwrap(), &store.statement(&r2).unwrap());
    for line in diff.lines() {
        println!("    {line}");
    }
    assert!(diff.hardening.iter().any(|h| h.contains("security/updates suites false -> true")));

    println!("promote test-minimal@2 and export the signed allowlist");
    let promoted = store.promote("test-minimal@2", &policy).unwrap();
    assert_eq!(promoted.status, Status::Promoted);
    let (_, allowlist_bytes) = store.allowlist(&signer).unwrap();
    let allowlist = store::verify_allowlist(&allowlist_bytes, &policy).unwrap();
    assert!(allowlist.allows(&r2.raw_sha256));
    assert!(allowlist.allows(&r2.qcow2_sha256));
    if r1.raw_sha256 != r2.raw_sha256 {
        assert!(!allowlist.allows(&r1.raw_sha256), "an unpromoted version must not be allowed");
    }
    let mut tampered = allowlist_bytes.clone();
    let at = tampered.windows(10).position(|w| w == b"\"payload\":").unwrap() + 40;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    assert!(store::verify_allowlist(&tampered, &policy).is_err());

    println!("archive test-minimal@1 under a TTP domain key");
    let (listener, ttp_url) = RunningTtp::bind().await.unwrap();
    let vendor_ca = root.join("tpm-vendor-ca");
    let LabHost { host: agent, swtpm: _swtpm } =
        LabHost::start(root, &pki, "archiver-1", &vendor_ca, &ttp_url).unwrap();
    let selection = PcrSelection::default_host();
    let reference = {
        let selection_copy = selection.clone();
        let values = agent.tpm.run(move |tpm| tpm.read_pcrs(&selection_copy)).await.unwrap();
        ttp::attestation::ReferenceState {
            name: "archiver-v1".into(),
            selection: selection.clone(),
            pcr_values: values,
        }
    };
    let ttp_policy = AttestationPolicy {
        trusted_ek_roots: ttp::attestation::EkRoot::every_host_each(
            secure_component::swtpm::ca_certificates_der(&vendor_ca).unwrap(),
        ),
        ek_intermediates: Vec::new(),
        ek_crls: Vec::new(),
        reference_states: vec![reference],
    };
    let ttp = RunningTtp::start(root, &pki, &ttp_policy, listener).await.unwrap();
    agent.enroll(&selection).await.unwrap();
    let owner = DomainManager::create(&pki, "image-archive-owner").unwrap();
    let keys = TtpKeySource {
        owner: owner.key,
        owner_name: owner.name.clone(),
        registrar: pki.client("image-pipeline", Role::Ttp, &ttp.url).unwrap(),
        placer: files.load().unwrap().signature_key().unwrap(),
        agent,
        vm_id: "image-archiver".into(),
    };
    let started = Instant::now();
    let archived = archive::archive(&store, "test-minimal@1", &keys).await.unwrap();
    let archive_ref = archived.archive.clone().unwrap();
    println!(
        "  archived in {:.1}s: {} (domain {})",
        started.elapsed().as_secs_f64(),
        archive_ref.file,
        archive_ref.domain_id
    );
    let shared = r1.raw_sha256 == r2.raw_sha256;
    assert_eq!(
        store.has_blob(&r1.raw_sha256),
        shared,
        "the plaintext leaves the store unless another live version is the same bytes"
    );
    let archive_path = store.root.join("archives").join(&archive_ref.file);
    assert!(std::fs::metadata(&archive_path).unwrap().len() >= r1.raw_size);

    println!("restore test-minimal@1: byte-identical");
    let restored_path = root.join("restored.raw");
    let started = Instant::now();
    archive::restore(&store, "test-minimal@1", &keys, Some(&restored_path)).await.unwrap();
    println!("  restored in {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(image_pipeline::debian::sha256_of_file(&restored_path).unwrap(), r1.raw_sha256);
    store.verify(&store.resolve("test-minimal@1").unwrap(), &policy, false).unwrap();

    println!("destroy test-minimal@1: crypto-shredding + every copy removed, record kept");
    let domain = archive::ArchiveDomain {
        domain_id: archive_ref.domain_id.clone(),
        header: protocol::messages::HeaderRecord::decode(&base64_decode(&archive_ref.header)).unwrap(),
    };
    let destroyed = archive::destroy(&store, "test-minimal@1", &keys).await.unwrap();
    assert_eq!(destroyed.status, Status::Destroyed);
    let details = destroyed.destroyed.clone().unwrap();
    println!("  {details:?}");
    assert!(details.domain_deleted.is_some());
    assert!(!archive_path.exists());
    if !shared {
        assert!(!store.has_blob(&r1.raw_sha256));
        assert!(!store.has_blob(&r1.qcow2_sha256));
    }
    assert!(store.has_blob(&r1.provenance_sha256), "the record of what existed is kept");
    match keys.key(&domain).await {
        Err(e) => {
            println!("  key after destroy: {e}");
            assert!(e.to_string().contains("domain_deleted"), "{e}");
        }
        Ok(_) => panic!("the TTP released the key of a destroyed archive"),
    }
    assert!(archive::restore(&store, "test-minimal@1", &keys, None).await.is_err());
    let log = store.versions("test-minimal").unwrap();
    assert_eq!(
        log.iter().map(|r| (r.version, r.status)).collect::<Vec<_>>(),
        vec![(1, Status::Destroyed), (2, Status::Promoted)]
    );
    ttp.stop().await;

    println!(
        "FIGURES: build {:.1}s, patch {:.1}s, raw {} bytes ({} MiB, sparse), qcow2 {} bytes, rebuild bit-identical: yes",
        build_time.as_secs_f64(),
        patch_time.as_secs_f64(),
        r1.raw_size,
        r1.raw_size / (1024 * 1024),
        r1.qcow2_size
    );
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
