//! Pipelined dispatch: a pool's worker slot keeps a small window of tasks
//! sent to its worker, so the worker finds its next task already there
//! instead of waiting a round trip for it.
//!
//! The worker runs the window's tasks one at a time, in order, and flushes
//! each `Done` before it starts the next task: the head of the window is the
//! task running now, and its deadline starts when the previous `Done`
//! arrives (or when it was sent to an idle worker). When the worker is lost
//! (timeout, crash, abort, memory ceiling, protocol error) only the head
//! fails; the tasks behind it had not started and go back to the front of
//! the pool's queue. A task aborted while queued in the worker gets a
//! `Cancel`: the worker answers `Skipped` without running it, and lives on.
//!
//! Tasks are sent ahead only while that costs nothing to the others: no
//! worker slot is idle, this worker's previous task was short
//! ([`FAST`]), and no per-task memory check is configured (an RSS recycle
//! limit or a sampled memory ceiling, which are checked between tasks).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Counters, Event, Live, WorkerCore, broke, bump, classify, count, ended, over_ceiling,
    watch_memory,
};
use crate::child::{Child, Launcher};
use crate::error::PoolError;
use crate::protocol::{FromWorker, Outcome, ToWorker};
use crate::task::ErasedTask;

/// Most tasks sent to one worker and not answered yet.
pub(crate) const WINDOW: usize = 16;
/// Most payload bytes queued in a worker behind its running task. Keeps the
/// parent's writes within the socket's buffer, so a write never waits for a
/// worker that is itself waiting to write a result.
const WINDOW_BYTES: usize = 64 << 10;
/// A task is sent ahead only if the one before it on the same worker took
/// less than this: slow tasks are dispatched one at a time, as without a
/// window, so none waits behind another while a worker idles.
const FAST: Duration = Duration::from_millis(2);

/// One task taken from a pool's queue.
pub(crate) trait Job: Send {
    fn task(&self) -> &ErasedTask;
    fn limit(&self) -> Option<Duration>;
    fn cancel(&self) -> &CancellationToken;
}

/// Where a worker slot takes its tasks from and delivers their results.
pub(crate) trait Jobs: Sync {
    type Job: Job;
    /// The next queued job, if any, now.
    fn try_next(&self) -> Option<Self::Job>;
    /// Waits for the next job; `None` once no more will come.
    fn next(&self) -> impl Future<Output = Option<Self::Job>> + Send;
    /// True while another worker slot waits for work.
    fn someone_idle(&self) -> bool;
    /// Jobs sent to a worker that is gone, none started: back to the front
    /// of the queue, in this order.
    fn give_back(&self, jobs: Vec<Self::Job>);
    /// Delivers a job's result.
    fn finish(&self, job: Self::Job, result: Result<Bytes, PoolError>);
    /// Notified (one waiter) when a job is queued.
    fn queued(&self) -> &Notify;
    /// Passes a `queued` notification this slot did not act on to another
    /// waiter, if a job is still queued.
    fn pass_on(&self);
    /// Notified (all waiters) when a job was aborted that was not queued.
    fn aborted(&self) -> &Notify;
}

/// A task sent to the worker.
struct Sent<J> {
    wire: u64,
    /// `None` once its result was delivered (aborted while queued).
    job: Option<J>,
    bytes: usize,
}

struct Window<J> {
    sent: VecDeque<Sent<J>>,
    /// Taken from the queue but too large to send ahead: sent when the
    /// window is empty.
    held: Option<J>,
    /// Payload bytes of the sent tasks behind the head.
    queued_bytes: usize,
    /// `feed` buffered something to flush.
    dirty: bool,
    /// A write to the worker failed: nothing more is sent.
    broken: bool,
    /// The head is counted as running.
    head_running: bool,
}

impl<J: Job> Window<J> {
    /// Counts the head as running (no longer queued) once it has started.
    fn mark_head(&mut self, counters: &Counters) {
        if !self.head_running && self.sent.front().is_some_and(|s| s.job.is_some()) {
            self.head_running = true;
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            bump(&counters.running);
        }
    }

    /// The head ended: it no longer counts as running.
    fn pop_head(&mut self, counters: &Counters) -> Option<Sent<J>> {
        let head = self.sent.pop_front()?;
        if std::mem::take(&mut self.head_running) {
            counters.running.fetch_sub(1, Ordering::Relaxed);
        }
        Some(head)
    }

    fn lose(&mut self) -> Vec<J> {
        let back = self.sent.drain(..).filter_map(|s| s.job).chain(self.held.take()).collect();
        self.queued_bytes = 0;
        back
    }
}

