//! Runners: measure built kernels through RPC sessions ([`RpcRunner`]) or in
//! a local worker process ([`LocalRunner`]), behind an overridable
//! [`Pipeline`] of stages.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use popen_pool::{PoolError, PopenWorker, WorkerProgram};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::args::ArgInfo;
use super::evaluator::EvaluatorConfig;
use super::kernel::{AllocArgs, LoadKernel, ReadArg, TimeKernel};
use crate::session::{ConnectOptions, RequestOptions, Session, SessionError};
use crate::tracker::TrackerClient;

/// Where and how [`RpcRunner`] leases devices: TVM's `RPCConfig`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RpcConfig {
    /// Tracker host (env `TVM_TRACKER_HOST`).
    pub tracker_host: String,
    /// Tracker port (env `TVM_TRACKER_PORT`).
    pub tracker_port: u16,
    /// Device key (env `TVM_TRACKER_KEY`).
    pub tracker_key: String,
    /// Priority of lease requests (TVM default 1).
    pub session_priority: i32,
    /// Limit of one measurement, counted from when the device is leased; the
    /// server enforces it too (TVM default 60 s).
    pub session_timeout: Duration,
    /// Token of servers that require one.
    pub token: Option<String>,
}

impl RpcConfig {
    /// A configuration for `key` at `host:port`.
    pub fn new(host: impl Into<String>, port: u16, key: impl Into<String>) -> Self {
        RpcConfig {
            tracker_host: host.into(),
            tracker_port: port,
            tracker_key: key.into(),
            session_priority: 1,
            session_timeout: Duration::from_secs(60),
            token: None,
        }
    }

    /// Reads `TVM_TRACKER_HOST`, `TVM_TRACKER_PORT` and `TVM_TRACKER_KEY`.
    ///
    /// # Errors
    ///
    /// A message naming the missing or malformed variable.
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        let host = var("TVM_TRACKER_HOST")?;
        let port = var("TVM_TRACKER_PORT")?;
        let port = port.parse().map_err(|_| format!("TVM_TRACKER_PORT is not a port: {port:?}"))?;
        Ok(Self::new(host, port, var("TVM_TRACKER_KEY")?))
    }

    /// `host:port` of the tracker.
    pub fn tracker_addr(&self) -> String {
        format!("{}:{}", self.tracker_host, self.tracker_port)
    }
}

/// One kernel to measure.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunnerInput {
    /// The built shared library.
    pub artifact_path: PathBuf,
    /// The device type (`"cpu"`); informational.
    pub device_type: String,
    /// The kernel's arguments.
    pub args_info: Vec<ArgInfo>,
    /// Arguments of the first set to read back after timing (e.g. outputs to
    /// check), by index.
    pub read_args: Vec<u32>,
}

impl RunnerInput {
    /// A CPU kernel with these arguments.
    pub fn new(artifact_path: impl Into<PathBuf>, args_info: Vec<ArgInfo>) -> Self {
        RunnerInput {
            artifact_path: artifact_path.into(),
            device_type: "cpu".into(),
            args_info,
            read_args: Vec::new(),
        }
    }

    /// Also read back these arguments after timing.
    #[must_use]
    pub fn read_args(mut self, indices: impl Into<Vec<u32>>) -> Self {
        self.read_args = indices.into();
        self
    }
}

/// What a successful measurement produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// One cost per batch, in seconds (`repeat * alloc_repeat` values).
    pub run_secs: Vec<f64>,
    /// The bytes of the arguments named in `read_args`, in that order.
    pub outputs: Vec<Vec<u8>>,
}

/// Why a measurement failed, classified like TVM's `MeasureErrorNo`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// No device could be leased or connected.
    #[error("cannot get a session: {message}")]
    Session {
        /// The underlying error.
        message: String,
    },
    /// The artifact could not be uploaded.
    #[error("upload failed: {message}")]
    Upload {
        /// The underlying error.
        message: String,
    },
    /// The artifact is not a loadable shared library, or lacks the entry.
    #[error("cannot load the kernel ({kind}): {message}")]
    Load {
        /// `load_error` or `missing_symbol`.
        kind: String,
        /// The loader's message.
        message: String,
    },
    /// The kernel returned a nonzero code.
    #[error("{message}")]
    KernelError {
        /// e.g. `kernel returned error 3`.
        message: String,
    },
    /// The kernel crashed its worker (e.g. `worker died (SIGSEGV)`).
    #[error("kernel crashed: {message}")]
    KernelCrash {
        /// How the worker died.
        message: String,
    },
    /// The measurement ran past its limit (the session timeout).
    #[error("measurement timed out after {limit:?}")]
    Timeout {
        /// The limit.
        limit: Duration,
    },
    /// The device server went away mid-measurement.
    #[error("device server lost: {message}")]
    ServerLost {
        /// The underlying error.
        message: String,
    },
    /// Anything else (bad arguments, protocol errors...).
    #[error("measurement failed: {message}")]
    Other {
        /// The underlying error.
        message: String,
    },
}

