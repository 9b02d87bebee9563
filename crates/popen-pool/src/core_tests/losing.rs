//! Losing the child: timeout, crash, protocol errors, cancellation, drop.

use super::*;

#[tokio::test(start_paused = true)]
async fn timeout_kills_the_child_and_the_next_task_gets_a_new_one() {
    let mut h = Harness::new(options(false));
    let limit = ms(50);
    let start = Instant::now();
    let err = within(h.core.run(&erased(Hang(())), Some(limit), None)).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit });
    assert!((limit..limit + ms(2)).contains(&start.elapsed()), "{:?}", start.elapsed());
    assert_eq!(h.stats().timeouts, 1);
    assert_eq!(h.core.pid(), None);
    settle().await;
    {
        let log = h.log();
        assert_eq!(log.kills, [P1]);
        assert!(log.alive().is_empty());
        assert_eq!(log.pids, [P1], "no warm spare: nothing starts before the next task");
    }

    h.run(&erased(Echo(vec![7]))).await.expect("a fresh child serves");
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.log().sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn timeout_with_warm_spare_relaunches_right_after_the_kill() {
    let mut h = Harness::new(options(true));
    let limit = ms(50);
    let err = within(h.core.run(&erased(Hang(())), Some(limit), None)).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit });
    settle().await;
    assert_eq!(h.log().kills, [P1]);
    assert_eq!(h.log().pids, [P1, P2], "the replacement starts before the next task");

    h.run(&erased(Echo(vec![7]))).await.expect("the spare serves");
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (2, &[P1, P2][..]));
    assert_eq!(log.sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn crash_reports_the_signal_and_the_next_task_gets_a_new_child() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(Die(()))).await;
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Signal(11) });
    assert_eq!(h.stats().crashes, 1);
    assert_eq!(h.core.pid(), None);
    assert_eq!(h.log().reaps, [P1]);

    h.run(&erased(Echo(vec![]))).await.expect("a fresh child serves");
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.core.pid(), Some(P2));
}

#[tokio::test(start_paused = true)]
async fn a_death_by_the_cgroup_ceiling_is_a_memory_limit_error() {
    let mut h = Harness::new(options(false));
    h.log().script.oom_ceiling = Some(64 << 20);
    let err = h.run_err(&erased(Die(()))).await;
    assert_eq!(err, PoolError::MemoryLimit { limit: 64 << 20 });
    assert_eq!((h.stats().memory_kills, h.stats().crashes), (1, 0));
    assert_eq!(h.log().reaps, [P1]);
    h.log().script.oom_ceiling = None;
    h.run(&erased(Echo(vec![]))).await.expect("a fresh child serves");
    assert_eq!(h.log().pids, [P1, P2]);
}

#[tokio::test(start_paused = true)]
async fn protocol_errors_kill_the_child() {
    let mut h = Harness::new(options(false));
    let cases = [
        (erased(Garbage(())), "undecodable frame"),
        (erased(WrongId(())), "expected the result of task"),
    ];
    for (n, (task, needle)) in (1..).zip(cases) {
        let err = h.run_err(&task).await;
        let PoolError::Protocol { message } = &err else { panic!("{}: got {err:?}", task.name) };
        assert!(message.contains(needle), "{message:?}");
        assert_eq!(h.stats().crashes, n);
        assert_eq!(h.core.pid(), None);
    }
    let log = h.log();
    assert_eq!(log.kills, [P1, P2]);
    assert!(log.alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_running_task_kills_the_child() {
    let mut h = Harness::new(options(false));
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let hang = erased(Hang(()));
    let (res, ()) = tokio::join!(within(h.core.run(&hang, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert_eq!(start.elapsed(), ms(10));
    assert_eq!(h.stats().cancelled, 1);
    assert_eq!(h.core.pid(), None);
    assert_eq!(h.log().kills, [P1]);
}

#[tokio::test(start_paused = true)]
async fn cancelling_while_a_slow_launch_waits_returns_promptly() {
    let mut h =
        Harness::scripted(options(false), |s| s.launch_delay = Some(Duration::from_secs(10)));
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let echo = erased(Echo(vec![]));
    let (res, ()) = tokio::join!(within(h.core.run(&echo, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert_eq!(start.elapsed(), ms(10));
    assert_eq!(h.stats().cancelled, 1);
    assert!(h.log().sent.is_empty());

    // The launch kept going; the next task uses it rather than starting another.
    h.run(&echo).await.expect("the started child serves");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (1, &[P1][..]));
}

#[tokio::test(start_paused = true)]
async fn dropping_run_mid_task_leaves_no_child() {
    let mut h = Harness::new(options(false));
    let res = tokio::time::timeout(ms(10), h.core.run(&erased(Hang(())), None, None)).await;
    assert!(res.is_err(), "the hanging task was still running");
    {
        let log = h.log();
        assert_eq!(log.sent_to(P1), ["hang"]);
        assert_eq!(log.drops, [P1], "the child went down with the future");
        assert!(log.alive().is_empty());
    }
    assert_eq!(h.core.pid(), None);
    h.run(&erased(Echo(vec![]))).await.expect("a fresh child serves");
    assert_eq!(h.core.pid(), Some(P2));
}
