//! The per-worker state machine: start and handshake, run one task under a
//! deadline, classify the outcome, kill, recycle and keep a warm spare.
//!
//! Generic over [`Launcher`] so it is unit-tested with a fake child
//! (`tests` below) and used with real processes by [`PopenWorker`] and
//! [`PopenPool`].
//!
//! [`PopenWorker`]: crate::PopenWorker
//! [`PopenPool`]: crate::PopenPool

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::child::{Ceiling, Child, Launcher};
use crate::config::WorkerOptions;
use crate::error::PoolError;
use crate::protocol::{FromWorker, Outcome, PROTOCOL_VERSION, ToWorker};
use crate::task::ErasedTask;

pub use crate::stats::PoolStats;
pub(crate) use crate::stats::{Counters, bump};

/// What every core of one pool shares.
#[derive(Debug)]
pub(crate) struct CoreShared<L> {
    pub(crate) launcher: L,
    pub(crate) opts: Arc<WorkerOptions>,
    pub(crate) counters: Arc<Counters>,
    /// Set once the pool is shutting down, killed or dropped: from then on
    /// no spare is started ahead of need.
    pub(crate) closing: AtomicBool,
}

impl<L> CoreShared<L> {
    pub(crate) fn new(launcher: L, opts: Arc<WorkerOptions>, counters: Arc<Counters>) -> Self {
        CoreShared { launcher, opts, counters, closing: AtomicBool::new(false) }
    }

    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// A started, handshaken (and initialized) worker.
#[derive(Debug)]
struct Live<C> {
    child: C,
    uses: u32,
    tasks: Arc<[String]>,
    /// Its last task was short: the next ones may be sent ahead.
    fast: bool,
}

/// One worker slot: at most one live process, plus maybe a spare starting.
#[derive(Debug)]
pub(crate) struct WorkerCore<L: Launcher> {
    shared: Arc<CoreShared<L>>,
    live: Option<Live<L::Child>>,
    spare: Option<Spare<L::Child>>,
    retiring: Option<Retiring>,
    next_id: u64,
}

/// A worker being started in the background, and the token that stops it.
#[derive(Debug)]
struct Spare<C> {
    handle: JoinHandle<Result<Live<C>, PoolError>>,
    stop: CancellationToken,
}

/// A recycled worker exiting gracefully in the background.
#[derive(Debug)]
struct Retiring {
    handle: JoinHandle<()>,
    /// Cancelled by `kill`: stop waiting for the graceful exit, kill now.
    now: CancellationToken,
}

enum Event<T> {
    Done(T),
    Timeout(Duration),
    Cancelled,
    OverMemory(u64),
}

/// How often the parent samples a worker's RSS where no cgroup enforces
/// its memory ceiling.
const MEMORY_SAMPLE: Duration = Duration::from_millis(10);

fn over_ceiling(ceiling: Option<Ceiling>) -> Option<u64> {
    let c = ceiling?;
    let rss = crate::unix::rss_bytes(c.watch?)?;
    (rss > c.limit).then_some(c.limit)
}

/// Resolves once the sampled worker is over its ceiling; never without a watch.
async fn watch_memory(ceiling: Option<Ceiling>) -> u64 {
    if ceiling.is_none_or(|c| c.watch.is_none()) {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(MEMORY_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(limit) = over_ceiling(ceiling) {
            return limit;
        }
    }
}

async fn wait_cancelled(cancel: Option<&CancellationToken>) {
    match cancel {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn wait_limit(limit: Option<Duration>) {
    match limit {
        Some(l) => tokio::time::sleep(l).await,
        None => std::future::pending().await,
    }
}

/// Result of one request/response with a worker.
struct Exchange {
    result: Result<Bytes, PoolError>,
    /// The worker ran the task (a `Done` came back).
    ran: bool,
    /// The worker process is gone (killed or died) and was reaped.
    lost: bool,
}

impl Exchange {
    fn kept(result: Result<Bytes, PoolError>, ran: bool) -> Self {
        Exchange { result, ran, lost: false }
    }
    fn lost(err: PoolError) -> Self {
        Exchange { result: Err(err), ran: false, lost: true }
    }
}

/// After the channel closed: what the worker's end means for its task.
async fn ended<C: Child>(child: &mut C) -> PoolError {
    // Before the reap, which removes the worker's cgroup.
    let oom = child.oom_killed();
    let exit = child.reap().await;
    match (oom, child.memory_ceiling()) {
        (true, Some(c)) => PoolError::MemoryLimit { limit: c.limit },
        _ => PoolError::WorkerDied { exit },
    }
}

/// After a failed read: the worker is killed; the protocol error to report.
async fn broke<C: Child>(child: &mut C, e: PoolError) -> PoolError {
    child.kill().await;
    let message = match e {
        PoolError::FrameTooLarge { len, max } => {
            format!("worker sent a frame of {len} bytes, over the maximum of {max}")
        }
        PoolError::Protocol { message } => message,
        other => other.to_string(),
    };
    PoolError::protocol(message)
}

async fn recv_done<C: Child>(child: &mut C, id: u64, known: &[String]) -> Exchange {
    let frame = match child.recv().await {
        Ok(Some(frame)) => frame.freeze(),
        Ok(None) => return Exchange::lost(ended(child).await),
        Err(e) => return Exchange::lost(broke(child, e).await),
    };
    let outcome = match postcard::from_bytes::<FromWorker<'_>>(&frame) {
        Ok(FromWorker::Done { id: got, outcome }) if got == id => outcome,
        Ok(other) => {
            let message = format!("expected the result of task {id}, got {other:?}");
            child.kill().await;
            return Exchange::lost(PoolError::protocol(message));
        }
        Err(e) => {
            child.kill().await;
            return Exchange::lost(PoolError::protocol(format!("undecodable frame: {e}")));
        }
    };
    let result = classify(&frame, outcome, known);
    Exchange::kept(result, true)
}

/// The result a task's outcome stands for (`frame` holds the outcome).
fn classify(frame: &Bytes, outcome: Outcome<'_>, known: &[String]) -> Result<Bytes, PoolError> {
    match outcome {
        Outcome::Ok(out) => Ok(frame.slice_ref(out)),
        Outcome::Failed { kind, message } => Err(PoolError::Task { kind, message }),
        Outcome::Panicked { message } => Err(PoolError::Task { kind: "panic".into(), message }),
        Outcome::UnknownTask { name } => {
            Err(PoolError::UnknownTask { name, known: known.to_vec() })
        }
        Outcome::TooLarge { len, max } => {
            Err(PoolError::FrameTooLarge { len: len as usize, max: max as usize })
        }
        Outcome::Skipped => Err(PoolError::protocol("worker skipped a task it was not told to")),
    }
}

/// Counts one task's end.
fn count(counters: &Counters, result: &Result<Bytes, PoolError>, lost: bool) {
    match result {
        Ok(_) => bump(&counters.completed),
        Err(PoolError::Timeout { .. }) => bump(&counters.timeouts),
        Err(PoolError::Cancelled) => bump(&counters.cancelled),
        Err(PoolError::MemoryLimit { .. }) => bump(&counters.memory_kills),
        Err(_) if lost => bump(&counters.crashes),
        Err(_) => bump(&counters.failed),
    }
}

/// Sends one task and waits for its outcome, its deadline or its cancellation.
async fn exchange<C: Child>(
    child: &mut C,
    tasks: &[String],
    id: u64,
    task: &ErasedTask,
    limit: Option<Duration>,
    cancel: Option<&CancellationToken>,
) -> Exchange {
    if !tasks.iter().any(|t| *t == task.name) {
        let err = PoolError::UnknownTask { name: task.name.to_string(), known: tasks.to_vec() };
        return Exchange::kept(Err(err), false);
    }
    if cancel.is_some_and(CancellationToken::is_cancelled) {
        return Exchange::kept(Err(PoolError::Cancelled), false);
    }
    let msg = ToWorker::Run { id, name: &task.name, payload: &task.payload };
    match child.send(&msg).await {
        Ok(()) => {}
        // Refused by the encoder before anything was written: the worker is fine.
        Err(e @ PoolError::FrameTooLarge { .. }) => return Exchange::kept(Err(e), false),
        Err(_) => {
            let exit = child.reap().await;
            return Exchange::lost(PoolError::WorkerDied { exit });
        }
    }
    let ceiling = child.memory_ceiling();
    let event = tokio::select! {
        biased;
        ex = recv_done(child, id, tasks) => Event::Done(ex),
        () = wait_limit(limit) => Event::Timeout(limit.unwrap_or_default()),
        () = wait_cancelled(cancel) => Event::Cancelled,
        over = watch_memory(ceiling) => Event::OverMemory(over),
    };
    match event {
        // A sampled ceiling is checked once more when the task ends, so a
        // task that leaves its worker over the ceiling fails too.
        Event::Done(ex) if !ex.lost && over_ceiling(ceiling).is_some() => {
            child.kill().await;
            Exchange::lost(PoolError::MemoryLimit { limit: ceiling.map_or(0, |c| c.limit) })
        }
        Event::Done(ex) => ex,
        Event::OverMemory(limit) => {
            child.kill().await;
            Exchange::lost(PoolError::MemoryLimit { limit })
        }
        Event::Timeout(limit) => {
            child.kill().await;
            Exchange::lost(PoolError::Timeout { limit })
        }
        Event::Cancelled => {
            child.kill().await;
            Exchange::lost(PoolError::Cancelled)
        }
    }
}

/// Waits for the worker's `Hello` and returns the task names it serves.
async fn handshake<C: Child>(child: &mut C, program: &str) -> Result<Arc<[String]>, PoolError> {
    let frame = match child.recv().await {
        Ok(Some(frame)) => frame,
        Ok(None) => {
            let exit = child.reap().await;
            return Err(PoolError::spawn(format!(
                "worker program {program} exited before its handshake ({exit}); does its main \
                 call popen_pool::serve_if_worker (or serve) first?"
            )));
        }
        Err(e) => {
            return Err(PoolError::spawn(format!(
                "handshake with worker program {program} failed: {e} (is it built with the \
                 same popen-pool version?)"
            )));
        }
    };
    match postcard::from_bytes::<FromWorker<'_>>(&frame) {
        Ok(FromWorker::Hello { version, tasks, .. }) if version == PROTOCOL_VERSION => {
            Ok(tasks.into())
        }
        Ok(FromWorker::Refused { message, .. }) => Err(PoolError::spawn(format!(
            "worker program {program} cannot apply its process controls: {message}"
        ))),
        Ok(FromWorker::Hello { version, .. }) => Err(PoolError::spawn(format!(
            "worker program {program} speaks protocol version {version}, this parent speaks \
             {PROTOCOL_VERSION}"
        ))),
        _ => Err(PoolError::spawn(format!(
            "worker program {program} did not start with a handshake"
        ))),
    }
}

/// Handshake, then the initializer (if any), within the start timeout.
async fn prepare<C: Child>(
    child: &mut C,
    opts: &WorkerOptions,
    program: &str,
) -> Result<Arc<[String]>, PoolError> {
    let tasks = handshake(child, program).await?;
    if let Some(Ok(init)) = &opts.initializer {
        let ex = exchange(child, &tasks, 0, init, None, None).await;
        if let Err(e) = ex.result {
            return Err(PoolError::Initializer { source: Box::new(e) });
        }
    }
    Ok(tasks)
}

/// Starts a worker, checks its handshake and runs the initializer. On any
/// failure, or when `stop` is cancelled, the process is killed and reaped
/// before this returns.
async fn start_child<L: Launcher>(
    shared: Arc<CoreShared<L>>,
    stop: CancellationToken,
) -> Result<Live<L::Child>, PoolError> {
    let opts = &shared.opts;
    if stop.is_cancelled() {
        return Err(PoolError::Cancelled);
    }
    // Launching is a posix_spawn on the spawner thread: short, and not
    // interrupted, so a started process is never dropped unreaped.
    let mut child = shared.launcher.launch().await?;
    bump(&shared.counters.spawned);
    let program = shared.launcher.program();
    let prepared = tokio::select! {
        biased;
        () = stop.cancelled() => Err(PoolError::Cancelled),
        r = tokio::time::timeout(opts.start_timeout, prepare(&mut child, opts, &program)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(PoolError::spawn(format!(
                    "worker program {program} did not complete its handshake and initializer \
                     within {:?}",
                    opts.start_timeout
                ))),
            }
        }
    };
    match prepared {
        Ok(tasks) => Ok(Live { child, uses: 0, tasks, fast: false }),
        Err(e) => {
            child.kill().await;
            Err(e)
        }
    }
}

impl<L: Launcher> WorkerCore<L> {
    pub(crate) fn new(shared: Arc<CoreShared<L>>) -> Self {
        WorkerCore { shared, live: None, spare: None, retiring: None, next_id: 1 }
    }

