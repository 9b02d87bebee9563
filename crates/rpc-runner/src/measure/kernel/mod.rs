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
//! [`TimeKernel`] (any number of times) -> [`ReadArg`] (to check outputs);
//! [`MeasureKernel`] runs them in one task.
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

mod buffers;
mod candidates;
mod env;
mod fill;
mod flush;
mod fused;
mod load;
mod realtime;
mod rounds;
#[cfg(test)]
mod tests;
mod timing;

pub use self::candidates::{
    AddCandidate, CandidateTiming, MAX_CANDIDATES, ReadCandidateArg, TimeCandidates,
};
pub use self::env::Environment;
pub(crate) use self::env::{online_cpus, warm_for_fork};
pub(crate) use self::fill::host_args;
pub use self::fused::{MeasureKernel, MeasuredKernel};
pub use self::rounds::StopReason;

use self::buffers::{AlignedBuf, ArgSets};
use self::flush::CacheFlush;
use self::load::LoadedKernel;
use self::timing::{read_arg, time_kernel};
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
    #[error("cannot allocate {bytes} bytes for an argument set")]
    Alloc {
        /// The set's size (all its arguments in one allocation).
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
/// Replaces (and frees) the sets of an earlier call; when that call was for
/// the same `args` and `alloc_repeat`, its buffers are kept and filled
/// again instead (the same bytes, without allocating and faulting in new
/// pages). Every buffer is 64-byte aligned. Values: floats uniform in `[1, 10)` (as TVM's random fill),
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
        if let Some(sets) = ctx.get_mut::<ArgSets>() {
            if sets.refill(&self.args, self.alloc_repeat, self.seed) {
                return Ok(());
            }
        }
        drop(ctx.remove::<ArgSets>());
        let sets = ArgSets::new(&self.args, self.alloc_repeat, self.seed)
            .map_err(KernelError::into_failure)?;
        ctx.insert(sets);
        Ok(())
    }
}

/// Times the loaded kernel on every allocated argument set (task
/// `rpc_runner.time_kernel`); returns the costs in seconds with how they
/// were taken ([`Timing`]: calls per batch, why timing stopped, the
/// [`Environment`]).
///
/// **TVM's rule** (`config.adaptive == None`). For each set: one discarded
/// warm-up call, then `repeat` batches. A batch calls the entry `number`
/// times under a monotonic clock; a batch shorter than `min_repeat_ms` is
/// run again with TVM's
/// `number = max(min_repeat_ms / (batch_ms / number) + 1, number * 1.618)`
/// (truncated; a batch that reads zero time grows `number` by the golden
/// ratio, and 10 zero readings in a row are an error), and the grown
/// `number` is kept for later batches and later sets, as TVM keeps it in
/// its evaluator. A batch's cost is its time / `number`. `cooldown_ms` is
/// slept between batches (and between sets).
///
/// **Adaptive rule** ([`AdaptiveStop`](crate::measure::AdaptiveStop)). One
/// warm-up call per set, `number` calibrated the same way on set 0 (these
/// batches are discarded), then batches on the sets in turn until the
/// relative noise of the costs is at most the target with at least
/// `min_batches` of them, or `max_batches` / `max_time_ms` is reached
/// ([`StopReason`] says which).
///
/// Both: with `enable_cpu_cache_flush`, every argument but the first is
/// flushed from the CPU caches before each timed batch (x86_64: `clflush`
/// of every line, then `mfence`; elsewhere a 16 MiB scratch buffer is
/// written instead); with `realtime`, the loop runs under `SCHED_FIFO`
/// where permitted and sleeps 0.1 ms between batches.
///
/// # Errors
///
/// [`failure_kind::KERNEL_ERROR`] (`kernel returned error N`; timing stops),
/// [`failure_kind::NO_KERNEL`], [`failure_kind::NO_ARGS`],
/// [`failure_kind::BAD_CONFIG`] (`number` or `repeat` is 0, an impossible
/// adaptive rule), [`failure_kind::TIMER_ERROR`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeKernel {
    /// How to time.
    pub config: EvaluatorConfig,
}

/// What [`TimeKernel`] returns: the batch costs and how they were taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Timing {
    /// One cost per batch, in seconds: with TVM's rule `repeat` per set,
    /// set after set; with the adaptive rule, the sets in turn.
    pub costs: Vec<f64>,
    /// Calls per batch at the end.
    pub number: u32,
    /// Why timing stopped.
    pub stop: StopReason,
    /// Batches the adaptive rule discarded and timed again because the
    /// timed thread was off its CPU for more than 0.5% of the batch (other
    /// tasks ran on it); at most `max_batches`, then such batches count.
    pub preempted: u32,
    /// Where and under what conditions it was timed.
    pub env: Environment,
}

impl Timing {
    fn of(o: rounds::RoundsOut, mut env: Environment) -> Timing {
        if o.preempted_counted > 0 {
            env.warnings.push(format!(
                "{} batches lost more than 0.5% of their time to other tasks on the CPU and were counted (after {} were timed again)",
                o.preempted_counted, o.preempted
            ));
        }
        Timing { costs: o.costs, number: o.number, stop: o.stop, preempted: o.preempted, env }
    }
}

impl Task for TimeKernel {
    const NAME: &'static str = "rpc_runner.time_kernel";
    type Output = Timing;
    fn run(self, ctx: &mut WorkerContext) -> Result<Timing, TaskFailure> {
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
