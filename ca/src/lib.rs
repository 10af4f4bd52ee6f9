//! Skydd's certificate authority: generating the cloud CA, issuing the certificates every
//! party presents, and revoking them with signed revocation lists (docs/PKI.md).
//!
//! Only what signs lives here, so that only the CA tool (`cloud-platform ca`), the loopback
//! lab and tests link a certificate generator (rcgen). Everything a verifier needs (roles,
//! the role extension, identities, reading revocation lists, the rustls configurations) is
//! in `protocol::pki`; errors are `protocol`'s, so a caller handles one error type for both.
//!
//! No I/O here: PEM strings in, PEM strings out. Keys are returned in [`zeroize::Zeroizing`]
//! buffers and never appear in an error.

#![warn(missing_docs)]

mod issue;
mod revoke;
mod signing_ca;
mod validity;

pub use issue::IssuedIdentity;
pub use revoke::DEFAULT_CRL_DAYS;
pub use validity::{Validity, CA_DAYS, DEFAULT_LEAF_DAYS};

/// The cloud certificate authority: [`generate`](Self::generate) a CA,
/// [`issue`](Self::issue) certificates with it, [`revocation_entry`](Self::revocation_entry)
/// and [`sign_revocation_list`](Self::sign_revocation_list) to revoke them. Stateless: every
/// call takes the CA certificate (and key) as PEM.
pub struct CertificateAuthority;
