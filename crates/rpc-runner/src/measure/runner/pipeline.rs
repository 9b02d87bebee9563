//! The [`Pipeline`] of measurement stages, the [`DeviceSession`] they work
//! on, and what they all see ([`StageContext`]).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use popen_pool::{PopenWorker, Task};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::super::evaluator::EvaluatorConfig;
use super::super::kernel::{AllocArgs, LoadKernel};
use super::config::{Backend, RpcConfig};
use super::deferred::Pending;
use super::result::{Measurement, RunError, RunnerInput};
use super::tvm::{self, TvmDevice};
use crate::measure::cause::Cause;
use crate::session::{ConnectOptions, RequestOptions, Session, SessionError};
use crate::tracker::TrackerClient;
use crate::tvm::TvmSession;

/// What every stage of a measurement can see.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StageContext {
    /// The runner's RPC configuration (for a [`LocalRunner`](super::LocalRunner),
    /// only `session_timeout`, its per-input limit, and `lease_timeout` apply).
    pub rpc: RpcConfig,
    /// The time evaluator's configuration.
    pub evaluator: EvaluatorConfig,
    /// Independent argument sets per input (TVM's `alloc_repeat`).
    pub alloc_repeat: u32,
    /// Seed of the random argument fill.
    pub seed: u64,
    /// Name of the kernel's entry symbol.
    pub entry: String,
    /// The local runner's worker, when this is a local pipeline.
    pub(crate) local: Option<Arc<Mutex<PopenWorker>>>,
    /// Tracker connections between leases (shared by the runner's clones),
    /// so a lease does not pay for a TCP connect and the tracker's
    /// handshake.
    pub(crate) trackers: Arc<std::sync::Mutex<Vec<TrackerClient>>>,
}

/// Most idle tracker connections a runner keeps.
const MAX_IDLE_TRACKERS: usize = 64;

impl StageContext {
    pub(crate) fn new(rpc: RpcConfig) -> Self {
        StageContext {
            rpc,
            evaluator: EvaluatorConfig::default(),
            alloc_repeat: 1,
            seed: 0,
            entry: super::super::kernel::DEFAULT_ENTRY.into(),
            local: None,
            trackers: Arc::default(),
        }
    }

