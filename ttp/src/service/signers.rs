//! Checks of signed objects that remember what they proved (docs/PERFORMANCE.md "Key-release
//! decisions"). A key release carries four signed objects: the owner's descriptor and the
//! TTP's registration (the same for every release of a domain version), and a mount grant
//! and a placement (new each time, from the same few signers). Checked from scratch, each
//! costs a certificate verifier built from the CA and revocation-list PEMs, a chain check and
//! an ECDSA verification. Remembered here:
//!
//! - **the verifier**, per CA set, rebuilt when the revocation lists' contents change;
//! - **verified certificates** (by SHA-256 of the DER), forgotten whenever the revocation
//!   lists change, and checked against the clock on every use;
//! - **verified signatures** (by SHA-256 of context and envelope): a signature that verified
//!   once verifies forever, as it is pure arithmetic over the bytes hashed.
//!
//! The revocation lists are still read at every check (small files, in the page cache), so a
//! revocation the CA publishes counts from the next signed request on, as before.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::pki::{Identity, TrustedRoot};
use protocol::signing::{SignatureContext, SignedEnvelope};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};

/// Entries each memory holds before it starts afresh (bounded: a flood of distinct signed
/// objects costs CPU, never memory).
const MAX_REMEMBERED: usize = 16_384;

/// Which trust anchors a certificate must chain to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Anchors {
    /// Every trusted CA (own cloud's and federated partners', each within the roles it may
    /// issue): descriptors, grants, placements, deletions.
    Trusted,
    /// Only the CAs that issued this TTP's own certificate: registrations.
    Registration,
}

/// A certificate that passed the verifier, with the window in which it stays valid.
struct VerifiedCertificate {
    identity: Identity,
    not_before: i64,
    not_after: i64,
}

/// What was proved under one set of revocation lists.
#[derive(Default)]
struct UnderLists {
    /// SHA-256 over the revocation lists' contents this was proved under.
    lists_digest: Option<[u8; 32]>,
    verifiers: HashMap<Anchors, Arc<dyn ClientCertVerifier>>,
    certificates: HashMap<(Anchors, [u8; 32]), VerifiedCertificate>,
}

/// The TTP's signer checks (see the module documentation).
pub(super) struct SignerChecks {
    trusted_cas: Vec<TrustedRoot>,
    registration_cas: Vec<TrustedRoot>,
    revocation_lists: Vec<PathBuf>,
    under_lists: Mutex<UnderLists>,
    signatures: Mutex<HashSet<[u8; 32]>>,
    /// `false`: every check from scratch, as before this memory (the benchmark's peer).
    remember: bool,
}

impl SignerChecks {
    /// Checks under `trusted_cas` (and `registration_cas` for registrations); no revocation
    /// list until [`SignerChecks::set_revocation_lists`].
    pub(super) fn new(trusted_cas: Vec<impl Into<TrustedRoot>>, registration_cas: Vec<impl Into<TrustedRoot>>) -> Self {
        Self {
            trusted_cas: trusted_cas.into_iter().map(Into::into).collect(),
            registration_cas: registration_cas.into_iter().map(Into::into).collect(),
            revocation_lists: Vec::new(),
            under_lists: Mutex::default(),
            signatures: Mutex::default(),
            remember: true,
        }
    }

    /// Checks that remember nothing (the benchmark's peer).
    #[cfg(test)]
    pub(super) fn forgetting(mut self) -> Self {
        self.remember = false;
        self
    }

    /// Checks certificates against these revocation lists (PEM files) from now on.
    pub(super) fn set_revocation_lists(&mut self, files: Vec<PathBuf>) {
        self.revocation_lists = files;
        self.under_lists = Mutex::default();
    }

    /// The revocation lists as they are now. An unreadable list refuses every signature
    /// (fail closed): a revocation must not be skipped because a file went missing.
    fn current_lists(&self) -> protocol::Result<Vec<String>> {
        self.revocation_lists
            .iter()
            .map(|path| {
                net::read_pem_file(path).map_err(|e| {
                    protocol::Error::Certificate(format!(
                        "{e}; signed requests are refused until the revocation list can be read"
                    ))
                })
            })
            .collect()
    }

    /// The identity of a certificate chaining to `anchors`, valid at `now_unix` and not
    /// revoked by the current lists.
    pub(super) fn certificate(&self, anchors: Anchors, der: &[u8], now_unix: u64) -> protocol::Result<Identity> {
        let lists = self.current_lists()?;
        let mut digest = Sha256::new();
        for list in &lists {
            digest.update((list.len() as u64).to_be_bytes());
            digest.update(list.as_bytes());
        }
        let lists_digest: [u8; 32] = digest.finalize().into();
        let key = (anchors, <[u8; 32]>::from(Sha256::digest(der)));
        let now = i64::try_from(now_unix).unwrap_or(i64::MAX);

        let mut under = self.under_lists.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if under.lists_digest != Some(lists_digest) || !self.remember {
            // New lists (or the first check): nothing proved before counts.
            *under = UnderLists { lists_digest: Some(lists_digest), ..UnderLists::default() };
        }
        if let Some(known) = under.certificates.get(&key) {
            if known.not_before <= now && now <= known.not_after {
                return Ok(known.identity.clone());
            }
        }
        let verifier = match under.verifiers.get(&anchors) {
            Some(verifier) => verifier.clone(),
            None => {
                let cas = match anchors {
                    Anchors::Trusted => &self.trusted_cas,
                    Anchors::Registration => &self.registration_cas,
                };
                let verifier = protocol::pki::client_cert_verifier(cas, &lists)?;
                under.verifiers.insert(anchors, verifier.clone());
                verifier
            }
        };
        let identity = protocol::signing::verify_signer_certificate_with(verifier.as_ref(), der, now_unix)?;
        let (not_before, not_after) = validity(der)?;
        if under.certificates.len() >= MAX_REMEMBERED {
            under.certificates.clear();
        }
        under.certificates.insert(key, VerifiedCertificate { identity: identity.clone(), not_before, not_after });
        Ok(identity)
    }

