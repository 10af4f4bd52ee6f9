//! Keeps two requests off one attachment id or mapping name at a time: an attach or detach
//! holds a [`Reservation`] for each until it returns, and a second one meanwhile is refused
//! with `attachment_conflict`.

use std::collections::HashSet;
use std::sync::Mutex;

use super::AttachmentService;
use crate::error::{Error, Result};

/// Holds ids in `busy` until dropped.
pub(super) struct Reservation<'a> {
    busy: &'a Mutex<HashSet<String>>,
    keys: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            for k in &self.keys {
                busy.remove(k);
            }
        }
    }
}

impl AttachmentService {
    /// Reserves `keys` (e.g. `attachment <id>`, `mapping <name>`) until the returned value
    /// is dropped; refuses if any is reserved already.
    pub(super) fn reserve(&self, keys: Vec<String>) -> Result<Reservation<'_>> {
        let mut busy = self.busy.lock().map_err(|_| Error::Volume("agent state lock poisoned".into()))?;
        if let Some(k) = keys.iter().find(|k| busy.contains(*k)) {
            return Err(Error::AttachmentConflict(format!(
                "{k} has an attach or detach in progress; try again when it has finished"
            )));
        }
        busy.extend(keys.iter().cloned());
        Ok(Reservation { busy: &self.busy, keys })
    }
}
