//! The behaviours of TVM's own popen-pool tests, and the API around them.

use std::time::{Duration, Instant};

use futures::StreamExt;
use popen_pool::{ExitInfo, PoolError, PopenPool, PopenWorker};

use crate::common::*;
use crate::test_worker_program;

const SIGABRT: i32 = 6;
const SIGSEGV: i32 = 11;

#[tokio::test]
async fn worker_timeout_then_crash_then_normal_tasks() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let err =
        w.run_with_timeout(Sleep(100_000), Some(Duration::from_millis(10))).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit: Duration::from_millis(10) });
    let err = w.run(ExitSelf(3)).await.unwrap_err();
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Code(3) });
    assert_eq!(err.to_string(), "worker died (exit code 3)");
    for i in 0..5 {
        assert_eq!(w.run(Int(i)).await.unwrap(), i);
    }
    let stats = w.stats();
    assert_eq!((stats.timeouts, stats.crashes, stats.completed), (1, 1, 5));
    w.shutdown().await;
}

#[tokio::test]
async fn worker_keeps_its_pid_without_a_use_limit() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let first = w.run(Pid).await.unwrap();
    for _ in 0..5 {
        assert_eq!(w.run(Pid).await.unwrap(), first);
    }
    assert_eq!(w.pid(), Some(first));
    w.shutdown().await;
    assert!(!pid_exists(first), "shutdown reaps the worker");
}

#[tokio::test]
async fn worker_recycles_after_maximum_process_uses() {
    let mut w =
        PopenWorker::builder(test_worker_program()).maximum_process_uses(2).build().unwrap();
    let a = w.run(Pid).await.unwrap();
    assert_eq!(w.run(Pid).await.unwrap(), a);
    let b = w.run(Pid).await.unwrap();
    assert_ne!(a, b, "the third call runs in a new process");
    assert!(!pid_exists(a), "the recycled process {a} is gone");
    assert_eq!(w.stats().recycled, 1);
    w.shutdown().await;
}

#[tokio::test]
async fn pool_of_two_sorts_out_timeout_crash_and_values() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(2)
        .timeout(Duration::from_millis(15))
        .build()
        .unwrap();
    let sleep = pool.submit(Sleep(100_000));
    let exit = pool.submit(ExitSelf(0));
    let three = pool.submit(Int(3));
    let text = pool.submit(Identity(Val::Text("a string".into())));
    assert_eq!(sleep.await, Err(PoolError::Timeout { limit: Duration::from_millis(15) }));
    assert_eq!(exit.await, Err(PoolError::WorkerDied { exit: ExitInfo::Code(0) }));
    assert_eq!(three.await, Ok(3));
    assert_eq!(text.await, Ok(Val::Text("a string".into())));
    pool.shutdown().await;
}

#[tokio::test]
async fn map_returns_results_in_input_order() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(4).build().unwrap();
    let out: Vec<_> = pool.map_with_error_catching((0..100).map(Int)).collect().await;
    let want: Vec<Result<i64, PoolError>> = (0..100).map(Ok).collect();
    assert_eq!(out, want);
    // Errors are per item and do not stop the stream.
    let mixed: Vec<_> = pool
        .map_with_error_catching(vec![Identity(Val::Int(1)), Identity(Val::List(vec![2]))])
        .collect()
        .await;
    assert_eq!(mixed, vec![Ok(Val::Int(1)), Ok(Val::List(vec![2]))]);
    pool.shutdown().await;
}

#[tokio::test]
async fn initializer_state_is_visible_and_rerun_after_recycling() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .initializer(Init("configured".into()))
        .maximum_process_uses(2)
        .build()
        .unwrap();
    let (value, init_pid, before) = pool.submit(ReadInit).await.unwrap().expect("init ran");
    assert_eq!(value, "configured");
    assert_eq!(before, 1, "only the initializer ran before the first task");
    let (_, same_pid, before) = pool.submit(ReadInit).await.unwrap().unwrap();
    assert_eq!((same_pid, before), (init_pid, 2));
    // The worker was recycled after two uses (the initializer is not a use).
    let (value, new_pid, before) = pool.submit(ReadInit).await.unwrap().unwrap();
    assert_ne!(new_pid, init_pid);
    assert_eq!((value.as_str(), before), ("configured", 1));
    pool.shutdown().await;
}

#[tokio::test]
async fn failing_initializer_fails_tasks_clearly() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .initializer(Panic("no config".into()))
        .build()
        .unwrap();
    match pool.submit(Int(1)).await.unwrap_err() {
        PoolError::Initializer { source } => match *source {
            PoolError::Task { kind, message } => {
                assert_eq!(kind, "panic");
                assert!(message.contains("no config"), "{message}");
            }
            other => panic!("unexpected initializer error {other:?}"),
        },
        other => panic!("unexpected error {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn pool_timeout_of_half_a_second() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let start = Instant::now();
    let err = pool.submit(Sleep(20_000)).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit: Duration::from_millis(500) });
    assert!(start.elapsed() < Duration::from_secs(10), "timed out far too late");
    // A per-task override wins over the pool's limit.
    assert_eq!(pool.submit_with_timeout(Sleep(700), Some(Duration::from_secs(30))).await, Ok(700));
    pool.shutdown().await;
}

