//! Domain key derivation (docs/PROTOCOL.md "Key derivation"):
//!
//! `K = HKDF-SHA256(ikm = K_TTP, salt = r, info)`, 64 bytes, with
//! `info = "skydd/v1/volume-key" || lp(domain_id) || lp(H(meta)) || cipher_spec`
//! where `lp(x)` is a big-endian u32 length followed by x. This is the paper's
//! `PRF(meta || r, K_TTP)` with unambiguous encoding and domain separation.

use hkdf::Hkdf;
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::secret::SecretBytes;

/// Domain-separation label at the start of the HKDF `info`, so no other Skydd derivation
/// from `K_TTP` can produce a volume key.
pub const VOLUME_KEY_LABEL: &[u8] = b"skydd/v1/volume-key";
/// Domain-separation label of the sector-tag key `K_mac` of a format-2 volume.
pub const SECTOR_MAC_KEY_LABEL: &[u8] = b"skydd/v2/sector-mac-key";
/// Length of `K_mac`: a 256-bit BLAKE3 key.
pub const SECTOR_MAC_KEY_BYTES: usize = 32;
/// What a key release wraps: the volume key followed by `K_mac` (docs/PROTOCOL.md "Key release").
pub const RELEASED_KEYS_BYTES: usize = VOLUME_KEY_BYTES + SECTOR_MAC_KEY_BYTES;
/// Length of a derived domain key: 64 bytes, the AES-256-XTS key (key1 for data, key2 for
/// the tweak; docs/FORMAT.md "Data area").
pub const VOLUME_KEY_BYTES: usize = 64;
/// Length of the TTP master key `K_TTP` (32 bytes); any other length is `Error::InvalidKey`.
pub const MASTER_KEY_BYTES: usize = 32;
/// Length of the per-domain nonce `r` (32 bytes), the HKDF salt. The TTP draws it at
/// version 1; it lives only in the volume header, so destroying both header slots
/// crypto-shreds the domain.
pub const NONCE_BYTES: usize = 32;

/// The HKDF `info` string for a domain.
pub fn volume_key_info(domain_id: &str, metadata_hash: &[u8; 32], cipher_spec: &str) -> Vec<u8> {
    key_info(VOLUME_KEY_LABEL, domain_id, metadata_hash, cipher_spec)
}

fn key_info(label: &[u8], domain_id: &str, metadata_hash: &[u8; 32], cipher_spec: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(label.len() + domain_id.len() + 40 + cipher_spec.len());
    info.extend_from_slice(label);
    info.extend_from_slice(&(domain_id.len() as u32).to_be_bytes());
    info.extend_from_slice(domain_id.as_bytes());
    info.extend_from_slice(&(metadata_hash.len() as u32).to_be_bytes());
    info.extend_from_slice(metadata_hash);
    info.extend_from_slice(cipher_spec.as_bytes());
    info
}

/// Derives the 64-byte AES-256-XTS key of a domain into locked memory.
pub fn derive_volume_key(
    master_key: &SecretBytes,
    nonce_r: &[u8; NONCE_BYTES],
    domain_id: &str,
    metadata_hash: &[u8; 32],
    cipher_spec: &str,
) -> Result<SecretBytes> {
    expand(master_key, nonce_r, &volume_key_info(domain_id, metadata_hash, cipher_spec), VOLUME_KEY_BYTES)
}

/// Derives the 32-byte sector-tag key `K_mac` of a domain (format 2) into locked memory.
pub fn derive_sector_mac_key(
    master_key: &SecretBytes,
    nonce_r: &[u8; NONCE_BYTES],
    domain_id: &str,
    metadata_hash: &[u8; 32],
    cipher_spec: &str,
) -> Result<SecretBytes> {
    let info = key_info(SECTOR_MAC_KEY_LABEL, domain_id, metadata_hash, cipher_spec);
    expand(master_key, nonce_r, &info, SECTOR_MAC_KEY_BYTES)
}