    /// How this core's launcher contains its workers.
    pub(crate) fn containment(&self) -> crate::Containment {
        self.shared.launcher.containment()
    }

    /// The pid of the live worker process, if one is running.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.live.as_ref().map(|l| l.child.pid())
    }

    fn start_spare(&mut self) {
        if self.spare.is_none() {
            let stop = CancellationToken::new();
            let handle = tokio::spawn(start_child(Arc::clone(&self.shared), stop.clone()));
            self.spare = Some(Spare { handle, stop });
        }
    }

    /// Starts a spare ahead of need, unless the pool is closing.
    fn start_warm_spare(&mut self) {
        if self.shared.opts.warm_spare && !self.shared.is_closing() {
            self.start_spare();
        }
    }

    /// Starts a worker process now if there is none (and none starting),
    /// unless the pool is closing.
    pub(crate) fn prestart(&mut self) {
        if self.live.is_none() && !self.shared.is_closing() {
            self.start_spare();
        }
    }

    /// Waits for a recycled worker to be gone (the handle stays tracked until
    /// it is, even if this future is dropped). `Err` if `cancel` fired first.
    pub(in crate::core) async fn join_retiring(
        &mut self,
        cancel: Option<&CancellationToken>,
    ) -> Result<(), PoolError> {
        if let Some(retiring) = self.retiring.as_mut() {
            tokio::select! {
                biased;
                () = wait_cancelled(cancel) => return Err(PoolError::Cancelled),
                _ = &mut retiring.handle => {}
            }
            self.retiring = None;
        }
        Ok(())
    }

