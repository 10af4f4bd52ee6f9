//! `logon` keys in this thread's keyring (keyctl(2)): how dm-crypt gets a volume key without
//! it ever appearing in a table string (docs/DMCRYPT.md). A logon key's payload can never be
//! read back from userspace.

use std::ffi::CString;

use protocol::secret::SecretBytes;

const KEY_SPEC_THREAD_KEYRING: libc::c_long = -1;
const KEYCTL_UNLINK: libc::c_long = 9;
const KEYCTL_INVALIDATE: libc::c_long = 21;

/// A `logon` key in this thread's keyring, invalidated when dropped (also on error paths).
/// dm-crypt looks it up with request_key() in the context of the thread that issues
/// DM_TABLE_LOAD, which searches the thread, process and session keyrings.
#[derive(Debug)]
pub struct LogonKey(libc::c_long);

impl LogonKey {
    /// Adds `key` as logon key `description` (e.g. `skydd:<mapping>`) to the thread keyring.
    pub fn add(description: &str, key: &SecretBytes) -> std::io::Result<Self> {
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "key description contains a NUL byte");
        let ktype = CString::new("logon").map_err(|_| invalid())?;
        let desc = CString::new(description).map_err(|_| invalid())?;
        let payload = key.expose();
        // SAFETY: valid NUL-terminated strings and a payload pointer/length from a live slice.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                ktype.as_ptr(),
                desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                KEY_SPEC_THREAD_KEYRING,
            )
        };
        if id < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(id))
    }

    /// The key's serial number.
    pub fn id(&self) -> libc::c_long {
        self.0
    }

    /// Invalidates the key now (the kernel forgets the payload), reporting a failure that
    /// dropping would swallow.
    pub fn invalidate(self) -> std::io::Result<()> {
        let id = self.0;
        std::mem::forget(self);
        drop_key(id)
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        let _ = drop_key(self.0);
    }
}

fn drop_key(id: libc::c_long) -> std::io::Result<()> {
    // SAFETY: keyctl with integer arguments only.
    if unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, id) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_UNLINK, id, KEY_SPEC_THREAD_KEYRING) } == 0 {
        return Ok(());
    }
    Err(err)
}