/// What woke a worker slot up.
enum Step {
    Event(Event<Result<Option<bytes::BytesMut>, PoolError>>),
    /// A job was aborted somewhere: look for aborted tasks in the window.
    Look,
    /// A job was queued: maybe send it ahead.
    Queued,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn head_cancelled(cancel: Option<&CancellationToken>) {
    // `None`: aborted while queued and answered already; not waited for.
    if let Some(c) = cancel {
        c.cancelled().await;
    }
}

impl<L: Launcher> WorkerCore<L> {
    /// Serves jobs until `jobs` has no more. Dropping the future kills the
    /// worker (its process is owned by the future while tasks run) and
    /// drops the jobs in its window unanswered.
    pub(crate) async fn serve<Q: Jobs>(&mut self, jobs: &Q) {
        while let Some(job) = jobs.next().await {
            self.serve_window(job, jobs).await;
        }
    }

    /// Whether this worker needs a check between every two tasks.
    fn per_task_checks(&self, live: &Live<L::Child>) -> bool {
        self.shared.opts.max_rss_bytes.is_some()
            || live.child.memory_ceiling().is_some_and(|c| c.watch.is_some())
    }

    /// Sends `job` (buffered) or, if it cannot be sent, delivers its error.
    fn admit<Q: Jobs>(
        &mut self,
        live: &mut Live<L::Child>,
        w: &mut Window<Q::Job>,
        job: Q::Job,
        jobs: &Q,
    ) {
        let counters = &self.shared.counters;
        let finish = |job, result| {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            jobs.finish(job, result);
        };
        let task = job.task();
        let max = self.shared.opts.max_frame_bytes;
        if task.payload.len() > max {
            let err = PoolError::FrameTooLarge { len: task.payload.len(), max };
            return finish(job, Err(err));
        }
        if job.cancel().is_cancelled() {
            bump(&counters.cancelled);
            return finish(job, Err(PoolError::Cancelled));
        }
        if !live.tasks.iter().any(|t| *t == task.name) {
            bump(&counters.failed);
            let err =
                PoolError::UnknownTask { name: task.name.to_string(), known: live.tasks.to_vec() };
            return finish(job, Err(err));
        }
        let wire = self.next_id;
        let msg = ToWorker::Run { id: wire, name: &task.name, payload: &task.payload };
        if let Err(e) = live.child.feed(&msg) {
            bump(&counters.failed);
            return finish(job, Err(e));
        }
        self.next_id += 1;
        w.dirty = true;
        let bytes = task.payload.len();
        if !w.sent.is_empty() {
            w.queued_bytes += bytes;
        }
        w.sent.push_back(Sent { wire, job: Some(job), bytes });
        let max_uses = self.shared.opts.maximum_process_uses;
        if max_uses.is_some_and(|max| live.uses + w.sent.len() as u32 >= max) {
            self.start_warm_spare();
        }
    }

    /// Sends more jobs while the window has room and sending ahead is free.
    fn top_up<Q: Jobs>(
        &mut self,
        live: &mut Live<L::Child>,
        w: &mut Window<Q::Job>,
        jobs: &Q,
        fast: bool,
    ) {
        if w.broken {
            return;
        }
        if w.sent.is_empty() {
            if let Some(job) = w.held.take() {
                self.admit(live, w, job, jobs);
            }
        }
        let ahead = fast && !self.per_task_checks(live);
        let max_uses = self.shared.opts.maximum_process_uses;
        while w.held.is_none()
            && (w.sent.is_empty() || (ahead && w.sent.len() < WINDOW && !jobs.someone_idle()))
            && max_uses.is_none_or(|max| live.uses + (w.sent.len() as u32) < max)
        {
            let Some(job) = jobs.try_next() else { break };
            let len = job.task().payload.len();
            if !w.sent.is_empty() && w.queued_bytes + len > WINDOW_BYTES {
                w.held = Some(job);
                break;
            }
            self.admit(live, w, job, jobs);
        }
    }

    /// The live (or a fresh) worker for the next task, once a recycled one
    /// is gone; a cancellation first is counted.
    ///
    /// Cancel safety: dropping the future loses nothing: the recycled
    /// worker stays tracked until it is gone, a spare being started stays
    /// in `self.spare` for the next call.
    pub(in crate::core) async fn ready_live(
        &mut self,
        cancel: Option<&CancellationToken>,
    ) -> Result<Live<L::Child>, PoolError> {
        let ready = match self.join_retiring(cancel).await {
            Ok(()) => self.take_live(cancel).await,
            Err(e) => Err(e),
        };
        if matches!(ready, Err(PoolError::Cancelled)) {
            bump(&self.shared.counters.cancelled);
        }
        ready
    }

