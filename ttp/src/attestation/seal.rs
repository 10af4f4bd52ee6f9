//! Sealing a released domain key to a host: RSA-OAEP to its PCR-bound binding key, which
//! only that TPM, in the enrolled state, can use (docs/TPM.md "Quotes and key release").

use protocol::attest::BINDING_OAEP_LABEL;
use protocol::secret::SecretBytes;
use tss_esapi::structures::Public;
use tss_esapi::traits::UnMarshall;

use super::objects::{oaep_encrypt, rsa_public};
use super::HostRecord;
use crate::error::{Error, Result};

/// Encrypts `key` (a key release's K || K_mac) to the host's binding key: RSA-OAEP, SHA-256
/// and MGF1-SHA-256, label [`BINDING_OAEP_LABEL`]. Only that TPM, with the host's PCRs in the
/// enrolled state, can decrypt it.
pub fn seal_key_to_host(host: &HostRecord, key: &SecretBytes) -> Result<Vec<u8>> {
    let public = Public::unmarshall(&host.binding_public)
        .map_err(|e| Error::BindingKeyInvalid(format!("host {}: stored binding key unparsable: {e}", host.host_id)))?;
    let rsa = rsa_public(&public).map_err(Error::BindingKeyInvalid)?;
    oaep_encrypt(&rsa, key.expose(), BINDING_OAEP_LABEL)
        .map_err(|e| Error::BindingKeyInvalid(format!("host {}: sealing to the binding key failed: {e}", host.host_id)))
}
