//! The session-worker side of a measurement: load a kernel, allocate its
//! arguments, time it with TVM's time evaluator, read arguments back.
//!
//! # Kernel ABI
//!
//! A kernel is a shared library exporting, with C linkage,
//!
//! ```c
//! int32_t entry(DLTensor* args, int32_t num_args);  // 0 = success
//! ```
//!
//! `args` points to `num_args` contiguous `DLTensor`s (dlpack.h), one per
//! argument in [`AllocArgs::args`] order: CPU tensors (`kDLCPU`, device 0),
//! compact row-major (`strides == NULL`), `byte_offset == 0`, data 64-byte
//! aligned. The symbol's name is [`LoadKernel::entry`], by default
//! [`DEFAULT_ENTRY`] (`"entry"`). A nonzero return is reported as
//! `kernel returned error N`.
//!
//! # Tasks
//!
//! All state lives in the worker's [`WorkerContext`], so the tasks are used
//! in order on one worker (one session): [`LoadKernel`] -> [`AllocArgs`] ->
//! [`TimeKernel`] (any number of times) -> [`ReadArg`] (to check outputs).
//! A worker that dies (a crashing kernel) loses that state; its replacement
//! starts empty.
//!
//! # Failure kinds
//!
//! Errors reach the caller as [`TaskFailure`]s whose `kind` is one of
//! [`failure_kind`]'s constants.

use std::alloc::Layout;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use popen_pool::{Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

use super::args::{ArgInfo, DType};
use super::dlpack::{DLDataType, DLTensor};
use super::evaluator::EvaluatorConfig;

/// The entry symbol a kernel exports unless told otherwise.
pub const DEFAULT_ENTRY: &str = "entry";

/// The `kind`s of the [`TaskFailure`]s the kernel tasks report.
pub mod failure_kind {
    /// The library could not be loaded (missing file, not a shared library,
    /// unresolved symbols); the message has the loader's (`dlerror`) text.
    pub const LOAD_ERROR: &str = "load_error";
    /// The library has no symbol of the entry's name; the message names it.
    pub const MISSING_SYMBOL: &str = "missing_symbol";
    /// The kernel returned nonzero: `kernel returned error N`.
    pub const KERNEL_ERROR: &str = "kernel_error";
    /// [`TimeKernel`](super::TimeKernel) before any successful
    /// [`LoadKernel`](super::LoadKernel) on this worker.
    pub const NO_KERNEL: &str = "no_kernel";
    /// [`TimeKernel`](super::TimeKernel) or [`ReadArg`](super::ReadArg)
    /// before any successful [`AllocArgs`](super::AllocArgs) on this worker.
    pub const NO_ARGS: &str = "no_args";
    /// [`AllocArgs`](super::AllocArgs) was given impossible arguments.
    pub const BAD_ARGS: &str = "bad_args";
    /// [`TimeKernel`](super::TimeKernel) was given an unusable configuration.
    pub const BAD_CONFIG: &str = "bad_config";
    /// The allocator refused an argument buffer.
    pub const ALLOC_ERROR: &str = "alloc_error";
    /// [`ReadArg`](super::ReadArg) named a set or an argument that does not exist.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// The clock read zero for too many batches in a row.
    pub const TIMER_ERROR: &str = "timer_error";
}

/// Alignment of every argument buffer (TVM's `kAllocAlignment`).
const ALIGN: usize = 64;

/// A cache line, for `clflush`.
#[cfg(target_arch = "x86_64")]
const CACHE_LINE: usize = 64;

/// TVM's growth factor for `number` when a batch is too short.
const GOLDEN_RATIO: f64 = 1.618;

/// Batches in a row that may read zero time before timing gives up (TVM's
/// `limit_zero_time_iterations` is 100 and then reports a cost of 0; we
/// grow `number` on a zero reading and fail instead, see [`next_number`]).
const MAX_ZERO_TIME_BATCHES: u32 = 10;

/// Costs reserved up front at most (a huge `repeat` must not abort the
/// worker on allocation before the first batch).
const PREALLOC: u32 = 1024;

/// The C signature of a kernel's entry.
type EntryFn = unsafe extern "C" fn(args: *mut DLTensor, num_args: i32) -> i32;

/// Everything that can go wrong in the kernel tasks; reported as a
/// [`TaskFailure`] of [`kind`](KernelError::kind).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum KernelError {
    /// dlopen failed.
    #[error("cannot load kernel {path}: {message}")]
    Load {
        /// The path given to dlopen.
        path: String,
        /// The loader's message.
        message: String,
    },
    /// dlsym failed.
    #[error("kernel {path} has no symbol {symbol:?}: {message}")]
    MissingSymbol {
        /// The library's path.
        path: String,
        /// The entry's name.
        symbol: String,
        /// The loader's message.
        message: String,
    },
    /// The kernel returned nonzero.
    #[error("kernel returned error {0}")]
    Kernel(i32),
    /// No kernel is loaded.
    #[error("no kernel loaded in this worker: run LoadKernel first")]
    NoKernel,
    /// No arguments are allocated.
    #[error("no arguments allocated in this worker: run AllocArgs first")]
    NoArgs,
    /// Impossible argument descriptions.
    #[error("bad arguments: {0}")]
    BadArgs(String),
    /// Unusable evaluator configuration.
    #[error("bad evaluator config: {0}")]
    BadConfig(String),
    /// An allocation failed.
    #[error("cannot allocate {bytes} bytes for argument {index}")]
    Alloc {
        /// The argument's index.
        index: usize,
        /// Its size.
        bytes: usize,
    },
    /// A set or argument index out of range.
    #[error("{what} {index} out of range: there are {len}")]
    OutOfRange {
        /// `"argument set"` or `"argument"`.
        what: &'static str,
        /// The index asked for.
        index: u32,
        /// How many there are.
        len: usize,
    },
    /// The clock read zero too often.
    #[error(
        "the clock read zero for {0} batches in a row (last number = {1}); cannot time this kernel"
    )]
    ZeroTime(u32, u32),
}