    /// Runs `first` and whatever joins it in the window, until the window
    /// is empty or the worker is lost or retired.
    pub(in crate::core) async fn serve_window<Q: Jobs>(&mut self, first: Q::Job, jobs: &Q) {
        let counters = Arc::clone(&self.shared.counters);
        let finish = |job, result| {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            jobs.finish(job, result);
        };
        if first.cancel().is_cancelled() {
            bump(&counters.cancelled);
            return finish(first, Err(PoolError::Cancelled));
        }
        let mut live = match self.ready_live(Some(first.cancel())).await {
            Ok(live) => live,
            Err(e) => {
                return finish(first, Err(e));
            }
        };
        let mut w = Window {
            sent: VecDeque::new(),
            held: None,
            queued_bytes: 0,
            dirty: false,
            broken: false,
            head_running: false,
        };
        self.admit(&mut live, &mut w, first, jobs);
        let mut fast = live.fast;
        self.top_up(&mut live, &mut w, jobs, fast);
        w.mark_head(&counters);
        let mut started = Instant::now();
        loop {
            if w.dirty {
                w.dirty = false;
                if live.child.flush().await.is_err() {
                    // The worker closed its end (it exited, or is exiting):
                    // send nothing more, read what it answered before, up
                    // to the end of its channel, which tells which task
                    // it died in.
                    w.broken = true;
                }
            }
            let aborted = jobs.aborted().notified();
            tokio::pin!(aborted);
            let more = w.sent.len() > 1 || w.held.is_some();
            if more && !w.broken {
                aborted.as_mut().enable();
                self.cancel_queued(&mut live, &mut w, jobs);
                if w.dirty {
                    continue;
                }
            }
            let Some(head) = w.sent.front() else {
                if w.broken {
                    // Every task sent was answered, and the worker is gone.
                    live.child.reap().await;
                    jobs.give_back(w.lose());
                    self.start_warm_spare();
                    return;
                }
                live.fast = fast;
                self.live = Some(live);
                return;
            };
            let limit = head.job.as_ref().and_then(|j| j.limit());
            // A limit too far off to represent is no limit.
            let deadline = limit.and_then(|l| started.checked_add(l));
            let ceiling = live.child.memory_ceiling();
            let watch = self.per_task_checks(&live).then_some(ceiling).flatten();
            let room = !w.broken
                && w.held.is_none()
                && !jobs.someone_idle()
                && fast
                && w.sent.len() < WINDOW
                && !self.per_task_checks(&live)
                && self
                    .shared
                    .opts
                    .maximum_process_uses
                    .is_none_or(|max| live.uses + (w.sent.len() as u32) < max);
            let head_cancel = head.job.as_ref().map(|j| j.cancel());
            let step = tokio::select! {
                biased;
                r = live.child.recv() => Step::Event(Event::Done(r)),
                () = sleep_until(deadline) => Step::Event(Event::Timeout(limit.unwrap_or_default())),
                () = head_cancelled(head_cancel) => Step::Event(Event::Cancelled),
                over = watch_memory(watch) => Step::Event(Event::OverMemory(over)),
                () = &mut aborted, if more => Step::Look,
                () = jobs.queued().notified(), if room => Step::Queued,
            };
            let event = match step {
                Step::Event(event) => event,
                Step::Look => continue,
                Step::Queued => {
                    let before = (w.sent.len(), w.held.is_some());
                    self.top_up(&mut live, &mut w, jobs, fast);
                    if (w.sent.len(), w.held.is_some()) == before {
                        // Meant for an idle slot, maybe: let it have it.
                        jobs.pass_on();
                    }
                    continue;
                }
            };
            let frame = match event {
                Event::Done(Ok(Some(frame))) => frame.freeze(),
                Event::Done(Ok(None)) => {
                    let err = ended(&mut live.child).await;
                    return self.lose(&mut w, err, jobs, &counters);
                }
                Event::Done(Err(e)) => {
                    let err = broke(&mut live.child, e).await;
                    return self.lose(&mut w, err, jobs, &counters);
                }
                Event::Timeout(limit) => {
                    live.child.kill().await;
                    return self.lose(&mut w, PoolError::Timeout { limit }, jobs, &counters);
                }
                Event::Cancelled => {
                    live.child.kill().await;
                    return self.lose(&mut w, PoolError::Cancelled, jobs, &counters);
                }
                Event::OverMemory(limit) => {
                    live.child.kill().await;
                    return self.lose(&mut w, PoolError::MemoryLimit { limit }, jobs, &counters);
                }
            };
            let head = w.sent.front().expect("the head answered");
            let outcome = match postcard::from_bytes::<FromWorker<'_>>(&frame) {
                Ok(FromWorker::Done { id, outcome }) if id == head.wire => outcome,
                Ok(other) => {
                    let message =
                        format!("expected the result of task {}, got {other:?}", head.wire);
                    let err = broke(&mut live.child, PoolError::protocol(message)).await;
                    return self.lose(&mut w, err, jobs, &counters);
                }
                Err(e) => {
                    let err = broke(
                        &mut live.child,
                        PoolError::protocol(format!("undecodable frame: {e}")),
                    )
                    .await;
                    return self.lose(&mut w, err, jobs, &counters);
                }
            };
            let skipped = matches!(outcome, Outcome::Skipped);
            let head = w.pop_head(&counters).expect("the head answered");
            let now = Instant::now();
            fast = now.duration_since(started) < FAST;
            started = now;
            if let Some(first) = w.sent.front() {
                w.queued_bytes -= first.bytes;
            }
            match head.job {
                // Answered already (aborted while queued); it ran if not skipped.
                None => live.uses += u32::from(!skipped),
                Some(job) if skipped => {
                    // Counted out of the running by `pop_head`; `lose` counts it again.
                    let err = PoolError::protocol("worker skipped a task it was not told to");
                    let err = broke(&mut live.child, err).await;
                    w.sent.push_front(Sent { wire: head.wire, job: Some(job), bytes: 0 });
                    return self.lose(&mut w, err, jobs, &counters);
                }
                Some(job) => {
                    let result = classify(&frame, outcome, &live.tasks);
                    live.uses += 1;
                    // A sampled ceiling is checked once more when the task
                    // ends, so a task that leaves its worker over it fails too.
                    if let Some(limit) = watch.and_then(|c| over_ceiling(Some(c))) {
                        live.child.kill().await;
                        w.sent.push_front(Sent { wire: head.wire, job: Some(job), bytes: 0 });
                        return self.lose(
                            &mut w,
                            PoolError::MemoryLimit { limit },
                            jobs,
                            &counters,
                        );
                    }
                    count(&counters, &result, false);
                    jobs.finish(job, result);
                }
            }
            let opts = &self.shared.opts;
            let over_uses = opts.maximum_process_uses.is_some_and(|max| live.uses >= max);
            let over_rss = opts
                .max_rss_bytes
                .is_some_and(|limit| live.child.rss_bytes().is_some_and(|rss| rss > limit));
            if over_uses || over_rss {
                // Nothing was sent ahead of these checks.
                debug_assert!(w.sent.is_empty());
                jobs.give_back(w.lose());
                self.retire(live);
                return;
            }
            self.top_up(&mut live, &mut w, jobs, fast);
            w.mark_head(&counters);
        }
    }

