//! The measurement pipeline: kernels as shared libraries over DLPack tensors,
//! TVM's time evaluator, the builder and the runners.
//!
//! # Layout
//!
//! - `args.rs`: [`ArgInfo`] / [`DType`] in TVM's JSON shape.
//! - `evaluator.rs`: [`EvaluatorConfig`].
//! - `builder.rs`: [`LocalBuilder`], compiling candidates in a process pool,
//!   and its default build task [`CompileC`].
//! - `dlpack.rs`, `kernel.rs`: the worker side: loading a kernel, allocating
//!   arguments, the timing loop (session-worker task types).
//! - `header.rs`: the C header of the kernel ABI ([`KERNEL_HEADER`]).
//! - `runner.rs`: the [`Pipeline`] of stages, [`RpcRunner`] and [`LocalRunner`].

mod args;
mod builder;
mod dlpack;
mod evaluator;
mod header;
mod kernel;
mod runner;

pub use args::{ArgInfo, DType};
pub use builder::{
    BuildError, BuildFailure, BuildOutput, BuildPlan, BuildTask, BuildTaskOutput, BuilderInput,
    BuilderResult, CompileC, LocalBuilder, LocalBuilderConfig, MAX_NAME_LEN,
};
pub use evaluator::EvaluatorConfig;
pub use header::{KERNEL_HEADER, KERNEL_HEADER_NAME, write_kernel_header};
pub use kernel::{AllocArgs, DEFAULT_ENTRY, LoadKernel, ReadArg, TimeKernel, failure_kind};
pub use runner::{
    DefaultPipeline, LocalRunner, Measurement, Pipeline, RpcConfig, RpcRunner, RpcRunnerBuilder,
    RunError, RunnerFuture, RunnerInput, RunnerResult, StageContext,
};
