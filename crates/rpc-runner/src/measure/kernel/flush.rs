//! The CPU cache flush between batches (`clflush` of every argument but the first).

use super::*;

/// Evicts every argument but the first from the CPU caches.
pub(super) struct CacheFlush<'a> {
    pub(super) bufs: &'a [AlignedBuf],
    /// The fallback's scratch buffer (architectures without `clflush`).
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) scratch: Vec<u8>,
}

impl<'a> CacheFlush<'a> {
    pub(super) fn new(bufs: &'a [AlignedBuf]) -> Self {
        CacheFlush {
            bufs: bufs.get(1..).unwrap_or(&[]),
            #[cfg(not(target_arch = "x86_64"))]
            scratch: Vec::new(),
        }
    }

    /// x86_64: `clflush` every 64-byte line of the arguments, then `mfence`
    /// (what TVM's `cpu_cache_flush` does).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn flush(&mut self) {
        use std::arch::x86_64::{_mm_clflush, _mm_mfence};
        // SAFETY: `clflush` and `mfence` are SSE2, part of every x86_64 CPU.
        // Each address is inside a live allocation (`bufs` is borrowed for
        // the flusher's lifetime); `clflush` neither reads nor writes data.
        unsafe {
            for buf in self.bufs {
                let base = buf.ptr.as_ptr().cast_const();
                for offset in (0..buf.len).step_by(CACHE_LINE) {
                    _mm_clflush(base.add(offset));
                }
            }
            _mm_mfence();
        }
    }

    /// Other architectures: no portable user-space flush instruction, so
    /// write a 16 MiB scratch buffer, larger than common last-level caches,
    /// which evicts most of the arguments.
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn flush(&mut self) {
        if self.bufs.is_empty() {
            return;
        }
        scratch_flush(&mut self.scratch);
    }
}

/// The fallback flush: writes `scratch` (grown to 16 MiB) end to end.
#[cfg(any(not(target_arch = "x86_64"), test))]
pub(super) fn scratch_flush(scratch: &mut Vec<u8>) {
    const SCRATCH: usize = 16 << 20;
    scratch.resize(SCRATCH, 0);
    for (i, byte) in scratch.iter_mut().enumerate() {
        *byte = byte.wrapping_add(i as u8);
    }
    std::hint::black_box(scratch);
}
