//! One task fails (unknown task, frame limits, missing program), the worker
//! serves on; and regressions of library bugs these tests found.

use std::time::{Duration, Instant};

use popen_pool::{PoolError, PopenPool, WorkerProgram};

use crate::common::*;
use crate::hygiene::*;
use crate::test_worker_program;

// ---------------------------------------------------------------------------
// 6. Unknown tasks and frame limits fail one task; the worker serves on.

#[tokio::test]
async fn unknown_task_is_a_clear_error_and_the_worker_serves_on() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();
    match pool.submit(Unregistered).await {
        Err(PoolError::UnknownTask { name, known }) => {
            assert_eq!(name, "unregistered");
            assert!(known.iter().any(|k| k == "identity"), "{known:?}");
            assert!(!known.iter().any(|k| k == "unregistered"), "{known:?}");
        }
        other => panic!("expected UnknownTask, got {other:?}"),
    }
    let msg = pool.submit(Unregistered).await.unwrap_err().to_string();
    assert!(msg.contains("unregistered") && msg.contains("identity"), "{msg}");
    assert_eq!(pool.submit(Identity(Val::Int(7))).await, Ok(Val::Int(7)));
    assert_eq!(pool.submit(Pid).await, Ok(worker));
    assert_eq!(pool.stats().spawned, 1);
    pool.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_fail_the_task_and_the_worker_serves_on() {
    let max = 1 << 20;
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .max_frame_bytes(max)
        .build()
        .unwrap();
    let worker = pool.submit(Pid).await.unwrap();

    match pool.submit(Checksum(vec![1; 2 << 20])).await {
        Err(PoolError::FrameTooLarge { len, max: m }) => {
            assert_eq!(m, max);
            assert!(len >= 2 << 20, "{len}");
        }
        other => panic!("an oversized input: expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(pool.submit(Pid).await, Ok(worker), "the worker serves on after a large input");

    match pool.submit(MakeBytes(2 << 20)).await {
        Err(PoolError::FrameTooLarge { len, max: m }) => {
            assert_eq!(m, max);
            assert!(len >= 2 << 20, "{len}");
        }
        other => panic!("an oversized output: expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(pool.submit(Pid).await, Ok(worker), "the worker serves on after a large output");

    // Just under the limit still fits both ways.
    let data: Vec<u8> = (0..(max - 1024)).map(|i| (i % 7) as u8).collect();
    let sum = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(pool.submit(Checksum(data)).await, Ok((max - 1024, sum)));
    let out = pool.submit(MakeBytes(max - 1024)).await.unwrap();
    assert_eq!(out.len(), max - 1024);
    assert_eq!(pool.stats().spawned, 1);
    pool.shutdown().await;
}

#[tokio::test]
async fn payloads_of_64_mib_round_trip_with_the_default_limit() {
    let len = 64 << 20;
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(pool.submit(Checksum(data.clone())).await, Ok((len, sum)));
    let out = pool.submit(MakeBytes(len)).await.unwrap();
    assert!(out.as_slice() == data.as_slice(), "64 MiB output differs");
    assert_eq!(pool.stats().spawned, 1);
    pool.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. A missing worker program fails each task with `Spawn`, without hanging.

#[tokio::test]
async fn missing_worker_program_fails_every_task_with_spawn() {
    let path = "/nonexistent/popen-pool-no-such-worker";
    let pool = PopenPool::builder(WorkerProgram::binary(path)).max_workers(2).build().unwrap();
    let handles: Vec<_> = (0..6).map(|i| pool.submit(Int(i))).collect();
    let results = tokio::time::timeout(SOON, futures::future::join_all(handles))
        .await
        .expect("tasks on a missing program resolve promptly");
    for r in results {
        match r {
            Err(PoolError::Spawn { message }) => assert!(message.contains(path), "{message}"),
            other => panic!("expected Spawn, got {other:?}"),
        }
    }
    assert_eq!(pool.stats().spawned, 0);
    tokio::time::timeout(SOON, pool.shutdown()).await.expect("shutdown does not hang");
    assert!(child_pids().is_empty());
}

// ---------------------------------------------------------------------------
// Regressions: two library bugs these tests found (both fixed).

/// `ProcessLauncher::launch` gives the spawner thread a `Command` whose
/// pre_exec `dup2`s the *raw fd number* of the socketpair's child end onto
/// fd 3, while the end itself stays owned by the launch future. When that
/// future is dropped before the spawner thread forks (a starting worker
/// aborted by `kill`, `shutdown` or `Drop` through `WorkerCore::stop_spare`),
/// the fd is closed and its number reused, e.g. by the CLOEXEC error pipe
/// std's `Command::spawn` creates next. The new worker then writes its
/// handshake into that pipe, std panics on the spawner thread ("Validation on
/// the CLOEXEC pipe failed"), and the thread dies: every later spawn in the
/// process fails with `Spawn("the popen-pool spawner thread is gone")`, the
/// forked child is never reaped, and PR_SET_PDEATHSIG (tied to that thread)
/// SIGKILLs every live worker of every pool.
///
/// Fixed: the command owns the child's end until after the fork, the spawner
/// skips requests whose caller is gone, and it survives a panicking spawn.
#[tokio::test]
async fn cancelled_worker_starts_never_break_the_spawner_thread() {
    let bystander = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let bystander_pid = bystander.submit(Pid).await.unwrap();
    for round in 0..400 {
        // Kill a pool whose workers are all still starting: their launches
        // are cancelled, some while queued on the spawner thread.
        let doomed = PopenPool::builder(test_worker_program()).max_workers(6).build().unwrap();
        tokio::task::yield_now().await;
        doomed.kill().await;
        drop(doomed);

        let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
        let got = pool.submit(Int(round)).await;
        pool.shutdown().await;
        if got != Ok(round) {
            let bystander_now = bystander.submit(Pid).await;
            panic!(
                "round {round}: a fresh pool cannot run a task: {got:?}; the bystander worker \
                 {bystander_pid} now gives {bystander_now:?}; children {:?}",
                child_pids()
            );
        }
    }
    assert_eq!(bystander.submit(Pid).await, Ok(bystander_pid));
    bystander.shutdown().await;
    assert!(
        eventually(SOON, || child_pids().is_empty()).await,
        "children left: {:?}",
        child_pids()
    );
}

/// `kill` documents "every worker is reaped before this returns" and
/// `shutdown` that it "reaps" the workers, but a worker that is still starting
/// (here the warm spare replacing a crashed worker) is only aborted by
/// `WorkerCore::stop_spare`: dropping its `ProcessChild` sends SIGKILL and
/// leaves the reaping to tokio in the background. Right after `kill().await`
/// or `shutdown().await` the process still exists (running or a zombie).
///
/// Fixed: a starting worker is stopped through a token, and kills and reaps
/// its own process before `stop_spare` returns.
#[tokio::test]
async fn stop_reaps_a_worker_that_is_still_starting() {
    let mut late = Vec::new();
    for round in 0..30 {
        let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
        assert!(matches!(pool.submit(ExitSelf(1)).await, Err(PoolError::WorkerDied { .. })));
        // The spare replacing the crashed worker has a pid before it has
        // finished its handshake; catch it in between.
        let mut spare = Vec::new();
        let deadline = Instant::now() + SOON;
        while spare.is_empty() && Instant::now() < deadline {
            tokio::task::yield_now().await;
            spare = pool.worker_pids();
        }
        assert_eq!(spare.len(), 1, "round {round}: no spare appeared");
        let kill = round % 2 == 0;
        if kill {
            pool.kill().await;
        } else {
            pool.shutdown().await;
        }
        let pid = spare[0];
        if pid_exists(pid) {
            let how = if kill { "kill" } else { "shutdown" };
            late.push(format!(
                "round {round}: {pid} after {how}: state {:?}",
                proc_stat(pid).map(|s| s.0)
            ));
        }
    }
    let reaped_later = eventually(SOON, || child_pids().is_empty()).await;
    assert!(
        late.is_empty(),
        "{} of 30 starting spares outlived kill/shutdown (all reaped within {SOON:?} later: \
         {reaped_later}): {late:#?}",
        late.len()
    );
}
