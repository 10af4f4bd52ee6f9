//! Sharing a domain with a partner cloud's VM (docs/PKI.md "Federation", "A partner cloud's
//! host"): two clouds, each with its own CA, TTP and cloud platform.
//!
//! The first test works at the key release: cloud B's host `b-compute-07` (a TPM of another
//! vendor CA, a certificate of B's CA) enrolls at A's TTP, gets the key of A's owner's domain
//! sealed to its TPM, reads a sector A wrote, and is refused as soon as A's owner takes the VM
//! out of the ACL; what B's root may not do is refused too.
//!
//! The second runs two whole clouds ([`skydd::cloud::PartnerClouds`]): `b-compute-07` serves
//! B's own VM with keys from B's TTP and A's shared VM with keys from A's TTP, each cloud
//! platform seeing only its own attachments there.

use std::path::{Path, PathBuf};

use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager as Manager};
use net::Role;
use protocol::attest::PcrSelection;
use protocol::cloud::{AgentAttachRequest, AgentAttachment, AgentAttachmentList};
use protocol::domain::AccessMode;
use protocol::messages::{HeaderRecord, Registration};
use protocol::pki::RoleAllowance;
use protocol::secret::SecretBytes;
use secure_component::key_release::ObtainedKey;
use secure_component::service::Cloud;
use skydd::cloud::{Layout, PartnerClouds, SharedHosts};
use skydd::lab::{register, DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_testkit::independent_key;
use skydd_testkit::refusal::{client_code, expect_code, ttp_code};
use skydd_volume::xts::XtsEngine;
use ttp::attestation::{AttestationPolicy, EkRoot};

#[test]
fn a_partner_clouds_host_gets_an_owners_domain_and_loses_it_at_once_on_revoke() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (dir.path().join("cloud-a"), dir.path().join("cloud-b"));
        let mut pki_a = LabPki::create_named(&a_dir.join("pki"), "Cloud A CA").unwrap();
        let mut pki_b = LabPki::create_named(&b_dir.join("pki"), "Cloud B CA").unwrap();
        pki_a.trust(&pki_b, vec![RoleAllowance::named(Role::SecureComponent, &["b-compute-07"]).unwrap()]);
        pki_b.trust(&pki_a, vec![RoleAllowance::named(Role::Ttp, &["ttp-1"]).unwrap()]);

        // Cloud B's host, configured to ask A's TTP; its TPM is of B's vendor.
        let (listener, ttp_a_url) = RunningTtp::bind().await.unwrap();
        let b_vendor = b_dir.join("tpm-vendor-ca");
        let b_host = LabHost::start(&b_dir, &pki_b, "b-compute-07", &b_vendor, &ttp_a_url).unwrap();
        let selection = PcrSelection::default_host();
        let b_state = b_host.reference_state("b-compute-07-measured", &selection).await.unwrap();

        // Cloud A's TTP: B's vendor root and B's host's state are enrolled for this host.
        let policy = AttestationPolicy {
            trusted_ek_roots: EkRoot::only_for_each(
                secure_component::swtpm::ca_certificates_der(&b_vendor).unwrap(),
                &["b-compute-07"],
            ),
            ek_intermediates: Vec::new(),
            ek_crls: Vec::new(),
            reference_states: vec![b_state],
        };
        let ttp_a = RunningTtp::start(&a_dir, &pki_a, &policy, listener).await.unwrap();
        pki_a.issue(Role::CloudPlatform, "cloud-platform").unwrap();
        let cp_a = pki_a.client("cloud-platform", Role::Ttp, &ttp_a.url).unwrap();
        let placer_a = Operator::of(&pki_a, "cloud-platform").unwrap();
        let alice = DomainManager::create(&pki_a, "dm-alice").unwrap();

        // B's host enrolls at A's TTP (over TLS that each side's root limit lets through).
        let enrolled = b_host.host.enroll(&selection).await.expect("B's host enrolls at A's TTP");
        assert_eq!(enrolled.reference_state, "b-compute-07-measured");

        // A's owner shares a domain with vm-b, which A's operator placed on B's host.
        let descriptor = alice.new_domain(&[("department", "oncology")], &[("vm-b", AccessMode::Rw)]).unwrap();
        let domain_id = descriptor.domain_id.clone();
        let header_v1 = register(&cp_a, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
        let registration = Registration::decode(&header_v1.registration.message).unwrap();
        let master = ttp_a.master_key_from_custodians(1).unwrap().expose().to_vec();
        let expected = independent_key(&master, &registration, &domain_id, &descriptor.metadata_hash());

        // Cloud A wrote a sector of the volume with K; the ciphertext is what B's host reads.
        let plaintext: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut sector = plaintext.clone();
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut expected.clone()))
            .unwrap()
            .encrypt_sectors(0, &mut sector)
            .unwrap();
        assert_ne!(sector, plaintext);

        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let ObtainedKey { key, response, .. } = placer_a
            .obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw)
            .await
            .expect("B's host gets the key, sealed to its TPM");
        assert_eq!(response.version, 1);
        assert_eq!(&key.expose()[..64], expected.as_slice(), "B's host holds exactly K");
        let mut released = key.expose()[..64].to_vec();
        XtsEngine::new(&SecretBytes::from_slice_wiping(&mut released))
            .unwrap()
            .decrypt_sectors(0, &mut sector)
            .unwrap();
        assert_eq!(sector, plaintext, "B's host reads what A wrote");

        // B's root may not issue another host, nor a cloud platform that places VMs here.
        let other = LabHost::start(&b_dir, &pki_b, "b-compute-08", &b_vendor, &ttp_a.url).unwrap();
        let refused = other.host.enroll(&selection).await.expect_err("another B host is refused in TLS");
        assert!(refused.to_string().contains("its role is not accepted there"), "{refused}");
        pki_b.issue(Role::CloudPlatform, "cloud-platform").unwrap();
        let placer_b = Operator::of(&pki_b, "cloud-platform").unwrap();
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_b.obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "placement_invalid");

        // A's owner revokes: version 2 without vm-b. B's very next request is refused.
        let descriptor_v2 = descriptor.next_version(|d| d.acl.clear()).unwrap();
        let header_v2 =
            register(&cp_a, alice.sign_descriptor(&descriptor_v2).unwrap(), Some(header_v1.registration.clone()))
                .await
                .unwrap();
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_a.obtain_key(&b_host.host, &header_v2, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "vm_not_in_acl");
        let grant = alice.grant(&domain_id, "vm-b", AccessMode::Rw, 300);
        let code = ttp_code(placer_a.obtain_key(&b_host.host, &header_v1, &grant, "vm-b", AccessMode::Rw).await);
        assert_eq!(code, "version_rollback", "the header of before the revoke is refused too");

        ttp_a.stop().await;
    });
}