impl RunError {
    /// Classifies a session error raised by a stage.
    pub fn from_session(e: SessionError, limit: Duration) -> Self {
        match e {
            SessionError::Task(p) => Self::from_pool(p),
            SessionError::SessionTimeout { limit } => RunError::Timeout { limit },
            SessionError::Timeout { .. } => RunError::Timeout { limit },
            e @ (SessionError::ConnectionLost { .. } | SessionError::ServerShutdown) => {
                RunError::ServerLost { message: e.to_string() }
            }
            e => RunError::Other { message: e.to_string() },
        }
    }

    /// Classifies a worker error raised by a kernel task.
    pub fn from_pool(e: PoolError) -> Self {
        match e {
            PoolError::Task { kind, message }
                if kind == "load_error" || kind == "missing_symbol" =>
            {
                RunError::Load { kind, message }
            }
            PoolError::Task { kind, message } if kind == "kernel_error" => {
                RunError::KernelError { message }
            }
            PoolError::WorkerDied { exit } => {
                RunError::KernelCrash { message: format!("worker died ({exit})") }
            }
            PoolError::Timeout { limit } => RunError::Timeout { limit },
            e => RunError::Other { message: e.to_string() },
        }
    }
}

/// The outcome of measuring one input.
pub type RunnerResult = Result<Measurement, RunError>;

/// What every stage of a measurement can see.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StageContext {
    /// The runner's RPC configuration.
    pub rpc: RpcConfig,
    /// The time evaluator's configuration.
    pub evaluator: EvaluatorConfig,
    /// Independent argument sets per input (TVM's `alloc_repeat`).
    pub alloc_repeat: u32,
    /// Seed of the random argument fill.
    pub seed: u64,
    /// Name of the kernel's entry symbol.
    pub entry: String,
}

/// The stages of one RPC measurement, each overridable. The defaults lease a
/// device through the tracker, upload the artifact, allocate random
/// arguments, run the time evaluator and close the session.
///
/// [`cleanup`](Pipeline::cleanup) always runs: after success, error, timeout,
/// and when the caller drops the measurement's future.
pub trait Pipeline: Send + Sync + 'static {
    /// Leases a device and opens its session. The default waits for a free
    /// device without a bound; connecting to the server and its handshake
    /// are bounded by 10 s.
    fn create_session(
        &self,
        ctx: &StageContext,
    ) -> impl Future<Output = Result<Session, RunError>> + Send {
        default_create_session(ctx)
    }

    /// Uploads the artifact; returns its remote path.
    fn upload_module(
        &self,
        _ctx: &StageContext,
        sess: &mut Session,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<String, RunError>> + Send {
        async move {
            let remote = "kernel.so".to_owned();
            sess.upload(&input.artifact_path, &remote)
                .await
                .map_err(|e| RunError::Upload { message: e.to_string() })?;
            Ok(remote)
        }
    }

    /// Loads the kernel and allocates `alloc_repeat` random argument sets.
    fn alloc_argument(
        &self,
        ctx: &StageContext,
        sess: &mut Session,
        remote_path: &str,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<(), RunError>> + Send {
        async move {
            let limit = ctx.rpc.session_timeout;
            let load = LoadKernel { path: remote_path.to_owned(), entry: ctx.entry.clone() };
            sess.call(load, None).await.map_err(|e| RunError::from_session(e, limit))?;
            let alloc = AllocArgs {
                args: input.args_info.clone(),
                alloc_repeat: ctx.alloc_repeat,
                seed: ctx.seed,
            };
            sess.call(alloc, None).await.map_err(|e| RunError::from_session(e, limit))
        }
    }

    /// Times the kernel and reads back `read_args`.
    fn run_evaluator(
        &self,
        ctx: &StageContext,
        sess: &mut Session,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<Measurement, RunError>> + Send {
        async move {
            let limit = ctx.rpc.session_timeout;
            let time = TimeKernel { config: ctx.evaluator.clone() };
            let run_secs =
                sess.call(time, None).await.map_err(|e| RunError::from_session(e, limit))?;
            let mut outputs = Vec::new();
            for &index in &input.read_args {
                let bytes = sess
                    .call(ReadArg { set: 0, index }, None)
                    .await
                    .map_err(|e| RunError::from_session(e, limit))?;
                outputs.push(bytes.into_vec());
            }
            Ok(Measurement { run_secs, outputs })
        }
    }

    /// Ends the session (removing everything the measurement left on the
    /// device). Always runs once a session exists.
    fn cleanup(&self, _ctx: &StageContext, sess: Session) -> impl Future<Output = ()> + Send {
        async move {
            let mut sess = sess;
            if let Err(e) = sess.close().await {
                tracing::debug!(error = %e, "closing a measurement session failed");
            }
        }
    }
}

/// The default [`Pipeline`]: every stage as documented there.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPipeline;

impl Pipeline for DefaultPipeline {}

async fn default_create_session(ctx: &StageContext) -> Result<Session, RunError> {
    let rpc = &ctx.rpc;
    let addr = rpc.tracker_addr();
    let session_err =
        |e: &dyn std::fmt::Display| RunError::Session { message: format!("{addr}: {e}") };
    let mut tracker = TrackerClient::connect(&addr).await.map_err(|e| session_err(&e))?;
    let mut opts = RequestOptions::new(rpc.session_priority, Some(rpc.session_timeout));
    opts.connect = ConnectOptions::default()
        .session_timeout(Some(rpc.session_timeout))
        .token(rpc.token.clone());
    tracker.request_with(&rpc.tracker_key, &opts).await.map_err(|e| session_err(&e))
}

struct RunnerShared<P> {
    pipeline: P,
    ctx: StageContext,
    slots: Semaphore,
}

/// Measures kernels on devices leased through a tracker.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use rpc_runner::measure::{ArgInfo, DType, RpcConfig, RpcRunner, RunnerInput};
/// let runner = RpcRunner::builder(RpcConfig::from_env()?).build().await;
/// let args = vec![ArgInfo::tensor(DType::F32, [64, 64]); 3];
/// let futures = runner.run(vec![RunnerInput::new("build/mm.so", args)]);
/// for f in futures {
///     match f.await {
///         Ok(m) => println!("median {:?}", m.run_secs),
///         Err(e) => println!("failed: {e}"),
///     }
/// }
/// # Ok(()) }
/// ```
pub struct RpcRunner<P: Pipeline = DefaultPipeline> {
    shared: Arc<RunnerShared<P>>,
}

impl<P: Pipeline> std::fmt::Debug for RpcRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcRunner").field("ctx", &self.shared.ctx).finish_non_exhaustive()
    }
}

