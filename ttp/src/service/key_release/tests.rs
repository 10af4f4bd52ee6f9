//! Every refusal of [`Ttp::release_key`], one test each, and the release itself. The host is
//! real TPM evidence recorded once from a swtpm (`ttp/tests/vectors/attested_host.json`,
//! re-recorded by `cargo test -p ttp --test record_vectors -- --ignored`): an enrolled
//! [`HostRecord`], its reference state and its quote over a known nonce. A test plants a
//! challenge with that nonce in the store, so the quote check runs for real without a TPM.
//! Each refusal is also checked in the audit chain: the last record is a `key_release` with
//! the refusal's code.

use protocol::domain::{descriptor_hash, AccessMode, AclEntry, Descriptor};
use protocol::kdf::{derive_sector_mac_key, derive_volume_key, RELEASED_KEYS_BYTES, VOLUME_KEY_BYTES};
use protocol::messages::{
    grant_digest, Deletion, HeaderRecord, KeyReleaseRequest, MountGrant, Registration, MAX_GRANT_VALIDITY_SECS,
    MAX_PLACEMENT_AGE_SECS, PLACEMENT_CLOCK_SKEW_SECS,
};
use protocol::pki::{Identity, Role};
use protocol::secret::SecretBytes;
use protocol::signing::SignatureContext;

use crate::service::test_support::fixture::{assert_mentions, register, Fixture, HOST, OTHER_VM, OWNER, RO_VM, VM};
use crate::store::now_unix;

// ---- the caller --------------------------------------------------------------------------

/// A malformed host id is refused and audited without it, and the refusal does not repeat it.
#[test]
fn malformed_host_id_is_bad_request_audited_without_it() {
    let f = Fixture::new();
    let hostile = format!("{HOST}\n{}", "x".repeat(4096));
    let error = f.refused(&KeyReleaseRequest { host_id: hostile, ..f.request() }, "bad_request");
    assert_mentions(&error, "host_id");
    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert!(record.message.len() < 200, "the refusal does not repeat the id: {}", record.message);
    assert_eq!((record.host_id, record.vm_id.as_deref()), (None, Some(VM)));
}

/// A malformed VM id (empty, or with a space) is refused and audited without it.
#[test]
fn malformed_vm_id_is_bad_request_audited_without_it() {
    let f = Fixture::new();
    for vm_id in ["", "vm a"] {
        let error = f.refused(&KeyReleaseRequest { vm_id: vm_id.into(), ..f.request() }, "bad_request");
        assert_mentions(&error, "vm_id");
        let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
        assert_eq!((record.host_id.as_deref(), record.vm_id), (Some(HOST), None));
    }
}

/// Only a secure component may ask for a key: a cloud-platform certificate is `forbidden`.
#[test]
fn caller_without_secure_component_role_is_forbidden() {
    let f = Fixture::new();
    let cloud = Identity { name: HOST.into(), role: Role::CloudPlatform };
    let error = f.refused_for(&cloud, &f.request(), "forbidden");
    assert_mentions(&error, "secure-component");
}

/// A secure component asks only for its own host: another host's id is `forbidden`.
#[test]
fn request_for_another_host_than_the_caller_is_forbidden() {
    let f = Fixture::new();
    let other = Identity { name: "compute-2".into(), role: Role::SecureComponent };
    let error = f.refused_for(&other, &f.request(), "forbidden");
    assert_mentions(&error, "claims host compute-1");
}

// ---- 1. the host ---------------------------------------------------------------------------

/// A host that never enrolled is `host_unknown`.
#[test]
fn unenrolled_host_is_host_unknown() {
    let f = Fixture::new();
    let stranger = Identity { name: "compute-2".into(), role: Role::SecureComponent };
    let request = KeyReleaseRequest { host_id: "compute-2".into(), ..f.request() };
    f.refused_for(&stranger, &request, "host_unknown");
}

/// A challenge the TTP never issued is `challenge_invalid`.
#[test]
fn unknown_challenge_is_challenge_invalid() {
    let f = Fixture::new();
    let error =
        f.refused(&KeyReleaseRequest { challenge_id: "0123456789abcdef".into(), ..f.request() }, "challenge_invalid");
    assert_mentions(&error, "unknown or was already used");
}

