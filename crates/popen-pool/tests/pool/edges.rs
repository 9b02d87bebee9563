//! Edges found by review: a death hidden by a forked child, concurrent kills,
//! spares started at teardown, zombies of a runtime that ends, fds right
//! after shutdown, `Spawn` messages, bounded `map` concurrency, garbage on fd 3.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use popen_pool::{ExitInfo, PoolError, PopenPool};

use crate::common::*;
use crate::hygiene::{
    SOON, TempDir, alive, eventually, read_pid_file, settle, wait_running, warm_up,
};
use crate::test_worker_program;

/// A task forks (no exec) a child that keeps the channel open, then the
/// worker aborts: no EOF comes, so the old parent reported a timeout (or
/// hung without a limit). The death is learned from the exit now.
#[tokio::test]
async fn a_forked_child_holding_the_channel_does_not_hide_a_crash() {
    let dir = TempDir::new("fork-abort");
    let file = dir.path().join("child.pid");
    let program = test_worker_program().env("SLEEPER_PID_FILE", &file);
    let pool = PopenPool::builder(program).max_workers(1).build().unwrap();
    for limit in [None, Some(Duration::from_secs(600))] {
        let _ = std::fs::remove_file(&file);
        let handle = pool.submit_with_timeout(ForkThenAbort, limit);
        let got = tokio::time::timeout(SOON, handle).await.expect("the crash is reported, no hang");
        assert_eq!(got, Err(PoolError::WorkerDied { exit: ExitInfo::Signal(libc::SIGABRT) }));
        let child = read_pid_file(&file).await;
        assert!(eventually(SOON, || !alive(child)).await, "the forked child {child} survived");
    }
    assert_eq!(pool.submit(Int(4)).await, Ok(4));
    assert_eq!(pool.stats().crashes, 2);
    pool.shutdown().await;
}

/// `kill()` took the driver handles with `mem::take`: a second, concurrent
/// caller returned at once, with the workers still alive.
#[tokio::test]
async fn every_concurrent_kill_returns_after_every_worker_is_reaped() {
    let pool = Arc::new(PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap());
    settle(&pool).await;
    let running: Vec<_> = (0..2).map(|_| pool.submit(Sleep(600_000))).collect();
    wait_running(&pool, 2).await;
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2);
    let check = |who: &str| {
        let left: Vec<_> = pids.iter().filter(|&&p| pid_exists(p)).collect();
        assert!(left.is_empty(), "{who} kill() returned with workers {left:?} still there");
    };
    tokio::join!(
        async {
            pool.kill().await;
            check("the first");
        },
        async {
            pool.kill().await;
            check("the second");
        },
    );
    for h in running {
        assert_eq!(h.await, Err(PoolError::Shutdown));
    }
}

/// `kill()` with two running tasks started two warm spares only to kill them.
#[tokio::test]
async fn kill_with_running_tasks_starts_no_spare() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
    settle(&pool).await;
    let running: Vec<_> = (0..2).map(|_| pool.submit(Sleep(600_000))).collect();
    wait_running(&pool, 2).await;
    let before = pool.stats().spawned;
    pool.kill().await;
    for h in running {
        assert_eq!(h.await, Err(PoolError::Shutdown));
    }
    assert_eq!(pool.stats().spawned, before, "workers were started during kill()");
}

/// A pool dropped with a task running just before its runtime ends: the
/// workers (and spares that started as the old worker died) were left to
/// tokio's background reaper, which needs a runtime that no longer runs:
/// zombies.
#[test]
fn a_pool_dropped_as_its_runtime_ends_leaves_no_zombie() {
    for round in 0..24u64 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
            settle(&pool).await;
            let _running = pool.submit(Sleep(600_000));
            wait_running(&pool, 1).await;
            drop(pool);
            // Let the drivers see the kill for a varying moment, then end:
            // a few polls (the dead worker's slot starts a spare), or a
            // few milliseconds.
            if round < 12 {
                for _ in 0..round * 4 {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(round - 11)).await;
            }
        });
        drop(rt);
    }
    let clean = crate::hygiene::eventually_blocking(SOON, || child_pids().is_empty());
    assert!(clean, "children left (zombies included): {:?}", child_pids());
}

