//! The TPM objects the TTP parses from a host's evidence (docs/TPM.md "Objects in the host
//! TPM" and "Wire formats"): AK and binding key publics, object names, TPMS_ATTEST and its
//! ECDSA signature, and RSA publics for OAEP.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::encrypt::Encrypter;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public as PublicKeyKind};
use openssl::rsa::{Padding, Rsa};
use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, RsaSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{Attest, EccScheme, Public, RsaScheme, Signature};
use tss_esapi::traits::UnMarshall;

use crate::error::{Error, Result};

/// TPM_GENERATED_VALUE: every TPMS_ATTEST starts with it, so a restricted AK never signs
/// anything that looks like an attestation but was not made by the TPM.
pub(super) const TPM_GENERATED: [u8; 4] = [0xff, 0x54, 0x43, 0x47];
pub(super) const TPM_ST_ATTEST_CERTIFY: [u8; 2] = [0x80, 0x17];
pub(super) const TPM_ST_ATTEST_QUOTE: [u8; 2] = [0x80, 0x18];
pub(super) const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0b];

pub(super) fn check_ak_public(ak_public: &[u8]) -> Result<()> {
    let public = Public::unmarshall(ak_public)
        .map_err(|e| Error::BadRequest(format!("the AK public is not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Ecc { object_attributes: attrs, name_hashing_algorithm, parameters, .. } = &public else {
        return Err(Error::BadRequest("the AK is not an ECC key (expected ECC P-256 ECDSA-SHA256)".into()));
    };
    if *name_hashing_algorithm != HashingAlgorithm::Sha256
        || !attrs.fixed_tpm()
        || !attrs.fixed_parent()
        || !attrs.sensitive_data_origin()
        || !attrs.restricted()
        || !attrs.sign_encrypt()
        || attrs.decrypt()
        || parameters.ecc_curve() != EccCurve::NistP256
        || !matches!(parameters.ecc_scheme(), EccScheme::EcDsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256)
    {
        return Err(Error::BadRequest(
            "the AK is not a TPM-generated, fixedTPM, restricted ECC P-256 ECDSA-SHA256 signing key".into(),
        ));
    }
    Ok(())
}

/// Checks the binding key's attributes and returns its authPolicy.
pub(super) fn check_binding_public(binding_public: &[u8]) -> Result<Vec<u8>> {
    let public = Public::unmarshall(binding_public)
        .map_err(|e| Error::BindingKeyInvalid(format!("not a marshalled TPMT_PUBLIC: {e}")))?;
    let Public::Rsa { object_attributes: a, name_hashing_algorithm, auth_policy, parameters, .. } = &public else {
        return Err(Error::BindingKeyInvalid("it is not an RSA key".into()));
    };
    let mut problems = Vec::new();
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        problems.push("nameAlg is not sha256");
    }
    if !a.fixed_tpm() {
        problems.push("fixedTPM is clear");
    }
    if !a.fixed_parent() {
        problems.push("fixedParent is clear");
    }
    if !a.sensitive_data_origin() {
        problems.push("sensitiveDataOrigin is clear (the key was imported)");
    }
    if a.user_with_auth() {
        problems.push("userWithAuth is set (its authValue could bypass the PCR policy)");
    }
    if !a.decrypt() {
        problems.push("decrypt is clear");
    }
    if a.sign_encrypt() {
        problems.push("sign is set");
    }
    if a.restricted() {
        problems.push("restricted is set");
    }
    if parameters.key_bits() != RsaKeyBits::Rsa2048 {
        problems.push("it is not RSA-2048");
    }
    match parameters.rsa_scheme() {
        RsaScheme::Null => {}
        RsaScheme::Oaep(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        other if other.algorithm() == RsaSchemeAlgorithm::Oaep => problems.push("its OAEP hash is not sha256"),
        _ => problems.push("its scheme is not OAEP"),
    }
    if auth_policy.value().len() != 32 {
        problems.push("its authPolicy is not a sha256 policy digest");
    }
    if !problems.is_empty() {
        return Err(Error::BindingKeyInvalid(problems.join("; ")));
    }
    Ok(auth_policy.value().to_vec())
}

/// Name of an object: nameAlg || H_nameAlg(TPMT_PUBLIC). Only sha256 names are accepted
/// (checked where the publics are parsed).
pub(super) fn object_name(public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_vec();
    name.extend_from_slice(&Sha256::digest(public));
    name
}

pub(super) fn ak_verifying_key(ak_public: &[u8]) -> std::result::Result<EcKey<PublicKeyKind>, String> {
    let public = Public::unmarshall(ak_public).map_err(|e| format!("the AK public is unparsable: {e}"))?;
    let Public::Ecc { unique, .. } = &public else {
        return Err("the AK is not an ECC key".into());
    };
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(|e| e.to_string())?;
    let x = BigNum::from_slice(unique.x().value()).map_err(|e| e.to_string())?;
    let y = BigNum::from_slice(unique.y().value()).map_err(|e| e.to_string())?;
    EcKey::from_public_key_affine_coordinates(&group, &x, &y)
        .map_err(|e| format!("the AK's point is not on P-256: {e}"))
}

pub(super) fn verify_attest_signature(
    ak: &EcKey<PublicKeyKind>,
    attest: &[u8],
    signature: &[u8],
) -> std::result::Result<(), String> {
    let signature =
        Signature::unmarshall(signature).map_err(|e| format!("the signature is not a TPMT_SIGNATURE: {e}"))?;
    let Signature::EcDsa(sig) = signature else {
        return Err("the signature is not ECDSA".into());
    };
    if sig.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err("the signature is not ECDSA-SHA256".into());
    }
    let r = BigNum::from_slice(sig.signature_r().value()).map_err(|e| e.to_string())?;
    let s = BigNum::from_slice(sig.signature_s().value()).map_err(|e| e.to_string())?;
    let sig = EcdsaSig::from_private_components(r, s).map_err(|e| e.to_string())?;
    let digest = Sha256::digest(attest);
    match sig.verify(&digest, ak) {
        Ok(true) => Ok(()),
        _ => Err("the signature does not verify with the AK".into()),
    }
}

/// Checks magic and type on the signed bytes, then parses them.
pub(super) fn parse_attest(bytes: &[u8], kind: [u8; 2], what: &str) -> std::result::Result<Attest, String> {
    if bytes.len() < 6 || bytes[0..4] != TPM_GENERATED {
        return Err(format!("the {what} attest does not start with TPM_GENERATED_VALUE: not made by a TPM"));
    }
    if bytes[4..6] != kind {
        return Err(format!("the attest is of type 0x{}, not a {what}", hex::encode(&bytes[4..6])));
    }
    Attest::unmarshall(bytes).map_err(|e| format!("the {what} attest is malformed: {e}"))
}

pub(super) fn rsa_public(public: &Public) -> std::result::Result<Rsa<PublicKeyKind>, String> {
    let Public::Rsa { parameters, unique, .. } = public else {
        return Err("not an RSA key".into());
    };
    let n = BigNum::from_slice(unique.value()).map_err(|e| e.to_string())?;
    // An exponent of 0 in a TPMT_PUBLIC means the default, 65537.
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let e = BigNum::from_u32(exponent).map_err(|e| e.to_string())?;
    Rsa::from_public_components(n, e).map_err(|e| e.to_string())
}

pub(super) fn oaep_encrypt(
    rsa: &Rsa<PublicKeyKind>,
    plaintext: &[u8],
    label: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let pkey = PKey::from_rsa(rsa.clone()).map_err(|e| e.to_string())?;
    let mut encrypter = Encrypter::new(&pkey).map_err(|e| e.to_string())?;
    encrypter.set_rsa_padding(Padding::PKCS1_OAEP).map_err(|e| e.to_string())?;
    encrypter.set_rsa_oaep_md(MessageDigest::sha256()).map_err(|e| e.to_string())?;
    encrypter.set_rsa_mgf1_md(MessageDigest::sha256()).map_err(|e| e.to_string())?;
    encrypter.set_rsa_oaep_label(label).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; encrypter.encrypt_len(plaintext).map_err(|e| e.to_string())?];
    let n = encrypter.encrypt(plaintext, &mut out).map_err(|e| e.to_string())?;
    out.truncate(n);
    Ok(out)
}
