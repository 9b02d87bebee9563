//! Runners: measure built kernels through RPC sessions ([`RpcRunner`]) or in
//! a local worker process ([`LocalRunner`]), both behind the [`Runner`]
//! trait and both running the same overridable [`Pipeline`] of stages.
//!
//! # Layout
//!
//! - `config.rs`: [`RpcConfig`].
//! - `result.rs`: [`RunnerInput`], [`Measurement`], [`RunError`].
//! - `pipeline.rs`: [`Pipeline`], [`DeviceSession`], [`StageContext`].
//! - `drive.rs`: running one input through the stages, and a batch of them.
//! - `rpc.rs`, `local.rs`: the two runners and their builders.

mod config;
mod deferred;
mod drive;
mod interleave;
mod local;
mod pipeline;
mod result;
mod rpc;
mod tvm;

use tokio_util::sync::CancellationToken;

pub use config::{Backend, RpcConfig, RpcConfigError};
pub use local::{LocalRunner, LocalRunnerBuilder};
pub use pipeline::{DefaultPipeline, DeviceSession, Pipeline, StageContext};
pub use result::{
    Element, Measurement, Output, OutputError, RunError, RunnerInput, RunnerResult, StageTimes,
};
pub use rpc::{RpcRunner, RpcRunnerBuilder};

/// The stream of a batch of measurements: `(index, result)` in completion order.
pub type RunStream = super::batch::Batch<RunnerResult>;

/// Something that measures kernels: [`RpcRunner`], [`LocalRunner`].
///
/// # Drop rule
///
/// The [`RunStream`] owns its measurements: dropping it cancels those not
/// yet finished ([`RunError::Cancelled`]; their sessions are closed by the
/// pipeline's `cleanup` and their devices freed, in the background).
///
/// # Examples
///
/// Results as they come, with their index (a progress bar), or all of them
/// in input order:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::StreamExt as _;
/// use rpc_runner::measure::{ArgInfo, DType, RpcConfig, RpcRunner, Runner, RunnerInput};
///
/// let runner = RpcRunner::builder(RpcConfig::from_env()?).build().await?;
/// let args = vec![ArgInfo::tensor(DType::F32, [64, 64]); 3];
/// let inputs = vec![RunnerInput::new("build/a.so", args.clone()), RunnerInput::new("build/b.so", args)];
/// let mut results = runner.run(inputs.clone());
/// while let Some((i, result)) = results.next().await {
///     match result {
///         Ok(m) => println!("{i}: median {:?} s on {}", m.median_secs(), m.server),
///         Err(e) => println!("{i} failed: {e}"),
///     }
/// }
/// let in_order = runner.run(inputs).collect_ordered().await;
/// # drop(in_order); Ok(()) }
/// ```
///
/// Cancel a batch (every unfinished item resolves to
/// [`RunError::Cancelled`]):
///
/// ```no_run
/// # async fn demo(runner: rpc_runner::measure::RpcRunner, inputs: Vec<rpc_runner::measure::RunnerInput>) {
/// use rpc_runner::measure::{RunError, Runner};
/// use tokio_util::sync::CancellationToken;
///
/// let cancel = CancellationToken::new();
/// let batch = runner.run_with_cancel(inputs, &cancel);
/// cancel.cancel(); // e.g. from a Ctrl-C handler
/// for r in batch.collect_ordered().await {
///     assert!(r.is_ok() || matches!(r, Err(RunError::Cancelled)));
/// }
/// # }
/// ```
pub trait Runner: Send + Sync {
    /// Starts measuring every input at once (at most the runner's
    /// `max_workers` at a time); the stream yields each result when ready,
    /// with its index in `inputs`. Must be called within a tokio runtime.
    fn run(&self, inputs: Vec<RunnerInput>) -> RunStream {
        self.run_with_cancel(inputs, &CancellationToken::new())
    }

    /// As [`run`](Runner::run); cancelling `cancel` (or any parent of it)
    /// cancels every unfinished measurement of the batch.
    fn run_with_cancel(&self, inputs: Vec<RunnerInput>, cancel: &CancellationToken) -> RunStream;

    /// Measures every input in **one** session (one lease, one worker),
    /// their batches interleaved: each input is uploaded and loaded as a
    /// candidate ([`AddCandidate`](crate::measure::AddCandidate)), then
    /// [`TimeCandidates`](crate::measure::TimeCandidates) times one batch of
    /// each per round, in a shuffled order (seeded by the runner's seed), so
    /// that drift hits them all alike. Results per input, as if measured
    /// alone (`Measurement::interleaved` is set). All results come when the
    /// set is done; dropping the stream cancels it.
    ///
    /// The pipeline's `create_session` and `cleanup` stages apply; the
    /// stages in between are this method's own (inputs are uploaded as
    /// `candidate-<i>.so`). The session timeout bounds the whole set: size
    /// sets so that `inputs.len()` times the evaluator's budget fits. An
    /// input that fails to upload or load, or whose kernel returns an
    /// error, fails alone; a kernel that crashes the worker while timing
    /// makes every candidate be timed again on its own (their measurements
    /// then say so in `env.warnings`), so the crash is reported for the
    /// kernel that causes it.
    fn run_interleaved(&self, inputs: Vec<RunnerInput>) -> RunStream {
        self.run_interleaved_with_cancel(inputs, &CancellationToken::new())
    }

    /// As [`run_interleaved`](Runner::run_interleaved), cancelled by `cancel`.
    fn run_interleaved_with_cancel(
        &self,
        inputs: Vec<RunnerInput>,
        cancel: &CancellationToken,
    ) -> RunStream;
}