    pub(in crate::core) async fn take_live(
        &mut self,
        cancel: Option<&CancellationToken>,
    ) -> Result<Live<L::Child>, PoolError> {
        if let Some(live) = self.live.take() {
            return Ok(live);
        }
        self.start_spare();
        let spare = self.spare.as_mut().expect("spare was just started");
        let event = tokio::select! {
            biased;
            () = wait_cancelled(cancel) => Event::Cancelled,
            r = &mut spare.handle => Event::Done(r),
        };
        match event {
            Event::Done(r) => {
                self.spare = None;
                match r {
                    Ok(r) => r,
                    Err(e) => Err(PoolError::spawn(format!("worker start task failed: {e}"))),
                }
            }
            // The spare keeps starting; the next task will use it.
            _ => Err(PoolError::Cancelled),
        }
    }

    /// Starts (if needed) and returns once the worker is ready.
    pub(crate) async fn ensure_started(&mut self) -> Result<u32, PoolError> {
        let live = self.take_live(None).await?;
        let pid = live.child.pid();
        self.live = Some(live);
        Ok(pid)
    }

    /// Runs one task. Dropping the returned future kills the worker (its
    /// process is owned by the future while the task runs).
    pub(crate) async fn run(
        &mut self,
        task: &ErasedTask,
        limit: Option<Duration>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Bytes, PoolError> {
        let opts = Arc::clone(&self.shared.opts);
        let counters = Arc::clone(&self.shared.counters);
        if task.payload.len() > opts.max_frame_bytes {
            return Err(PoolError::FrameTooLarge {
                len: task.payload.len(),
                max: opts.max_frame_bytes,
            });
        }
        let mut live = self.ready_live(cancel).await?;
        let last_use = opts.maximum_process_uses.is_some_and(|max| live.uses + 1 >= max);
        if last_use {
            self.start_warm_spare();
        }
        let id = self.next_id;
        self.next_id += 1;
        let ex = exchange(&mut live.child, &live.tasks, id, task, limit, cancel).await;
        count(&counters, &ex.result, ex.lost);
        if ex.lost {
            self.start_warm_spare();
            return ex.result;
        }
        if ex.ran {
            live.uses += 1;
        }
        let over_uses = opts.maximum_process_uses.is_some_and(|max| live.uses >= max);
        let over_rss = opts
            .max_rss_bytes
            .is_some_and(|limit| live.child.rss_bytes().is_some_and(|rss| rss > limit));
        if over_uses || over_rss {
            self.retire(live);
        } else {
            self.live = Some(live);
        }
        ex.result
    }

    /// Recycles `live`: it exits gracefully in the background (killed after
    /// the grace period), and a warm spare starts.
    fn retire(&mut self, mut live: Live<L::Child>) {
        bump(&self.shared.counters.recycled);
        let grace = self.shared.opts.kill_grace;
        let now = CancellationToken::new();
        let stop = now.clone();
        let handle = tokio::spawn(async move {
            let graceful = tokio::select! {
                biased;
                () = stop.cancelled() => false,
                _ = live.child.shutdown(grace) => true,
            };
            if !graceful {
                live.child.kill().await;
            }
        });
        self.retiring = Some(Retiring { handle, now });
        self.start_warm_spare();
    }

    /// Stops a starting worker: it kills and reaps its process itself.
    async fn stop_spare(&mut self) {
        if let Some(spare) = self.spare.take() {
            spare.stop.cancel();
            if let Ok(Ok(mut live)) = spare.handle.await {
                live.child.kill().await;
            }
        }
    }

    /// Kills the worker and its task's processes (and any spare) now and reaps it.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut live) = self.live.take() {
            live.child.kill().await;
        }
        self.stop_spare().await;
        if let Some(retiring) = &self.retiring {
            retiring.now.cancel();
        }
        let _ = self.join_retiring(None).await;
    }

    /// Asks the worker to exit, waits up to the grace period, then kills.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(mut live) = self.live.take() {
            live.child.shutdown(self.shared.opts.kill_grace).await;
        }
        self.stop_spare().await;
        let _ = self.join_retiring(None).await;
    }
}

impl<L: Launcher> Drop for WorkerCore<L> {
    fn drop(&mut self) {
        // The live child's own Drop kills its group; a starting spare is
        // aborted, which drops (and so kills) whatever it had started.
        if let Some(spare) = &self.spare {
            spare.stop.cancel();
            spare.handle.abort();
        }
    }
}

#[path = "pipeline.rs"]
mod pipeline;
pub(crate) use pipeline::{Job, Jobs};

#[cfg(test)]
#[path = "core_tests/mod.rs"]
mod tests;

#[cfg(test)]
mod stats_tests {
    #[test]
    fn pool_stats_serialize() {
        let stats = super::PoolStats { spawned: 2, memory_kills: 1, ..Default::default() };
        let json = serde_json::to_value(stats).unwrap();
        assert_eq!(json["spawned"], 2);
        assert_eq!(json["memory_kills"], 1);
    }
}