/// A challenge is single use: the same one again (after a granted release) is `challenge_invalid`.
#[test]
fn reused_challenge_is_challenge_invalid() {
    let f = Fixture::new();
    let request = f.request();
    f.release(&request).expect("the first use is granted");
    let error = f.refused(&request, "challenge_invalid");
    assert_mentions(&error, "unknown or was already used");
}

/// A challenge issued to another host is `challenge_invalid`.
#[test]
fn challenge_of_another_host_is_challenge_invalid() {
    let f = Fixture::new();
    let challenge_id = f.plant_challenge("compute-2", &f.nonce, now_unix() + 60);
    let error = f.refused(&KeyReleaseRequest { challenge_id, ..f.request() }, "challenge_invalid");
    assert_mentions(&error, "was issued to compute-2");
}

/// An expired challenge is `challenge_invalid`.
#[test]
fn expired_challenge_is_challenge_invalid() {
    let f = Fixture::new();
    let challenge_id = f.plant_challenge(HOST, &f.nonce, now_unix() - 1);
    let error = f.refused(&KeyReleaseRequest { challenge_id, ..f.request() }, "challenge_invalid");
    assert_mentions(&error, "expired");
}

/// A genuine quote over another nonce than the challenge's (a replayed quote) is `challenge_invalid`.
#[test]
fn quote_over_another_nonce_is_challenge_invalid() {
    let f = Fixture::new();
    let challenge_id = f.plant_challenge(HOST, &[0x17; 32], now_unix() + 60);
    let error = f.refused(&KeyReleaseRequest { challenge_id, ..f.request() }, "challenge_invalid");
    assert_mentions(&error, "another nonce");
}

/// A quote whose signature does not verify with the host's AK is `quote_invalid`.
#[test]
fn quote_with_a_broken_signature_is_quote_invalid() {
    let f = Fixture::new();
    let mut quote = f.quote.clone();
    *quote.signature.last_mut().unwrap() ^= 0x01;
    let error = f.refused(&KeyReleaseRequest { quote, ..f.request() }, "quote_invalid");
    assert_mentions(&error, "does not verify with the AK");
}

/// A quote of other PCR values than the host's reference state is `pcr_mismatch`, naming the PCR.
#[test]
fn quote_of_other_pcr_values_is_pcr_mismatch() {
    let f = Fixture::with_reference_state(|state| {
        let (_, value) = state.pcr_values.iter_mut().find(|(index, _)| *index == 11).unwrap();
        value[0] ^= 0xff;
    });
    let error = f.refused(&f.request(), "pcr_mismatch");
    assert_mentions(&error, "PCR 11 differs from reference state 'compute-v1'");
}

// ---- 2. the header -------------------------------------------------------------------------

/// A descriptor naming the owner but signed by someone else is `descriptor_signature_invalid`.
#[test]
fn descriptor_not_signed_by_its_owner_is_descriptor_signature_invalid() {
    let f = Fixture::new();
    let mallory = f.key(Role::DomainManager, "dm-mallory");
    let descriptor = mallory.sign_envelope(SignatureContext::Descriptor, f.descriptor.encode().unwrap());
    let header = HeaderRecord { descriptor, ..f.header.clone() };
    let error = f.refused(&KeyReleaseRequest { header, ..f.request() }, "descriptor_signature_invalid");
    assert_mentions(&error, "signed by dm-mallory");
}

/// Another domain's registration beside this descriptor is `registration_mismatch`.
#[test]
fn registration_of_another_domain_is_registration_mismatch() {
    let f = Fixture::new();
    let other = Descriptor::new(OWNER, Default::default(), Vec::new()).unwrap();
    let other_header = register(&f.ttp, &f.owner, &other, None);
    let header = HeaderRecord { registration: other_header.registration, ..f.header.clone() };
    let error = f.refused(&KeyReleaseRequest { header, ..f.request() }, "registration_mismatch");
    assert_mentions(&error, "is not the registration of this descriptor");
}

