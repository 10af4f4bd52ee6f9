//! OpenSSL's assembly AES-256-XTS (AES-NI) behind the engine, for CPUs without VAES and as
//! the reference the VAES path is checked against.
//!
//! Each sector is one `EVP_CipherUpdate` on a context whose key schedule is set once; per
//! sector only the IV is re-initialised (`EVP_CipherInit_ex` with NULL cipher and NULL key
//! keeps the key schedule). We call openssl-sys directly because the `openssl` crate's safe
//! wrappers query the IV and block lengths from the provider on every call, which costs more
//! than the 4 KiB of AES itself.
//!
//! Keys: the raw key is only read in [`Contexts::new`]; afterwards it lives only inside
//! OpenSSL's cipher contexts (expanded), new contexts are copied from a template context,
//! and OpenSSL wipes the context memory when it frees it (OPENSSL_clear_free).

use std::ptr;
use std::sync::Mutex;

use openssl_sys as ffi;

use super::{xts_err, Direction};
use crate::Result;

impl Direction {
    fn enc_flag(self) -> libc::c_int {
        match self {
            Direction::Encrypt => 1,
            Direction::Decrypt => 0,
        }
    }
}

/// One owned `EVP_CIPHER_CTX`.
struct Ctx(*mut ffi::EVP_CIPHER_CTX);

// SAFETY: an EVP_CIPHER_CTX has no thread affinity; we only ever use one from one thread
// at a time (it is moved out of the pool, used, and moved back).
unsafe impl Send for Ctx {}

impl Ctx {
    fn new() -> Result<Self> {
        // SAFETY: plain constructor; null is checked.
        let p = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if p.is_null() {
            return Err(xts_err("EVP_CIPHER_CTX_new failed (out of memory?)"));
        }
        Ok(Ctx(p))
    }

    /// A new context with the same cipher, direction and key schedule as `self`.
    fn duplicate(&self) -> Result<Self> {
        let copy = Ctx::new()?;
        // SAFETY: both pointers are live contexts; `self` is only read.
        if unsafe { ffi::EVP_CIPHER_CTX_copy(copy.0, self.0) } != 1 {
            return Err(xts_err(format!("EVP_CIPHER_CTX_copy failed: {}", openssl_errors())));
        }
        Ok(copy)
    }

    /// Processes one data unit in place with tweak `tweak` (128-bit little-endian).
    #[inline]
    fn crypt_unit(&mut self, enc: libc::c_int, tweak: u128, unit: &mut [u8]) -> Result<()> {
        let iv = tweak.to_le_bytes();
        let mut outl: libc::c_int = 0;
        // SAFETY: the context was initialised with AES-256-XTS and a key; NULL cipher and
        // key keep both, only the 16-byte IV is replaced. `unit` is at most MAX_UNIT_LEN
        // (checked by callers) so the length fits a c_int; in-place operation is allowed
        // by EVP_CipherUpdate when in == out exactly.
        unsafe {
            if ffi::EVP_CipherInit_ex(self.0, ptr::null(), ptr::null_mut(), ptr::null(), iv.as_ptr(), enc) != 1 {
                return Err(xts_err(format!("setting the tweak failed: {}", openssl_errors())));
            }
            let len = unit.len() as libc::c_int;
            let p = unit.as_mut_ptr();
            if ffi::EVP_CipherUpdate(self.0, p, &mut outl, p, len) != 1 {
                return Err(xts_err(format!("EVP_CipherUpdate on {} bytes failed: {}", unit.len(), openssl_errors())));
            }
        }
        if outl as usize != unit.len() {
            return Err(xts_err(format!("OpenSSL returned {outl} bytes for a {}-byte data unit", unit.len())));
        }
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: we own the context; OpenSSL's XTS provider clears its key schedule
        // before freeing it.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0) }
    }
}

struct Pair {
    enc: Ctx,
    dec: Ctx,
}

impl Pair {
    fn get(&mut self, dir: Direction) -> &mut Ctx {
        match dir {
            Direction::Encrypt => &mut self.enc,
            Direction::Decrypt => &mut self.dec,
        }
    }
}

