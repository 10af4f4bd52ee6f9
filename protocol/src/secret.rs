//! Key buffers: zeroized on drop, locked in RAM (mlock) so they never reach swap, and
//! never printed (`Debug` shows only the length).

use zeroize::Zeroize;

/// A secret byte buffer (a domain key, K_TTP, a credential secret).
///
/// The bytes live in a heap allocation that is `mlock`ed for its whole life and wiped
/// before it is unlocked and freed. `Debug` never shows the bytes.
pub struct SecretBytes {
    bytes: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, to be filled in place (so the secret is never
    /// copied through an unlocked temporary).
    pub fn zeroed(len: usize) -> Self {
        let bytes = vec![0u8; len].into_boxed_slice();
        let locked = lock_memory(&bytes);
        Self { bytes, locked }
    }

    /// Moves `source` into locked memory and wipes `source`.
    pub fn from_slice_wiping(source: &mut [u8]) -> Self {
        let mut secret = Self::zeroed(source.len());
        secret.bytes.copy_from_slice(source);
        source.zeroize();
        secret
    }

    /// Borrows the secret bytes. Keep the borrow short and never copy them into an unlocked
    /// buffer that is not wiped.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// Borrows the secret bytes mutably, to fill a [`SecretBytes::zeroed`] buffer in place.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Length of the secret in bytes (not secret itself).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the secret has zero length.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether mlock succeeded (it can fail under a low RLIMIT_MEMLOCK; the buffer is
    /// still wiped on drop).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.bytes.len() == other.len() && bool::from(self.bytes.ct_eq(other))
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.bytes.len());
        copy.bytes.copy_from_slice(&self.bytes);
        copy
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if self.locked {
            unlock_memory(&self.bytes);
        }
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes, redacted)", self.bytes.len())
    }
}

fn lock_memory(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    // SAFETY: the pointer and length describe a live allocation owned by the caller.
    unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) == 0 }
}

fn unlock_memory(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: as in lock_memory; the range was locked by lock_memory.
    unsafe {
        libc::munlock(bytes.as_ptr().cast(), bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let mut raw = [0xABu8; 16];
        let secret = SecretBytes::from_slice_wiping(&mut raw);
        assert_eq!(raw, [0u8; 16], "the source must be wiped");
        let shown = format!("{secret:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(secret.ct_eq(&[0xAB; 16]));
        assert!(!secret.ct_eq(&[0xAB; 15]));
        assert!(secret.is_locked(), "mlock of 16 bytes should succeed as root");
    }
}
