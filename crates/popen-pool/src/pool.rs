//! `PopenPool`: N workers behind a queue.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cgroup::Containment;
use crate::child::{Launcher, ProcessLauncher};
use crate::config::{WorkerOptions, WorkerProgram, worker_option_setters};
use crate::core::{CoreShared, Counters, PoolStats, WorkerCore};
use crate::error::PoolError;
use crate::queue::{Job, PoolShared};
use crate::task::{ErasedTask, Task};

/// A future of one task's result; it can also abort the task.
///
/// [`abort`](TaskHandle::abort) removes a queued task, or kills the worker of
/// a running one (the pool replaces it); the handle then resolves to
/// [`PoolError::Cancelled`].
///
/// # Dropping a handle cancels its task
///
/// Dropping the handle before it resolved aborts the task, as `abort` does;
/// [`detach`](TaskHandle::detach) lets it run unobserved instead. This is the
/// rule of the whole project (pool, builder and runner futures and streams):
/// dropping a future or stream cancels the work it owns. It differs from
/// tokio's `JoinHandle`, which detaches on drop, on purpose: a task holds a
/// worker process (a core, often a device), and one nobody waits for wastes
/// it, up to its time limit or forever, while `select!`, `timeout` and a
/// dropped batch would otherwise leave such tasks behind silently.
#[must_use = "a TaskHandle cancels its task when dropped; await it, or call detach()"]
pub struct TaskHandle<O> {
    id: u64,
    rx: oneshot::Receiver<Result<Bytes, PoolError>>,
    cancel: CancellationToken,
    pool: Weak<PoolShared>,
    /// Resolved (nothing left to cancel) or detached.
    settled: bool,
    _out: PhantomData<fn() -> O>,
}

impl<O> Drop for TaskHandle<O> {
    fn drop(&mut self) {
        if !self.settled {
            self.abort();
        }
    }
}

impl<O> std::fmt::Debug for TaskHandle<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<O> TaskHandle<O> {
    fn failed(err: PoolError) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(err));
        TaskHandle {
            id: 0,
            rx,
            cancel: CancellationToken::new(),
            pool: Weak::new(),
            settled: true,
            _out: PhantomData,
        }
    }

    /// Lets the task run to its end unobserved: dropping the handle no longer
    /// cancels it, and its result is discarded.
    pub fn detach(mut self) {
        self.settled = true;
    }

    /// The task's id within its pool.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Aborts the task: a queued task is removed; a running one has its
    /// worker killed. Does nothing if the task already finished.
    pub fn abort(&self) {
        self.cancel.cancel();
        if let Some(pool) = self.pool.upgrade() {
            pool.remove_queued(self.id);
        }
    }
}

impl<O: DeserializeOwned> Future for TaskHandle<O> {
    type Output = Result<O, PoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let out = ready!(Pin::new(&mut this.rx).poll(cx));
        this.settled = true;
        Poll::Ready(match out {
            Ok(Ok(bytes)) => postcard::from_bytes(&bytes).map_err(PoolError::codec),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PoolError::Shutdown),
        })
    }
}

/// A pool of worker processes behind a queue.
///
/// Each task runs in one of `max_workers` worker processes under the pool's
/// (or its own) time limit. A timeout, crash or abort fails that task alone:
/// the worker and its task's processes are killed and a fresh worker takes its place.
/// Dropping the pool kills every worker.
///
/// A `PopenPool` is a handle: cloning it is cheap (an `Arc` inside) and
/// every clone submits to the same queue and workers. `shutdown` and `kill`
/// through any clone stop the pool for all of them; the workers are killed
/// when the last clone is dropped.
///
/// # Examples
///
/// ```no_run
/// # use popen_pool::{PopenPool, WorkerProgram, Task, TaskFailure, WorkerContext};
/// # use serde::{Deserialize, Serialize};
/// # use futures::StreamExt;
/// # #[derive(Serialize, Deserialize)] struct Square(u64);
/// # impl Task for Square {
/// #     const NAME: &'static str = "square"; type Output = u64;
/// #     fn run(self, _: &mut WorkerContext) -> Result<u64, TaskFailure> { Ok(self.0 * self.0) }
/// # }
/// # async fn demo() -> Result<(), popen_pool::PoolError> {
/// let pool = PopenPool::builder(WorkerProgram::current_exe()?)
///     .max_workers(2)
///     .timeout(std::time::Duration::from_secs(10))
///     .build()?;
/// assert_eq!(pool.submit(Square(3)).await?, 9);
/// let squares: Vec<_> = pool.map_with_error_catching((0..10).map(Square)).collect().await;
/// assert_eq!(squares[4], Ok(16));
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PopenPool {
    inner: Arc<PoolInner>,
}

