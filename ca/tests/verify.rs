//! Certificates of this CA as `protocol::pki` verifies them: identities, rustls
//! configurations and revocation of a signer.

use protocol::pki::{
    certs_from_pem, client_config, encode_role_extension, identity_from_certificate, server_config, single_cert_der,
    RevocationReason, Role, ROLE_EXTENSION_OID,
};
use rcgen::{CertificateParams, CustomExtension, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use skydd_ca::{CertificateAuthority, Validity};
use time::OffsetDateTime;
use zeroize::Zeroizing;

fn ca() -> (String, Zeroizing<String>) {
    CertificateAuthority::generate("Test Cloud CA").unwrap()
}

#[test]
fn certificate_without_role_is_not_an_identity() {
    let (ca_pem, _) = ca();
    let der = certs_from_pem(&ca_pem, "ca").unwrap().remove(0);
    let e = identity_from_certificate(&der).unwrap_err().to_string();
    assert!(e.contains("no CN") || e.contains("not a Skydd name") || e.contains("no Skydd role"), "{e}");
    // A plain rcgen certificate with a good CN but no extension.
    let mut p = CertificateParams::new(vec!["plain".into()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "plain");
    let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let c = p.self_signed(&k).unwrap();
    let e = identity_from_certificate(c.der()).unwrap_err().to_string();
    assert!(e.contains("carries no Skydd role extension (1.3.6.1.4.1.4200000000.1.1)"), "{e}");
    // OU disagreeing with the extension.
    let mut p = CertificateParams::new(vec!["mixed".into()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "mixed");
    p.distinguished_name.push(DnType::OrganizationalUnitName, "ttp");
    p.custom_extensions
        .push(CustomExtension::from_oid_content(ROLE_EXTENSION_OID, encode_role_extension(Role::DomainManager)));
    let c = p.self_signed(&k).unwrap();
    let e = identity_from_certificate(c.der()).unwrap_err().to_string();
    assert!(e.contains("role domain-manager in its extension but OU \"ttp\""), "{e}");
}

#[test]
fn configs_build_and_refuse_bad_input() {
    let (ca_pem, ca_key) = ca();
    let id = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "ttp", Validity::Days(5)).unwrap();
    let cas = vec![ca_pem.clone()];
    server_config(&cas, &[], &id.cert_pem, &id.key_pem, &[Role::SecureComponent]).unwrap();
    client_config(&cas, &[], &id.cert_pem, &id.key_pem, Role::CloudPlatform).unwrap();
    let e = server_config(&cas, &[], &id.cert_pem, &id.key_pem, &[]).unwrap_err();
    assert!(e.to_string().contains("no client role is allowed"));
    let e = server_config::<String>(&[], &[], &id.cert_pem, &id.key_pem, &[Role::Ttp]).unwrap_err();
    assert!(e.to_string().contains("no trusted CA"));
    let other = CertificateAuthority::issue(&ca_pem, &ca_key, Role::Ttp, "ttp", Validity::Days(5)).unwrap();
    let e = server_config(&cas, &[], &id.cert_pem, &other.key_pem, &[Role::Ttp]).unwrap_err();
    assert!(e.to_string().contains("do not fit together"), "{e}");
}

#[test]
fn a_revoked_signer_is_refused_and_an_unlisted_one_accepted() {
    let (ca_pem, ca_key) = ca();
    let alice =
        CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "alice", Validity::Days(60)).unwrap();
    let bob = CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "bob", Validity::Days(60)).unwrap();
    let entry =
        CertificateAuthority::revocation_entry(&ca_pem, &alice.cert_pem, RevocationReason::AffiliationChanged).unwrap();
    let crl = CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 2, &[entry], 30).unwrap();
    let cas = vec![ca_pem.clone()];
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let der = |pem: &str| single_cert_der(pem, "signer").unwrap();
    let e = protocol::signing::verify_signer_certificate(&der(&alice.cert_pem), &cas, std::slice::from_ref(&crl), now)
        .unwrap_err();
    assert!(e.to_string().contains("certificate is revoked"), "{e}");
    let bob_id =
        protocol::signing::verify_signer_certificate(&der(&bob.cert_pem), &cas, std::slice::from_ref(&crl), now)
            .unwrap();
    assert_eq!(bob_id.name, "bob");
    // Without the list, alice still verifies: the list is what revokes.
    protocol::signing::verify_signer_certificate(&der(&alice.cert_pem), &cas, &[], now).unwrap();
    // A list past its next update revokes everything: it can no longer be trusted to be complete.
    let later = now + 31 * 86_400;
    let e = protocol::signing::verify_signer_certificate(&der(&bob.cert_pem), &cas, &[crl], later).unwrap_err();
    assert!(e.to_string().contains("past its next update"), "{e}");
}
