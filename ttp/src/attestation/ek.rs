//! The endorsement key (docs/TPM.md "EK certificate checks"): its certificate chains to a
//! trusted TPM vendor CA, is not revoked and carries the TCG extensions; its public is the
//! TCG default RSA-2048 EK holding the certificate's key.

use openssl::pkey::Public as PublicKeyKind;
use openssl::rsa::Rsa;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{CrlStatus, X509Crl, X509StoreContext, X509};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{Public, SymmetricDefinitionObject};
use tss_esapi::traits::UnMarshall;

use super::objects::rsa_public;
use super::AttestationPolicy;
use crate::error::{Error, Result};

/// The TCG default EK policy (PolicySecret(TPM_RH_ENDORSEMENT)), SHA-256.
const EK_POLICY_A_SHA256: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52, 0xd7,
    0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// X.509 OIDs of TCG EK certificates (TCG EK Credential Profile 2.x).
const OID_TCG_KP_EK_CERTIFICATE: &str = "2.23.133.8.1";
const OID_TCG_TPM_MANUFACTURER: &str = "2.23.133.2.1";
const OID_TCG_TPM_MODEL: &str = "2.23.133.2.2";
const OID_TCG_TPM_VERSION: &str = "2.23.133.2.3";

/// Verifies the EK certificate of `host_id` chains to a trusted root that may vouch for that
/// host (a root limited to named hosts, [`EkRoot::hosts`](super::EkRoot), vouches for no
/// other: `ek_root_not_for_host`), and handles the TCG-specific extensions deliberately: the
/// critical subjectAltName must be a directoryName naming the TPM (manufacturer, model,
/// version), keyUsage must allow keyEncipherment, an extendedKeyUsage (if present) must be
/// tcg-kp-EKCertificate, and any other critical extension is refused. Returns a description
/// of the TPM.
pub fn verify_ek_certificate(policy: &AttestationPolicy, certificate_der: &[u8], host_id: &str) -> Result<String> {
    let certificate = X509::from_der(certificate_der)
        .map_err(|e| Error::EkUntrusted(format!("the EK certificate is not DER X.509: {e}")))?;
    if policy.trusted_ek_roots.is_empty() {
        return Err(Error::EkUntrusted("the attestation policy trusts no EK CA (trusted_ek_roots is empty)".into()));
    }
    let for_this_host: Vec<_> = policy.trusted_ek_roots.iter().filter(|root| root.vouches_for(host_id)).collect();
    let (verified, error, chain) = verify_chain(policy, &for_this_host, &certificate)?;
    let issuer = name_text(certificate.issuer_name());
    if !verified {
        // Does it chain to a root this host may not use? Say so rather than "untrusted".
        if for_this_host.len() < policy.trusted_ek_roots.len() {
            let all: Vec<_> = policy.trusted_ek_roots.iter().collect();
            if let (true, _, chain) = verify_chain(policy, &all, &certificate)? {
                let anchor = chain.last().map(|root| name_text(root.subject_name())).unwrap_or_default();
                let anchor_der = chain.last().and_then(|root| root.to_der().ok()).unwrap_or_default();
                let hosts = policy
                    .trusted_ek_roots
                    .iter()
                    .find(|root| root.certificate == anchor_der)
                    .and_then(|root| root.hosts.clone())
                    .unwrap_or_default();
                return Err(Error::EkRootNotForHost(format!(
                    "the EK certificate of host {host_id} issued by '{issuer}' chains only to EK CA '{anchor}', which the \
                     attestation policy trusts for host(s) {} only",
                    hosts.join(", ")
                )));
            }
        }
        return Err(Error::EkUntrusted(format!(
            "the EK certificate issued by '{issuer}' does not chain to a trusted EK CA: {}",
            error.error_string()
        )));
    }
    check_ek_revocation(policy, &chain)?;
    check_ek_extensions(certificate_der)
}