/// A header whose domain the TTP does not know (a registration it never stored) is `domain_unknown`.
#[test]
fn header_of_an_unknown_domain_is_domain_unknown() {
    let f = Fixture::new();
    let unknown =
        Descriptor::new(OWNER, Default::default(), vec![AclEntry { vm_id: VM.into(), mode: AccessMode::Rw }]).unwrap();
    let descriptor = f.owner.sign_envelope(SignatureContext::Descriptor, unknown.encode().unwrap());
    let registration = Registration {
        domain_id: unknown.domain_id.clone(),
        version: 1,
        descriptor_hash: descriptor_hash(&descriptor.message),
        metadata_hash: unknown.metadata_hash(),
        nonce_r: [1; 32],
        registered_at: now_unix(),
        key_generation: 1,
    };
    let registration = f.key(Role::Ttp, "ttp-1").sign_envelope(SignatureContext::Registration, registration.encode());
    let request =
        KeyReleaseRequest { header: HeaderRecord { descriptor, registration, rotation: None }, ..f.request() };
    let error = f.refused(&request, "domain_unknown");
    assert_mentions(&error, &unknown.domain_id);
}

/// A domain its owner deleted is `domain_deleted`.
#[test]
fn deleted_domain_is_domain_deleted() {
    let f = Fixture::new();
    let deletion = Deletion { domain_id: f.descriptor.domain_id.clone(), requested_at: now_unix() };
    let deletion = f.owner.sign_envelope(SignatureContext::Deletion, deletion.encode());
    f.ttp.delete_domain(&f.host(), &deletion).unwrap();
    f.refused(&f.request(), "domain_deleted");
}

/// A header older than the newest registered version is `version_rollback`.
#[test]
fn header_of_an_older_version_is_version_rollback() {
    let f = Fixture::new();
    let v2 = f.descriptor.next_version(|d| d.acl.retain(|entry| entry.vm_id != VM)).unwrap();
    register(&f.ttp, &f.owner, &v2, Some(f.header.registration.clone()));
    let error = f.refused(&f.request(), "version_rollback");
    assert_mentions(&error, "version 2 is the newest");
}

// ---- 3. access ----------------------------------------------------------------------------

/// A VM the access list does not name is `vm_not_in_acl`.
#[test]
fn vm_not_in_the_access_list_is_vm_not_in_acl() {
    let f = Fixture::new();
    let error = f.refused(&KeyReleaseRequest { vm_id: "vm-z".into(), ..f.request() }, "vm_not_in_acl");
    assert_mentions(&error, "vm-z is not in the access list");
}

/// `rw` for a VM the access list gives `ro` is `mode_not_permitted`.
#[test]
fn write_access_for_a_read_only_vm_is_mode_not_permitted() {
    let f = Fixture::new();
    let error = f.refused(&KeyReleaseRequest { vm_id: RO_VM.into(), ..f.request() }, "mode_not_permitted");
    assert_mentions(&error, "vm-ro has ro access");
}

// ---- 4. the grant -------------------------------------------------------------------------

/// A grant signed with a certificate of another role than domain-manager is `grant_signature_invalid`.
#[test]
fn grant_signed_with_another_role_is_grant_signature_invalid() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.operator, |_| {});
    let error = f.refused(&f.request_with_grant(grant), "grant_signature_invalid");
    assert_mentions(&error, "a domain-manager certificate is needed");
}

/// A grant naming the owner as issuer but signed by another manager is `grant_signature_invalid`.
#[test]
fn grant_naming_another_issuer_than_its_signer_is_grant_signature_invalid() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.key(Role::DomainManager, "dm-mallory"), |_| {});
    let error = f.refused(&f.request_with_grant(grant), "grant_signature_invalid");
    assert_mentions(&error, "names issuer dm-alice but is signed by dm-mallory");
}

/// A grant by a manager the domain is not shared with is `grant_signer_not_authorized`.
#[test]
fn grant_by_a_manager_the_domain_is_not_shared_with_is_grant_signer_not_authorized() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.key(Role::DomainManager, "dm-mallory"), |g| g.issuer = "dm-mallory".into());
    let error = f.refused(&f.request_with_grant(grant), "grant_signer_not_authorized");
    assert_mentions(&error, "dm-mallory is neither the owner");
}

/// A grant for another VM is `grant_mismatch`.
#[test]
fn grant_for_another_vm_is_grant_mismatch() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.owner, |g| g.vm_id = OTHER_VM.into());
    let error = f.refused(&f.request_with_grant(grant), "grant_mismatch");
    assert_mentions(&error, "the grant is for vm-b");
}