/// Builds an [`RpcRunner`].
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
            ctx: StageContext {
                rpc,
                evaluator: EvaluatorConfig::default(),
                alloc_repeat: 1,
                seed: 0,
                entry: "entry".into(),
            },
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
    /// tracker lists for the key, or 1).
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = Some(n.max(1));
        self
    }

    /// Builds the runner (asks the tracker how many servers serve the key
    /// unless `max_workers` was given).
    pub async fn build(self) -> RpcRunner<P> {
        let workers = match self.max_workers {
            Some(n) => n,
            None => servers_for_key(&self.ctx.rpc).await.max(1),
        };
        RpcRunner {
            shared: Arc::new(RunnerShared {
                pipeline: self.pipeline,
                ctx: self.ctx,
                slots: Semaphore::new(workers),
            }),
        }
    }
}

async fn servers_for_key(rpc: &RpcConfig) -> usize {
    let Ok(mut tc) = TrackerClient::connect(&rpc.tracker_addr()).await else { return 1 };
    match tc.summary().await {
        Ok(s) => s.server_info.iter().filter(|i| i.device_key() == rpc.tracker_key).count(),
        Err(_) => 1,
    }
}

/// The future of one measurement. Dropping it cancels the measurement; the
/// pipeline's `cleanup` still runs (in the background).
#[must_use = "a RunnerFuture measures nothing unless awaited"]
#[derive(Debug)]
pub struct RunnerFuture {
    handle: JoinHandle<RunnerResult>,
    cancel: CancellationToken,
}

impl Future for RunnerFuture {
    type Output = RunnerResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RunnerResult> {
        Pin::new(&mut self.handle).poll(cx).map(|r| {
            r.unwrap_or_else(|e| {
                Err(RunError::Other { message: format!("measurement task failed: {e}") })
            })
        })
    }
}

impl Drop for RunnerFuture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl<P: Pipeline> RpcRunner<P> {
    /// Starts measuring every input; one future per input, in order.
    /// At most `max_workers` measurements run at once.
    pub fn run(&self, inputs: Vec<RunnerInput>) -> Vec<RunnerFuture> {
        inputs
            .into_iter()
            .map(|input| {
                let shared = Arc::clone(&self.shared);
                let cancel = CancellationToken::new();
                let token = cancel.clone();
                let handle = tokio::spawn(async move { measure(shared, input, token).await });
                RunnerFuture { handle, cancel }
            })
            .collect()
    }
}

