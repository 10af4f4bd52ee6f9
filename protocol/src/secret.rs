//! Key buffers: zeroized on drop, locked in RAM (mlock) so they never reach swap, left out
//! of core dumps (MADV_DONTDUMP), and never printed (`Debug` shows only the length).

use std::alloc::Layout;
use std::ptr::NonNull;

use zeroize::Zeroize;

/// A secret byte buffer (a domain key, K_TTP, a credential secret).
///
/// The bytes live in pages of their own (a page-aligned heap allocation, so that locking and
/// unlocking one secret never touches another's page), `mlock`ed and marked
/// `MADV_DONTDUMP` for their whole life, and wiped before they are unlocked and freed.
/// `Debug` never shows the bytes.
pub struct SecretBytes {
    pages: NonNull<u8>,
    /// Bytes allocated: `len` rounded up to whole pages (0 for an empty secret).
    capacity: usize,
    len: usize,
    locked: bool,
}

// SAFETY: SecretBytes owns its allocation exclusively, like a Box<[u8]>; shared access only
// hands out `&[u8]`.
unsafe impl Send for SecretBytes {}
// SAFETY: as for Send: `&SecretBytes` gives only immutable access to the bytes.
unsafe impl Sync for SecretBytes {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, to be filled in place (so the secret is never
    /// copied through an unlocked temporary).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self { pages: NonNull::dangling(), capacity: 0, len: 0, locked: true };
        }
        let page = page_size();
        let capacity = len.div_ceil(page) * page;
        let layout = Layout::from_size_align(capacity, page).expect("a secret's size fits in a Layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(pages) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: [pages, pages + capacity) is a live, page-aligned allocation of ours. A failed
        // madvise only means the bytes would appear in a core dump.
        let locked = unsafe {
            libc::madvise(pages.as_ptr().cast(), capacity, libc::MADV_DONTDUMP);
            libc::mlock(pages.as_ptr().cast(), capacity) == 0
        };
        Self { pages, capacity, len, locked }
    }

    /// Moves `source` into locked memory and wipes `source`.
    pub fn from_slice_wiping(source: &mut [u8]) -> Self {
        let mut secret = Self::zeroed(source.len());
        secret.expose_mut().copy_from_slice(source);
        source.zeroize();
        secret
    }

    /// Borrows the secret bytes. Keep the borrow short and never copy them into an unlocked
    /// buffer that is not wiped.
    pub fn expose(&self) -> &[u8] {
        // SAFETY: `pages` holds `len` initialized bytes (or is dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr(), self.len) }
    }

    /// Borrows the secret bytes mutably, to fill a [`SecretBytes::zeroed`] buffer in place.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `expose`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_ptr(), self.len) }
    }

    /// Length of the secret in bytes (not secret itself).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the secret has zero length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether mlock succeeded (it can fail under a low RLIMIT_MEMLOCK; the buffer is
    /// still wiped on drop).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.len == other.len() && bool::from(self.expose().ct_eq(other))
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.expose_mut().copy_from_slice(self.expose());
        copy
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        if self.capacity == 0 {
            return;
        }
        let page = page_size();
        // SAFETY: [pages, pages + capacity) is our live allocation, made in `zeroed` with this
        // layout; it is wiped whole before it is unlocked, given back to core dumps (the
        // allocator may reuse the pages) and freed.
        unsafe {
            std::slice::from_raw_parts_mut(self.pages.as_ptr(), self.capacity).zeroize();
            if self.locked {
                libc::munlock(self.pages.as_ptr().cast(), self.capacity);
            }
            libc::madvise(self.pages.as_ptr().cast(), self.capacity, libc::MADV_DODUMP);
            std::alloc::dealloc(self.pages.as_ptr(), Layout::from_size_align_unchecked(self.capacity, page));
        }
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes, redacted)", self.len)
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

    #[test]
    fn secrets_have_pages_of_their_own_and_survive_clone_and_drop() {
        let page = page_size();
        let secrets: Vec<SecretBytes> =
            [0usize, 1, 32, page, page + 1].iter().map(|n| SecretBytes::zeroed(*n)).collect();
        for secret in &secrets[1..] {
            assert_eq!(secret.pages.as_ptr() as usize % page, 0, "page-aligned");
            assert!(secret.is_locked());
            assert!(secret.expose().iter().all(|b| *b == 0));
        }
        assert!(secrets[0].is_empty() && secrets[0].expose().is_empty());
        let mut raw: Vec<u8> = (0..=255).collect();
        let original = SecretBytes::from_slice_wiping(&mut raw);
        let copy = original.clone();
        drop(original);
        assert!(copy.ct_eq(&(0..=255).collect::<Vec<u8>>()));
    }
}