struct Pool {
    template: Pair,
    free: Vec<Pair>,
}

/// A pool of keyed OpenSSL contexts, one encrypt/decrypt pair per thread that uses it at
/// the same time (each call borrows a pair and gives it back).
pub(super) struct Contexts {
    pool: Mutex<Pool>,
}

impl Contexts {
    /// Loads `key` (KEY_LEN bytes, checked by the caller) into a template pair and copies
    /// it once per rayon thread.
    pub(super) fn new(key: &[u8]) -> Result<Self> {
        ffi::init();
        let template = Pair { enc: keyed_ctx(key, Direction::Encrypt)?, dec: keyed_ctx(key, Direction::Decrypt)? };
        let threads = rayon::current_num_threads().max(1);
        let mut free = Vec::with_capacity(threads);
        for _ in 0..threads {
            free.push(Pair { enc: template.enc.duplicate()?, dec: template.dec.duplicate()? });
        }
        Ok(Self { pool: Mutex::new(Pool { template, free }) })
    }

    /// Processes whole `unit_len`-byte data units in place, unit i with tweak `first + i`.
    pub(super) fn crypt(&self, dir: Direction, first: u128, unit_len: usize, buf: &mut [u8]) -> Result<()> {
        let mut pair = self.take()?;
        let r = run_u128(pair.get(dir), dir, first, unit_len, buf);
        self.give(pair);
        r
    }

    fn take(&self) -> Result<Pair> {
        let mut pool = self.pool.lock().map_err(|_| xts_err("context pool lock poisoned"))?;
        if let Some(p) = pool.free.pop() {
            return Ok(p);
        }
        Ok(Pair { enc: pool.template.enc.duplicate()?, dec: pool.template.dec.duplicate()? })
    }

    fn give(&self, pair: Pair) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.free.push(pair);
        }
    }
}

fn run_u128(ctx: &mut Ctx, dir: Direction, first: u128, unit_len: usize, buf: &mut [u8]) -> Result<()> {
    let enc = dir.enc_flag();
    for (i, unit) in buf.chunks_exact_mut(unit_len).enumerate() {
        // u64 sector + usize index cannot overflow 128 bits.
        ctx.crypt_unit(enc, first + i as u128, unit)?;
    }
    Ok(())
}

fn keyed_ctx(key: &[u8], dir: Direction) -> Result<Ctx> {
    let ctx = Ctx::new()?;
    // SAFETY: EVP_aes_256_xts returns a static cipher; key is KEY_LEN bytes (checked by
    // the caller) which is the cipher's key length; the zero IV is replaced per unit.
    unsafe {
        let zero_iv = [0u8; 16];
        if ffi::EVP_CipherInit_ex(
            ctx.0,
            ffi::EVP_aes_256_xts(),
            ptr::null_mut(),
            key.as_ptr(),
            zero_iv.as_ptr(),
            dir.enc_flag(),
        ) != 1
        {
            return Err(xts_err(format!("loading the AES-256-XTS key into OpenSSL failed: {}", openssl_errors())));
        }
    }
    Ok(ctx)
}

/// Drains OpenSSL's thread-local error queue into one line.
fn openssl_errors() -> String {
    let mut out = Vec::new();
    loop {
        // SAFETY: reads and pops this thread's error queue.
        let code = unsafe { ffi::ERR_get_error() };
        if code == 0 {
            break;
        }
        // SAFETY: returns a static NUL-terminated string or null.
        let reason = unsafe { ffi::ERR_reason_error_string(code) };
        if reason.is_null() {
            out.push(format!("error 0x{code:x}"));
        } else {
            // SAFETY: non-null static C string from OpenSSL.
            let text = unsafe { std::ffi::CStr::from_ptr(reason) };
            out.push(format!("{} (0x{code:x})", text.to_string_lossy()));
        }
    }
    if out.is_empty() {
        "no OpenSSL error recorded".into()
    } else {
        out.join("; ")
    }
}