impl KernelError {
    /// The [`failure_kind`] of this error.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            KernelError::Load { .. } => failure_kind::LOAD_ERROR,
            KernelError::MissingSymbol { .. } => failure_kind::MISSING_SYMBOL,
            KernelError::Kernel(_) => failure_kind::KERNEL_ERROR,
            KernelError::NoKernel => failure_kind::NO_KERNEL,
            KernelError::NoArgs => failure_kind::NO_ARGS,
            KernelError::BadArgs(_) => failure_kind::BAD_ARGS,
            KernelError::BadConfig(_) => failure_kind::BAD_CONFIG,
            KernelError::Alloc { .. } => failure_kind::ALLOC_ERROR,
            KernelError::OutOfRange { .. } => failure_kind::OUT_OF_RANGE,
            KernelError::ZeroTime(..) => failure_kind::TIMER_ERROR,
        }
    }

    fn into_failure(self) -> TaskFailure {
        TaskFailure::new(self.kind(), self.to_string())
    }
}

// ---------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------

/// Loads a kernel library in the session's worker and looks up its entry
/// (task `rpc_runner.load_kernel`).
///
/// Any previously loaded kernel is unloaded first (so a new file uploaded
/// under the same name is really loaded); if loading fails, no kernel is
/// loaded. The library is opened with `RTLD_NOW | RTLD_LOCAL`, so unresolved
/// symbols are a load error rather than a crash at the first call.
///
/// # Errors
///
/// [`failure_kind::LOAD_ERROR`] with the loader's message,
/// [`failure_kind::MISSING_SYMBOL`] naming the symbol.
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::LoadKernel;
///
/// let task = LoadKernel::new("kernel.so").with_entry("matmul");
/// assert_eq!((task.path.as_str(), task.entry.as_str()), ("kernel.so", "matmul"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadKernel {
    /// The library: relative to the worker's working directory (a session's
    /// temp dir, where uploads land), or absolute (local use).
    pub path: String,
    /// The entry symbol ([`DEFAULT_ENTRY`] unless the kernel says otherwise).
    pub entry: String,
}

impl LoadKernel {
    /// Loads `path` with the entry [`DEFAULT_ENTRY`].
    pub fn new(path: impl Into<String>) -> Self {
        LoadKernel { path: path.into(), entry: DEFAULT_ENTRY.to_owned() }
    }

    /// Uses `entry` as the entry symbol.
    #[must_use]
    pub fn with_entry(mut self, entry: impl Into<String>) -> Self {
        self.entry = entry.into();
        self
    }
}

impl Task for LoadKernel {
    const NAME: &'static str = "rpc_runner.load_kernel";
    type Output = ();
    fn run(self, ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        drop(ctx.remove::<LoadedKernel>());
        let kernel =
            LoadedKernel::open(&self.path, &self.entry).map_err(KernelError::into_failure)?;
        ctx.insert(kernel);
        Ok(())
    }
}

/// Allocates `alloc_repeat` independent sets of the kernel's arguments, each
/// filled with seeded random values (task `rpc_runner.alloc_args`).
///
/// Replaces (and frees) the sets of an earlier call. Every buffer is 64-byte
/// aligned. Values: floats uniform in `[1, 10)` (as TVM's random fill),
/// integers uniform in `[0, 10)`. They come from one SplitMix64 stream
/// seeded with `seed`, filling set 0's arguments in order, then set 1's...:
/// the same `seed` and `args` give the same bytes on every machine and
/// version (and a set's contents do not depend on `alloc_repeat`).
///
/// # Errors
///
/// [`failure_kind::BAD_ARGS`] (`alloc_repeat == 0`, a negative dimension, a
/// size that overflows), [`failure_kind::ALLOC_ERROR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocArgs {
    /// The kernel's arguments, in the order it takes them.
    pub args: Vec<ArgInfo>,
    /// How many independent sets to allocate (>= 1); each is timed in turn.
    pub alloc_repeat: u32,
    /// Seed of the random fill.
    pub seed: u64,
}

impl Task for AllocArgs {
    const NAME: &'static str = "rpc_runner.alloc_args";
    type Output = ();
    fn run(self, ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        drop(ctx.remove::<ArgSets>());
        let sets = ArgSets::new(&self.args, self.alloc_repeat, self.seed)
            .map_err(KernelError::into_failure)?;
        ctx.insert(sets);
        Ok(())
    }
}