    /// True for a [`LocalRunner`](super::LocalRunner)'s pipeline.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}

/// The device a measurement's stages work on: an RPC [`Session`] to a
/// leased server, or the [`LocalRunner`](super::LocalRunner)'s worker
/// process (held exclusively while this value lives).
pub struct DeviceSession {
    pub(super) inner: Device,
    server: String,
    pub(super) limit: Duration,
    /// Steps the default stages deferred to the next call (see
    /// [`DeviceSession::flush`]).
    pub(super) pending: Pending,
}

pub(super) enum Device {
    Rpc(Box<Session>),
    Local(OwnedMutexGuard<PopenWorker>),
    Tvm(Box<TvmDevice>),
}

impl std::fmt::Debug for DeviceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Device::Rpc(_) => "rpc",
            Device::Local(_) => "local",
            Device::Tvm(_) => "tvm",
        };
        f.debug_struct("DeviceSession")
            .field("kind", &kind)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl DeviceSession {
    /// A device behind an RPC session; `limit` is the session timeout (the
    /// limit reported by a timed-out call).
    pub fn from_session(sess: Session, limit: Duration) -> Self {
        DeviceSession {
            server: sess.addr().to_owned(),
            inner: Device::Rpc(Box::new(sess)),
            limit,
            pending: Pending::default(),
        }
    }

    /// A device behind a session with a TVM RPC server; `limit` is the
    /// session timeout.
    pub fn from_tvm_session(sess: TvmSession, limit: Duration) -> Self {
        DeviceSession {
            server: sess.addr().to_owned(),
            inner: Device::Tvm(Box::new(TvmDevice::new(sess))),
            limit,
            pending: Pending::default(),
        }
    }

    /// The TVM session, if this device is a TVM RPC server.
    pub fn tvm_session(&mut self) -> Option<&mut TvmSession> {
        match &mut self.inner {
            Device::Tvm(t) => Some(&mut t.sess),
            _ => None,
        }
    }

    fn tvm(&mut self) -> Option<&mut TvmDevice> {
        match &mut self.inner {
            Device::Tvm(t) => Some(t),
            _ => None,
        }
    }

    fn local(worker: OwnedMutexGuard<PopenWorker>, limit: Duration) -> Self {
        DeviceSession {
            inner: Device::Local(worker),
            server: "local".into(),
            limit,
            pending: Pending::default(),
        }
    }

    /// The server measuring: its `host:port`, or `"local"`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The RPC session, unless this is a local device.
    ///
    /// Steps deferred by the default stages (see [`flush`](Self::flush))
    /// have not run yet: `flush` first before calling the session's worker
    /// yourself.
    pub fn session(&mut self) -> Option<&mut Session> {
        match &mut self.inner {
            Device::Rpc(s) => Some(s),
            Device::Local(_) | Device::Tvm(_) => None,
        }
    }

    /// Makes the artifact available to the device as `remote`; returns the
    /// path to load it from (the remote path, or the artifact's absolute
    /// local path on a local device, where nothing is copied).
    ///
    /// # Errors
    ///
    /// [`RunError::Upload`].
    ///
    /// # Cancel safety
    ///
    /// As [`Session::upload`]: a dropped upload leaves the session usable or broken.
    pub async fn upload(&mut self, artifact: &Path, remote: &str) -> Result<String, RunError> {
        let upload_err =
            |e| RunError::Upload { artifact: artifact.to_path_buf(), source: Cause::new(e) };
        match &mut self.inner {
            Device::Rpc(sess) => {
                sess.upload(artifact, remote).await.map_err(upload_err)?;
                Ok(remote.to_owned())
            }
            Device::Tvm(dev) => tvm::upload(dev, artifact, remote, self.limit).await,
            Device::Local(_) => match std::path::absolute(artifact) {
                Ok(path) => Ok(path.display().to_string()),
                Err(source) => Err(upload_err(SessionError::LocalIo {
                    path: artifact.display().to_string(),
                    source,
                })),
            },
        }
    }

    /// Runs a task on the device's worker, after any deferred steps
    /// ([`flush`](Self::flush)).
    ///
    /// # Errors
    ///
    /// The task's failure or the session's, classified
    /// ([`RunError::from_session`], [`RunError::from_pool`]), or a deferred
    /// step's; [`RunError::Other`] on a TVM server, which runs no tasks of
    /// ours.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the worker running the task is killed and the next task
    /// starts a fresh one (deferred steps not yet sent are dropped; a
    /// later call runs none of them).
    pub async fn call<T: Task>(&mut self, task: T) -> Result<T::Output, RunError> {
        self.flush().await?;
        self.call_now(task).await
    }

    /// Runs a task on the device's worker now, ignoring deferred steps.
    pub(super) async fn call_now<T: Task>(&mut self, task: T) -> Result<T::Output, RunError> {
        match &mut self.inner {
            Device::Rpc(sess) => {
                sess.call(task, None).await.map_err(|e| RunError::from_session(e, self.limit))
            }
            Device::Local(worker) => worker.run(task).await.map_err(RunError::from_pool),
            Device::Tvm(_) => Err(RunError::Other {
                message: format!("task {} cannot run on a TVM RPC server", T::NAME),
            }),
        }
    }

    /// Ends the session, waiting at most `limit` for the server's answer
    /// (then the connection is dropped, which frees the device too). A
    /// local device is released.
    ///
    /// # Errors
    ///
    /// [`RunError::Timeout`] when the close took longer than `limit`, the
    /// session's error otherwise.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the value is consumed and dropping it closes the connection.
    pub async fn close(self, limit: Duration) -> Result<(), RunError> {
        match self.inner {
            Device::Rpc(mut sess) => match tokio::time::timeout(limit, sess.close()).await {
                Ok(r) => r.map_err(|e| RunError::from_session(e, self.limit)),
                Err(_) => Err(RunError::Timeout { limit }),
            },
            Device::Local(_) => Ok(()),
            Device::Tvm(dev) => tvm::close(*dev, limit).await,
        }
    }
}