/// The spawner thread replied before dropping the command that owns the
/// child's end of the channel: for a moment after `shutdown()` (which had
/// stopped a starting spare) that fd was still open.
#[tokio::test]
async fn no_fd_is_open_right_after_shutdown_or_kill() {
    let baseline = warm_up().await;
    let fds = open_fds();
    for round in 0..30 {
        let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
        assert!(matches!(pool.submit(ExitSelf(1)).await, Err(PoolError::WorkerDied { .. })));
        // A spare is starting now; stop the pool at once.
        if round % 2 == 0 {
            pool.kill().await;
            drop(pool);
        } else {
            pool.shutdown().await;
        }
        assert_eq!(open_fds(), fds, "round {round}: fds open right after the pool stopped");
    }
    baseline.assert_clean("the rounds").await;
}

/// Spawn errors name the program, as documented.
#[tokio::test]
async fn spawn_errors_name_the_program() {
    let pool = PopenPool::builder(popen_pool::WorkerProgram::binary("/bin/true"))
        .max_workers(1)
        .build()
        .unwrap();
    match pool.submit(Int(1)).await {
        Err(PoolError::Spawn { message }) => {
            assert!(message.contains("/bin/true"), "{message}");
            assert!(message.contains("exited before its handshake (exit code 0)"), "{message}");
        }
        other => panic!("expected Spawn, got {other:?}"),
    }
    pool.shutdown().await;
}

/// With a bounded queue, `map_with_error_catching` kept only `capacity`
/// tasks in flight: with queue 1 and 2 workers, one worker idled.
#[tokio::test]
async fn bounded_map_keeps_every_worker_busy() {
    let pool =
        PopenPool::builder(test_worker_program()).max_workers(2).max_queue(1).build().unwrap();
    assert_eq!(pool.submit(Int(0)).await, Ok(0));
    let mut both = false;
    let mut out = Vec::new();
    let mut stream = Box::pin(pool.map_with_error_catching((0..4).map(|_| Sleep(300))));
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(r) => out.push(r),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        both |= pool.stats().running == 2;
    }
    drop(stream);
    assert_eq!(out, vec![Ok(300); 4]);
    assert!(both, "the two workers never ran at the same time");
    pool.shutdown().await;
}

/// Task code writing a partial frame header to fd 3 (where the channel was)
/// made the parent wait for a frame that never came: a timeout, or a hang.
/// The channel is elsewhere now and fd 3 is /dev/null.
#[tokio::test]
async fn garbage_written_to_fd_3_does_not_reach_the_channel() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    for garbage in [vec![0u8, 0, 0x10, 0], vec![0xff; 3], b"PPv2\0\0\0\x09".to_vec()] {
        let got = tokio::time::timeout(SOON, pool.submit(WriteFd3(garbage.clone())))
            .await
            .expect("no hang");
        assert_eq!(got, Ok(garbage.len()));
    }
    assert_eq!(pool.submit(Pid).await, Ok(worker), "the same worker serves on");
    pool.shutdown().await;
}

fn refuse<S: serde::Serializer>(_: &u8, _: S) -> Result<S::Ok, S::Error> {
    Err(serde::ser::Error::custom("refusing: this handle cannot leave the process"))
}

/// A task whose `Serialize` fails with a custom message.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Unserializable(#[serde(serialize_with = "refuse")] u8);

impl popen_pool::Task for Unserializable {
    const NAME: &'static str = "unserializable";
    type Output = ();
    fn run(self, _: &mut popen_pool::WorkerContext) -> Result<(), popen_pool::TaskFailure> {
        Ok(())
    }
}

/// postcard drops the text of a custom serializer error.
#[tokio::test]
async fn custom_serializer_errors_keep_their_text() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    match pool.submit(Unserializable(1)).await {
        Err(PoolError::Codec { message }) => {
            assert!(message.contains("this handle cannot leave the process"), "{message}");
            assert!(message.contains("unserializable"), "{message}");
        }
        other => panic!("expected Codec, got {other:?}"),
    }
    pool.shutdown().await;
}

/// Durations from the caller saturate: a task limit or kill grace of
/// `Duration::MAX` must not overflow an `Instant` anywhere on the kill path.
#[tokio::test]
async fn huge_durations_from_the_caller_do_not_panic() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .kill_grace(Duration::MAX)
        .timeout(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(tokio::time::timeout(SOON, pool.submit(Int(1))).await.unwrap(), Ok(1));
    let timed = pool.submit_with_timeout(Sleep(60_000), Some(Duration::from_millis(50)));
    let got = tokio::time::timeout(SOON, timed).await.expect("the timeout fires");
    assert!(matches!(got, Err(PoolError::Timeout { .. })), "{got:?}");
    assert_eq!(tokio::time::timeout(SOON, pool.submit(Int(2))).await.unwrap(), Ok(2));
    tokio::time::timeout(SOON, pool.kill()).await.expect("kill returns");
}
