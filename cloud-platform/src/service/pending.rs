//! Unfinished updates (docs/CLOUD-API.md, "Unfinished updates"): a descriptor update is
//! written ahead before the TTP is asked; one that a stop, a lost TTP or a failed volume
//! write interrupted is finished on the next request for the domain or at start-up.

use protocol::messages::{KeyRotation, Registration};

use super::domains::decode_descriptor;
use super::{is_refusal, CloudPlatform};
use crate::error::{Error, Result};
use crate::store::{DomainRecord, PendingUpdate};

/// The `version` of a pending key rotation: its envelope is the owner's signed
/// `KeyRotation`, not a descriptor (one pending operation per domain either way).
pub(super) const PENDING_ROTATION: u64 = 0;

/// Says, on an interrupted rotation, that the CP keeps it and finishes it later.
pub(super) fn rotation_kept_for_later(error: Error) -> Error {
    error.with_note(
        "; the cloud platform keeps the signed rotation and finishes it on the next request for this domain or at its next start (`domain show` tells when the header records it)",
    )
}

/// Says, on an interrupted update, that the CP keeps it and finishes it later.
pub(super) fn kept_for_later(error: Error, version: u64) -> Error {
    error.with_note(&format!(
        "; the cloud platform keeps version {version} and finishes it on the next request for this domain or at its next start (`domain show` tells when it is in force)"
    ))
}

impl CloudPlatform {
    /// Finishes the domain's pending update, if it has one; the caller holds the domain's
    /// lock. The header in force tells how far it got: at the pending version already, only
    /// the CP's record was missing; behind it, the update is registered again (the TTP
    /// answers its own registration again if it had made it) and written. A TTP refusal
    /// ends it (the update never took effect); an unreachable TTP or a failed write keeps
    /// it for the next request and fails this one, since acting on a header the TTP no
    /// longer calls newest would be refused anyway.
    pub(super) async fn finish_pending_update(&self, record: &DomainRecord) -> Result<()> {
        let id = record.id.clone();
        let Some(pending) = self.store(move |s| s.pending_update(&id)).await? else {
            return Ok(());
        };
        if pending.version == PENDING_ROTATION {
            return self.finish_pending_rotation(record, pending).await;
        }
        let current = self.read_header(record).await?;
        let (in_force, _) = current
            .record
            .unverified_contents()
            .map_err(|e| Error::Volume(format!("header of domain {}: {e}", record.id)))?;
        let why = format!("access revoked by version {} (finished after an interruption)", pending.version);
        if in_force.version >= pending.version {
            let (id, version, shared) = (record.id.clone(), in_force.version, in_force.shared_with.clone());
            self.store(move |s| s.update_domain(&id, version, &shared)).await?;
            tracing::warn!(domain = %record.id, version = in_force.version, "pending update had reached the volume header; recorded it");
            return self.detach_lost(&record.id, &in_force, &why).await;
        }
        let descriptor = match decode_descriptor(&pending.descriptor) {
            Ok(descriptor) => descriptor,
            Err(e) => {
                let id = record.id.clone();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                tracing::error!(domain = %record.id, error = %e, "pending update does not decode; dropped");
                return Ok(());
            }
        };
        match self.apply_update(record, pending.descriptor, &descriptor, current).await {
            Ok(_) => {
                tracing::warn!(domain = %record.id, version = pending.version, recorded_at = pending.recorded_at,
                    "finished an update that was interrupted");
                self.detach_lost(&record.id, &descriptor, &why).await
            }
            Err(e) if is_refusal(&e) => {
                let id = record.id.clone();
                self.store(move |s| s.drop_pending_update(&id)).await?;
                tracing::warn!(domain = %record.id, version = pending.version, code = e.code(), error = %e,
                    "the TTP refused an interrupted update; dropped it");
                Ok(())
            }
            Err(e) => Err(kept_for_later(e, pending.version)),
        }
    }

    /// Finishes a key rotation the TTP may have registered without the header being written:
    /// done if the header is past its generation already, otherwise registered again (the
    /// TTP answers its repeat with a fresh `r`) and written. A refusal drops it; an
    /// unreachable TTP keeps it.
    async fn finish_pending_rotation(&self, record: &DomainRecord, pending: PendingUpdate) -> Result<()> {
        let drop_it = || {
            let id = record.id.clone();
            self.store(move |s| s.drop_pending_update(&id))
        };
        let rotation = match KeyRotation::decode(&pending.descriptor.message) {
            Ok(rotation) => rotation,
            Err(e) => {
                tracing::error!(domain = %record.id, error = %e, "pending rotation does not decode; dropped");
                return drop_it().await;
            }
        };
        let current = self.read_header(record).await?.record;
        let generation = Registration::decode(&current.registration.message)
            .map_err(|e| Error::Volume(format!("the header registration of domain {}: {e}", record.id)))?
            .key_generation;
        if generation > rotation.from_generation {
            tracing::warn!(domain = %record.id, generation, "pending rotation had reached the volume header; dropped");
            return drop_it().await;
        }
        match self.register_rotation(record, pending.descriptor, current).await {
            Ok(_) => {
                tracing::warn!(domain = %record.id, from_generation = rotation.from_generation,
                    recorded_at = pending.recorded_at, "finished a key rotation that was interrupted");
                Ok(())
            }
            Err(e) if is_refusal(&e) => {
                tracing::warn!(domain = %record.id, code = e.code(), error = %e,
                    "the TTP refused an interrupted key rotation; dropped it");
                drop_it().await
            }
            Err(e) => Err(rotation_kept_for_later(e)),
        }
    }

    /// Finishes every pending update (start-up, before the attachments are reconciled).
    /// Returns how many were finished or dropped; one that cannot be finished now stays.
    pub async fn finish_pending_updates(&self) -> Result<usize> {
        let pending = self.store(|s| s.pending_updates()).await?;
        let mut finished = 0;
        for update in pending {
            let lock = self.lock_of(&update.domain_id);
            let _guard = lock.lock().await;
            let id = update.domain_id.clone();
            let Some(record) = self.store(move |s| s.domain(&id)).await? else { continue };
            match self.finish_pending_update(&record).await {
                Ok(()) => finished += 1,
                Err(e) => tracing::error!(domain = %update.domain_id, version = update.version, error = %e,
                    "cannot finish an interrupted update now; the next request for the domain retries"),
            }
        }
        Ok(finished)
    }
}
