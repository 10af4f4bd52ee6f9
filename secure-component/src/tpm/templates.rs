//! The public templates of the objects this host's TPM creates (docs/TPM.md "Objects in
//! the host TPM"): the TCG storage root key, the attestation key and the PCR-bound binding
//! key.

use super::*;

/// TCG ECC P-256 SRK template (TCG TPM v2.0 Provisioning Guidance, "Storage Root Key").
pub(super) fn srk_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| Error::tpm("SRK template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| Error::tpm("SRK template", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(vec![0u8; 32]).map_err(|e| Error::tpm("SRK template", e))?,
            EccParameter::try_from(vec![0u8; 32]).map_err(|e| Error::tpm("SRK template", e))?,
        ))
        .build()
        .map_err(|e| Error::tpm("SRK template", e))
}

/// AK: ECC P-256, ECDSA-SHA256, restricted signing (it signs only TPM-generated structures).
pub(super) fn ak_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| Error::tpm("AK template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()
                .map_err(|e| Error::tpm("AK template", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| Error::tpm("AK template", e))
}

/// Binding key: RSA-2048 OAEP-SHA256 decrypt-only; userWithAuth clear, so every use
/// (RSA_Decrypt) needs a PolicyPCR session that matches authPolicy; fixedTPM and fixedParent
/// so it can never be duplicated off this TPM.
///
/// adminWithPolicy is clear on purpose: with it set, the ADMIN role (needed by TPM2_Certify)
/// demands a policy session that also ran PolicyCommandCode, which a pure PolicyPCR policy
/// cannot satisfy (the TPM answers TPM_RC_POLICY_FAIL). The ADMIN role with the empty
/// authValue allows only Certify, ActivateCredential-as-object and ObjectChangeAuth, none of
/// which can decrypt (userWithAuth stays clear whatever the authValue) or move the key.
pub(super) fn binding_template(policy: Vec<u8>) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(false)
        .with_admin_with_policy(false)
        .with_no_da(true)
        .with_decrypt(true)
        .with_sign_encrypt(false)
        .with_restricted(false)
        .build()
        .map_err(|e| Error::tpm("binding key template", e))?;
    let scheme = RsaScheme::create(RsaSchemeAlgorithm::Oaep, Some(HashingAlgorithm::Sha256))
        .map_err(|e| Error::tpm("binding key template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(Digest::try_from(policy).map_err(|e| Error::tpm("binding key template", e))?)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_scheme(scheme)
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_decryption_key(true)
                .with_is_signing_key(false)
                .with_restricted(false)
                .build()
                .map_err(|e| Error::tpm("binding key template", e))?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(|e| Error::tpm("binding key template", e))
}
