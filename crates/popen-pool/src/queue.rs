//! A pool's queue of jobs, shared by its handles and its worker slots,
//! and what the slots take jobs from ([`Jobs`](crate::core::Jobs)).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::core::Counters;
use crate::error::PoolError;
use crate::task::ErasedTask;

pub(crate) type Reply = oneshot::Sender<Result<Bytes, PoolError>>;

pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) task: ErasedTask,
    pub(crate) limit: Option<Duration>,
    pub(crate) reply: Reply,
    pub(crate) cancel: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) jobs: VecDeque<Job>,
    pub(crate) closed: bool,
}

pub(crate) struct PoolShared {
    pub(crate) queue: Mutex<Queue>,
    /// A job was queued, or the queue closed.
    pub(crate) work: Notify,
    /// A job left the queue (room for `submit_wait`).
    pub(crate) space: Notify,
    /// A job was aborted that was not in the queue (maybe queued in a worker).
    pub(crate) aborted: Notify,
    /// Worker slots waiting for a job.
    pub(crate) idle: AtomicUsize,
    /// Cancelled by `kill` and `Drop`; every job's token is a child of it.
    pub(crate) kill: CancellationToken,
    pub(crate) counters: Arc<Counters>,
    pub(crate) next_id: AtomicU64,
    pub(crate) max_queue: Option<usize>,
}

impl PoolShared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn next_job(&self) -> Option<Job> {
        if let Some(job) = self.try_take() {
            return Some(job);
        }
        self.idle.fetch_add(1, Ordering::SeqCst);
        let job = tokio::select! {
            biased;
            () = self.kill.cancelled() => None,
            job = self.wait_job() => job,
        };
        self.idle.fetch_sub(1, Ordering::SeqCst);
        job
    }

    /// A queued job, now. (It counts as queued until its worker starts
    /// it: the worker slot keeps the counts from here.)
    pub(crate) fn try_take(&self) -> Option<Job> {
        let job = self.lock().jobs.pop_front()?;
        if self.max_queue.is_some() {
            self.space.notify_one();
        }
        Some(job)
    }

    pub(crate) async fn wait_job(&self) -> Option<Job> {
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                if let Some(job) = self.try_take() {
                    return Some(job);
                }
                if self.lock().closed {
                    // A job given back since the check is served first.
                    return self.try_take();
                }
            }
            notified.await;
        }
    }

    /// Closes the queue; with `fail_queued`, every queued job fails with `Shutdown`.
    pub(crate) fn close(&self, fail_queued: bool) {
        let drained: Vec<Job> = {
            let mut q = self.lock();
            q.closed = true;
            if fail_queued { q.jobs.drain(..).collect() } else { Vec::new() }
        };
        self.counters.queued.fetch_sub(drained.len() as u64, Ordering::Relaxed);
        for job in drained {
            let _ = job.reply.send(Err(PoolError::Shutdown));
        }
        self.work.notify_waiters();
        self.space.notify_waiters();
    }

    pub(crate) fn remove_queued(&self, id: u64) -> bool {
        let job = {
            let mut q = self.lock();
            let pos = q.jobs.iter().position(|j| j.id == id);
            pos.and_then(|p| q.jobs.remove(p))
        };
        match job {
            Some(job) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                self.space.notify_one();
                let _ = job.reply.send(Err(PoolError::Cancelled));
                true
            }
            None => {
                // Maybe queued in a worker: its slot looks.
                self.aborted.notify_waiters();
                false
            }
        }
    }
}

impl crate::core::Job for Job {
    fn task(&self) -> &ErasedTask {
        &self.task
    }
    fn limit(&self) -> Option<Duration> {
        self.limit
    }
    fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl crate::core::Jobs for PoolShared {
    type Job = Job;

    fn try_next(&self) -> Option<Job> {
        self.try_take()
    }

    fn next(&self) -> impl Future<Output = Option<Job>> + Send {
        self.next_job()
    }

    fn someone_idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst) > 0
    }

    fn give_back(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let n = jobs.len() as u64;
        if self.kill.is_cancelled() {
            self.counters.queued.fetch_sub(n, Ordering::Relaxed);
            for job in jobs {
                let _ = job.reply.send(Err(PoolError::Shutdown));
            }
            return;
        }
        {
            let mut q = self.lock();
            for job in jobs.into_iter().rev() {
                q.jobs.push_front(job);
            }
        }
        for _ in 0..n {
            self.work.notify_one();
        }
    }

    fn finish(&self, job: Job, mut result: Result<Bytes, PoolError>) {
        if matches!(result, Err(PoolError::Cancelled)) && self.kill.is_cancelled() {
            result = Err(PoolError::Shutdown);
        }
        let _ = job.reply.send(result);
    }

    fn queued(&self) -> &Notify {
        &self.work
    }

    fn pass_on(&self) {
        if !self.lock().jobs.is_empty() {
            self.work.notify_one();
        }
    }

    fn aborted(&self) -> &Notify {
        &self.aborted
    }
}
