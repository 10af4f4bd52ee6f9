//! Entry points for the fuzz targets in `fuzz/` (docs/SECURITY-TESTING.md): each runs, on
//! untrusted bytes, the parsers the TTP applies to a host's enrollment and quote evidence,
//! which otherwise sit behind a signature check the fuzzer cannot pass. Not an API.

use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::Public as PublicKeyKind;
use tss_esapi::structures::{AttestInfo, Public};
use tss_esapi::traits::UnMarshall;

use super::ek::check_ek_extensions;
use super::objects::{
    ak_verifying_key, check_ak_public, check_binding_public, rsa_public, verify_attest_signature,
    TPM_ST_ATTEST_CERTIFY, TPM_ST_ATTEST_QUOTE,
};

/// TPMS_ATTEST as a quote and as a certify, then the fields the TTP reads from it.
pub fn parse_attest(bytes: &[u8]) {
    for (kind, what) in [(TPM_ST_ATTEST_QUOTE, "TPM2_Quote"), (TPM_ST_ATTEST_CERTIFY, "TPM2_Certify")] {
        let Ok(attest) = super::objects::parse_attest(bytes, kind, what) else { continue };
        let _ = attest.extra_data().value().len();
        match attest.attested() {
            AttestInfo::Quote { info } => {
                for selection in info.pcr_selection().get_selections() {
                    let _ = selection.hashing_algorithm();
                    let _: Vec<u8> =
                        selection.selected().into_iter().map(|slot| u32::from(slot).trailing_zeros() as u8).collect();
                }
                let _ = info.pcr_digest().value().len();
            }
            AttestInfo::Certify { info } => {
                let _ = info.name().value().len();
            }
            _ => {}
        }
    }
}

/// TPMT_PUBLIC as an EK, an AK and a binding key.
pub fn parse_public(bytes: &[u8]) {
    let _ = check_ak_public(bytes);
    let _ = check_binding_public(bytes);
    let _ = ak_verifying_key(bytes);
    if let Ok(public) = Public::unmarshall(bytes) {
        let _ = rsa_public(&public);
    }
}

/// TPMT_SIGNATURE, checked against a fixed P-256 key.
pub fn parse_signature(bytes: &[u8]) {
    static AK: std::sync::OnceLock<Option<EcKey<PublicKeyKind>>> = std::sync::OnceLock::new();
    let ak = AK.get_or_init(|| {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok()?;
        let private = EcKey::generate(&group).ok()?;
        EcKey::from_public_key(&group, private.public_key()).ok()
    });
    if let Some(ak) = ak {
        let _ = verify_attest_signature(ak, b"attest", bytes);
    }
}

/// The TCG extensions of an EK certificate (DER), as checked after its chain.
pub fn check_ek_certificate_extensions(certificate_der: &[u8]) {
    let _ = check_ek_extensions(certificate_der);
}
