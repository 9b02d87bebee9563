//! The counters of a pool or worker and their snapshot, [`PoolStats`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a pool or worker; see [`PoolStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) spawned: AtomicU64,
    pub(crate) recycled: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) crashes: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) memory_kills: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) running: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> PoolStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolStats {
            spawned: get(&self.spawned),
            recycled: get(&self.recycled),
            timeouts: get(&self.timeouts),
            crashes: get(&self.crashes),
            completed: get(&self.completed),
            failed: get(&self.failed),
            cancelled: get(&self.cancelled),
            memory_kills: get(&self.memory_kills),
            queued: get(&self.queued),
            running: get(&self.running),
        }
    }
}

/// A snapshot of a pool's (or a worker's) counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes started.
    pub spawned: u64,
    /// Worker processes retired by `maximum_process_uses` or the RSS limit.
    pub recycled: u64,
    /// Tasks that hit their time limit.
    pub timeouts: u64,
    /// Worker processes that died under a task (crash, abort, exit) or broke the protocol.
    pub crashes: u64,
    /// Tasks that returned a value.
    pub completed: u64,
    /// Tasks that returned an error or panicked (the worker survived).
    pub failed: u64,
    /// Tasks aborted through their handle (or by dropping it).
    pub cancelled: u64,
    /// Tasks that took their worker past the memory ceiling (the worker was killed).
    pub memory_kills: u64,
    /// Tasks waiting now: in the pool's queue, or sent ahead to a worker
    /// and not started yet (see docs/popen-pool.md, "Dispatch").
    pub queued: u64,
    /// Tasks running now (started in their worker).
    pub running: u64,
}
