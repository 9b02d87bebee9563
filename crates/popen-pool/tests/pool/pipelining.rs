//! Tasks sent ahead to a worker (pipelined dispatch) with real workers:
//! what becomes of a task queued in a worker when the one before it ends
//! badly, or when it is aborted itself.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use popen_pool::{ExitInfo, PoolError, PopenPool};

use crate::common::*;
use crate::hygiene::{SOON, eventually, wait_running};
use crate::test_worker_program;

/// One worker that has just run short tasks, so the next ones are sent
/// ahead of the running one.
async fn warm_single_worker() -> (PopenPool, u32) {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let pid = pool.submit(Pid).await.unwrap();
    for i in 0..10 {
        assert_eq!(pool.submit(Int(i)).await, Ok(i));
    }
    (pool, pid)
}

#[tokio::test]
async fn a_task_queued_behind_a_timing_out_task_runs_elsewhere_and_succeeds() {
    let (pool, first) = warm_single_worker().await;
    let stuck = pool.submit_with_timeout(Sleep(600_000), Some(Duration::from_millis(300)));
    let behind = pool.submit(Pid);
    let after = pool.submit(Int(5));
    assert_eq!(stuck.await, Err(PoolError::Timeout { limit: Duration::from_millis(300) }));
    let second = behind.await.expect("the task behind the timeout succeeds");
    assert_ne!(second, first, "it ran in the replacement worker");
    assert_eq!(after.await, Ok(5));
    let stats = pool.stats();
    assert_eq!((stats.timeouts, stats.crashes, stats.failed), (1, 0, 0), "{stats:?}");
    pool.shutdown().await;
}

/// A task queued behind a slow one gets its whole time limit once it
/// starts, not from when it was sent.
#[tokio::test]
async fn a_queued_task_deadline_starts_when_it_starts() {
    let (pool, _) = warm_single_worker().await;
    let limit = Some(Duration::from_millis(900));
    let first = pool.submit_with_timeout(Sleep(500), limit);
    let second = pool.submit_with_timeout(Sleep(500), limit);
    assert_eq!(first.await, Ok(500));
    assert_eq!(second.await, Ok(500), "timed from when it was sent");
    pool.shutdown().await;
}

#[tokio::test]
async fn aborting_a_task_queued_in_the_worker_keeps_the_worker() {
    let (pool, worker) = warm_single_worker().await;
    let running = pool.submit(Sleep(500));
    let queued = pool.submit(Int(1));
    let after = pool.submit(Pid);
    wait_running(&pool, 1).await;
    queued.abort();
    assert_eq!(queued.await, Err(PoolError::Cancelled));
    assert_eq!(running.await, Ok(500));
    assert_eq!(after.await, Ok(worker), "the worker was replaced");
    let stats = pool.stats();
    assert_eq!((stats.cancelled, stats.crashes, stats.spawned), (1, 0, 1), "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_crash_with_tasks_queued_behind_fails_only_the_running_task() {
    let (pool, _) = warm_single_worker().await;
    let before = pool.submit(Int(1));
    let crash = pool.submit(Abort);
    let behind: Vec<_> = (10..20).map(|i| pool.submit(Int(i))).collect();
    assert_eq!(before.await, Ok(1));
    assert_eq!(crash.await, Err(PoolError::WorkerDied { exit: ExitInfo::Signal(libc::SIGABRT) }));
    for (i, h) in (10..20).zip(behind) {
        assert_eq!(h.await, Ok(i));
    }
    let stats = pool.stats();
    assert_eq!((stats.crashes, stats.failed), (1, 0), "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn maximum_process_uses_stays_exact_with_pipelining() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(2)
        .maximum_process_uses(7)
        .build()
        .unwrap();
    let pids: Vec<u32> =
        pool.map_with_error_catching((0..700).map(|_| Pid)).map(|r| r.unwrap()).collect().await;
    let mut uses: BTreeMap<u32, usize> = BTreeMap::new();
    for pid in pids {
        *uses.entry(pid).or_default() += 1;
    }
    // Every worker ran 7 tasks, but the last one of each slot, which may
    // still be serving (and has at most 7).
    let live = pool.worker_pids();
    let short: Vec<_> = uses.iter().filter(|&(_, &n)| n != 7).collect();
    assert!(short.len() <= 2, "uses per worker: {uses:?}");
    assert!(short.iter().all(|(pid, n)| **n < 7 && live.contains(pid)), "uses: {uses:?}");
    let full = uses.values().filter(|&&n| n == 7).count() as u64;
    assert!(eventually(SOON, || pool.stats().recycled == full).await, "{:?}", pool.stats());
    pool.shutdown().await;
}

/// Nothing is sent ahead to a busy worker while another one idles: a short
/// task submitted after a long one runs at once in the idle worker.
#[tokio::test]
async fn an_idle_worker_gets_the_task_rather_than_a_busy_ones_window() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
    let warm: Vec<_> = (0..20).map(|i| pool.submit(Int(i))).collect();
    for (i, h) in (0..20).zip(warm) {
        assert_eq!(h.await, Ok(i));
    }
    let mut long = Box::pin(pool.submit(Sleep(5_000)));
    wait_running(&pool, 1).await;
    assert_eq!(pool.submit(Int(1)).await, Ok(1));
    assert!(futures::poll!(long.as_mut()).is_pending(), "the short task waited for the long one");
    drop(long);
    pool.shutdown().await;
}
