//! The volume key K computed independently of `protocol::kdf`: OpenSSL's HKDF-SHA256 over
//! the info string built here by hand from docs/PROTOCOL.md, "Key derivation". A test that
//! compares what the TTP released with this value checks the derivation, not just that the
//! two sides of the protocol agree with each other.

use openssl::md::Md;
use openssl::pkey::Id;
use openssl::pkey_ctx::PkeyCtx;
use protocol::messages::Registration;

/// K = HKDF-SHA256(ikm = the TTP's master key, salt = the registration's r,
/// info = "skydd/v1/volume-key" || lp(domain_id) || lp(H(meta)) || cipher spec), 64 bytes.
pub fn independent_key(
    master: &[u8],
    registration: &Registration,
    domain_id: &str,
    metadata_hash: &[u8; 32],
) -> Vec<u8> {
    let mut info = b"skydd/v1/volume-key".to_vec();
    info.extend_from_slice(&(domain_id.len() as u32).to_be_bytes());
    info.extend_from_slice(domain_id.as_bytes());
    info.extend_from_slice(&32u32.to_be_bytes());
    info.extend_from_slice(metadata_hash);
    info.extend_from_slice(b"aes-xts-plain64:512:4096");
    let mut ctx = PkeyCtx::new_id(Id::HKDF).expect("OpenSSL has HKDF");
    ctx.derive_init().expect("HKDF derive init");
    ctx.set_hkdf_md(Md::sha256()).expect("HKDF digest");
    ctx.set_hkdf_key(master).expect("HKDF key");
    ctx.set_hkdf_salt(&registration.nonce_r).expect("HKDF salt");
    ctx.add_hkdf_info(&info).expect("HKDF info");
    let mut out = vec![0u8; 64];
    ctx.derive(Some(&mut out)).expect("HKDF derive");
    out
}