/// OpenSSL's chain verification of `certificate` to `roots` (with the policy's
/// intermediates): whether it verified, the error if not, and the verified chain (EK first,
/// root last).
fn verify_chain(
    policy: &AttestationPolicy,
    roots: &[&super::EkRoot],
    certificate: &X509,
) -> Result<(bool, openssl::x509::X509VerifyResult, Vec<X509>)> {
    let mut store = X509StoreBuilder::new().map_err(|e| Error::Config(format!("X509 store: {e}")))?;
    for (i, root) in roots.iter().enumerate() {
        let root = X509::from_der(&root.certificate)
            .map_err(|e| Error::Config(format!("trusted EK CA {i} is not DER X.509: {e}")))?;
        store.add_cert(root).map_err(|e| Error::Config(format!("trusted EK CA {i}: {e}")))?;
    }
    let store = store.build();
    let mut chain = Stack::new().map_err(|e| Error::Config(format!("X509 stack: {e}")))?;
    for (i, der) in policy.ek_intermediates.iter().enumerate() {
        let cert =
            X509::from_der(der).map_err(|e| Error::Config(format!("ek_intermediates[{i}] is not DER X.509: {e}")))?;
        chain.push(cert).map_err(|e| Error::Config(format!("ek_intermediates[{i}]: {e}")))?;
    }
    let mut context = X509StoreContext::new().map_err(|e| Error::Config(format!("X509 store context: {e}")))?;
    context
        .init(&store, certificate, &chain, |c| {
            let ok = c.verify_cert()?;
            let verified: Vec<X509> =
                c.chain().map(|chain| chain.iter().map(|cert| cert.to_owned()).collect()).unwrap_or_default();
            Ok((ok, c.error(), verified))
        })
        .map_err(|e| Error::EkUntrusted(format!("verifying the EK certificate chain: {e}")))
}

/// Checks each certificate of the verified chain (EK first, root last) against the
/// configured CRL of its issuer, if there is one. A list that does not verify with the
/// issuer's key or is past its nextUpdate fails closed.
fn check_ek_revocation(policy: &AttestationPolicy, chain: &[X509]) -> Result<()> {
    if policy.ek_crls.is_empty() {
        return Ok(());
    }
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|e| Error::Config(format!("clock: {e}")))?;
    for pair in chain.windows(2) {
        let (cert, issuer) = (&pair[0], &pair[1]);
        let issuer_der = issuer.subject_name().to_der().map_err(|e| Error::Config(format!("EK CA name: {e}")))?;
        for (i, der) in policy.ek_crls.iter().enumerate() {
            let crl = X509Crl::from_der(der)
                .map_err(|e| Error::Config(format!("ek_crls[{i}] is not a DER X.509 CRL: {e}")))?;
            if crl.issuer_name().to_der().ok().as_deref() != Some(issuer_der.as_slice()) {
                continue;
            }
            let issuer_name = name_text(issuer.subject_name());
            let key = issuer.public_key().map_err(|e| Error::Config(format!("EK CA '{issuer_name}' key: {e}")))?;
            if !crl.verify(&key).unwrap_or(false) {
                return Err(Error::EkUntrusted(format!(
                    "ek_crls[{i}] names issuer '{issuer_name}' but is not signed by its key; refusing rather than skipping the revocation check"
                )));
            }
            if crl.next_update().is_none_or(|next| *next < now) {
                return Err(Error::EkUntrusted(format!(
                    "the revocation list of EK CA '{issuer_name}' (ek_crls[{i}]) is past its nextUpdate; refusing until a current list is configured"
                )));
            }
            if !matches!(crl.get_by_cert(cert), CrlStatus::NotRevoked) {
                return Err(Error::EkUntrusted(format!(
                    "the certificate '{}' issued by '{issuer_name}' is revoked (ek_crls[{i}])",
                    name_text(cert.subject_name())
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn check_ek_extensions(certificate_der: &[u8]) -> Result<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(certificate_der)
        .map_err(|e| Error::EkUntrusted(format!("the EK certificate cannot be parsed: {e}")))?;
    let mut description = None;
    let mut key_encipherment = None;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let mut fields = Vec::new();
                for name in &san.general_names {
                    if let GeneralName::DirectoryName(dn) = name {
                        for attr in dn.iter_attributes() {
                            let what = match attr.attr_type().to_id_string().as_str() {
                                OID_TCG_TPM_MANUFACTURER => "manufacturer",
                                OID_TCG_TPM_MODEL => "model",
                                OID_TCG_TPM_VERSION => "version",
                                _ => continue,
                            };
                            let value = attr
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|_| hex::encode(attr.attr_value().data));
                            fields.push(format!("{what} {value}"));
                        }
                    }
                }
                if fields.is_empty() {
                    return Err(Error::EkUntrusted(
                        "the EK certificate's subjectAltName names no TPM (no TCG manufacturer/model/version attributes)".into(),
                    ));
                }
                description = Some(fields.join(", "));
            }
            ParsedExtension::KeyUsage(usage) => key_encipherment = Some(usage.key_encipherment()),
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let tcg = eku.other.iter().any(|o| o.to_id_string() == OID_TCG_KP_EK_CERTIFICATE);
                if !tcg {
                    return Err(Error::EkUntrusted(format!(
                        "the EK certificate's extendedKeyUsage lacks tcg-kp-EKCertificate ({OID_TCG_KP_EK_CERTIFICATE})"
                    )));
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(Error::EkUntrusted("the EK certificate is a CA certificate".into()));
            }
            ParsedExtension::BasicConstraints(_)
            | ParsedExtension::AuthorityKeyIdentifier(_)
            | ParsedExtension::SubjectKeyIdentifier(_)
            | ParsedExtension::CertificatePolicies(_)
            | ParsedExtension::AuthorityInfoAccess(_)
            | ParsedExtension::CRLDistributionPoints(_) => {}
            _ if ext.critical => {
                return Err(Error::EkUntrusted(format!("the EK certificate has an unknown critical extension {oid}")));
            }
            // Non-critical extras (e.g. subjectDirectoryAttributes with the TPM spec) are informational.
            _ => {}
        }
    }
    // TCG EK Credential Profile 2.x, 3.2.16: keyUsage must be present; an RSA EK decrypts
    // (MakeCredential seeds), so keyEncipherment must be set.
    match key_encipherment {
        None => {
            return Err(Error::EkUntrusted(
                "the EK certificate has no keyUsage extension (the TCG EK profile requires one)".into(),
            ))
        }
        Some(false) => {
            return Err(Error::EkUntrusted("the EK certificate's keyUsage does not allow keyEncipherment".into()))
        }
        Some(true) => {}
    }
    description.ok_or_else(|| Error::EkUntrusted("the EK certificate has no subjectAltName naming the TPM".into()))
}

pub(super) fn ek_description(certificate_der: &[u8]) -> Option<String> {
    check_ek_extensions(certificate_der).ok()
}

fn name_text(name: &openssl::x509::X509NameRef) -> String {
    name.entries().map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned()).collect::<Vec<_>>().join(", ")
}

