//! The measurement pipeline: kernels as shared libraries over DLPack tensors,
//! TVM's time evaluator, the builder and the runners.
//!
//! # Layout
//!
//! - `args.rs`: [`ArgInfo`] / [`DType`] in TVM's JSON shape.
//! - `evaluator.rs`: [`EvaluatorConfig`] and the adaptive stop rule [`AdaptiveStop`].
//! - `builder/`: the worker-side build plan and its default task
//!   [`CompileC`] (`plan.rs`), the parent-side [`LocalBuilder`] (`local.rs`),
//!   its settings and errors.
//! - `dlpack.rs`, `kernel/`: the worker side: the kernel tasks (`mod.rs`),
//!   loading (`load.rs`), argument buffers (`buffers.rs`), the random fill
//!   with its PRNG and float16 (`fill.rs`), TVM's timing loop (`timing.rs`),
//!   the adaptive and interleaved loop (`rounds.rs`), several candidates in
//!   one worker (`candidates.rs`), the [`Environment`] record (`env.rs`),
//!   `SCHED_FIFO` (`realtime.rs`) and the cache flush (`flush.rs`): the
//!   session-worker task types.
//! - `header.rs`: the C headers of the kernel ABI ([`KERNEL_HEADER`]) and of
//!   the TVM-FFI declarations of TVM exports ([`TVM_FFI_HEADER`]).
//! - `stats.rs`: [`Stats`] of batch costs (median, MAD, relative noise,
//!   `stable`) and [`Verdict`]s on whether two measurements differ beyond noise.
//! - `runner/`: the [`Runner`] trait, the [`Pipeline`] of stages,
//!   [`RpcRunner`] and [`LocalRunner`] (its own `# Layout` says more).
//! - `batch.rs`: [`Batch`], the stream of `(index, result)` runners and the
//!   builder return (dropping it cancels its unfinished work).
//! - `cpus.rs`: [`CpuPlan`] (which CPU measures) and [`pin_this_process`].
//! - `cause.rs`: [`Cause`], the typed source of an error that still serializes.

mod args;
mod batch;
mod builder;
mod cause;
mod cpus;
mod dlpack;
mod evaluator;
mod header;
mod kernel;
mod runner;
mod stats;

pub use args::{ArgInfo, ArgInfoError, DType};
pub use batch::Batch;
pub use builder::{
    BuildError, BuildFailure, BuildOutput, BuildPlan, BuildStream, BuildTask, BuildTaskOutput,
    BuilderInput, BuilderResult, CompileC, LocalBuilder, LocalBuilderConfig, MAX_NAME_LEN,
    MAX_SYMBOL_LEN, TVM_SHIM_MAX_ARGS, TvmExport,
};
pub use cause::Cause;
pub use cpus::{CpuPlan, pin_this_process};
pub use evaluator::{AdaptiveStop, EvaluatorConfig};
pub use header::{
    KERNEL_HEADER, KERNEL_HEADER_NAME, TVM_FFI_HEADER, TVM_FFI_HEADER_NAME, write_kernel_header,
    write_tvm_ffi_header,
};
pub(crate) use kernel::warm_for_fork;
pub use kernel::{
    AddCandidate, AllocArgs, CandidateTiming, DEFAULT_ENTRY, Environment, LoadKernel,
    MAX_CANDIDATES, MeasureKernel, MeasuredKernel, ReadArg, ReadCandidateArg, StopReason,
    TimeCandidates, TimeKernel, Timing, failure_kind,
};
pub use runner::{
    Backend, DefaultPipeline, DeviceSession, Element, LocalRunner, LocalRunnerBuilder, Measurement,
    Output, OutputError, Pipeline, RpcConfig, RpcConfigError, RpcRunner, RpcRunnerBuilder,
    RunError, RunStream, Runner, RunnerInput, RunnerResult, StageContext, StageTimes,
};
pub use stats::{Stats, Verdict, best_within_noise, best_within_noise_paired, compare_paired};
