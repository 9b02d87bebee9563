//! The builder: [`LocalBuilder`] compiles candidate kernels in a `popen_pool::PopenPool`,
//! with a per-build time limit, and classifies each failure (the counterpart
//! of TVM's meta-schedule `LocalBuilder` and its `MeasureErrorNo` codes).
//!
//! The parent validates each [`BuilderInput`], resolves it into a
//! [`BuildPlan`] (compiler, flags, source and artifact paths under the
//! builder's output directory) and hands a build task made from the plan to a
//! worker process. The default task, [`CompileC`], writes the source and runs
//! the C compiler; any task type whose output is [`BuildTaskOutput`] can take
//! its place ([`LocalBuilder::with_task`]).
//!
//! Failures are told apart, never panicked on:
//! - [`BuildError::Compile`]: the compiler ran and failed; its stderr and exit status;
//! - [`BuildError::Timeout`]: the build ran past the limit; the worker's whole
//!   process group (the compiler and its `cc1`/`as`/`ld` children too) was killed;
//! - [`BuildError::Crash`]: the build task did not finish normally (its worker
//!   died, it panicked) or no worker could be started;
//! - [`BuildError::Io`]: the source could not be written or the compiler not started;
//! - [`BuildError::InvalidInput`]: rejected by the parent before anything ran;
//! - [`BuildError::Cancelled`]: its token was cancelled or its stream dropped.
//!
//! # Layout
//!
//! - `plan.rs`: the worker side: [`BuilderInput`], [`BuildPlan`], the build
//!   task [`CompileC`] and what it returns.
//! - `local.rs`: the parent side: [`LocalBuilder`] and its [`BuildStream`].
//! - `config.rs`: [`LocalBuilderConfig`].
//! - `tvm.rs`: [`TvmExport`], the generated shim that exports a kernel to
//!   TVM's runtime (`__tvm_ffi_<name>`).
//! - `error.rs`: [`BuildError`], [`BuilderResult`].

mod config;
mod error;
mod local;
mod plan;
mod tvm;

pub use config::LocalBuilderConfig;
pub use error::{BuildError, BuilderResult};
pub use local::{BuildStream, LocalBuilder};
pub use plan::{
    BuildFailure, BuildOutput, BuildPlan, BuildTask, BuildTaskOutput, BuilderInput, CompileC,
    MAX_NAME_LEN,
};
pub use tvm::{MAX_SYMBOL_LEN, TVM_SHIM_MAX_ARGS, TvmExport};