/// Times the loaded kernel on every allocated argument set with TVM's time
/// evaluator (task `rpc_runner.time_kernel`); returns the costs in seconds,
/// `repeat` per set, set after set.
///
/// For each set: one discarded warm-up call, then `repeat` batches. A batch
/// calls the entry `number` times under a monotonic clock; a batch shorter
/// than `min_repeat_ms` is run again with TVM's
/// `number = max(min_repeat_ms / (batch_ms / number) + 1, number * 1.618)`
/// (truncated; a batch that reads zero time grows `number` by the golden
/// ratio, and 10 zero readings in a row are an error), and the grown
/// `number` is kept for later batches and later sets, as TVM keeps it in
/// its evaluator. A batch's cost is its time / `number`. `cooldown_ms` is
/// slept between batches (and between sets). With `enable_cpu_cache_flush`,
/// every argument but the first is flushed from the CPU caches before each
/// timed batch (x86_64: `clflush` of every line, then `mfence`; elsewhere a
/// 16 MiB scratch buffer is written instead).
///
/// # Errors
///
/// [`failure_kind::KERNEL_ERROR`] (`kernel returned error N`; timing stops),
/// [`failure_kind::NO_KERNEL`], [`failure_kind::NO_ARGS`],
/// [`failure_kind::BAD_CONFIG`] (`number` or `repeat` is 0),
/// [`failure_kind::TIMER_ERROR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeKernel {
    /// How to time.
    pub config: EvaluatorConfig,
}

impl Task for TimeKernel {
    const NAME: &'static str = "rpc_runner.time_kernel";
    type Output = Vec<f64>;
    fn run(self, ctx: &mut WorkerContext) -> Result<Vec<f64>, TaskFailure> {
        time_kernel(&self.config, ctx).map_err(KernelError::into_failure)
    }
}

/// Returns the bytes of one argument of one set (task `rpc_runner.read_arg`),
/// for checking a kernel's output.
///
/// # Errors
///
/// [`failure_kind::NO_ARGS`], [`failure_kind::OUT_OF_RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadArg {
    /// The argument set, `0..alloc_repeat`.
    pub set: u32,
    /// The argument, `0..args.len()`.
    pub index: u32,
}

impl Task for ReadArg {
    const NAME: &'static str = "rpc_runner.read_arg";
    type Output = serde_bytes::ByteBuf;
    fn run(self, ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        read_arg(self, ctx).map_err(KernelError::into_failure)
    }
}

// ---------------------------------------------------------------------------
// The loaded kernel
// ---------------------------------------------------------------------------

/// A kernel's entry and the library that keeps it valid.
struct LoadedKernel {
    entry: EntryFn,
    /// `None` only for a kernel linked into the worker program (unit tests).
    _lib: Option<libloading::os::unix::Library>,
}

impl LoadedKernel {
    fn open(path: &str, entry: &str) -> Result<Self, KernelError> {
        let full = resolve(path);
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        // SAFETY: loading runs the library's initializers, i.e. code we
        // cannot check. Running untrusted kernels is what session workers
        // are for: at worst the library crashes this disposable process,
        // which the parent reports as a dead worker.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&full), flags) }
            .map_err(|e| KernelError::Load { path: path.to_owned(), message: e.to_string() })?;
        // SAFETY: the kernel ABI says the symbol is an `EntryFn`; we cannot
        // check that, and a kernel breaking its ABI can only crash this
        // worker. The pointer is copied out and stays valid as long as `lib`,
        // which `LoadedKernel` owns beside it.
        let entry =
            unsafe { lib.get::<EntryFn>(entry.as_bytes()) }.map(|symbol| *symbol).map_err(|e| {
                KernelError::MissingSymbol {
                    path: path.to_owned(),
                    symbol: entry.to_owned(),
                    message: e.to_string(),
                }
            })?;
        Ok(LoadedKernel { entry, _lib: Some(lib) })
    }
}

/// An absolute path for dlopen: a relative name without a `/` would make
/// dlopen search the library path instead of the working directory.
fn resolve(path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_owned();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(p),
        Err(_) => Path::new(".").join(p),
    }
}

// ---------------------------------------------------------------------------
// Argument buffers
// ---------------------------------------------------------------------------