/// A grant for another domain is `grant_mismatch`.
#[test]
fn grant_for_another_domain_is_grant_mismatch() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.owner, |g| g.domain_id = "0123456789abcdef0123456789abcdef".into());
    let error = f.refused(&f.request_with_grant(grant), "grant_mismatch");
    assert_mentions(&error, "on domain 0123456789abcdef0123456789abcdef");
}

/// A `ro` grant for a `rw` request is `grant_mismatch`.
#[test]
fn read_only_grant_for_a_write_request_is_grant_mismatch() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.owner, |g| g.mode = AccessMode::Ro);
    let error = f.refused(&f.request_with_grant(grant), "grant_mismatch");
    assert_mentions(&error, "the grant allows ro only");
}

/// An expired grant is `grant_expired`.
#[test]
fn expired_grant_is_grant_expired() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.owner, |g| g.expires_at = now_unix() - 10);
    let error = f.refused(&f.request_with_grant(grant), "grant_expired");
    assert_mentions(&error, "expired");
}

/// A grant valid for longer than `MAX_GRANT_VALIDITY_SECS` is `grant_too_long`.
#[test]
fn grant_valid_for_too_long_is_grant_too_long() {
    let f = Fixture::new();
    let grant = f.grant_with(&f.owner, |g| g.expires_at = now_unix() + MAX_GRANT_VALIDITY_SECS + 100);
    let error = f.refused(&f.request_with_grant(grant), "grant_too_long");
    assert_mentions(&error, &format!("at most {MAX_GRANT_VALIDITY_SECS} s"));
}

// ---- 5. the placement -----------------------------------------------------------------------

/// A placement signed by a tenant (a domain-manager certificate) is `placement_invalid`.
#[test]
fn placement_signed_by_a_tenant_is_placement_invalid() {
    let f = Fixture::new();
    let error = f.refused_placement(|grant| f.place(&f.owner, VM, HOST, grant, now_unix()), "placement_invalid");
    assert_mentions(&error, "a cloud-platform certificate is needed");
}

/// A placement older than `MAX_PLACEMENT_AGE_SECS` is `placement_invalid`.
#[test]
fn placement_too_old_is_placement_invalid() {
    let f = Fixture::new();
    let error = f.refused_placement(
        |grant| f.place(&f.operator, VM, HOST, grant, now_unix() - MAX_PLACEMENT_AGE_SECS - 10),
        "placement_invalid",
    );
    assert_mentions(&error, &format!("at most {MAX_PLACEMENT_AGE_SECS} s are accepted"));
}

/// A placement dated beyond the allowed clock skew ahead is `placement_invalid`.
#[test]
fn placement_dated_in_the_future_is_placement_invalid() {
    let f = Fixture::new();
    let error = f.refused_placement(
        |grant| f.place(&f.operator, VM, HOST, grant, now_unix() + PLACEMENT_CLOCK_SKEW_SECS + 60),
        "placement_invalid",
    );
    assert_mentions(&error, "ahead of the TTP's clock");
}

/// A placement of the VM on another host is `placement_mismatch`.
#[test]
fn placement_on_another_host_is_placement_mismatch() {
    let f = Fixture::new();
    let error =
        f.refused_placement(|grant| f.place(&f.operator, VM, "compute-2", grant, now_unix()), "placement_mismatch");
    assert_mentions(&error, "placed vm-a on compute-2");
}

/// A placement of another VM on this host is `placement_mismatch`.
#[test]
fn placement_of_another_vm_is_placement_mismatch() {
    let f = Fixture::new();
    let error =
        f.refused_placement(|grant| f.place(&f.operator, OTHER_VM, HOST, grant, now_unix()), "placement_mismatch");
    assert_mentions(&error, "placed vm-b on compute-1");
}

/// A placement made for another grant is `placement_mismatch`.
#[test]
fn placement_for_another_grant_is_placement_mismatch() {
    let f = Fixture::new();
    let other_grant = f.grant_with(&f.owner, |_| {});
    let error = f.refused_placement(|_| f.place(&f.operator, VM, HOST, &other_grant, now_unix()), "placement_mismatch");
    assert_mentions(&error, "made for another grant");
}

