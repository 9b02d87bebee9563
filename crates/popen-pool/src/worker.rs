//! `PopenWorker`: one worker process, one task at a time.

use std::sync::Arc;
use std::time::Duration;

use crate::child::ProcessLauncher;
use crate::config::{WorkerOptions, WorkerProgram, worker_option_setters};
use crate::core::{CoreShared, Counters, PoolStats, WorkerCore};
use crate::error::PoolError;
use crate::task::{ErasedTask, Task};

/// One worker process that runs one task at a time, restarted as needed.
///
/// The process starts on the first task (or [`start`](PopenWorker::start)). A
/// timeout, crash or abort kills it and its task's processes (see
/// [`containment`](PopenWorker::containment)) and the next task runs in a
/// fresh process. Dropping the worker kills them too.
///
/// # Examples
///
/// ```no_run
/// # use popen_pool::{PopenWorker, WorkerProgram, Task, TaskFailure, WorkerContext};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Square(u64);
/// # impl Task for Square {
/// #     const NAME: &'static str = "square"; type Output = u64;
/// #     fn run(self, _: &mut WorkerContext) -> Result<u64, TaskFailure> { Ok(self.0 * self.0) }
/// # }
/// # async fn demo() -> Result<(), popen_pool::PoolError> {
/// let mut worker = PopenWorker::builder(WorkerProgram::current_exe()?)
///     .timeout(std::time::Duration::from_secs(5))
///     .build()?;
/// assert_eq!(worker.run(Square(7)).await?, 49);
/// worker.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PopenWorker {
    core: WorkerCore<ProcessLauncher>,
    counters: Arc<Counters>,
    default_timeout: Option<Duration>,
}

/// Builds a [`PopenWorker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    program: WorkerProgram,
    opts: WorkerOptions,
}

impl WorkerBuilder {
    worker_option_setters!();

    /// Builds the worker; no process starts until it is needed.
    ///
    /// # Errors
    ///
    /// [`PoolError::Config`] for invalid options, [`PoolError::Codec`] if the
    /// initializer cannot be serialized.
    pub fn build(self) -> Result<PopenWorker, PoolError> {
        self.opts.validate_for(&self.program)?;
        let default_timeout = self.opts.timeout;
        let opts = Arc::new(self.opts);
        let counters = Arc::new(Counters::default());
        let launcher = ProcessLauncher::new(self.program, Arc::clone(&opts), true);
        let shared = Arc::new(CoreShared::new(launcher, opts, Arc::clone(&counters)));
        Ok(PopenWorker { core: WorkerCore::new(shared), counters, default_timeout })
    }
}

impl PopenWorker {
    /// A builder for a worker running `program`.
    pub fn builder(program: WorkerProgram) -> WorkerBuilder {
        WorkerBuilder { program, opts: WorkerOptions::default() }
    }

    /// Starts the worker process now (it otherwise starts on the first task)
    /// and returns its pid.
    ///
    /// # Errors
    ///
    /// [`PoolError::Spawn`] or [`PoolError::Initializer`].
    pub async fn start(&mut self) -> Result<u32, PoolError> {
        self.core.ensure_started().await
    }

    /// Runs `task` with the worker's default time limit.
    ///
    /// Dropping the returned future while the task runs kills the worker.
    ///
    /// # Errors
    ///
    /// One [`PoolError`] per failure: timeout, worker died, task error or
    /// panic, unknown task, spawn failure, frame too large, protocol error.
    pub async fn run<T: Task>(&mut self, task: T) -> Result<T::Output, PoolError> {
        let limit = self.default_timeout;
        self.run_with_timeout(task, limit).await
    }

    /// Runs `task` with this time limit (`None`: no limit).
    ///
    /// # Errors
    ///
    /// As [`run`](PopenWorker::run).
    pub async fn run_with_timeout<T: Task>(
        &mut self,
        task: T,
        limit: Option<Duration>,
    ) -> Result<T::Output, PoolError> {
        let erased = ErasedTask::new(&task)?;
        let bytes = self.core.run(&erased, limit, None).await?;
        postcard::from_bytes(&bytes).map_err(PoolError::codec)
    }

    /// Runs an already-serialized task and returns its postcard-encoded output
    /// (for relays that forward tasks they cannot type).
    ///
    /// # Errors
    ///
    /// As [`run`](PopenWorker::run).
    pub async fn run_erased(
        &mut self,
        task: &ErasedTask,
        limit: Option<Duration>,
    ) -> Result<bytes::Bytes, PoolError> {
        self.core.run(task, limit, None).await
    }

    /// The pid of the current worker process, if one is running.
    pub fn pid(&self) -> Option<u32> {
        self.core.pid()
    }

    /// How the worker's processes are contained (see
    /// [`PopenPool::containment`](crate::PopenPool::containment)).
    pub fn containment(&self) -> crate::Containment {
        self.core.containment()
    }

    /// The worker's counters.
    pub fn stats(&self) -> PoolStats {
        self.counters.snapshot()
    }

    /// Kills the worker and its task's processes now and reaps it; the next task starts
    /// a fresh process.
    ///
    /// The signal goes out when the future is first polled (SIGKILL to the
    /// worker's cgroup or process tree): from then on no code of the worker
    /// runs, whether or not the future is polled again. The rest of the
    /// future waits for the reap and removes the worker's cgroup; dropping it
    /// before then leaves the reap to the worker's `Drop`.
    pub async fn kill(&mut self) {
        self.core.kill().await;
    }

    /// Asks the worker process to exit, waits up to the grace period, then
    /// kills its group; reaps it.
    pub async fn shutdown(mut self) {
        self.core.shutdown().await;
    }
}