/// What every clone of a pool shares; dropping the last clone kills the workers.
struct PoolInner {
    shared: Arc<PoolShared>,
    cores: Arc<CoreShared<ProcessLauncher>>,
    /// The worker slots' loops; closed at build, so `wait` means "all ended".
    drivers: TaskTracker,
    default_timeout: Option<Duration>,
    max_workers: usize,
}

impl std::fmt::Debug for PopenPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PopenPool")
            .field("max_workers", &self.inner.max_workers)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Builds a [`PopenPool`].
#[derive(Debug)]
pub struct PoolBuilder {
    program: WorkerProgram,
    opts: WorkerOptions,
    max_workers: Option<usize>,
    max_queue: Option<usize>,
    prestart: bool,
}

impl PoolBuilder {
    worker_option_setters!();

    /// Number of worker processes (default: the available parallelism).
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = Some(n);
        self
    }

    /// Bound the queue of waiting tasks: `submit` then fails with
    /// [`PoolError::QueueFull`] and `submit_wait` waits for room. Default:
    /// unbounded (see [`unbounded_queue`](Self::unbounded_queue)).
    #[must_use]
    pub fn max_queue(mut self, capacity: usize) -> Self {
        self.max_queue = Some(capacity);
        self
    }

    /// No bound on the queue of waiting tasks (the default).
    #[must_use]
    pub fn unbounded_queue(mut self) -> Self {
        self.max_queue = None;
        self
    }

    /// Start every worker process when the pool is built rather than on
    /// first use (default: on).
    #[must_use]
    pub fn prestart(mut self, on: bool) -> Self {
        self.prestart = on;
        self
    }

    /// Builds the pool and starts its workers. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`PoolError::Config`] for invalid options or when no tokio runtime is
    /// running; [`PoolError::Codec`] if the initializer cannot be serialized.
    pub fn build(self) -> Result<PopenPool, PoolError> {
        self.opts.validate_for(&self.program)?;
        let max_workers = self
            .max_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if max_workers == 0 {
            return Err(PoolError::Config { message: "max_workers must be >= 1".into() });
        }
        if self.max_queue == Some(0) {
            return Err(PoolError::Config { message: "max_queue must be >= 1".into() });
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(PoolError::Config {
                message: "a PopenPool must be built inside a tokio runtime".into(),
            });
        }
        let default_timeout = self.opts.timeout;
        let opts = Arc::new(self.opts);
        let counters = Arc::new(Counters::default());
        let launcher = ProcessLauncher::new(self.program, Arc::clone(&opts), false);
        let cores = Arc::new(CoreShared::new(launcher, opts, Arc::clone(&counters)));
        let shared = Arc::new(PoolShared {
            queue: Mutex::default(),
            work: Notify::new(),
            space: Notify::new(),
            aborted: Notify::new(),
            idle: AtomicUsize::new(0),
            kill: CancellationToken::new(),
            counters,
            next_id: AtomicU64::new(1),
            max_queue: self.max_queue,
        });
        let drivers = TaskTracker::new();
        for slot in 0..max_workers {
            let core = WorkerCore::new(Arc::clone(&cores));
            drivers.spawn(drive(Arc::clone(&shared), core, slot, self.prestart));
        }
        drivers.close();
        let inner = PoolInner { shared, cores, drivers, default_timeout, max_workers };
        Ok(PopenPool { inner: Arc::new(inner) })
    }
}

/// One worker slot's loop: take jobs, run them (a few ahead, see
/// [`core::pipeline`](crate::core)), reply.
async fn drive(
    shared: Arc<PoolShared>,
    mut core: WorkerCore<ProcessLauncher>,
    slot: usize,
    prestart: bool,
) {
    if prestart {
        core.prestart();
    }
    let span = tracing::debug_span!("popen_pool.slot", slot);
    core.serve(&*shared).instrument(span).await;
    if shared.kill.is_cancelled() {
        core.kill().await;
    } else {
        core.shutdown().await;
    }
}

impl PopenPool {
    /// A builder for a pool running `program`.
    pub fn builder(program: WorkerProgram) -> PoolBuilder {
        PoolBuilder {
            program,
            opts: WorkerOptions::default(),
            max_workers: None,
            max_queue: None,
            prestart: true,
        }
    }

    /// Queues `task` with the pool's default time limit.
    ///
    /// Errors (queue full, pool shut down, serialization) come out of the
    /// handle, like the task's own outcome. Dropping the handle cancels the
    /// task (see [`TaskHandle`]).
    pub fn submit<T: Task>(&self, task: T) -> TaskHandle<T::Output> {
        self.submit_with_timeout(task, self.inner.default_timeout)
    }

    /// Queues `task` with its own time limit (`None`: no limit).
    pub fn submit_with_timeout<T: Task>(
        &self,
        task: T,
        limit: Option<Duration>,
    ) -> TaskHandle<T::Output> {
        match ErasedTask::new(&task) {
            Ok(erased) => {
                self.enqueue(erased, limit).unwrap_or_else(|(e, _)| TaskHandle::failed(e))
            }
            Err(e) => TaskHandle::failed(e),
        }
    }

