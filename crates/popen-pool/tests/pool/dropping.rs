//! The drop rule: dropping a future or stream cancels the work it owns.

use futures::StreamExt;
use popen_pool::{PoolError, PopenPool};

use crate::common::*;
use crate::hygiene::*;
use crate::test_worker_program;

#[tokio::test]
async fn dropping_a_running_handle_kills_its_worker() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    let handle = pool.submit(Sleep(600_000));
    wait_running(&pool, 1).await;
    drop(handle);
    assert!(eventually(SOON, || !pid_exists(worker)).await, "the worker of a dropped task lives");
    assert!(eventually(SOON, || pool.stats().running == 0).await, "{:?}", pool.stats());
    assert_eq!(pool.stats().cancelled, 1);
    // The pool serves on, in a fresh worker.
    assert_eq!(pool.submit(Pid).await.map(|p| p != worker), Ok(true));
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_a_queued_handle_removes_it() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    let busy = pool.submit(Sleep(300));
    wait_running(&pool, 1).await;
    drop(pool.submit(ExitSelf(5)));
    assert_eq!(pool.stats().queued, 0, "a dropped queued task left the queue at once");
    assert_eq!(busy.await, Ok(300));
    assert_eq!(pool.submit(Pid).await, Ok(worker), "the dropped task never ran");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_detached_handle_runs_to_its_end() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    pool.submit(Sleep(200)).detach();
    wait_running(&pool, 1).await;
    assert!(eventually(SOON, || pool.stats().completed == 2).await, "{:?}", pool.stats());
    assert_eq!(pool.stats().cancelled, 0);
    assert_eq!(pool.submit(Pid).await, Ok(worker), "nothing killed the worker");
    pool.shutdown().await;
}

#[tokio::test]
async fn dropping_a_map_stream_cancels_its_remaining_tasks() {
    for bounded in [false, true] {
        let builder = PopenPool::builder(test_worker_program()).max_workers(1);
        let pool = if bounded { builder.max_queue(2) } else { builder }.build().unwrap();
        let worker = pool.submit(Pid).await.unwrap();
        let mut results = Box::pin(pool.map_with_error_catching([
            Sleep(1),
            Sleep(600_000),
            Sleep(600_000),
            Sleep(600_000),
            Sleep(600_000),
        ]));
        assert_eq!(results.next().await, Some(Ok(1)));
        // Poll once more, so the bounded stream has queued what fits.
        let pending = futures::poll!(results.next());
        assert!(pending.is_pending());
        wait_running(&pool, 1).await;
        drop(results);
        assert!(
            eventually(SOON, || {
                let s = pool.stats();
                s.running == 0 && s.queued == 0
            })
            .await,
            "bounded {bounded}: {:?}",
            pool.stats()
        );
        assert!(eventually(SOON, || !pid_exists(worker)).await, "the running task's worker lives");
        assert_eq!(pool.stats().completed, 2, "bounded {bounded}: {:?}", pool.stats());
        assert_eq!(pool.submit(Int(3)).await, Ok(3));
        pool.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// 5. Abort: a running task's worker is killed; a queued task never runs.

#[tokio::test]
async fn abort_of_a_running_task_kills_its_worker() {
    let dir = TempDir::new("abort");
    let file = dir.path().join("sleeper.pid");
    let program = test_worker_program().env("SLEEPER_PID_FILE", &file);
    let pool = PopenPool::builder(program).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();

    let handle = pool.submit(SpawnSleeper { then_sleep_ms: 600_000 });
    let sleeper = read_pid_file(&file).await; // the task is running now
    assert!(pid_exists(worker));
    handle.abort();
    let got = tokio::time::timeout(SOON, handle).await.expect("an aborted task resolves");
    assert_eq!(got, Err(PoolError::Cancelled));
    assert!(wait_gone(worker, SOON).await, "worker {worker} of the aborted task still exists");
    assert!(
        eventually(SOON, || !alive(sleeper)).await,
        "the aborted task's child {sleeper} survived"
    );

    let stats = pool.stats();
    assert_eq!((stats.cancelled, stats.running, stats.completed), (1, 0, 1), "{stats:?}");
    let next = pool.submit(Pid).await.unwrap();
    assert_ne!(next, worker, "a new worker serves the next task");
    pool.shutdown().await;
}

#[tokio::test]
async fn abort_of_a_queued_task_removes_it() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    let busy = pool.submit(Sleep(1500));
    wait_running(&pool, 1).await;
    // If this task ever ran, the worker would die with code 5.
    let queued = pool.submit(ExitSelf(5));
    assert_eq!(pool.stats().queued, 1);
    queued.abort();
    let stats = pool.stats();
    assert_eq!((stats.queued, stats.cancelled), (0, 1), "{stats:?}");
    assert_eq!(queued.await, Err(PoolError::Cancelled));
    let stats = pool.stats();
    assert_eq!((stats.running, stats.completed), (1, 1), "the busy task still runs: {stats:?}");

    assert_eq!(busy.await, Ok(1500));
    assert_eq!(pool.submit(Pid).await, Ok(worker), "the same worker serves on: nothing killed it");
    let stats = pool.stats();
    assert_eq!((stats.crashes, stats.completed, stats.spawned), (0, 3, 1), "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn clones_share_one_pool_and_the_last_one_kills_it() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let clone = pool.clone();
    let worker = pool.submit(Pid).await.unwrap();
    drop(pool);
    assert_eq!(clone.submit(Pid).await, Ok(worker), "a clone uses the same worker");
    assert_eq!(clone.stats().completed, 2, "and the same counters");
    drop(clone);
    assert!(
        eventually(SOON, || !pid_exists(worker)).await,
        "the last clone's drop kills the worker"
    );
}