#[tokio::test]
async fn fast_task_after_slow_one_finishes_first() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
    let slow = pool.submit(Sleep(1_000));
    let fast = pool.submit(Sleep(10));
    tokio::select! {
        r = fast => assert_eq!(r, Ok(10)),
        _ = slow => panic!("the slow task finished first"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn panics_and_errors_are_reported_and_the_worker_survives() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let pid = w.run(Pid).await.unwrap();
    match w.run(Panic("kaboom 42".into())).await.unwrap_err() {
        PoolError::Task { kind, message } => {
            assert_eq!(kind, "panic");
            assert!(message.contains("kaboom 42") && message.contains("common.rs"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = w.run(Fail("bad input".into())).await.unwrap_err();
    assert_eq!(err, PoolError::Task { kind: "custom".into(), message: "bad input".into() });
    assert_eq!(w.run(Pid).await.unwrap(), pid, "same process after a panic and an error");
    let stats = w.stats();
    assert_eq!((stats.failed, stats.crashes, stats.spawned), (2, 0, 1));
    w.shutdown().await;
}

#[tokio::test]
async fn crashes_report_the_signal() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let err = w.run(Segfault).await.unwrap_err();
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Signal(SIGSEGV) });
    assert_eq!(err.to_string(), "worker died (SIGSEGV)");
    let err = w.run(Abort).await.unwrap_err();
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Signal(SIGABRT) });
    assert_eq!(w.run(Int(5)).await, Ok(5));
    w.shutdown().await;
}

