//! The TTP as a format-2 volume sees it ([`skydd_volume::integrity::Authority`]): each flush
//! commits the volume root over the host's mutual-TLS connection to the TTP, and anything
//! that does not verify is reported into the domain's viewing history (docs/PROTOCOL.md
//! "Integrity anchor"). The volume calls it from the FUSE thread, outside the runtime, so a
//! commit blocks on the runtime handle and a report is sent in the background.

use protocol::integrity::ViolationKind;
use protocol::messages::KeyReleaseResponse;
use protocol::refusal::Refusal;
use protocol::secret::SecretBytes;
use skydd_volume::integrity::{Anchor, Authority};
use skydd_volume::reencrypt::format2::GenerationAnchor;

use crate::error::{Error, Result};
use crate::integrity_client;

/// Commits and reports for one mapping (a domain opened for a VM on this host).
pub(super) struct TtpAuthority {
    pub(super) ttp: net::Client,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) domain_id: String,
    pub(super) host_id: String,
    pub(super) vm_id: String,
    /// The key generation whose `K_mac` tags the roots this authority commits.
    pub(super) key_generation: u64,
}

impl Authority for TtpAuthority {
    fn commit(&self, epoch: u64, root: &[u8; 32]) -> std::result::Result<(), String> {
        let committed = self
            .runtime
            .block_on(integrity_client::commit_root(
                &self.ttp,
                &self.domain_id,
                &self.host_id,
                epoch,
                self.key_generation,
                root,
                None,
            ))
            .map_err(|e| format!("epoch {epoch}: {e}"))?;
        tracing::debug!(domain = %self.domain_id, epoch, audit_seq = committed.audit_seq, "integrity root committed");
        Ok(())
    }

    fn report(&self, kind: ViolationKind, sector: Option<u64>) {
        tracing::error!(domain = %self.domain_id, vm = %self.vm_id, kind = kind.as_str(), ?sector,
            "integrity violation: the volume was altered outside this host");
        let (ttp, domain, host, vm) =
            (self.ttp.clone(), self.domain_id.clone(), self.host_id.clone(), self.vm_id.clone());
        self.runtime.spawn(async move {
            if let Err(e) = integrity_client::report_violation(&ttp, &domain, &host, &vm, kind, sector).await {
                tracing::error!(%domain, error = %e, "reporting an integrity violation to the TTP failed");
            }
        });
    }
}

/// The two keys of a release: the 64-byte XTS key and, from a TTP that releases it, the
/// 32-byte sector-tag key of format 2 (docs/PROTOCOL.md "Key derivation").
pub(super) fn split_released_keys(released: &SecretBytes) -> Result<(SecretBytes, Option<SecretBytes>)> {
    use protocol::kdf::{RELEASED_KEYS_BYTES, VOLUME_KEY_BYTES};
    let bytes = released.expose();
    let part = |range: std::ops::Range<usize>| {
        let mut key = SecretBytes::zeroed(range.len());
        key.expose_mut().copy_from_slice(&bytes[range]);
        key
    };
    match bytes.len() {
        VOLUME_KEY_BYTES => Ok((part(0..VOLUME_KEY_BYTES), None)),
        RELEASED_KEYS_BYTES => Ok((part(0..VOLUME_KEY_BYTES), Some(part(VOLUME_KEY_BYTES..RELEASED_KEYS_BYTES)))),
        other => Err(Error::Volume(format!(
            "the TTP released {other} bytes of key; expected {VOLUME_KEY_BYTES} or {RELEASED_KEYS_BYTES}"
        ))),
    }
}

/// The newest anchor the TTP returned with the release, and the key generation its tags are
/// under: its signature checked, and it must be this domain's.
pub(super) fn anchor_of(release: &KeyReleaseResponse) -> Result<Option<GenerationAnchor>> {
    let Some(envelope) = &release.integrity_anchor else {
        return Ok(None);
    };
    let anchor = integrity_client::verified_anchor(envelope, &release.domain_id, None)?;
    if anchor.epoch == 0 {
        return Err(Error::Integrity {
            refusal: Refusal::IntegrityViolation,
            message: format!("the TTP returned an anchor of epoch 0 for domain {}", release.domain_id),
        });
    }
    Ok(Some(GenerationAnchor {
        anchor: Anchor { epoch: anchor.epoch, root: anchor.root },
        generation: anchor.key_generation,
    }))
}

/// The key generation a registration (a header's, or its rotation's previous one) names.
pub(super) fn generation_of(registration: &protocol::signing::SignedEnvelope) -> Result<u64> {
    Ok(protocol::messages::Registration::decode(&registration.message)?.key_generation)
}
