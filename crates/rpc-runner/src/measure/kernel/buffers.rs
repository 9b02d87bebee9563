//! Argument buffers: aligned, owned, described by DLPack tensors.

use super::fill::{SplitMix64, fill};
use super::*;

/// A zero-initialized, 64-byte-aligned heap buffer, freed on drop.
pub(super) struct AlignedBuf {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
    pub(super) layout: Layout,
}

// SAFETY: an `AlignedBuf` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `None` if the size is impossible or the allocator refuses.
    pub(super) fn zeroed(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: `layout` has a nonzero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, len, layout })
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialized (zeroed) allocation of at
        // least `len` bytes owned by `self`; the borrow of `self` keeps it alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by the global allocator with `layout`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
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
}

// SAFETY: the raw pointers in `tensors` point only into `bufs` and `_shapes`,
// owned by the same `ArgSet` and moved together with it; nothing else holds them.
unsafe impl Send for ArgSet {}

impl ArgSet {
    pub(super) fn new(args: &[ArgInfo], rng: &mut SplitMix64) -> Result<Self, KernelError> {
        let mut bufs = Vec::with_capacity(args.len());
        let mut shapes = Vec::with_capacity(args.len());
        for (index, info) in args.iter().enumerate() {
            let bytes = checked_nbytes(index, info)?;
            let mut buf = AlignedBuf::zeroed(bytes).ok_or(KernelError::Alloc { index, bytes })?;
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
        Ok(ArgSet { bufs, _shapes: shapes, tensors })
    }
}

/// The argument sets of the current [`AllocArgs`].
pub(super) struct ArgSets {
    pub(super) sets: Vec<ArgSet>,
}

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
        Ok(ArgSets { sets })
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