    /// The envelope's signature verifies under its certificate's key in `context`.
    pub(super) fn signature(&self, envelope: &SignedEnvelope, context: SignatureContext) -> protocol::Result<()> {
        let mut digest = Sha256::new();
        digest.update(context.label().as_bytes());
        digest.update([0]);
        digest.update(envelope.encode());
        let key: [u8; 32] = digest.finalize().into();
        if self.remember && self.signatures.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(&key) {
            return Ok(());
        }
        envelope.verify_signature(context)?;
        let mut known = self.signatures.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(key);
        Ok(())
    }
}

/// A certificate's validity window in unix seconds.
fn validity(der: &[u8]) -> protocol::Result<(i64, i64)> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| protocol::Error::Certificate(format!("certificate does not parse: {e}")))?;
    let window = certificate.validity();
    Ok((window.not_before.timestamp(), window.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pki::{RevocationReason, Role};
    use skydd_ca::{CertificateAuthority, Validity};

    /// A CA, a manager's certificate (PEM, DER) from it, and checks under that CA with an
    /// empty revocation list in `dir`.
    fn lab(dir: &std::path::Path) -> (String, zeroize::Zeroizing<String>, String, Vec<u8>, SignerChecks) {
        let (ca_pem, ca_key) = CertificateAuthority::generate("cloud-ca").unwrap();
        let issued =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "dm-alice", Validity::Days(5)).unwrap();
        let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
        let crl = CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 1, &[], 30).unwrap();
        std::fs::write(dir.join("crl.pem"), crl).unwrap();
        let mut checks = SignerChecks::new(vec![ca_pem.clone()], vec![ca_pem.clone()]);
        checks.set_revocation_lists(vec![dir.join("crl.pem")]);
        (ca_pem, ca_key, issued.cert_pem, der, checks)
    }

    /// A remembered certificate is refused again once the CA revokes it: the memory is
    /// keyed by the revocation lists' contents.
    #[test]
    fn a_remembered_certificate_is_refused_after_its_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, ca_key, cert_pem, der, checks) = lab(dir.path());
        let now = crate::store::now_unix();
        for _ in 0..2 {
            assert_eq!(checks.certificate(Anchors::Trusted, &der, now).unwrap().name, "dm-alice");
        }
        let entry =
            CertificateAuthority::revocation_entry(&ca_pem, &cert_pem, RevocationReason::KeyCompromise).unwrap();
        let crl = CertificateAuthority::sign_revocation_list(&ca_pem, &ca_key, 2, &[entry], 30).unwrap();
        std::fs::write(dir.path().join("crl.pem"), crl).unwrap();
        let refused = checks.certificate(Anchors::Trusted, &der, now).unwrap_err().to_string();
        assert!(refused.contains("revoked"), "{refused}");
        std::fs::remove_file(dir.path().join("crl.pem")).unwrap();
        let refused = checks.certificate(Anchors::Trusted, &der, now).unwrap_err().to_string();
        assert!(refused.contains("revocation list can be read"), "{refused}");
    }

    /// A remembered certificate is refused past its expiry: the clock is checked on every
    /// use, the chain only once.
    #[test]
    fn a_remembered_certificate_is_refused_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _, _, der, checks) = lab(dir.path());
        checks.certificate(Anchors::Trusted, &der, crate::store::now_unix()).unwrap();
        let (_, not_after) = validity(&der).unwrap();
        let refused = checks.certificate(Anchors::Trusted, &der, not_after as u64 + 1).unwrap_err().to_string();
        assert!(refused.contains("expired"), "{refused}");
    }

    /// A remembered signature counts for its exact bytes only: another message under the
    /// same certificate and signature is refused.
    #[test]
    fn a_remembered_signature_covers_only_its_own_bytes() {
        let (ca_pem, ca_key) = CertificateAuthority::generate("cloud-ca").unwrap();
        let issued =
            CertificateAuthority::issue(&ca_pem, &ca_key, Role::DomainManager, "dm-alice", Validity::Days(5)).unwrap();
        let der = protocol::pki::certs_from_pem(&issued.cert_pem, "certificate").unwrap()[0].to_vec();
        let key = protocol::signing::SignatureKey::from_pem(&issued.key_pem, der).unwrap();
        let checks = SignerChecks::new(vec![ca_pem.clone()], vec![ca_pem]);
        let envelope = key.sign_envelope(SignatureContext::MountGrant, b"grant one".to_vec());
        checks.signature(&envelope, SignatureContext::MountGrant).unwrap();
        checks.signature(&envelope, SignatureContext::MountGrant).unwrap();
        assert!(checks.signature(&envelope, SignatureContext::Placement).is_err(), "another context");
        let mut forged = envelope.clone();
        forged.message = b"grant two".to_vec();
        assert!(checks.signature(&forged, SignatureContext::MountGrant).is_err(), "another message");
    }
}