/// A zero-initialized, 64-byte-aligned heap buffer, freed on drop.
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an `AlignedBuf` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `None` if the size is impossible or the allocator refuses.
    fn zeroed(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: `layout` has a nonzero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, len, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialized (zeroed) allocation of at
        // least `len` bytes owned by `self`; the borrow of `self` keeps it alive.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
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
struct ArgSet {
    /// `tensors[i].data` points into `bufs[i]`.
    bufs: Vec<AlignedBuf>,
    /// `tensors[i].shape` points into `shapes[i]` (a heap buffer that moving
    /// the `Vec`s does not move; never resized after the tensors are made).
    _shapes: Vec<Vec<i64>>,
    tensors: Vec<DLTensor>,
}

// SAFETY: the raw pointers in `tensors` point only into `bufs` and `_shapes`,
// owned by the same `ArgSet` and moved together with it; nothing else holds them.
unsafe impl Send for ArgSet {}

impl ArgSet {
    fn new(args: &[ArgInfo], rng: &mut SplitMix64) -> Result<Self, KernelError> {
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
struct ArgSets {
    sets: Vec<ArgSet>,
}

impl ArgSets {
    fn new(args: &[ArgInfo], alloc_repeat: u32, seed: u64) -> Result<Self, KernelError> {
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
fn checked_nbytes(index: usize, info: &ArgInfo) -> Result<usize, KernelError> {
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
// Random fill
// ---------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea and Flood; the constants of Vigna's reference
/// version): tiny, fast and fixed forever, so fills never change with a
/// dependency's version.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[1, 10)`.
    fn float(&mut self) -> f64 {
        1.0 + 9.0 * self.unit()
    }

    /// Uniform in `[0, 10)` (the modulo bias is below 1e-18).
    fn small_int(&mut self) -> u8 {
        (self.next_u64() % 10) as u8
    }
}

/// Fills `bytes` (a whole number of elements) with random values of `dtype`.
fn fill(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    fn each<const N: usize>(bytes: &mut [u8], mut value: impl FnMut() -> [u8; N]) {
        for chunk in bytes.chunks_exact_mut(N) {
            chunk.copy_from_slice(&value());
        }
    }
    match dtype {
        DType::F16 => {
            each(bytes, || below_ten_f16(f32_to_f16_bits(rng.float() as f32)).to_ne_bytes())
        }
        DType::F32 => each(bytes, || below_ten_f32(rng.float() as f32).to_ne_bytes()),
        DType::F64 => each(bytes, || rng.float().to_ne_bytes()),
        DType::I8 => each(bytes, || (rng.small_int() as i8).to_ne_bytes()),
        DType::I16 => each(bytes, || i16::from(rng.small_int()).to_ne_bytes()),
        DType::I32 => each(bytes, || i32::from(rng.small_int()).to_ne_bytes()),
        DType::I64 => each(bytes, || i64::from(rng.small_int()).to_ne_bytes()),
        DType::U8 => each(bytes, || [rng.small_int()]),
    }
}

/// Keeps a value rounded up to 10 inside `[1, 10)`.
fn below_ten_f32(x: f32) -> f32 {
    if x >= 10.0 { f32::from_bits(10.0f32.to_bits() - 1) } else { x }
}

/// `f16` bits of 10.0.
const F16_TEN: u16 = 0x4900;

/// Keeps an `f16` rounded up to 10 inside `[1, 10)`.
fn below_ten_f16(bits: u16) -> u16 {
    if bits >= F16_TEN { F16_TEN - 1 } else { bits }
}

/// IEEE 754 binary16 bits of `x`, rounded to nearest, ties to even
/// (overflow to infinity, subnormals kept, NaN stays NaN).
fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN (quiet, keeping it a NaN).
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    // The binary16 biased exponent.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal binary16 (or zero): value = m * 2^-24.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1u32 << shift) - 1);
        let mut h = m >> shift;
        if rem > half || (rem == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        // A carry into the exponent is right, up to infinity.
        h += 1;
    }
    sign | h as u16
}

// ---------------------------------------------------------------------------
// The time evaluator
// ---------------------------------------------------------------------------

/// The next `number` after a batch of `number` calls took `batch`, shorter
/// than `min_repeat_ms`.
///
/// TVM's formula (`WrapTimeEvaluator` in `src/runtime/profiling.cc`, formerly
/// `rpc_module.cc`), truncated to an integer as its `static_cast<int>`:
///
/// ```text
/// number = max(min_repeat_ms / (batch_ms / number) + 1, number * 1.618)
/// ```
///
/// On a zero reading TVM keeps `number` and retries; we grow it to
/// `max(number + 1, number * 1.618)` so a coarse clock gets a longer batch.
fn next_number(number: u32, batch: Duration, min_repeat_ms: u64) -> u32 {
    let n = f64::from(number);
    let grown = if batch.is_zero() {
        (n * GOLDEN_RATIO).max(n + 1.0)
    } else {
        let batch_ms = batch.as_nanos() as f64 / 1e6;
        (min_repeat_ms as f64 / (batch_ms / n) + 1.0).max(n * GOLDEN_RATIO)
    };
    // `as` truncates toward zero and saturates at u32::MAX.
    grown as u32
}

fn check_config(cfg: &EvaluatorConfig) -> Result<(), KernelError> {
    if cfg.number == 0 {
        return Err(KernelError::BadConfig("number must be at least 1".into()));
    }
    if cfg.repeat == 0 {
        return Err(KernelError::BadConfig("repeat must be at least 1".into()));
    }
    Ok(())
}

/// TVM's time evaluator over one argument set, on a closure.
///
/// `call` runs the kernel once (`Err(code)` for a nonzero return); `flush`
/// runs before each timed batch when the config asks for a cache flush.
/// `number` starts at the config's value for the first set and carries the
/// grown value from set to set.
fn time_batches(
    cfg: &EvaluatorConfig,
    number: &mut u32,
    mut call: impl FnMut() -> Result<(), i32>,
    flush: impl FnMut(),
) -> Result<Vec<f64>, KernelError> {
    // The discarded warm-up call.
    call().map_err(KernelError::Kernel)?;
    run_batches(
        cfg,
        number,
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                call()?;
            }
            Ok(start.elapsed())
        },
        flush,
        std::thread::sleep,
    )
}

/// The batch loop of [`time_batches`], over `batch(number) -> elapsed`, so
/// it can be tested with a fake clock.
fn run_batches(
    cfg: &EvaluatorConfig,
    number: &mut u32,
    mut batch: impl FnMut(u32) -> Result<Duration, i32>,
    mut flush: impl FnMut(),
    mut pause: impl FnMut(Duration),
) -> Result<Vec<f64>, KernelError> {
    check_config(cfg)?;
    *number = (*number).max(1);
    let min_ms = cfg.min_repeat_ms as f64;
    let mut costs = Vec::with_capacity(cfg.repeat.min(PREALLOC) as usize);
    for i in 0..cfg.repeat {
        if i > 0 && cfg.cooldown_ms > 0 {
            pause(Duration::from_millis(cfg.cooldown_ms));
        }
        let mut zero_batches = 0;
        let elapsed = loop {
            if cfg.enable_cpu_cache_flush {
                flush();
            }
            let elapsed = batch(*number).map_err(KernelError::Kernel)?;
            if elapsed.as_nanos() as f64 / 1e6 >= min_ms {
                break elapsed;
            }
            if elapsed.is_zero() {
                zero_batches += 1;
                if zero_batches >= MAX_ZERO_TIME_BATCHES {
                    return Err(KernelError::ZeroTime(zero_batches, *number));
                }
            } else {
                zero_batches = 0;
            }
            *number = next_number(*number, elapsed, cfg.min_repeat_ms);
        };
        costs.push(elapsed.as_secs_f64() / f64::from(*number));
    }
    Ok(costs)
}

/// Evicts every argument but the first from the CPU caches.
struct CacheFlush<'a> {
    bufs: &'a [AlignedBuf],
    /// The fallback's scratch buffer (architectures without `clflush`).
    #[cfg(not(target_arch = "x86_64"))]
    scratch: Vec<u8>,
}

impl<'a> CacheFlush<'a> {
    fn new(bufs: &'a [AlignedBuf]) -> Self {
        CacheFlush {
            bufs: bufs.get(1..).unwrap_or(&[]),
            #[cfg(not(target_arch = "x86_64"))]
            scratch: Vec::new(),
        }
    }

    /// x86_64: `clflush` every 64-byte line of the arguments, then `mfence`
    /// (what TVM's `cpu_cache_flush` does).
    #[cfg(target_arch = "x86_64")]
    fn flush(&mut self) {
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
    fn flush(&mut self) {
        if self.bufs.is_empty() {
            return;
        }
        scratch_flush(&mut self.scratch);
    }
}

/// The fallback flush: writes `scratch` (grown to 16 MiB) end to end.
#[cfg(any(not(target_arch = "x86_64"), test))]
fn scratch_flush(scratch: &mut Vec<u8>) {
    const SCRATCH: usize = 16 << 20;
    scratch.resize(SCRATCH, 0);
    for (i, byte) in scratch.iter_mut().enumerate() {
        *byte = byte.wrapping_add(i as u8);
    }
    std::hint::black_box(scratch);
}

fn time_kernel(cfg: &EvaluatorConfig, ctx: &mut WorkerContext) -> Result<Vec<f64>, KernelError> {
    check_config(cfg)?;
    // The library stays in the context, untouched, for the whole task.
    let entry = ctx.get::<LoadedKernel>().ok_or(KernelError::NoKernel)?.entry;
    let sets = ctx.get_mut::<ArgSets>().ok_or(KernelError::NoArgs)?;
    let mut number = cfg.number;
    let mut costs =
        Vec::with_capacity(sets.sets.len().saturating_mul(cfg.repeat.min(PREALLOC) as usize));
    for (i, set) in sets.sets.iter_mut().enumerate() {
        if i > 0 && cfg.cooldown_ms > 0 {
            std::thread::sleep(Duration::from_millis(cfg.cooldown_ms));
        }
        let mut flusher = CacheFlush::new(&set.bufs);
        // `ArgSets::new` checked that the count fits.
        let num_args = i32::try_from(set.tensors.len()).unwrap_or(i32::MAX);
        let tensors = set.tensors.as_mut_ptr();
        let call = || {
            // SAFETY: `entry` comes from a library kept loaded in the
            // context for this whole task; `tensors` points to `num_args`
            // DLTensors whose data and shape pointers point into live
            // buffers of the sizes they describe. What the kernel does with
            // them is beyond our control: a bad kernel can only crash this
            // worker process, which is what session workers are for.
            let rc = unsafe { entry(tensors, num_args) };
            if rc == 0 { Ok(()) } else { Err(rc) }
        };
        costs.extend(time_batches(cfg, &mut number, call, || flusher.flush())?);
    }
    Ok(costs)
}

fn read_arg(task: ReadArg, ctx: &WorkerContext) -> Result<serde_bytes::ByteBuf, KernelError> {
    let sets = &ctx.get::<ArgSets>().ok_or(KernelError::NoArgs)?.sets;
    let set = sets.get(task.set as usize).ok_or(KernelError::OutOfRange {
        what: "argument set",
        index: task.set,
        len: sets.len(),
    })?;
    let buf = set.bufs.get(task.index as usize).ok_or(KernelError::OutOfRange {
        what: "argument",
        index: task.index,
        len: set.bufs.len(),
    })?;
    Ok(serde_bytes::ByteBuf::from(buf.as_slice().to_vec()))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn config(number: u32, repeat: u32, min_repeat_ms: u64) -> EvaluatorConfig {
        EvaluatorConfig { number, repeat, min_repeat_ms, ..Default::default() }
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn next_number_is_tvms_formula() {
        // max(100 / (1 / 3) + 1, 3 * 1.618) = 301
        assert_eq!(next_number(3, Duration::from_millis(1), 100), 301);
        // max(100 / (60 / 10) + 1, 16.18) = max(17.67, 16.18) -> 17
        assert_eq!(next_number(10, Duration::from_millis(60), 100), 17);
        // max(100 / (99 / 100) + 1, 161.8) -> 161: the golden ratio wins
        assert_eq!(next_number(100, Duration::from_millis(99), 100), 161);
        // Zero time: grow by the golden ratio, at least by one.
        assert_eq!(next_number(1, Duration::ZERO, 100), 2);
        assert_eq!(next_number(10, Duration::ZERO, 100), 16);
        // Saturates instead of wrapping.
        assert_eq!(next_number(u32::MAX, Duration::from_nanos(1), 100), u32::MAX);
    }

    #[test]
    fn short_batches_grow_number_which_stays_grown() {
        let cfg = config(3, 3, 1);
        let mut number = cfg.number;
        let mut batches = Vec::new();
        let flushes = Cell::new(0);
        // Each call takes 1 µs on the fake clock.
        let costs = run_batches(
            &cfg,
            &mut number,
            |n| {
                batches.push(n);
                Ok(us(u64::from(n)))
            },
            || flushes.set(flushes.get() + 1),
            |_| panic!("no cooldown configured"),
        )
        .unwrap();
        // 3 µs < 1 ms -> max(1 / (0.003 / 3) + 1, 4.854) = 1001 -> 1001 µs >= 1 ms.
        assert_eq!(batches, vec![3, 1001, 1001, 1001]);
        assert_eq!(number, 1001);
        assert_eq!(costs.len(), 3);
        for c in costs {
            assert!((c - 1e-6).abs() < 1e-12, "{c}");
        }
        assert_eq!(flushes.get(), 0, "the cache flush is off by default");
    }

    #[test]
    fn repeat_cooldown_and_flush() {
        let mut cfg = config(2, 4, 0);
        cfg.cooldown_ms = 7;
        cfg.enable_cpu_cache_flush = true;
        let mut number = cfg.number;
        let mut pauses = Vec::new();
        let flushes = Cell::new(0);
        let costs = run_batches(
            &cfg,
            &mut number,
            |n| Ok(us(10 * u64::from(n))),
            || flushes.set(flushes.get() + 1),
            |d| pauses.push(d),
        )
        .unwrap();
        assert_eq!(costs, vec![10e-6; 4]);
        assert_eq!(pauses, vec![Duration::from_millis(7); 3], "between batches only");
        assert_eq!(flushes.get(), 4, "before each batch");
    }

    #[test]
    fn zero_time_batches_are_bounded() {
        let cfg = config(1, 2, 10);
        let mut number = cfg.number;
        let mut batches = Vec::new();
        let err = run_batches(
            &cfg,
            &mut number,
            |n| {
                batches.push(n);
                Ok(Duration::ZERO)
            },
            || {},
            |_| {},
        )
        .unwrap_err();
        assert_eq!(err.kind(), "timer_error");
        assert_eq!(batches.len(), MAX_ZERO_TIME_BATCHES as usize);
        assert_eq!(&batches[..5], &[1, 2, 3, 4, 6]);
        assert!(err.to_string().contains("zero for 10 batches"), "{err}");

        // Without a minimum, a zero reading is accepted as in TVM.
        let mut number = 1;
        let costs =
            run_batches(&config(1, 2, 0), &mut number, |_| Ok(Duration::ZERO), || {}, |_| {})
                .unwrap();
        assert_eq!(costs, vec![0.0, 0.0]);
    }

    #[test]
    fn a_kernel_error_stops_timing() {
        let cfg = config(1, 5, 0);
        let mut calls = 0;
        let err = time_batches(
            &cfg,
            &mut 1,
            || {
                calls += 1;
                if calls == 3 { Err(3) } else { Ok(()) }
            },
            || {},
        )
        .unwrap_err();
        assert_eq!(err, KernelError::Kernel(3));
        assert_eq!(err.to_string(), "kernel returned error 3");
        assert_eq!(err.kind(), "kernel_error");
        assert_eq!(calls, 3);
        // The warm-up call counts too.
        let err = time_batches(&cfg, &mut 1, || Err(-1), || {}).unwrap_err();
        assert_eq!(err, KernelError::Kernel(-1));
    }

    #[test]
    fn bad_configs_are_refused() {
        for cfg in [config(0, 1, 0), config(1, 0, 0)] {
            let err = time_batches(&cfg, &mut 1, || Ok(()), || {}).unwrap_err();
            assert_eq!(err.kind(), "bad_config", "{err}");
        }
    }

    #[test]
    fn a_tiny_call_gets_a_large_number() {
        let cfg = config(3, 2, 5);
        let mut number = cfg.number;
        let mut calls = 0u64;
        let costs = time_batches(
            &cfg,
            &mut number,
            || {
                calls += 1;
                std::hint::black_box(calls);
                Ok(())
            },
            || {},
        )
        .unwrap();
        assert_eq!(costs.len(), 2);
        assert!(number > 1000, "number grew to {number}");
        assert!(calls > 2 * u64::from(number), "{calls} calls");
        for c in costs {
            assert!(c > 0.0 && c < 1e-5, "{c}");
        }
    }

    #[test]
    fn a_spinning_call_is_timed() {
        let cfg = config(3, 5, 0);
        let mut calls = 0;
        let costs = time_batches(
            &cfg,
            &mut 3,
            || {
                calls += 1;
                let start = Instant::now();
                while start.elapsed() < us(200) {
                    std::hint::spin_loop();
                }
                Ok(())
            },
            || {},
        )
        .unwrap();
        assert_eq!(calls, 1 + 5 * 3);
        let mut sorted = costs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[2];
        assert!((200e-6..400e-6).contains(&median), "{costs:?}");
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        let cases: &[(f32, u16)] = &[
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (1.5, 0x3e00),
            (10.0, 0x4900),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),            // tie at the top rounds to infinity
            (1.0 + 1.0 / 2048.0, 0x3c00), // tie, even stays
            (1.0 + 3.0 / 2048.0, 0x3c02), // tie, odd rounds up
            (f32::from_bits(0x3f80_1001), 0x3c01), // just above a tie
            (6.103_515_6e-5, 0x0400),     // smallest normal
            (5.960_464_5e-8, 0x0001),     // smallest subnormal
            (2.0e-8, 0x0000),             // underflow
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
        ];
        for &(x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x03ff, 0);
    }

    fn args() -> Vec<ArgInfo> {
        vec![
            ArgInfo::tensor(DType::F32, [3, 5]),
            ArgInfo::tensor(DType::F16, [100]),
            ArgInfo::tensor(DType::I32, [7]),
            ArgInfo::tensor(DType::U8, [0, 4]),
            ArgInfo::tensor(DType::F64, Vec::<i64>::new()),
        ]
    }

    fn read(ctx: &WorkerContext, set: u32, index: u32) -> Vec<u8> {
        read_arg(ReadArg { set, index }, ctx).unwrap().into_vec()
    }

    #[test]
    fn alloc_args_is_seeded_aligned_and_in_range() {
        let mut ctx = WorkerContext::default();
        AllocArgs { args: args(), alloc_repeat: 2, seed: 42 }.run(&mut ctx).unwrap();
        let sets = &ctx.get::<ArgSets>().unwrap().sets;
        assert_eq!(sets.len(), 2);
        for set in sets {
            for (t, buf) in set.tensors.iter().zip(&set.bufs) {
                assert_eq!(t.data as usize % 64, 0);
                assert_eq!(t.data, buf.ptr.as_ptr().cast());
            }
            assert_eq!(set.tensors[0].ndim, 2);
            // SAFETY: the shape pointer points at the set's own 2-element shape.
            assert_eq!(unsafe { *set.tensors[0].shape.add(1) }, 5);
            assert_eq!(set.tensors[1].dtype, DLDataType { code: 2, bits: 16, lanes: 1 });
            assert_eq!(set.tensors[4].ndim, 0);
        }
        let a = read(&ctx, 0, 0);
        assert_eq!(a.len(), 60);
        for v in a.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())) {
            assert!((1.0..10.0).contains(&v), "{v}");
        }
        for h in read(&ctx, 0, 1).chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])) {
            assert!((0x3c00..0x4900).contains(&h), "{h:#x}");
        }
        for v in read(&ctx, 1, 2).chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
        {
            assert!((0..10).contains(&v), "{v}");
        }
        assert!(read(&ctx, 0, 3).is_empty());
        let scalar = f64::from_ne_bytes(read(&ctx, 1, 4).try_into().unwrap());
        assert!((1.0..10.0).contains(&scalar));
        assert_ne!(read(&ctx, 0, 0), read(&ctx, 1, 0), "sets are independent");

        // Same seed, same bytes; set 0 does not depend on alloc_repeat.
        let mut again = WorkerContext::default();
        AllocArgs { args: args(), alloc_repeat: 1, seed: 42 }.run(&mut again).unwrap();
        for i in 0..5 {
            assert_eq!(read(&ctx, 0, i), read(&again, 0, i));
        }
        AllocArgs { args: args(), alloc_repeat: 1, seed: 43 }.run(&mut again).unwrap();
        assert_ne!(read(&ctx, 0, 0), read(&again, 0, 0));
    }

    #[test]
    fn fill_is_stable() {
        // Pinned so a change to the generator is noticed: fills are part of
        // what a tuning log reproduces.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut bytes = [0u8; 4];
        fill(&mut bytes, DType::I32, &mut SplitMix64(7));
        assert_eq!(i32::from_ne_bytes(bytes), (SplitMix64(7).next_u64() % 10) as i32);
    }

    #[test]
    fn bad_alloc_args_and_read_arg_bounds() {
        let mut ctx = WorkerContext::default();
        let bad = |args: Vec<ArgInfo>, alloc_repeat| {
            AllocArgs { args, alloc_repeat, seed: 0 }
                .run(&mut WorkerContext::default())
                .unwrap_err()
        };
        assert_eq!(bad(args(), 0).kind, "bad_args");
        let err = bad(vec![ArgInfo::tensor(DType::F32, [2, -1])], 1);
        assert_eq!(err.kind, "bad_args");
        assert!(err.message.contains("negative dimension -1"), "{}", err.message);
        let err = bad(vec![ArgInfo::tensor(DType::F64, [1 << 40, 1 << 40])], 1);
        assert_eq!(err.kind, "bad_args");

        let err = ReadArg { set: 0, index: 0 }.run(&mut ctx).unwrap_err();
        assert_eq!(err.kind, "no_args");
        AllocArgs { args: args(), alloc_repeat: 2, seed: 0 }.run(&mut ctx).unwrap();
        let err = ReadArg { set: 2, index: 0 }.run(&mut ctx).unwrap_err();
        assert_eq!(err.kind, "out_of_range");
        assert_eq!(err.message, "argument set 2 out of range: there are 2");
        let err = ReadArg { set: 1, index: 5 }.run(&mut ctx).unwrap_err();
        assert_eq!(err.message, "argument 5 out of range: there are 5");
    }

    #[test]
    fn time_kernel_needs_a_kernel_and_args() {
        let mut ctx = WorkerContext::default();
        let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
        assert_eq!(err.kind, "no_kernel");
        assert!(err.message.contains("LoadKernel"), "{}", err.message);
        ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
        let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
        assert_eq!(err.kind, "no_args");
        assert!(err.message.contains("AllocArgs"), "{}", err.message);
    }

    /// `c = a + b` over f32 vectors of one length; 7 on a bad signature.
    unsafe extern "C" fn add_kernel(args: *mut DLTensor, num_args: i32) -> i32 {
        if num_args != 3 {
            return 7;
        }
        // SAFETY: the caller passes `num_args` tensors.
        let t = unsafe { std::slice::from_raw_parts(args, 3) };
        // SAFETY: each tensor has `ndim` dims at `shape`.
        let lens: Vec<_> = t.iter().map(|t| unsafe { *t.shape } as usize).collect();
        if t.iter().any(|t| t.ndim != 1 || t.dtype.code != 2 || t.dtype.bits != 32) {
            return 7;
        }
        // SAFETY: compact f32 tensors of `lens[i]` elements.
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(t[0].data as *const f32, lens[0]),
                std::slice::from_raw_parts(t[1].data as *const f32, lens[1]),
                std::slice::from_raw_parts_mut(t[2].data as *mut f32, lens[2]),
            )
        };
        for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
            *c = a + b;
        }
        0
    }

    #[test]
    fn time_kernel_calls_the_entry_on_each_set() {
        let mut ctx = WorkerContext::default();
        ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
        let vec = ArgInfo::tensor(DType::F32, [1000]);
        AllocArgs { args: vec![vec.clone(); 3], alloc_repeat: 2, seed: 5 }.run(&mut ctx).unwrap();
        let mut cfg = config(2, 3, 0);
        cfg.enable_cpu_cache_flush = true;
        let costs = TimeKernel { config: cfg }.run(&mut ctx).unwrap();
        assert_eq!(costs.len(), 6);
        assert!(costs.iter().all(|&c| c > 0.0 && c < 1e-3), "{costs:?}");
        let f = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
        };
        for set in 0..2 {
            let (a, b, c) = (f(read(&ctx, set, 0)), f(read(&ctx, set, 1)), f(read(&ctx, set, 2)));
            for i in 0..1000 {
                assert_eq!(c[i], a[i] + b[i]);
            }
        }
        // A bad signature is a kernel error.
        AllocArgs { args: vec![vec; 2], alloc_repeat: 1, seed: 5 }.run(&mut ctx).unwrap();
        let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
        assert_eq!(
            (err.kind.as_str(), err.message.as_str()),
            ("kernel_error", "kernel returned error 7")
        );
    }

    #[test]
    fn missing_or_bogus_libraries_are_load_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.so");
        let err = LoadKernel::new(missing.to_str().unwrap()).run(&mut WorkerContext::default());
        let err = err.unwrap_err();
        assert_eq!(err.kind, "load_error");
        assert!(err.message.contains("No such file"), "{}", err.message);
        let bogus = dir.path().join("bogus.so");
        std::fs::write(&bogus, b"not an ELF file, just text").unwrap();
        let err = LoadKernel::new(bogus.to_str().unwrap()).run(&mut WorkerContext::default());
        let err = err.unwrap_err();
        assert_eq!(err.kind, "load_error");
        assert!(err.message.contains("bogus.so"), "{}", err.message);
    }

    #[test]
    fn cache_flush_runs_on_real_buffers() {
        let bufs: Vec<_> = [0, 1, 100, 4096].map(|n| AlignedBuf::zeroed(n).unwrap()).into();
        let mut flusher = CacheFlush::new(&bufs);
        flusher.flush();
        CacheFlush::new(&[]).flush();
        let mut scratch = Vec::new();
        scratch_flush(&mut scratch);
        assert_eq!(scratch.len(), 16 << 20);
    }
}