async fn measure<P: Pipeline>(
    shared: Arc<RunnerShared<P>>,
    input: RunnerInput,
    cancel: CancellationToken,
) -> RunnerResult {
    let cancelled = || RunError::Other { message: "measurement cancelled".into() };
    let _slot = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(cancelled()),
        permit = shared.slots.acquire() => permit.map_err(|_| cancelled())?,
    };
    let ctx = &shared.ctx;
    let pipeline = &shared.pipeline;
    let limit = ctx.rpc.session_timeout;
    // Leasing may wait for a free device: the limit starts once leased.
    let mut sess = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(cancelled()),
        s = pipeline.create_session(ctx) => s?,
    };
    let stages = async {
        let remote = pipeline.upload_module(ctx, &mut sess, &input).await?;
        pipeline.alloc_argument(ctx, &mut sess, &remote, &input).await?;
        pipeline.run_evaluator(ctx, &mut sess, &input).await
    };
    let result = tokio::select! {
        biased;
        () = cancel.cancelled() => Err(cancelled()),
        r = tokio::time::timeout(limit, stages) => r.unwrap_or(Err(RunError::Timeout { limit })),
    };
    pipeline.cleanup(ctx, sess).await;
    result
}

/// Measures kernels in a local worker process: the same stages without the
/// network (artifacts are loaded from their local paths).
#[derive(Debug)]
pub struct LocalRunner {
    worker: Mutex<PopenWorker>,
    ctx: StageContext,
    timeout: Duration,
}

impl LocalRunner {
    /// A runner whose worker runs `program` (it must serve
    /// `rpc_runner::worker::registry()`), with a per-input `timeout`.
    ///
    /// # Errors
    ///
    /// If the worker cannot be configured.
    pub fn new(
        program: WorkerProgram,
        evaluator: EvaluatorConfig,
        timeout: Duration,
    ) -> Result<Self, PoolError> {
        let worker = PopenWorker::builder(program).build()?;
        let ctx = StageContext {
            rpc: RpcConfig::new("", 0, "local"),
            evaluator,
            alloc_repeat: 1,
            seed: 0,
            entry: "entry".into(),
        };
        Ok(LocalRunner { worker: Mutex::new(worker), ctx, timeout })
    }

    /// Sets `alloc_repeat`, the seed and the entry name (as [`RpcRunnerBuilder`]).
    #[must_use]
    pub fn with(mut self, alloc_repeat: u32, seed: u64, entry: impl Into<String>) -> Self {
        self.ctx.alloc_repeat = alloc_repeat.max(1);
        self.ctx.seed = seed;
        self.ctx.entry = entry.into();
        self
    }

    /// Measures `input` (inputs are measured one at a time).
    pub async fn run_one(&self, input: &RunnerInput) -> RunnerResult {
        let mut worker = self.worker.lock().await;
        let limit = self.timeout;
        let ctx = &self.ctx;
        let stages = async {
            let path = std::path::absolute(&input.artifact_path)
                .map_err(|e| RunError::Upload { message: e.to_string() })?;
            let load = LoadKernel { path: path.display().to_string(), entry: ctx.entry.clone() };
            worker.run(load).await.map_err(RunError::from_pool)?;
            let alloc = AllocArgs {
                args: input.args_info.clone(),
                alloc_repeat: ctx.alloc_repeat,
                seed: ctx.seed,
            };
            worker.run(alloc).await.map_err(RunError::from_pool)?;
            let run_secs = worker
                .run(TimeKernel { config: ctx.evaluator.clone() })
                .await
                .map_err(RunError::from_pool)?;
            let mut outputs = Vec::new();
            for &index in &input.read_args {
                outputs.push(
                    worker
                        .run(ReadArg { set: 0, index })
                        .await
                        .map_err(RunError::from_pool)?
                        .into_vec(),
                );
            }
            Ok(Measurement { run_secs, outputs })
        };
        match tokio::time::timeout(limit, stages).await {
            Ok(r) => r,
            // The dropped stage killed the worker; the next input gets a fresh one.
            Err(_) => Err(RunError::Timeout { limit }),
        }
    }

    /// Measures `inputs` in order.
    pub async fn run(&self, inputs: &[RunnerInput]) -> Vec<RunnerResult> {
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            out.push(self.run_one(input).await);
        }
        out
    }

    /// Stops the worker.
    pub async fn shutdown(self) {
        self.worker.into_inner().shutdown().await;
    }
}