/// A grant already used for a release is `grant_replayed`, even with a fresh challenge.
#[test]
fn grant_used_before_is_grant_replayed() {
    let f = Fixture::new();
    let request = f.request();
    f.release(&request).expect("the first use is granted");
    let again = KeyReleaseRequest { challenge_id: f.challenge(), ..request };
    let error = f.refused(&again, "grant_replayed");
    assert_mentions(&error, "every attach needs a new grant");
}

/// A grant is marked used only when everything else holds: a release refused at the
/// placement leaves it usable.
#[test]
fn grant_of_a_refused_release_stays_usable() {
    let f = Fixture::new();
    let request = f.request();
    let placement = f.place(&f.operator, VM, "compute-2", &request.grant, now_unix());
    f.refused(&KeyReleaseRequest { placement, ..request.clone() }, "placement_mismatch");
    f.release(&KeyReleaseRequest { challenge_id: f.challenge(), ..request }).expect("the grant is still usable");
}

// ---- 6. the release --------------------------------------------------------------------------

/// Everything holds: K is sealed to the host's binding key (RSA-2048), the release is audited
/// `ok` with the grant's and the placement's signers, and the grant is used up.
#[test]
fn attested_granted_placed_request_is_released_and_audited_ok() {
    let f = Fixture::new();
    let request = f.request();
    let response = f.release(&request).expect("granted");
    assert_eq!((response.domain_id.as_str(), response.version), (f.descriptor.domain_id.as_str(), 1));
    assert_eq!(response.wrapped_key.len(), 256, "RSA-OAEP to the 2048-bit binding key");
    assert!(response.integrity_anchor.is_none(), "no integrity root was committed yet");

    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!(record.seq, response.audit_seq);
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", "ok"));
    assert_eq!(
        (record.domain_id.as_deref(), record.host_id.as_deref(), record.vm_id.as_deref()),
        (Some(f.descriptor.domain_id.as_str()), Some(HOST), Some(VM))
    );
    assert!(record.message.contains("grant by dm-alice, placement by cp-1"), "{}", record.message);
    f.ttp.verify_audit_chain().unwrap();

    let grant = MountGrant::decode(&request.grant.message).unwrap();
    assert!(
        !f.ttp.store().consume_grant(&grant_digest(&request.grant), grant.expires_at).unwrap(),
        "the grant is marked used"
    );
}

/// The wrapped blob is K || K_mac (96 bytes): opened with the private half of a software
/// binding key, K is `derive_volume_key` and K_mac `derive_sector_mac_key` of the registration's
/// `r`, the domain id, H(meta) and the cipher spec, recomputed here from K_TTP.
#[test]
fn released_blob_is_the_volume_key_followed_by_the_sector_mac_key() {
    let f = Fixture::new();
    let binding_key = f.software_binding_key();
    let response = f.release(&f.request()).expect("granted");

    let pkey = openssl::pkey::PKey::from_rsa(binding_key).unwrap();
    let mut decrypter = openssl::encrypt::Decrypter::new(&pkey).unwrap();
    decrypter.set_rsa_padding(openssl::rsa::Padding::PKCS1_OAEP).unwrap();
    decrypter.set_rsa_oaep_md(openssl::hash::MessageDigest::sha256()).unwrap();
    decrypter.set_rsa_mgf1_md(openssl::hash::MessageDigest::sha256()).unwrap();
    decrypter.set_rsa_oaep_label(protocol::attest::BINDING_OAEP_LABEL).unwrap();
    let mut opened = vec![0; decrypter.decrypt_len(&response.wrapped_key).unwrap()];
    let len = decrypter.decrypt(&response.wrapped_key, &mut opened).unwrap();
    opened.truncate(len);
    assert_eq!(opened.len(), RELEASED_KEYS_BYTES);

    let registration = Registration::decode(&f.header.registration.message).unwrap();
    let master = SecretBytes::from_slice_wiping(&mut [7u8; 32]);
    let inputs = (&registration.nonce_r, f.descriptor.domain_id.as_str(), &f.descriptor.metadata_hash());
    let key = derive_volume_key(&master, inputs.0, inputs.1, inputs.2, &f.descriptor.cipher_spec).unwrap();
    let mac_key = derive_sector_mac_key(&master, inputs.0, inputs.1, inputs.2, &f.descriptor.cipher_spec).unwrap();
    assert_eq!(&opened[..VOLUME_KEY_BYTES], key.expose(), "K comes first");
    assert_eq!(&opened[VOLUME_KEY_BYTES..], mac_key.expose(), "K_mac follows");

    let record = f.ttp.store().audit_records(None).unwrap().pop().unwrap();
    assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", "ok"));
    assert!(!record.message.contains(&hex::encode(mac_key.expose())), "no key in the audit log");
}

