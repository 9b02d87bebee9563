//! Regressions: bugs these tests found in core.rs (all fixed).

use super::*;

#[tokio::test(start_paused = true)]
async fn oversized_reply_kills_the_child_and_counts_as_a_crash() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(Oversized(()))).await;
    match &err {
        PoolError::Protocol { message } => {
            assert!(message.contains("over the maximum"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(h.log().kills, [P1]);
    assert_eq!(h.core.pid(), None);
    let stats = h.stats();
    assert_eq!((stats.crashes, stats.failed), (1, 0), "the worker did not survive");
}

#[tokio::test(start_paused = true)]
async fn cancelling_while_a_retiring_worker_exits_returns_promptly() {
    let grace = Duration::from_secs(2);
    let opts = WorkerOptions { maximum_process_uses: Some(1), kill_grace: grace, ..options(true) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.log().shutdowns, [P1]);

    // P1 takes the whole grace period to exit; the spare P2 is ready.
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let hang = erased(Hang(()));
    let (res, ()) = tokio::join!(within(h.core.run(&hang, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert!(start.elapsed() < grace, "cancelled after {:?}", start.elapsed());
    let log = h.log();
    assert!(log.sent_to(P2).is_empty(), "a cancelled task was sent to {P2}");
    assert!(!log.kills.contains(&P2), "the spare was killed for a cancelled task");
}

#[tokio::test(start_paused = true)]
async fn kill_kills_a_retiring_worker_now() {
    let grace = Duration::from_secs(2);
    let opts = WorkerOptions { maximum_process_uses: Some(1), kill_grace: grace, ..options(false) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().shutdowns, [P1], "P1 retires, slowly");

    let start = Instant::now();
    within(h.core.kill()).await;
    assert!(h.log().alive().is_empty());
    assert!(start.elapsed() < grace, "kill() took {:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn no_worker_outlives_kill_after_a_run_dropped_during_retirement() {
    let opts = WorkerOptions { maximum_process_uses: Some(1), ..options(false) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    let echo = erased(Echo(vec![]));
    let res = tokio::time::timeout(ms(10), h.core.run(&echo, None, None)).await;
    assert!(res.is_err(), "the run was still waiting for P1 to exit");

    within(h.core.kill()).await;
    let alive = h.log().alive();
    assert!(alive.is_empty(), "alive after kill(): {alive:?}");
}
