//! Host attestation at the TTP, all in software (the TTP has no TPM): EK certificate
//! chains, TPM2_MakeCredential, TPM2_Certify and TPM2_Quote verification, PolicyPCR digests,
//! and sealing domain keys to a host's binding key. docs/TPM.md has the byte formats.
//!
//! TPM structures are (un)marshalled with tss-esapi; all cryptography is openssl. One module
//! per concept; what other crates use is re-exported here:
//!
//! - `policy`: what the operator trusts (EK CAs, reference states);
//! - `enrollment`: the two enrollment steps and the [`HostRecord`] they yield;
//! - `quote`: the quote check of every key release;
//! - `seal`: encrypting a released key to the host's binding key;
//! - `ek`: the EK certificate and EK public;
//! - `credential`: TPM2_MakeCredential in software;
//! - `objects`: parsing AK and binding key publics, attests and their signatures;
//! - `pcr`: PCR selections, composite and PolicyPCR digests.

#[doc(hidden)]
pub mod fuzzing;

mod credential;
mod ek;
mod enrollment;
mod objects;
mod pcr;
mod policy;
mod quote;
mod seal;

pub use ek::verify_ek_certificate;
pub use enrollment::{begin_enrollment, finish_enrollment, HostRecord, PendingEnrollment};
pub use pcr::{check_not_resettable, policy_pcr_digest};
pub use policy::{reference_state_from_values, AttestationPolicy, EkRoot, ReferenceState};
pub use quote::verify_quote;
pub use seal::seal_key_to_host;

use crate::error::{Error, Result};

/// Fills `buf` from openssl's CSPRNG (nonces, credential secrets, MakeCredential seeds).
fn random(buf: &mut [u8]) -> Result<()> {
    openssl::rand::rand_bytes(buf).map_err(|e| Error::Config(format!("the random number generator failed: {e}")))
}