/// The stages of one measurement, each overridable. The defaults lease a
/// device (through the tracker, or the local runner's worker), upload the
/// artifact, load it, allocate random arguments, run the time evaluator and
/// close the session. [`RpcRunner`](super::RpcRunner) and
/// [`LocalRunner`](super::LocalRunner) both run them, so an overridden stage
/// applies to both.
///
/// The runner times each stage ([`StageTimes`](super::StageTimes)), bounds
/// `create_session` by [`RpcConfig::lease_timeout`] and the stages from
/// `upload_module` to `run_evaluator` by [`RpcConfig::session_timeout`].
/// [`cleanup`](Pipeline::cleanup) always runs once a session exists: after
/// success, error, timeout and cancellation (also when the caller drops the
/// stream).
pub trait Pipeline: Send + Sync + 'static {
    /// Leases a device and opens its session. The default waits for a free
    /// device (bounded by the runner with `lease_timeout`); connecting to the
    /// server and its handshake are bounded by 10 s.
    fn create_session(
        &self,
        ctx: &StageContext,
    ) -> impl Future<Output = Result<DeviceSession, RunError>> + Send {
        default_create_session(ctx)
    }

    /// Uploads the artifact; returns the path to load it from. The default
    /// defers the upload on an RPC session to the next call on `dev` (see
    /// [`DeviceSession::flush`]), which sends it right ahead of itself; on
    /// our own servers the runner reads the artifact from the moment the
    /// measurement gets its slot (before the lease), and that upload sends
    /// what it read.
    fn upload_module(
        &self,
        _ctx: &StageContext,
        dev: &mut DeviceSession,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<String, RunError>> + Send {
        async move { dev.defer_upload(&input.artifact_path, "kernel.so").await }
    }

    /// Loads the kernel uploaded to `remote_path`. A load error names the
    /// artifact, not `remote_path`.
    ///
    /// The default defers the load to the next call on `dev` (see
    /// [`DeviceSession::flush`]): with the default `run_evaluator`, load,
    /// allocation, timing and read-back are one call to the worker. On a
    /// TVM server it loads at once.
    fn load_module(
        &self,
        ctx: &StageContext,
        dev: &mut DeviceSession,
        remote_path: &str,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<(), RunError>> + Send {
        async move {
            let limit = ctx.rpc.session_timeout;
            if let Some(t) = dev.tvm() {
                return tvm::load(t, remote_path, input, limit).await;
            }
            let load = LoadKernel { path: remote_path.to_owned(), entry: ctx.entry.clone() };
            dev.defer_load(load, &input.artifact_path, remote_path);
            Ok(())
        }
    }

    /// Allocates `alloc_repeat` random argument sets. The default defers
    /// the allocation to the next call on `dev`, as `load_module` does.
    fn alloc_argument(
        &self,
        ctx: &StageContext,
        dev: &mut DeviceSession,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<(), RunError>> + Send {
        async move {
            if let Some(t) = dev.tvm() {
                return tvm::alloc(t, ctx, input, ctx.rpc.session_timeout).await;
            }
            let alloc = AllocArgs {
                args: input.args_info.clone(),
                alloc_repeat: ctx.alloc_repeat,
                seed: ctx.seed,
            };
            dev.defer_alloc(alloc);
            Ok(())
        }
    }

    /// Times the kernel and reads back `read_args` (the default: after the
    /// deferred steps, in the same call).
    fn run_evaluator(
        &self,
        ctx: &StageContext,
        dev: &mut DeviceSession,
        input: &RunnerInput,
    ) -> impl Future<Output = Result<Measurement, RunError>> + Send {
        async move {
            if let Some(t) = dev.tvm() {
                return tvm::evaluate(t, ctx, input, ctx.rpc.session_timeout).await;
            }
            dev.measure(ctx, input).await
        }
    }

    /// Ends the session (removing everything the measurement left on the
    /// device), waiting at most `close_timeout`. Always runs once a session
    /// exists.
    fn cleanup(&self, ctx: &StageContext, dev: DeviceSession) -> impl Future<Output = ()> + Send {
        async move {
            if let Err(e) = dev.close(ctx.rpc.close_timeout).await {
                tracing::debug!(error = %e, "closing a measurement session failed");
            }
        }
    }
}

/// The default [`Pipeline`]: every stage as documented there.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPipeline;

impl Pipeline for DefaultPipeline {}

async fn default_create_session(ctx: &StageContext) -> Result<DeviceSession, RunError> {
    let rpc = &ctx.rpc;
    if let Some(worker) = &ctx.local {
        let guard = Arc::clone(worker).lock_owned().await;
        return Ok(DeviceSession::local(guard, rpc.session_timeout));
    }
    if matches!(rpc.backend, Backend::Tvm { .. }) {
        let dev = tvm::create(ctx).await?;
        return Ok(DeviceSession {
            server: dev.sess.addr().to_owned(),
            inner: Device::Tvm(Box::new(dev)),
            limit: rpc.session_timeout,
            pending: Pending::default(),
        });
    }
    let addr = rpc.tracker_addr();
    let session_err = |e| RunError::Session { addr: addr.clone(), source: Cause::new(e) };
    // A connection of an earlier lease (a dead one redials in the request);
    // dropped with this future if it is cancelled, so the tracker forgets
    // its pending request.
    let idle = ctx.trackers.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut tracker = match idle {
        Some(t) => t,
        None => {
            TrackerClient::connect(&addr).await.map_err(|e| session_err(SessionError::from(e)))?
        }
    };
    let mut opts = RequestOptions::new(rpc.session_priority, Some(rpc.session_timeout));
    opts.lease_timeout = rpc.lease_timeout;
    opts.connect = ConnectOptions::default()
        .session_timeout(Some(rpc.session_timeout))
        .token(rpc.token.clone());
    let sess = tracker.request_with(&rpc.tracker_key, &opts).await;
    {
        let mut idle = ctx.trackers.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_TRACKERS {
            idle.push(tracker);
        }
    }
    let sess = sess.map_err(|e| match e {
        // `request_with`'s own bound on the wait (connecting has another).
        SessionError::Timeout { what: "waiting for a free device", limit } => {
            RunError::LeaseTimeout { limit }
        }
        e => session_err(e),
    })?;
    Ok(DeviceSession::from_session(sess, rpc.session_timeout))
}
