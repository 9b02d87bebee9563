//! [`RpcRunner`]: measures kernels on devices leased through a tracker.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::config::RpcConfig;
use super::drive::Core;
use super::pipeline::{DefaultPipeline, Pipeline, StageContext};
use super::result::{RunError, RunnerInput};
use super::{RunStream, Runner};
use crate::measure::cause::Cause;
use crate::measure::evaluator::EvaluatorConfig;
use crate::session::SessionError;
use crate::tracker::TrackerClient;

/// Measures kernels on devices leased through a tracker. Cheap to clone
/// (an `Arc` inside); clones share the pipeline and the `max_workers` bound.
///
/// Measure with [`Runner::run`]; dropping the returned stream cancels its
/// unfinished measurements (their sessions are closed, their devices freed).
///
/// A lease reuses a tracker connection of an earlier one (the runner keeps
/// at most 64 idle; they close when the last clone of the runner is
/// dropped), so it costs one request to the tracker, not a new connection;
/// a connection the tracker closed meanwhile is redialled by the request.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use rpc_runner::measure::{ArgInfo, DType, RpcConfig, RpcRunner, Runner, RunnerInput};
///
/// // Fail a measurement that finds no free device within two minutes.
/// let rpc = RpcConfig::from_env()?.lease_timeout(Duration::from_secs(120));
/// let runner = RpcRunner::builder(rpc).seed(7).build().await?;
/// let args = vec![ArgInfo::tensor(DType::F32, [64, 64]); 3];
/// let input = RunnerInput::new("build/mm.so", args).read_args([2]);
/// for r in runner.run(vec![input]).collect_ordered().await {
///     let m = r?;
///     let c: Vec<f32> = m.output_as(0)?;
///     println!("{:?} s on {}, c[0] = {}", m.median_secs(), m.server, c[0]);
/// }
/// # Ok(()) }
/// ```
pub struct RpcRunner<P: Pipeline = DefaultPipeline> {
    core: Arc<Core<P>>,
}

impl<P: Pipeline> Clone for RpcRunner<P> {
    fn clone(&self) -> Self {
        RpcRunner { core: Arc::clone(&self.core) }
    }
}

impl<P: Pipeline> std::fmt::Debug for RpcRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcRunner").field("ctx", &self.core.ctx).finish_non_exhaustive()
    }
}

/// Builds an [`RpcRunner`]; setters take the value (tokio's style).
#[derive(Debug)]
pub struct RpcRunnerBuilder<P> {
    pipeline: P,
    ctx: StageContext,
    max_workers: Option<usize>,
}

impl RpcRunner<DefaultPipeline> {
    /// A builder with the default pipeline.
    pub fn builder(rpc: RpcConfig) -> RpcRunnerBuilder<DefaultPipeline> {
        RpcRunnerBuilder {
            pipeline: DefaultPipeline,
            ctx: StageContext::new(rpc),
            max_workers: None,
        }
    }
}

impl<P: Pipeline> RpcRunnerBuilder<P> {
    /// Uses `pipeline` instead of the default stages.
    pub fn pipeline<Q: Pipeline>(self, pipeline: Q) -> RpcRunnerBuilder<Q> {
        RpcRunnerBuilder { pipeline, ctx: self.ctx, max_workers: self.max_workers }
    }

    /// The time evaluator's configuration.
    #[must_use]
    pub fn evaluator(mut self, cfg: EvaluatorConfig) -> Self {
        self.ctx.evaluator = cfg;
        self
    }

    /// Independent argument sets per input (default 1).
    #[must_use]
    pub fn alloc_repeat(mut self, n: u32) -> Self {
        self.ctx.alloc_repeat = n.max(1);
        self
    }

    /// Seed of the random argument fill (default 0): the same seed gives
    /// every candidate the same inputs.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.ctx.seed = seed;
        self
    }

    /// Name of the kernels' entry symbol (default `"entry"`).
    #[must_use]
    pub fn entry(mut self, name: impl Into<String>) -> Self {
        self.ctx.entry = name.into();
        self
    }

    /// Measurements in flight at once (default: the number of servers the
    /// tracker lists for the key when the runner is built).
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = Some(n.max(1));
        self
    }

    /// Goes back to the default `max_workers`.
    #[must_use]
    pub fn default_max_workers(mut self) -> Self {
        self.max_workers = None;
        self
    }

    /// Builds the runner after asking the tracker which servers serve the
    /// key.
    ///
    /// # Errors
    ///
    /// [`RunError::Session`] if the tracker cannot be reached or does not
    /// answer (its cause says why: connection refused...),
    /// [`RunError::NoServer`] if it lists no server for the key.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: nothing is built until it returns.
    pub async fn build(self) -> Result<RpcRunner<P>, RunError> {
        let servers = servers_for_key(&self.ctx.rpc).await?;
        let workers = self.max_workers.unwrap_or(servers);
        Ok(RpcRunner {
            core: Arc::new(Core {
                pipeline: self.pipeline,
                ctx: self.ctx,
                slots: Semaphore::new(workers),
            }),
        })
    }
}

/// How many servers the tracker lists for the key (at least 1).
async fn servers_for_key(rpc: &RpcConfig) -> Result<usize, RunError> {
    let addr = rpc.tracker_addr();
    let fail =
        |e| RunError::Session { addr: addr.clone(), source: Cause::new(SessionError::from(e)) };
    let mut tc = TrackerClient::connect(&addr).await.map_err(fail)?;
    let summary = tc.summary().await.map_err(fail)?;
    let n = summary.server_info.iter().filter(|i| i.device_key() == rpc.tracker_key).count();
    if n == 0 {
        return Err(RunError::NoServer { addr, key: rpc.tracker_key.clone() });
    }
    Ok(n)
}

impl<P: Pipeline> Runner for RpcRunner<P> {
    fn run_with_cancel(&self, inputs: Vec<RunnerInput>, cancel: &CancellationToken) -> RunStream {
        self.core.start(inputs, cancel)
    }

    fn run_interleaved_with_cancel(
        &self,
        inputs: Vec<RunnerInput>,
        cancel: &CancellationToken,
    ) -> RunStream {
        self.core.start_interleaved(inputs, cancel)
    }
}