fn expand(master_key: &SecretBytes, nonce_r: &[u8; NONCE_BYTES], info: &[u8], len: usize) -> Result<SecretBytes> {
    if master_key.len() != MASTER_KEY_BYTES {
        return Err(Error::InvalidKey(format!("K_TTP must be {MASTER_KEY_BYTES} bytes, got {}", master_key.len())));
    }
    let hkdf = Hkdf::<Sha256>::new(Some(nonce_r), master_key.expose());
    let mut key = SecretBytes::zeroed(len);
    hkdf.expand(info, key.expose_mut()).map_err(|_| Error::InvalidKey("HKDF output length rejected".into()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::md::Md;
    use openssl::pkey::Id;
    use openssl::pkey_ctx::PkeyCtx;

    /// HKDF computed by OpenSSL, independently of the RustCrypto `hkdf` crate.
    fn openssl_hkdf(ikm: &[u8], salt: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut ctx = PkeyCtx::new_id(Id::HKDF).unwrap();
        ctx.derive_init().unwrap();
        ctx.set_hkdf_md(Md::sha256()).unwrap();
        ctx.set_hkdf_key(ikm).unwrap();
        ctx.set_hkdf_salt(salt).unwrap();
        ctx.add_hkdf_info(info).unwrap();
        let mut out = vec![0u8; len];
        ctx.derive(Some(&mut out)).unwrap();
        out
    }

    /// The published test vector of docs/PROTOCOL.md.
    #[test]
    fn published_vector_matches_openssl() {
        let master = SecretBytes::from_slice_wiping(&mut [0x0bu8; 32]);
        let r = [0x5au8; 32];
        let meta_hash: [u8; 32] = {
            use sha2::Digest;
            Sha256::digest(b"").into()
        };
        let domain_id = "00112233445566778899aabbccddeeff";
        let key = derive_volume_key(&master, &r, domain_id, &meta_hash, "aes-xts-plain64:512:4096").unwrap();
        let info = volume_key_info(domain_id, &meta_hash, "aes-xts-plain64:512:4096");
        assert_eq!(key.expose(), openssl_hkdf(&[0x0b; 32], &r, &info, 64).as_slice());
        assert_eq!(hex::encode(key.expose()), PUBLISHED_VECTOR_1);
    }

    #[test]
    fn sector_mac_key_is_its_own_hkdf_output() {
        let master = SecretBytes::from_slice_wiping(&mut [0x0bu8; 32]);
        let (r, meta_hash, id) = ([0x5au8; 32], [7u8; 32], "00112233445566778899aabbccddeeff");
        let mac = derive_sector_mac_key(&master, &r, id, &meta_hash, "c").unwrap();
        let mut info = SECTOR_MAC_KEY_LABEL.to_vec();
        info.extend_from_slice(&volume_key_info(id, &meta_hash, "c")[VOLUME_KEY_LABEL.len()..]);
        assert_eq!(mac.expose(), openssl_hkdf(&[0x0b; 32], &r, &info, 32).as_slice());
        let volume = derive_volume_key(&master, &r, id, &meta_hash, "c").unwrap();
        assert_ne!(&volume.expose()[..32], mac.expose(), "the labels separate the two keys");
    }

    #[test]
    fn random_inputs_match_openssl() {
        for _ in 0..32 {
            let mut raw: [u8; 32] = rand::random();
            let copy = raw;
            let master = SecretBytes::from_slice_wiping(&mut raw);
            let r: [u8; 32] = rand::random();
            let meta_hash: [u8; 32] = rand::random();
            let domain_id = hex::encode(rand::random::<[u8; 16]>());
            let key = derive_volume_key(&master, &r, &domain_id, &meta_hash, "aes-xts-plain64:512:4096").unwrap();
            let info = volume_key_info(&domain_id, &meta_hash, "aes-xts-plain64:512:4096");
            assert_eq!(key.expose(), openssl_hkdf(&copy, &r, &info, 64).as_slice());
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let master = SecretBytes::from_slice_wiping(&mut [1u8; 32]);
        let other_master = SecretBytes::from_slice_wiping(&mut [2u8; 32]);
        let id = "00112233445566778899aabbccddeeff";
        let base = derive_volume_key(&master, &[0; 32], id, &[0; 32], "c").unwrap();
        let variants = [
            derive_volume_key(&other_master, &[0; 32], id, &[0; 32], "c").unwrap(),
            derive_volume_key(&master, &[1; 32], id, &[0; 32], "c").unwrap(),
            derive_volume_key(&master, &[0; 32], "00112233445566778899aabbccddeefe", &[0; 32], "c").unwrap(),
            derive_volume_key(&master, &[0; 32], id, &[1; 32], "c").unwrap(),
            derive_volume_key(&master, &[0; 32], id, &[0; 32], "d").unwrap(),
        ];
        for variant in variants {
            assert!(!base.ct_eq(variant.expose()));
        }
    }

    pub(crate) const PUBLISHED_VECTOR_1: &str = "283d4f282643a4a2677d3a55c07367ef4f31fa8d161224325561cb04693f91b92508eb3e2fdc08f7afefdc2fc140f1e854c2ae54d67edd0cfacd5464077570a3";
}