/// Cloud A: compute-1 (vm-a) and dm-alice. Cloud B: b-compute-07 (B's vm-b1) and dm-bob;
/// b-compute-07 also serves cloud A, whose cloud platform places vm-x there.
const A_LAYOUT: Layout<'static> = Layout { hosts: &[("compute-1", &["vm-a"])], managers: &["dm-alice"] };
const B_LAYOUT: Layout<'static> = Layout { hosts: &[("b-compute-07", &["vm-b1"])], managers: &["dm-bob"] };
const SHARED: SharedHosts<'static> =
    SharedHosts { partner_name: "cloud-a", hosts: &[("b-compute-07", &["vm-x"])], tls_names: &["b-compute-*"] };

/// The header in force on A's volume of `domain_id` and a copy of that volume file under B's
/// volume store (what B's operator could copy if A's ciphertext reached B's storage).
fn header_and_copy(a_dir: &Path, b_dir: &Path, domain_id: &str) -> (HeaderRecord, PathBuf) {
    let volumes = a_dir.join("cloud-platform").join("volumes");
    let volume = std::fs::read_dir(&volumes)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.to_string_lossy().contains(domain_id))
        .expect("A's volume of the domain");
    let bytes = std::fs::read(&volume).unwrap();
    let active = protocol::format::decode_header_area(&bytes[..protocol::format::HEADER_AREA_SIZE]).unwrap();
    let copy = b_dir.join("cloud-platform").join("volumes").join("copied-from-a.img");
    std::fs::write(&copy, &bytes).unwrap();
    (HeaderRecord::decode(&active.payload).unwrap(), copy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_host_serves_its_own_cloud_and_a_shared_vm_each_with_its_own_ttp() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let clouds = PartnerClouds::start(dir.path(), &A_LAYOUT, &B_LAYOUT, &SHARED, &mut |line| println!(".. {line}"))
        .await
        .unwrap();
    let (a, b) = (&clouds.a, &clouds.b);
    let shared = b.host("b-compute-07").expect("B's shared host runs");
    println!("two clouds up in {:?}", started.elapsed());
    // One TPM, one binding key, a record per TTP.
    let enrollments = shared.service.enrollments().unwrap();
    assert_eq!(enrollments.iter().map(|r| r.ttp.as_str()).collect::<Vec<_>>(), ["home", "cloud-a"]);
    assert_eq!(enrollments[0].binding_key_sha256, enrollments[1].binding_key_sha256);
    assert_eq!(enrollments[0].ek_fingerprint, enrollments[1].ek_fingerprint);

    // B's owner attaches B's domain to vm-b1 on b-compute-07: B's cloud platform, B's TTP.
    let bob = Manager::connect(&DmConfig::load(&b.manager_config("dm-bob").unwrap()).unwrap()).unwrap();
    let b_domain =
        bob.create(Default::default(), vec![parse_acl_entry("vm-b1:rw").unwrap()], vec![], 32 << 20).await.unwrap();
    bob.attach(&b_domain.id, "vm-b1", AccessMode::Rw, 300).await.unwrap();
    let b_record = shared.vm_root.join("vm-b1").join(&b_domain.id).join("b.txt");
    std::fs::write(&b_record, "cardiology, written in cloud B\n").unwrap();
    let b_history = bob.history(&b_domain.id).await.unwrap().records;
    assert!(b_history.iter().any(|r| r.event == "key_release" && r.host_id.as_deref() == Some("b-compute-07")));

    // A's owner shares a domain with vm-x; vm-a, on A's own host, writes a record.
    let alice = Manager::connect(&DmConfig::load(&a.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let acl = vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-x:ro").unwrap()];
    let domain = alice.create(Default::default(), acl, vec![], 32 << 20).await.unwrap();
    alice.attach(&domain.id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    let record = a.vm_mount("vm-a", &domain.id, &A_LAYOUT).unwrap().join("record.txt");
    std::fs::write(&record, "oncology, written in cloud A\n").unwrap();
    alice.detach(&domain.id, "vm-a").await.unwrap();

    // A's cloud platform attaches it to vm-x on B's host: the key comes from A's TTP, sealed
    // to B's TPM; the ciphertext is read through A's side (A's volume store).
    let attached = alice.attach(&domain.id, "vm-x", AccessMode::Ro, 300).await.unwrap();
    assert_eq!(attached.host, "b-compute-07");
    let on_b = shared.vm_root.join("vm-x").join(&domain.id).join("record.txt");
    assert_eq!(std::fs::read_to_string(&on_b).unwrap(), "oncology, written in cloud A\n");
    let history = alice.history(&domain.id).await.unwrap().records;
    assert!(history.iter().any(|r| r.event == "key_release" && r.host_id.as_deref() == Some("b-compute-07")));

    // Each cloud platform sees (and may detach) only what it attached on the shared host.
    let b_cp = b.pki.client("cloud-platform", Role::SecureComponent, &shared.agent_url).unwrap();
    let a_cp = a.pki.client("cloud-platform", Role::SecureComponent, &shared.agent_url).unwrap();
    let vms_of = |list: AgentAttachmentList| list.attachments.into_iter().map(|a| a.vm_id).collect::<Vec<_>>();
    assert_eq!(vms_of(b_cp.get_json("/v1/attachments").await.unwrap()), ["vm-b1"]);
    assert_eq!(vms_of(a_cp.get_json("/v1/attachments").await.unwrap()), ["vm-x"]);
    let path = format!("/v1/attachments/{}", attached.id);
    expect_code(b_cp.delete_json::<AgentAttachment>(&path).await, "attachment_unknown");

    // B's cloud platform asks B's host to attach A's domain to B's own vm-b1 (with a copy
    // of A's volume in B's store, and a grant A's owner signed): it is served with B's TTP,
    // which trusts nothing of A's root, so not even the owner's signature on the header.
    let (header, copy) = header_and_copy(&a.dir, &b.dir, &domain.id);
    let alice_signer = DomainManager {
        name: "dm-alice".into(),
        key: net::TlsFiles::in_dir(&a.pki.dir, "dm-alice").load().unwrap().signature_key().unwrap(),
    };
    let placer_b = Operator::of(&b.pki, "cloud-platform").unwrap();
    let grant = alice_signer.grant(&domain.id, "vm-b1", AccessMode::Ro, 300);
    let request = AgentAttachRequest {
        attachment_id: "b-takes-a".into(),
        vm_id: "vm-b1".into(),
        mode: AccessMode::Ro,
        header: header.clone(),
        placement: placer_b.place("vm-b1", "b-compute-07", &grant),
        grant,
        volume_path: copy.to_string_lossy().into_owned(),
    };
    let code = client_code(b_cp.post_json::<_, AgentAttachment>("/v1/attachments", &request).await);
    assert_eq!(code, "descriptor_signature_invalid", "B's TTP knows nothing of A's domain or owner");
    // Asking A's TTP itself with B's cloud platform's placement: refused there.
    let at_a = shared.service.host_for(&Cloud::Partner("cloud-a".into())).unwrap();
    let grant = alice_signer.grant(&domain.id, "vm-x", AccessMode::Ro, 300);
    let code = ttp_code(placer_b.obtain_key(at_a, &header, &grant, "vm-x", AccessMode::Ro).await);
    assert_eq!(code, "placement_invalid", "A's TTP takes placements from A's cloud platform only");

    // A's owner revokes vm-x: A's cloud platform detaches it on B's host at once, and the
    // next attach is refused by A's TTP. B's own attachment is untouched.
    alice.revoke(&domain.id, "vm-x").await.unwrap();
    assert!(vms_of(a_cp.get_json("/v1/attachments").await.unwrap()).is_empty(), "vm-x detached on revoke");
    assert!(!on_b.exists(), "vm-x no longer sees the domain");
    let refused = alice.attach(&domain.id, "vm-x", AccessMode::Ro, 300).await.unwrap_err();
    assert_eq!(refused.code(), Some("vm_not_in_acl"), "{refused}");
    assert_eq!(std::fs::read_to_string(&b_record).unwrap(), "cardiology, written in cloud B\n");
    assert_eq!(vms_of(b_cp.get_json("/v1/attachments").await.unwrap()), ["vm-b1"]);

    // Another host of B (its TLS name is accepted, its TPM is of B's vendor) may not enroll
    // at A's TTP: A trusts B's vendor root for b-compute-07 only. Audited like any refusal.
    let before = skydd_testkit::audit::records(&a.ttp.service).len();
    let other = LabHost::start(&b.dir, &b.pki, "b-compute-08", &b.tpm_vendor_ca(), &a.ttp.url).unwrap();
    let code = ttp_code(other.host.enroll(&PcrSelection::default_host()).await);
    assert_eq!(code, "ek_root_not_for_host");
    skydd_testkit::audit::assert_audited(&a.ttp.service, before, "enroll_begin", "ek_root_not_for_host");

    // The host's own decision on a cloud platform, by name and root: A's is the partner's,
    // B's the home one; a certificate of A's root under another name (here refused in TLS
    // already, by the root's limit) is neither.
    let cloud_platform_of = |pki: &skydd::lab::LabPki, name: &str| {
        let pem = std::fs::read_to_string(pki.dir.join(format!("{name}.pem"))).unwrap();
        let der = protocol::pki::single_cert_der(&pem, "certificate").unwrap();
        let caller = net::Identity { name: name.to_string(), role: Role::CloudPlatform };
        shared.service.cloud_of(&caller, &[der.into()])
    };
    assert_eq!(cloud_platform_of(&a.pki, "cloud-platform").unwrap(), Cloud::Partner("cloud-a".into()));
    assert_eq!(cloud_platform_of(&b.pki, "cloud-platform").unwrap(), Cloud::Home);
    a.pki.issue(Role::CloudPlatform, "cloud-platform-2").unwrap();
    let refused = cloud_platform_of(&a.pki, "cloud-platform-2").unwrap_err();
    assert_eq!(refused.refusal().code(), "forbidden");
    assert!(
        refused.to_string().contains("neither this host's home cloud platform nor a configured [[partner]]"),
        "{refused}"
    );

    bob.detach(&b_domain.id, "vm-b1").await.unwrap();
    clouds.stop().await;
    println!("whole story in {:?}", started.elapsed());
}
