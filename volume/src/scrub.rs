//! Wiping what a thread leaves behind after it handled key material: its vector registers
//! and the stack below its current frame (docs/ARCHITECTURE.md, "Key hygiene").
//!
//! A thread that copied, expanded or used a key keeps copies of it where no `zeroize` can
//! reach: in SIMD registers (glibc's `memcpy` moves 64 bytes, a whole XTS key, through one
//! zmm register; AES key expansion holds each half in an xmm register) and in stack slots
//! the compiler spilled them to. An idle thread's registers sit in the kernel's saved state
//! and appear in a core dump. So each thread that touches a key calls [`scrub_this_thread`]
//! once when its work with that key ends: the TPM thread after every job, the attach task
//! after opening the volume, the FUSE thread when its session ends, and every rayon worker
//! when an engine is dropped ([`scrub_rayon_workers`]). Once per thread per detach keeps
//! the cost off the data path (a 16 KiB wipe per 4 KiB sector cost 4/5 of the engine's
//! speed).

/// How much of the stack below the caller is overwritten. The deepest key-handling call
/// chains here (the TSS2 ESAPI decrypt, the XTS loop with its spilled round keys) use a few
/// KiB; 64 KiB of zero stores take about 2 µs.
const STACK_BYTES: usize = 64 * 1024;

/// Zeroes this thread's vector registers and the stack below the caller's frame.
pub fn scrub_this_thread() {
    burn_stack();
    clear_vector_registers();
}

/// Runs [`scrub_this_thread`] on every thread of rayon's global pool (they split large
/// requests of the XTS engine), then on the calling thread.
pub fn scrub_rayon_workers() {
    rayon::broadcast(|_| scrub_this_thread());
    scrub_this_thread();
}

/// Overwrites `STACK_BYTES` of stack below this frame with zeros, as wide stores.
#[inline(never)]
fn burn_stack() {
    let scrub = [0u8; STACK_BYTES];
    // The compiler must assume the zeros are read, so the stores are kept.
    std::hint::black_box(&scrub);
}

/// Zeroes every SIMD register this CPU has: zmm0–31 with AVX-512, ymm0–15 with AVX,
/// xmm0–15 otherwise.
#[cfg(target_arch = "x86_64")]
fn clear_vector_registers() {
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        unsafe { clear_avx512() }
    } else if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked above).
        unsafe { clear_avx() }
    } else {
        // SAFETY: SSE2 is part of x86_64; the asm only writes the registers it clobbers.
        unsafe {
            std::arch::asm!(
                "pxor xmm0, xmm0",
                "pxor xmm1, xmm1",
                "pxor xmm2, xmm2",
                "pxor xmm3, xmm3",
                "pxor xmm4, xmm4",
                "pxor xmm5, xmm5",
                "pxor xmm6, xmm6",
                "pxor xmm7, xmm7",
                "pxor xmm8, xmm8",
                "pxor xmm9, xmm9",
                "pxor xmm10, xmm10",
                "pxor xmm11, xmm11",
                "pxor xmm12, xmm12",
                "pxor xmm13, xmm13",
                "pxor xmm14, xmm14",
                "pxor xmm15, xmm15",
                clobber_abi("C"),
                options(nostack, nomem, preserves_flags)
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn clear_vector_registers() {}

/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn clear_avx() {
    // SAFETY: the caller guarantees AVX; vzeroall only writes ymm0-15 (clobbered).
    unsafe { std::arch::asm!("vzeroall", clobber_abi("C"), options(nostack, nomem, preserves_flags)) };
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn clear_avx512() {
    // SAFETY: the caller guarantees AVX-512F; `vzeroall` reaches zmm0-15 only, the
    // vpxord lines clear zmm16-31; all are clobbered.
    unsafe {
        std::arch::asm!(
            "vzeroall",
            "vpxord zmm16, zmm16, zmm16",
            "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20",
            "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22",
            "vpxord zmm23, zmm23, zmm23",
            "vpxord zmm24, zmm24, zmm24",
            "vpxord zmm25, zmm25, zmm25",
            "vpxord zmm26, zmm26, zmm26",
            "vpxord zmm27, zmm27, zmm27",
            "vpxord zmm28, zmm28, zmm28",
            "vpxord zmm29, zmm29, zmm29",
            "vpxord zmm30, zmm30, zmm30",
            "vpxord zmm31, zmm31, zmm31",
            clobber_abi("C"),
            options(nostack, nomem, preserves_flags)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a scrub, xmm registers read back as zero (a key loaded into one before).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn registers_read_zero_after_a_scrub() {
        use std::arch::x86_64::*;
        let key = [0xa5u8; 16];
        // SAFETY: SSE2 is part of x86_64; reads 16 bytes from a 16-byte array.
        let loaded = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
        std::hint::black_box(loaded);
        scrub_this_thread();
        let mut out = [0xffu8; 16];
        // SAFETY: moves xmm7 (not used by the compiler across this asm) to a 16-byte array.
        unsafe {
            std::arch::asm!("movdqu [{0}], xmm7", in(reg) out.as_mut_ptr(), options(nostack, preserves_flags));
        }
        assert_eq!(out, [0u8; 16], "xmm7 still holds data after scrub_this_thread");
    }
}
