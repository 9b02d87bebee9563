//! Argument buffers: aligned, owned, described by DLPack tensors.

use super::fill::{SplitMix64, fill};
use super::*;

/// One zero-initialized allocation that the buffers of an argument set are
/// carved from, freed when the last of them is dropped.
///
/// An allocation of at least [`HUGE_ARENA_MIN`] bytes is a fresh mapping,
/// 2 MiB-aligned, rounded up to 2 MiB and advised `MADV_HUGEPAGE` before it
/// is first touched: where transparent huge pages are enabled (`always` or
/// `madvise`), the set's buffers then sit in physically contiguous 2 MiB
/// pages, so their cache placement does not change from process to process
/// (with 4 KiB pages it depends on which physical pages the kernel hands
/// out, a source of run-to-run variance).
pub(super) struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
    /// `madvise(MADV_HUGEPAGE)` was applied and accepted.
    pub(super) huge: bool,
    /// `ptr` is an `mmap` of `layout.size()` bytes, not the allocator's.
    mapped: bool,
}

// SAFETY: an `Arena` owns its allocation exclusively, like a `Box<[u8]>`;
// the buffers that point into it only hand out accesses under `&`/`&mut`
// of themselves (each covers its own disjoint range).
unsafe impl Send for Arena {}
// SAFETY: as above; `Arena` itself offers no access to the bytes.
unsafe impl Sync for Arena {}

/// Sets of at least this many bytes get a huge-page arena.
pub(super) const HUGE_ARENA_MIN: usize = 256 << 10;

/// A transparent huge page (x86_64, aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

impl Arena {
    /// `None` if the size is impossible or the allocator refuses.
    pub(super) fn zeroed(len: usize) -> Option<Arena> {
        if len >= HUGE_ARENA_MIN {
            let size = len.checked_next_multiple_of(HUGE_PAGE)?;
            let layout = Layout::from_size_align(size, HUGE_PAGE).ok()?;
            return huge_mapping(size).map(|(ptr, huge)| Arena { ptr, layout, huge, mapped: true });
        }
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: `layout` has a nonzero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Arena { ptr, layout, huge: false, mapped: false })
    }
}