    /// Tells the worker not to start the queued tasks aborted since the
    /// last look, and answers them `Cancelled` now.
    fn cancel_queued<Q: Jobs>(&self, live: &mut Live<L::Child>, w: &mut Window<Q::Job>, jobs: &Q) {
        let counters = &self.shared.counters;
        // The head aborted too (or the pool is being killed): the worker is
        // about to be killed and the rest given back, where their tokens
        // decide.
        if w.sent.front().and_then(|s| s.job.as_ref()).is_some_and(|j| j.cancel().is_cancelled()) {
            return;
        }
        if w.held.as_ref().is_some_and(|j| j.cancel().is_cancelled()) {
            bump(&counters.cancelled);
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            jobs.finish(w.held.take().expect("checked"), Err(PoolError::Cancelled));
        }
        for sent in w.sent.iter_mut().skip(1) {
            if sent.job.as_ref().is_some_and(|j| j.cancel().is_cancelled()) {
                let msg = ToWorker::Cancel { id: sent.wire };
                if live.child.feed(&msg).is_ok() {
                    w.dirty = true;
                    bump(&counters.cancelled);
                    counters.queued.fetch_sub(1, Ordering::Relaxed);
                    jobs.finish(sent.job.take().expect("checked"), Err(PoolError::Cancelled));
                }
            }
        }
    }

    /// The worker is gone (killed and reaped): the head fails with `err`,
    /// the tasks behind it go back to the queue.
    fn lose<Q: Jobs>(
        &mut self,
        w: &mut Window<Q::Job>,
        err: PoolError,
        jobs: &Q,
        counters: &Counters,
    ) {
        if let Some(head) = w.pop_head(counters) {
            if let Some(job) = head.job {
                let result = Err(err);
                count(counters, &result, true);
                jobs.finish(job, result);
            }
        }
        jobs.give_back(w.lose());
        self.start_warm_spare();
    }
}