#[tokio::test]
async fn bounded_queue_refuses_or_waits() {
    let pool =
        PopenPool::builder(test_worker_program()).max_workers(1).max_queue(1).build().unwrap();
    let running = pool.submit(Sleep(300));
    // Wait until the worker has taken the first task off the queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.stats().running == 0 {
        assert!(Instant::now() < deadline, "the first task never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let queued = pool.submit(Int(1));
    assert_eq!(pool.submit(Int(2)).await, Err(PoolError::QueueFull { capacity: 1 }));
    let waited = pool.submit_wait(Int(3)).await;
    assert_eq!(running.await, Ok(300));
    assert_eq!(queued.await, Ok(1));
    assert_eq!(waited.await, Ok(3));
    // map keeps the queue bounded and still yields everything in order.
    let out: Vec<_> = pool.map_with_error_catching((0..20).map(Int)).collect().await;
    assert_eq!(out, (0..20).map(Ok).collect::<Vec<_>>());
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_queued_work_and_kill_does_not() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let handles: Vec<_> = (0..5).map(|i| pool.submit(Sleep(20 + i))).collect();
    let pids = pool.worker_pids();
    pool.shutdown().await;
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await, Ok(20 + i as u64));
    }
    assert!(pids.iter().all(|&p| !pid_exists(p)), "workers reaped by shutdown");

    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let running = pool.submit(Sleep(60_000));
    let queued = pool.submit(Int(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.stats().running == 0 {
        assert!(Instant::now() < deadline, "the first task never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = Instant::now();
    pool.kill().await;
    assert!(start.elapsed() < Duration::from_secs(5), "kill does not wait for tasks");
    assert_eq!(running.await, Err(PoolError::Shutdown));
    assert_eq!(queued.await, Err(PoolError::Shutdown));
    assert_eq!(pool.submit(Int(2)).await, Err(PoolError::Shutdown));
    assert!(pool.worker_pids().is_empty());
}

#[tokio::test]
async fn rss_growth_recycles_the_worker() {
    let mut w =
        PopenWorker::builder(test_worker_program()).max_rss_bytes(200 << 20).build().unwrap();
    let a = w.run(Hog(8)).await.unwrap();
    assert_eq!(w.run(Pid).await.unwrap(), a, "small growth keeps the worker");
    let b = w.run(Hog(300)).await.unwrap();
    assert_eq!(b, a, "the hog ran in the same worker");
    let c = w.run(Pid).await.unwrap();
    assert_ne!(c, a, "a worker over the RSS limit is replaced");
    assert_eq!(w.stats().recycled, 1);
    w.shutdown().await;
}

#[tokio::test]
async fn warm_spare_replaces_a_crashed_worker_before_the_next_task() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    assert_eq!(pool.submit(Int(1)).await, Ok(1));
    let old = pool.worker_pids();
    assert_eq!(old.len(), 1);
    let _ = pool.submit(ExitSelf(1)).await.unwrap_err();
    // No task is pending, yet a replacement process appears.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = pool.worker_pids();
        if now.len() == 1 && now != old {
            break;
        }
        assert!(Instant::now() < deadline, "no spare started: {now:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(pool.stats().spawned, 2);
    pool.shutdown().await;
}

#[tokio::test]
async fn build_refuses_bad_configuration() {
    let err = PopenPool::builder(test_worker_program()).max_workers(0).build().unwrap_err();
    assert!(matches!(err, PoolError::Config { .. }), "{err}");
    let err =
        PopenWorker::builder(test_worker_program()).maximum_process_uses(0).build().unwrap_err();
    assert!(err.to_string().contains("maximum_process_uses"), "{err}");
}

#[test]
fn building_a_pool_outside_a_runtime_is_an_error() {
    let err = PopenPool::builder(test_worker_program()).build().unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

/// The `dedicated_worker` example binary (cargo builds examples for tests).
pub(crate) fn dedicated_worker_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir.join("examples").join("dedicated_worker");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p popen-pool --example dedicated_worker`",
        path.display()
    );
    path
}

#[tokio::test]
async fn dedicated_worker_binary_serves_its_tasks() {
    use popen_pool::{Task, TaskFailure, WorkerContext, WorkerProgram};
    use serde::{Deserialize, Serialize};

    // The parent's view of the example's task types: same names, same layout.
    #[derive(Serialize, Deserialize)]
    struct Square(u64);
    impl Task for Square {
        const NAME: &'static str = "square";
        type Output = u64;
        fn run(self, _: &mut WorkerContext) -> Result<u64, TaskFailure> {
            unreachable!("runs in the dedicated worker")
        }
    }
    #[derive(Serialize, Deserialize)]
    struct WhoAmI;
    impl Task for WhoAmI {
        const NAME: &'static str = "whoami";
        type Output = String;
        fn run(self, _: &mut WorkerContext) -> Result<String, TaskFailure> {
            unreachable!("runs in the dedicated worker")
        }
    }

    let program = WorkerProgram::binary(dedicated_worker_path());
    let pool = PopenPool::builder(program).max_workers(2).build().unwrap();
    assert_eq!(pool.submit(WhoAmI).await.unwrap(), "dedicated_worker");
    assert_eq!(pool.submit(Square(12)).await, Ok(144));
    let err = pool.submit(Square(u64::MAX)).await.unwrap_err();
    assert_eq!(
        err,
        PoolError::Task { kind: "overflow".into(), message: "square overflows u64".into() }
    );
    // The dedicated worker does not serve this test binary's task types.
    match pool.submit(Int(1)).await.unwrap_err() {
        PoolError::UnknownTask { name, known } => {
            assert_eq!(name, "int");
            assert_eq!(known, ["abort", "forks_prepared", "square", "whereami", "whoami"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;

    // Run by hand (not by a parent), it refuses clearly.
    let out = std::process::Command::new(dedicated_worker_path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("popen-pool parent"));
}

#[tokio::test]
async fn a_program_that_is_not_a_worker_fails_to_spawn_clearly() {
    let pool = PopenPool::builder(popen_pool::WorkerProgram::binary("/bin/true"))
        .max_workers(1)
        .build()
        .unwrap();
    match pool.submit(Int(1)).await.unwrap_err() {
        PoolError::Spawn { message } => {
            assert!(message.contains("exited before its handshake"), "{message}");
            assert!(message.contains("serve_if_worker"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn working_directory_and_erased_tasks() {
    let dir = std::env::temp_dir().canonicalize().unwrap();
    let program = test_worker_program().current_dir(&dir);
    let mut w = PopenWorker::builder(program).build().unwrap();
    assert_eq!(w.run(Cwd).await.unwrap(), dir.display().to_string());
    // A relay forwards a task by name and bytes, and gets bytes back.
    let erased = popen_pool::ErasedTask::from_raw(String::from("int"), postcard_bytes(&Int(41)));
    let out = w.run_erased(&erased, None).await.unwrap();
    assert_eq!(postcard_decode::<i64>(&out), 41);
    let unknown = popen_pool::ErasedTask::from_raw("nope", Vec::new());
    assert!(matches!(w.run_erased(&unknown, None).await, Err(PoolError::UnknownTask { .. })));
    w.shutdown().await;
}

fn postcard_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap()
}

fn postcard_decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> T {
    postcard::from_bytes(b).unwrap()
}

/// `kill` sends the signal when its future is first polled; the rest of the
/// future only reaps. A caller (the device server) relies on this to answer
/// before the reap: one poll, and the worker runs no more code.
#[tokio::test]
async fn kill_signals_the_worker_at_its_first_poll() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let pid = w.run(Pid).await.unwrap();
    let mut kill = std::pin::pin!(w.kill());
    // A worker reaped in the first poll completes it (not to be polled again).
    let pending = futures::poll!(kill.as_mut()).is_pending();
    if pending {
        // Not polled again until the worker is seen dead. Usually it is a
        // zombie then (reaping is what the rest of the future does), but a
        // worker that died at once may have been reaped in that first poll
        // already, which is still pending on its cgroup's removal (under
        // load this happens): either way it runs no more code.
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::hygiene::alive(pid) {
            assert!(Instant::now() < deadline, "worker {pid} still runs after kill's first poll");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    if pending {
        kill.await;
    }
    assert!(!pid_exists(pid), "reaped once kill returned");
}