/// A fresh anonymous mapping of `size` bytes (a multiple of [`HUGE_PAGE`]),
/// 2 MiB-aligned, advised `MADV_HUGEPAGE` and then faulted in: zero pages
/// from the kernel, so nothing is written over them (an allocator's memory
/// may be recycled and need a memset of the whole arena). Returns the
/// pointer and whether the advice was accepted.
fn huge_mapping(size: usize) -> Option<(NonNull<u8>, bool)> {
    use nix::libc;
    let span = size.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (aligned - start, span - (aligned - start) - size);
    // SAFETY: `start..start+head` and `aligned+size..start+span` are the
    // unaligned ends of the mapping just made, not used by anything.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    let ptr = aligned as *mut u8;
    // SAFETY: `ptr..ptr+size` is our own mapping; madvise only changes how
    // it is backed.
    let huge = unsafe { libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE) == 0 };
    // Fault every page in now, not in the kernel's first call: one write per
    // base page (the first one of a huge page brings in all 2 MiB).
    for offset in (0..size).step_by(4096) {
        // SAFETY: inside the mapping, which is readable and writable.
        unsafe { std::ptr::write_volatile(ptr.add(offset), 0) };
    }
    NonNull::new(ptr).map(|p| (p, huge))
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `ptr..ptr+size` is the mapping `huge_mapping` made.
            unsafe { nix::libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
        } else {
            // SAFETY: `ptr` was allocated by the global allocator with `layout`.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

/// A zero-initialized, 64-byte-aligned buffer inside an [`Arena`].
pub(super) struct AlignedBuf {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
    /// Keeps the allocation alive.
    pub(super) _arena: std::sync::Arc<Arena>,
}

// SAFETY: an `AlignedBuf` is the only handle to its byte range of the arena
// (the ranges of one set are disjoint), like a `Box<[u8]>` of it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer in an arena of its own; `None` if the size is impossible or
    /// the allocator refuses.
    #[cfg(test)]
    pub(super) fn zeroed(len: usize) -> Option<Self> {
        let arena = std::sync::Arc::new(Arena::zeroed(len)?);
        Some(AlignedBuf { ptr: arena.ptr, len, _arena: arena })
    }

    /// `len` bytes at `offset` (a multiple of 64) into `arena`.
    fn carve(arena: &std::sync::Arc<Arena>, offset: usize, len: usize) -> Self {
        debug_assert!(offset + len <= arena.layout.size());
        // SAFETY: `offset + len` is within the arena's allocation (the
        // caller sized it to hold every buffer), so the pointer stays in it.
        let ptr = unsafe { NonNull::new_unchecked(arena.ptr.as_ptr().add(offset)) };
        AlignedBuf { ptr, len, _arena: std::sync::Arc::clone(arena) }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialized (zeroed) bytes of the
        // arena, kept alive by `self.arena`; no other buffer covers them.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// One set of a kernel's arguments and the DLTensors describing them.
pub(super) struct ArgSet {
    /// `tensors[i].data` points into `bufs[i]`.
    pub(super) bufs: Vec<AlignedBuf>,
    /// `tensors[i].shape` points into `shapes[i]` (a heap buffer that moving
    /// the `Vec`s does not move; never resized after the tensors are made).
    pub(super) _shapes: Vec<Vec<i64>>,
    pub(super) tensors: Vec<DLTensor>,
    /// The set's buffers are in huge pages (advised, see [`Arena`]).
    pub(super) huge_pages: bool,
}

// SAFETY: the raw pointers in `tensors` point only into `bufs` and `_shapes`,
// owned by the same `ArgSet` and moved together with it; nothing else holds them.
unsafe impl Send for ArgSet {}

impl ArgSet {
    pub(super) fn new(args: &[ArgInfo], rng: &mut SplitMix64) -> Result<Self, KernelError> {
        let mut bufs = Vec::with_capacity(args.len());
        let mut shapes = Vec::with_capacity(args.len());
        // One arena for the set: each buffer at a 64-byte-aligned offset.
        let mut offsets = Vec::with_capacity(args.len());
        let mut total = 0usize;
        for (index, info) in args.iter().enumerate() {
            let bytes = checked_nbytes(index, info)?;
            let too_large = || KernelError::BadArgs("the arguments are too large together".into());
            offsets.push((total, bytes));
            total = total
                .checked_add(bytes)
                .and_then(|t| t.checked_next_multiple_of(ALIGN))
                .filter(|&t| t <= isize::MAX as usize - HUGE_PAGE)
                .ok_or_else(too_large)?;
        }
        let arena = Arena::zeroed(total).ok_or(KernelError::Alloc { bytes: total })?;
        let arena = std::sync::Arc::new(arena);
        for (info, &(offset, bytes)) in args.iter().zip(&offsets) {
            let mut buf = AlignedBuf::carve(&arena, offset, bytes);
            fill(buf.as_mut_slice(), info.dtype, rng);
            bufs.push(buf);
            shapes.push(info.shape.clone());
        }
        let tensors = bufs
            .iter()
            .zip(shapes.iter_mut())
            .zip(args)
            .map(|((buf, shape), info)| {
                DLTensor::cpu(buf.ptr.as_ptr().cast(), DLDataType::from(info.dtype), shape)
            })
            .collect();
        Ok(ArgSet { bufs, _shapes: shapes, tensors, huge_pages: arena.huge })
    }

    /// The pointer and count a kernel's entry takes.
    pub(super) fn raw_args(&mut self) -> (*mut DLTensor, i32) {
        // `ArgSets::new` checked that the count fits.
        let num_args = i32::try_from(self.tensors.len()).unwrap_or(i32::MAX);
        (self.tensors.as_mut_ptr(), num_args)
    }
}

/// The argument sets of the current [`AllocArgs`].
pub(super) struct ArgSets {
    pub(super) sets: Vec<ArgSet>,
    /// What they were made for (see [`ArgSets::refill`]).
    args: Vec<ArgInfo>,
    /// The seed they were last filled with.
    seed: u64,
    /// No kernel has run on them since they were filled: they hold exactly
    /// `seed`'s values (cleared by [`ArgSets::for_kernel`]).
    pristine: bool,
    /// `seed`'s bytes of every buffer (set by set), kept once the same
    /// sets were filled twice with that seed (a worker that measures again
    /// and again on them, a local runner's) if they total at most
    /// [`COPY_MAX`]: later refills copy them instead of computing them.
    copy: Option<Vec<Box<[u8]>>>,
}

/// Largest argument sets (bytes, all sets) whose fill is kept as a copy.
const COPY_MAX: usize = 64 << 20;

impl ArgSets {
    pub(super) fn new(args: &[ArgInfo], alloc_repeat: u32, seed: u64) -> Result<Self, KernelError> {
        if alloc_repeat == 0 {
            return Err(KernelError::BadArgs("alloc_repeat must be at least 1".into()));
        }
        if i32::try_from(args.len()).is_err() {
            return Err(KernelError::BadArgs(format!("{} arguments is too many", args.len())));
        }
        let mut rng = SplitMix64(seed);
        let sets = (0..alloc_repeat)
            .map(|_| ArgSet::new(args, &mut rng))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ArgSets { sets, args: args.to_vec(), seed, pristine: true, copy: None })
    }

    /// The sets, to hand to a kernel: from now on they may hold its writes,
    /// so the next [`refill`](Self::refill) fills them again.
    pub(super) fn for_kernel(&mut self) -> &mut [ArgSet] {
        self.pristine = false;
        &mut self.sets
    }

    /// Every buffer, set by set.
    fn bufs(&self) -> impl Iterator<Item = &AlignedBuf> {
        self.sets.iter().flat_map(|s| &s.bufs)
    }

    /// If these sets were made for the same `args` and `alloc_repeat`,
    /// fills them again with `seed`'s values (the bytes [`ArgSets::new`]
    /// would give: every argument buffer is overwritten, whatever a kernel
    /// wrote into it) and returns true; keeps the allocations, so their
    /// pages are neither freed nor faulted in again. Sets still
    /// [`pristine`](Self::pristine) with `seed`'s values already hold those
    /// bytes and are not filled again (a warm spare's, see the server).
    pub(super) fn refill(&mut self, args: &[ArgInfo], alloc_repeat: u32, seed: u64) -> bool {
        if self.args != args || usize::try_from(alloc_repeat).ok() != Some(self.sets.len()) {
            return false;
        }
        let same = self.seed == seed;
        if self.pristine && same {
            return true;
        }
        self.pristine = true;
        let bufs = self.sets.iter_mut().flat_map(|set| set.bufs.iter_mut());
        if let Some(copy) = self.copy.as_ref().filter(|_| same) {
            for (buf, bytes) in bufs.zip(copy) {
                buf.as_mut_slice().copy_from_slice(bytes);
            }
            return true;
        }
        let mut rng = SplitMix64(seed);
        for (buf, info) in bufs.zip(args.iter().cycle()) {
            fill(buf.as_mut_slice(), info.dtype, &mut rng);
        }
        self.seed = seed;
        let total: usize = self.bufs().map(|b| b.len).sum();
        self.copy =
            (same && total <= COPY_MAX).then(|| self.bufs().map(|b| b.as_slice().into()).collect());
        true
    }
}

/// An argument's size in bytes, refusing negative dimensions and overflow.
pub(super) fn checked_nbytes(index: usize, info: &ArgInfo) -> Result<usize, KernelError> {
    if i32::try_from(info.shape.len()).is_err() {
        return Err(KernelError::BadArgs(format!("argument {index} has too many dimensions")));
    }
    let mut bytes = info.dtype.bytes();
    for &dim in &info.shape {
        let dim = usize::try_from(dim).map_err(|_| {
            KernelError::BadArgs(format!("argument {index} has a negative dimension {dim}"))
        })?;
        bytes = bytes.checked_mul(dim).ok_or_else(|| {
            KernelError::BadArgs(format!("argument {index} of shape {:?} is too large", info.shape))
        })?;
    }
    if bytes > isize::MAX as usize - ALIGN {
        return Err(KernelError::BadArgs(format!("argument {index} is too large")));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------