// ---- key rotation --------------------------------------------------------------------------

/// After a rotation: the old header is stale (`version_rollback`), the rotating header is
/// served read-write only (`key_rotation_in_progress` otherwise), and a read-write release
/// carries both generations' keys, each derived from its own r.
#[test]
fn during_a_rotation_only_read_write_gets_both_keys() {
    use protocol::messages::{KeyRotation, RotateKeyRequest, RotationState};
    let f = Fixture::new();
    let binding_key = f.software_binding_key();
    // A format-1 domain beside the fixture's (format-2) one.
    let descriptor =
        Descriptor::new(OWNER, Default::default(), vec![AclEntry { vm_id: VM.into(), mode: AccessMode::Rw }]).unwrap();
    let header = register(&f.ttp, &f.owner, &descriptor, None);
    let id = descriptor.domain_id.clone();
    let request_for = |header: &HeaderRecord, mode: AccessMode| {
        let grant = f.grant_with(&f.owner, |g| g.domain_id = id.clone());
        KeyReleaseRequest { header: header.clone(), mode, ..f.request_with_grant(grant) }
    };
    let rotation = KeyRotation { domain_id: id.clone(), from_generation: 1, requested_at: 1 };
    let request = RotateKeyRequest {
        rotation: f.owner.sign_envelope(SignatureContext::KeyRotation, rotation.encode()),
        current_registration: header.registration.clone(),
    };
    let cp = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
    let error = f.ttp.rotate_key(&cp, &f.descriptor.domain_id, &request).unwrap_err();
    assert_eq!(error.code(), "bad_request", "{error}");
    let registration = f.ttp.rotate_key(&cp, &id, &request).unwrap().registration;

    let error = f.refused(&request_for(&header, AccessMode::Rw), "version_rollback");
    assert_mentions(&error, "key generation 1");
    let rotating = HeaderRecord {
        registration,
        rotation: Some(RotationState {
            previous_registration: header.registration.clone(),
            boundary: 0,
            hotzone: None,
        }),
        ..header.clone()
    };
    let error = f.refused(&request_for(&rotating, AccessMode::Ro), "key_rotation_in_progress");
    assert_mentions(&error, "only a read-write attach");

    let response = f.release(&request_for(&rotating, AccessMode::Rw)).expect("granted");
    let pkey = openssl::pkey::PKey::from_rsa(binding_key).unwrap();
    let open = |wrapped: &[u8]| {
        let mut decrypter = openssl::encrypt::Decrypter::new(&pkey).unwrap();
        decrypter.set_rsa_padding(openssl::rsa::Padding::PKCS1_OAEP).unwrap();
        decrypter.set_rsa_oaep_md(openssl::hash::MessageDigest::sha256()).unwrap();
        decrypter.set_rsa_mgf1_md(openssl::hash::MessageDigest::sha256()).unwrap();
        decrypter.set_rsa_oaep_label(protocol::attest::BINDING_OAEP_LABEL).unwrap();
        let mut opened = vec![0; decrypter.decrypt_len(wrapped).unwrap()];
        let len = decrypter.decrypt(wrapped, &mut opened).unwrap();
        opened.truncate(len);
        opened
    };
    let key_of = |envelope: &protocol::signing::SignedEnvelope| {
        let r = Registration::decode(&envelope.message).unwrap().nonce_r;
        let master = SecretBytes::from_slice_wiping(&mut [7u8; 32]);
        let meta = descriptor.metadata_hash();
        derive_volume_key(&master, &r, &id, &meta, &descriptor.cipher_spec).unwrap().expose().to_vec()
    };
    assert_eq!(&open(&response.wrapped_key)[..VOLUME_KEY_BYTES], key_of(&rotating.registration).as_slice());
    let previous = open(response.previous_wrapped_key.as_ref().expect("the previous generation's keys"));
    assert_eq!(&previous[..VOLUME_KEY_BYTES], key_of(&header.registration).as_slice());
    assert_ne!(key_of(&rotating.registration), key_of(&header.registration));
}