    /// Queues `task`, waiting for room if the queue is bounded and full.
    pub async fn submit_wait<T: Task>(&self, task: T) -> TaskHandle<T::Output> {
        let mut erased = match ErasedTask::new(&task) {
            Ok(erased) => erased,
            Err(e) => return TaskHandle::failed(e),
        };
        loop {
            let notified = self.inner.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.enqueue(erased, self.inner.default_timeout) {
                Ok(handle) => return handle,
                Err((PoolError::QueueFull { .. }, back)) => erased = back,
                Err((e, _)) => return TaskHandle::failed(e),
            }
            notified.await;
        }
    }

    fn enqueue<O>(
        &self,
        task: ErasedTask,
        limit: Option<Duration>,
    ) -> Result<TaskHandle<O>, (PoolError, ErasedTask)> {
        let shared = &self.inner.shared;
        let (reply, rx) = oneshot::channel();
        let cancel = shared.kill.child_token();
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = shared.lock();
            if q.closed {
                return Err((PoolError::Shutdown, task));
            }
            if let Some(capacity) = shared.max_queue {
                if q.jobs.len() >= capacity {
                    return Err((PoolError::QueueFull { capacity }, task));
                }
            }
            q.jobs.push_back(Job { id, task, limit, reply, cancel: cancel.clone() });
        }
        shared.counters.queued.fetch_add(1, Ordering::Relaxed);
        shared.work.notify_one();
        Ok(TaskHandle {
            id,
            rx,
            cancel,
            pool: Arc::downgrade(shared),
            settled: false,
            _out: PhantomData,
        })
    }

    /// Runs `tasks` and yields one result per task, in input order.
    ///
    /// With an unbounded queue every task is queued at once; with a bounded
    /// one, tasks are queued as room frees up while the stream is polled.
    /// Dropping the stream cancels every task it has not yielded yet (queued
    /// ones are removed, running ones have their workers killed and
    /// replaced) and queues no more.
    pub fn map_with_error_catching<T, I>(
        &self,
        tasks: I,
    ) -> impl Stream<Item = Result<T::Output, PoolError>> + Send + '_
    where
        T: Task,
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        match self.inner.shared.max_queue {
            None => {
                let handles: Vec<_> = tasks.into_iter().map(|t| self.submit(t)).collect();
                stream::iter(handles).then(|h| h).left_stream()
            }
            // As many in flight as can be queued or running at once: the
            // queue's room paces the submissions, every worker stays busy.
            Some(capacity) => stream::iter(tasks)
                .map(move |t| async move { self.submit_wait(t).await.await })
                .buffered(capacity.saturating_add(self.inner.max_workers))
                .right_stream(),
        }
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.inner.shared.counters.snapshot()
    }

    /// The number of worker slots.
    pub fn max_workers(&self) -> usize {
        self.inner.max_workers
    }

    /// Pids of the worker processes alive now (spares included).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.inner.cores.launcher.live_pids()
    }

    /// How the workers are contained: a cgroup per worker, or (without a
    /// usable cgroup2 hierarchy, or with [`cgroups(false)`]) process group
    /// and process tree. See docs/popen-pool.md for what each guarantees.
    ///
    /// [`cgroups(false)`]: PoolBuilder::cgroups
    pub fn containment(&self) -> Containment {
        self.inner.cores.launcher.containment()
    }

    /// Stops taking tasks, finishes every queued and running task, then stops
    /// the workers gracefully (grace period, then SIGKILL of each worker's
    /// cgroup or tree) and reaps them. When it returns, every process of the
    /// pool is gone and its cgroup directories are removed.
    ///
    /// Cancel safety: dropping the future drops this handle; the pool is
    /// killed once no clone of it is left (see [`Drop`]).
    pub async fn shutdown(self) {
        self.inner.cores.close();
        self.inner.shared.close(false);
        self.inner.drivers.wait().await;
    }

    /// Stops now: queued tasks fail with [`PoolError::Shutdown`], running
    /// tasks' workers are killed (their tasks fail with `Shutdown` too), and
    /// every worker is reaped (and its cgroup removed) before this returns,
    /// for every caller, also when called concurrently.
    ///
    /// Cancel safety: dropping the future does not stop the kill; the pool
    /// is killed and the workers are reaped in the background.
    pub async fn kill(&self) {
        self.inner.cores.close();
        self.inner.shared.close(true);
        self.inner.shared.kill.cancel();
        self.inner.drivers.wait().await;
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.cores.close();
        self.shared.close(true);
        self.shared.kill.cancel();
        // Synchronously, in case the runtime is going away too; the drivers
        // reap what this kills.
        self.cores.launcher.kill_all();
    }
}
