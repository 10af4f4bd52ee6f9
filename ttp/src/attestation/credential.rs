//! TPM2_MakeCredential in software (TPM 2.0 Part 1, 24 "Credential Protection"; docs/TPM.md
//! "MakeCredential"): a secret only TPM2_ActivateCredential with this EK, for this AK name,
//! recovers.

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public as PublicKeyKind};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use openssl::symm::{encrypt, Cipher};
use protocol::secret::SecretBytes;
use sha2::Sha256;

use super::objects::oaep_encrypt;
use super::random;
use crate::error::{Error, Result};

/// Returns (TPM2B_ID_OBJECT contents, TPM2B_ENCRYPTED_SECRET contents) for `credential`
/// and the AK name, decryptable only by TPM2_ActivateCredential with this EK.
pub(super) fn make_credential(
    ek: &Rsa<PublicKeyKind>,
    credential: &[u8],
    ak_name: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let fail = |e: String| Error::EkMismatch(format!("MakeCredential to the EK failed: {e}"));
    // The seed is as long as the EK's nameAlg digest; it goes to the EK with OAEP and the
    // label "IDENTITY" (with its terminating zero).
    let mut seed = SecretBytes::zeroed(32);
    random(seed.expose_mut())?;
    let encrypted_secret = oaep_encrypt(ek, seed.expose(), b"IDENTITY\0").map_err(fail)?;

    let sym_key = kdfa_sha256(seed.expose(), b"STORAGE", ak_name, &[], 128);
    let hmac_key = kdfa_sha256(seed.expose(), b"INTEGRITY", &[], &[], 256);

    // encIdentity = AES-128-CFB(symKey, IV = 0, TPM2B_DIGEST(credential)).
    let mut plain = SecretBytes::zeroed(2 + credential.len());
    plain.expose_mut()[..2].copy_from_slice(&(credential.len() as u16).to_be_bytes());
    plain.expose_mut()[2..].copy_from_slice(credential);
    let enc_identity = encrypt(Cipher::aes_128_cfb128(), sym_key.expose(), Some(&[0u8; 16]), plain.expose())
        .map_err(|e| fail(e.to_string()))?;

    // outerHMAC = HMAC(HMACkey, encIdentity || AK name).
    let hkey = PKey::hmac(hmac_key.expose()).map_err(|e| fail(e.to_string()))?;
    let mut signer = Signer::new(MessageDigest::sha256(), &hkey).map_err(|e| fail(e.to_string()))?;
    signer.update(&enc_identity).map_err(|e| fail(e.to_string()))?;
    signer.update(ak_name).map_err(|e| fail(e.to_string()))?;
    let integrity = signer.sign_to_vec().map_err(|e| fail(e.to_string()))?;

    let mut blob = Vec::with_capacity(2 + integrity.len() + enc_identity.len());
    blob.extend_from_slice(&(integrity.len() as u16).to_be_bytes());
    blob.extend_from_slice(&integrity);
    blob.extend_from_slice(&enc_identity);
    Ok((blob, encrypted_secret))
}

/// KDFa (TPM 2.0 Part 1, 11.4.10.2) with HMAC-SHA256: counter || label || 0 || contextU ||
/// contextV || bits, iterated until `bits` are produced.
fn kdfa_sha256(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> SecretBytes {
    use hmac::{Hmac, Mac};
    let bytes = bits.div_ceil(8) as usize;
    let mut out = SecretBytes::zeroed(bytes);
    let mut counter = 1u32;
    let mut filled = 0;
    while filled < bytes {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else { unreachable!("HMAC accepts keys of any length") };
        for part in [&counter.to_be_bytes()[..], label, &[0], context_u, context_v, &bits.to_be_bytes()] {
            mac.update(part);
        }
        let block = mac.finalize().into_bytes();
        let take = (bytes - filled).min(block.len());
        out.expose_mut()[filled..filled + take].copy_from_slice(&block[..take]);
        filled += take;
        counter += 1;
    }
    out
}
