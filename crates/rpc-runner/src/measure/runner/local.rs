//! [`LocalRunner`]: measures kernels in a local worker process, through the
//! same [`Pipeline`] as the RPC runner.

use std::sync::Arc;
use std::time::Duration;

use popen_pool::{PoolError, PopenWorker, WorkerProgram};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::config::RpcConfig;
use super::drive::Core;
use super::pipeline::{DefaultPipeline, Pipeline, StageContext};
use super::result::RunnerInput;
use super::{RunStream, Runner};
use crate::measure::evaluator::EvaluatorConfig;

/// Measures kernels in a local worker process, one at a time: the same
/// [`Pipeline`] as [`RpcRunner`](super::RpcRunner) (an overridden stage
/// applies here too) on a [`DeviceSession`](super::DeviceSession) that is
/// the runner's worker; nothing goes over the network and artifacts are
/// loaded from their local paths. Cheap to clone (an `Arc` inside); clones
/// share the worker.
///
/// A measurement past its limit kills the worker; the next one starts a
/// fresh worker. Dropping the [`RunStream`] cancels its unfinished
/// measurements.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use popen_pool::WorkerProgram;
/// use rpc_runner::measure::{ArgInfo, DType, LocalRunner, Runner, RunnerInput};
///
/// // `main` starts with `popen_pool::serve_if_worker(rpc_runner::tasks::registry())`.
/// let runner = LocalRunner::builder(WorkerProgram::current_exe()?)
///     .timeout(Duration::from_secs(10))
///     .seed(7)
///     .build()?;
/// let args = vec![ArgInfo::tensor(DType::F32, [64, 64]); 3];
/// let results = runner.run(vec![RunnerInput::new("build/mm.so", args)]).collect_ordered().await;
/// println!("{:?}", results[0].as_ref().map(|m| m.median_secs()));
/// runner.shutdown().await;
/// # Ok(()) }
/// ```
pub struct LocalRunner<P: Pipeline = DefaultPipeline> {
    core: Arc<Core<P>>,
    worker: Arc<Mutex<PopenWorker>>,
}

impl<P: Pipeline> Clone for LocalRunner<P> {
    fn clone(&self) -> Self {
        LocalRunner { core: Arc::clone(&self.core), worker: Arc::clone(&self.worker) }
    }
}

impl<P: Pipeline> std::fmt::Debug for LocalRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunner").field("ctx", &self.core.ctx).finish_non_exhaustive()
    }
}

/// Builds a [`LocalRunner`]; setters take the value (tokio's style).
#[derive(Debug)]
pub struct LocalRunnerBuilder<P> {
    program: WorkerProgram,
    pipeline: P,
    ctx: StageContext,
    cpus: Option<Vec<usize>>,
}

impl LocalRunner<DefaultPipeline> {
    /// A builder for a runner whose worker runs `program` (it must serve
    /// `rpc_runner::tasks::registry()`).
    pub fn builder(program: WorkerProgram) -> LocalRunnerBuilder<DefaultPipeline> {
        let mut ctx = StageContext::new(RpcConfig::new("", 0, "local"));
        ctx.rpc.session_timeout = Duration::from_secs(60);
        LocalRunnerBuilder { program, pipeline: DefaultPipeline, ctx, cpus: None }
    }
}

impl<P: Pipeline> LocalRunnerBuilder<P> {
    /// Uses `pipeline` instead of the default stages.
    pub fn pipeline<Q: Pipeline>(self, pipeline: Q) -> LocalRunnerBuilder<Q> {
        LocalRunnerBuilder { program: self.program, pipeline, ctx: self.ctx, cpus: self.cpus }
    }

    /// The time evaluator's configuration.
    #[must_use]
    pub fn evaluator(mut self, cfg: EvaluatorConfig) -> Self {
        self.ctx.evaluator = cfg;
        self
    }

    /// Limit of one measurement, from when the worker is free (default 60 s).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.ctx.rpc.session_timeout = limit;
        self
    }

    /// Independent argument sets per input (default 1).
    #[must_use]
    pub fn alloc_repeat(mut self, n: u32) -> Self {
        self.ctx.alloc_repeat = n.max(1);
        self
    }

    /// Seed of the random argument fill (default 0).
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

    /// Pins the worker (the timed thread) to these CPUs, e.g.
    /// [`CpuPlan::detect`](crate::measure::CpuPlan::detect)`().measure`
    /// (default: not pinned, unlike a device server's session workers: test
    /// suites run many local runners in parallel, and pinning them all to
    /// one CPU would make them share it).
    #[must_use]
    pub fn cpu_affinity(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        self.cpus = Some(cpus.into_iter().collect());
        self
    }

    /// Builds the runner; its worker starts with the first measurement.
    ///
    /// # Errors
    ///
    /// If the worker cannot be configured (no tokio runtime...).
    pub fn build(self) -> Result<LocalRunner<P>, PoolError> {
        let mut builder = PopenWorker::builder(self.program);
        if let Some(cpus) = self.cpus {
            builder = builder.cpu_affinity(cpus);
        }
        let worker = Arc::new(Mutex::new(builder.build()?));
        let mut ctx = self.ctx;
        ctx.local = Some(Arc::clone(&worker));
        let core = Arc::new(Core { pipeline: self.pipeline, ctx, slots: Semaphore::new(1) });
        Ok(LocalRunner { core, worker })
    }
}

impl<P: Pipeline> LocalRunner<P> {
    /// Stops the worker: gracefully if this is the last clone and no
    /// measurement is running, else it is killed after the measurement
    /// holding it (and other clones' later measurements start a fresh one).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the worker to be killed when the last
    /// clone is dropped.
    pub async fn shutdown(self) {
        let LocalRunner { core, worker } = self;
        drop(core);
        match Arc::try_unwrap(worker) {
            Ok(worker) => worker.into_inner().shutdown().await,
            Err(shared) => shared.lock().await.kill().await,
        }
    }
}

impl<P: Pipeline> Runner for LocalRunner<P> {
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
