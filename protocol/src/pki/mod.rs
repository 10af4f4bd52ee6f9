//! Skydd's PKI as every party verifies it: the identity (name + role) every certificate
//! carries, the revocation lists that withdraw certificates, and the rustls configurations
//! that enforce both on every link. Issuing certificates and signing revocation lists is the
//! CA's alone: that lives in the crate `skydd-ca`, so only the CA tool links a certificate
//! generator.
//!
//! No I/O here: PEM strings and DER bytes in, identities and rustls configurations out.
//! The byte-level profile is documented in docs/PKI.md.
//!
//! # How the role is carried
//! Every end-entity certificate carries its [`Role`] twice:
//! - authoritatively, in the non-critical private extension [`ROLE_EXTENSION_OID`] whose
//!   extnValue is the DER of `SkyddRole ::= SEQUENCE { version INTEGER (1), role UTF8String }`;
//! - for humans (`openssl x509 -text`), as the subject OU.
//!
//! [`identity_from_certificate`] requires the extension, requires the OU (when present) to
//! agree with it, and takes the name from the single subject CN. Nothing is guessed from the
//! name, the SANs or the issuer.
//!
//! # Where each piece lives (one module per concept, all re-exported here)
//! - `role`: the four kinds of party; `role_extension`: their DER encoding in a certificate;
//! - `name`: which names a certificate may carry;
//! - `identity`: the identity read out of a certificate;
//! - `affiliation`: the organisation and role (OrBAC) a domain manager's certificate may carry;
//! - `revocation`: revocation reasons and reading a signed list;
//! - `pem`: PEM to DER;
//! - `trusted_root`: the trusted CA roots and the roles (and names) each may issue;
//! - `tls_config`: the rustls client and server configurations; `verifier`: the
//!   certificate checks they run;
//! - `tls_error`: TLS errors in words.

mod affiliation;
mod identity;
mod name;
mod pem;
mod revocation;
mod role;
mod role_extension;
mod tls_config;
mod tls_error;
mod trusted_root;
mod verifier;

pub use affiliation::{
    affiliation_from_certificate, decode_affiliation_extension, encode_affiliation_extension, Affiliation,
    AFFILIATION_EXTENSION_OID, AFFILIATION_EXTENSION_VERSION, MAX_ORGANISATION_LEN, MAX_ORGANISATION_ROLE_LEN,
};
pub use identity::{identity_from_certificate, Identity};
pub use name::{check_ca_name, check_dns_name, check_name, MAX_NAME_LEN};
pub use pem::{certs_from_pem, crls_from_pems, single_cert_der};
pub use revocation::{read_revocation_list, RevocationList, RevocationReason, RevokedCertificate};
pub use role::Role;
pub use role_extension::{decode_role_extension, encode_role_extension, ROLE_EXTENSION_OID, ROLE_EXTENSION_VERSION};
pub use tls_config::{client_config, client_config_without_certificate, server_config};
pub use tls_error::{describe_tls_error, rfc3339, unix_seconds_rfc3339};
pub use trusted_root::{NamePattern, RoleAllowance, RootLimit, TrustedRoot};
pub use verifier::{client_cert_verifier, RoleRefused};