/// The EK public must be the TCG default RSA-2048 EK (its KDF parameters are what
/// MakeCredential relies on) and carry the certificate's key.
pub(super) fn check_ek_public(certificate_der: &[u8], ek_public: &[u8]) -> Result<Rsa<PublicKeyKind>> {
    let public = Public::unmarshall(ek_public)
        .map_err(|e| Error::EkMismatch(format!("the EK public is not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Rsa { object_attributes: attrs, name_hashing_algorithm, auth_policy, parameters, .. } = &public else {
        return Err(Error::EkMismatch("the EK public is not an RSA key (only the RSA-2048 EK is supported)".into()));
    };
    if *name_hashing_algorithm != HashingAlgorithm::Sha256
        || !attrs.fixed_tpm()
        || !attrs.fixed_parent()
        || !attrs.restricted()
        || !attrs.decrypt()
        || attrs.sign_encrypt()
        || parameters.key_bits() != RsaKeyBits::Rsa2048
        || parameters.symmetric_definition_object() != SymmetricDefinitionObject::AES_128_CFB
        || auth_policy.value() != EK_POLICY_A_SHA256
    {
        return Err(Error::EkMismatch(
            "the EK public is not the TCG default RSA-2048 EK template (sha256, fixedTPM, restricted decrypt, AES-128-CFB, PolicySecret(endorsement))".into(),
        ));
    }
    let ek_rsa = rsa_public(&public).map_err(Error::EkMismatch)?;
    let cert = X509::from_der(certificate_der).map_err(|e| Error::EkMismatch(format!("EK certificate: {e}")))?;
    let cert_rsa = cert
        .public_key()
        .and_then(|k| k.rsa())
        .map_err(|_| Error::EkMismatch("the EK certificate does not hold an RSA key".into()))?;
    if cert_rsa.n() != ek_rsa.n() || cert_rsa.e() != ek_rsa.e() {
        return Err(Error::EkMismatch("the EK public's modulus differs from the key in the EK certificate".into()));
    }
    Ok(ek_rsa)
}
#[cfg(test)]
mod tests {
    use super::*;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    /// docs/TPM.md "EK certificate checks": the TCG EK profile requires keyUsage; a certificate without it is refused
    /// (as is one whose keyUsage lacks keyEncipherment).
    #[test]
    fn ek_certificate_without_key_usage_is_refused() {
        use openssl::x509::extension::KeyUsage;
        let make = |key_usage: Option<KeyUsage>| {
            let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
            let mut b = openssl::x509::X509Builder::new().unwrap();
            b.set_version(2).unwrap();
            b.set_pubkey(&key).unwrap();
            b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
            b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
            // keyUsage is checked before the subjectAltName, so none is needed here.
            if let Some(mut ku) = key_usage {
                b.append_extension(ku.critical().build().unwrap()).unwrap();
            }
            b.sign(&key, MessageDigest::sha256()).unwrap();
            b.build().to_der().unwrap()
        };
        let err = check_ek_extensions(&make(None)).unwrap_err();
        assert!(err.to_string().contains("no keyUsage"), "{err}");
        let mut signing_only = KeyUsage::new();
        signing_only.digital_signature();
        let err = check_ek_extensions(&make(Some(signing_only))).unwrap_err();
        assert!(err.to_string().contains("keyEncipherment"), "{err}");
    }

    /// A CA and an EK-like certificate it issued (no TCG extensions: the chain is what counts).
    fn ca_and_leaf() -> (Vec<u8>, Vec<u8>) {
        use openssl::x509::extension::BasicConstraints;
        use openssl::x509::X509NameBuilder;
        let name = |cn: &str| {
            let mut n = X509NameBuilder::new().unwrap();
            n.append_entry_by_text("CN", cn).unwrap();
            n.build()
        };
        let build = |subject: &str,
                     issuer: &str,
                     key: &PKey<openssl::pkey::Private>,
                     signer: &PKey<openssl::pkey::Private>,
                     ca: bool| {
            let mut b = openssl::x509::X509Builder::new().unwrap();
            b.set_version(2).unwrap();
            b.set_subject_name(&name(subject)).unwrap();
            b.set_issuer_name(&name(issuer)).unwrap();
            b.set_pubkey(key).unwrap();
            b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
            b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
            if ca {
                b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
            }
            b.sign(signer, MessageDigest::sha256()).unwrap();
            b.build().to_der().unwrap()
        };
        let ca_key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let leaf_key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        (
            build("Vendor B EK CA", "Vendor B EK CA", &ca_key, &ca_key, true),
            build("ek", "Vendor B EK CA", &leaf_key, &ca_key, false),
        )
    }

    /// docs/PKI.md "A partner cloud's host": an EK CA limited to named hosts vouches for those
    /// only; another host whose EK chains only to it is refused with its own code, naming the
    /// CA and its hosts. Listed plainly too, the CA vouches for every host.
    #[test]
    fn an_ek_root_limited_to_hosts_vouches_for_those_only() {
        let (ca, leaf) = ca_and_leaf();
        let limited = AttestationPolicy {
            trusted_ek_roots: crate::attestation::EkRoot::only_for_each(vec![ca.clone()], &["b-compute-07"]),
            ..Default::default()
        };
        let err = verify_ek_certificate(&limited, &leaf, "b-compute-08").unwrap_err();
        assert_eq!(err.code(), "ek_root_not_for_host", "{err}");
        assert!(err.to_string().contains("Vendor B EK CA") && err.to_string().contains("b-compute-07"), "{err}");
        // The named host passes the chain (and then meets the TCG extension checks).
        let err = verify_ek_certificate(&limited, &leaf, "b-compute-07").unwrap_err();
        assert_eq!(err.code(), "ek_untrusted", "{err}");
        assert!(err.to_string().contains("keyUsage"), "past the chain: {err}");
        let mut both = limited.clone();
        both.trusted_ek_roots.push(crate::attestation::EkRoot::every_host(ca));
        let err = verify_ek_certificate(&both, &leaf, "b-compute-08").unwrap_err();
        assert!(err.to_string().contains("keyUsage"), "a plainly listed CA vouches for every host: {err}");
        // A certificate of no listed CA stays `ek_untrusted`.
        let (_, stranger) = ca_and_leaf();
        let err = verify_ek_certificate(&limited, &stranger, "b-compute-08").unwrap_err();
        assert_eq!(err.code(), "ek_untrusted", "{err}");
    }
}
