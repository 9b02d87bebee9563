//! Results.

use super::*;

#[tokio::test(start_paused = true)]
async fn success_returns_the_payload_and_reuses_the_child() {
    let mut h = Harness::new(options(true));
    for i in 0..3u8 {
        let task = erased(Echo(vec![i; 5]));
        let out = h.run(&task).await.expect("echo succeeds");
        assert_eq!(out, task.payload);
        assert_eq!(postcard::from_bytes::<Vec<u8>>(&out).unwrap(), vec![i; 5]);
    }
    let stats = h.stats();
    assert_eq!((stats.completed, stats.spawned, stats.failed), (3, 1, 0));
    assert_eq!(h.core.pid(), Some(P1));
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (1, &[P1][..]));
    assert_eq!(log.sent_to(P1), ["echo"; 3]);
    assert_eq!(log.alive(), [P1]);
}

#[tokio::test(start_paused = true)]
async fn task_error_and_panic_keep_the_child() {
    let mut h = Harness::new(options(true));
    let err = h.run_err(&erased(Fail(()))).await;
    assert_eq!(err, PoolError::Task { kind: "custom".into(), message: "fail went wrong".into() });
    let err = h.run_err(&erased(Panic(()))).await;
    assert_eq!(err, PoolError::Task { kind: "panic".into(), message: "boom".into() });
    h.run(&erased(Echo(vec![1]))).await.expect("the same child still serves");

    let stats = h.stats();
    assert_eq!((stats.failed, stats.completed, stats.crashes), (2, 1, 0));
    let log = h.log();
    assert_eq!(log.pids, [P1]);
    assert_eq!(log.sent_to(P1), ["fail", "panic", "echo"]);
    assert!(log.kills.is_empty());
}

#[tokio::test(start_paused = true)]
async fn output_too_large_for_the_worker_keeps_the_child() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(TooBig(()))).await;
    assert_eq!(err, PoolError::FrameTooLarge { len: 1 << 30, max: 1 << 28 });
    assert_eq!(h.stats().failed, 1);
    assert_eq!(h.core.pid(), Some(P1));
    assert!(h.log().kills.is_empty());
}

#[tokio::test(start_paused = true)]
async fn unknown_task_is_refused_without_sending_and_keeps_the_child() {
    let mut h = Harness::new(options(true));
    let err = h.run_err(&erased(Missing(()))).await;
    assert_eq!(err, PoolError::UnknownTask { name: "missing".into(), known: known() });
    assert!(h.log().sent.is_empty(), "nothing reaches the worker");
    assert_eq!(h.core.pid(), Some(P1));

    // A worker that announced a task but does not serve it: same error, child kept.
    let err = h.run_err(&erased(Stale(()))).await;
    assert_eq!(err, PoolError::UnknownTask { name: "stale".into(), known: known() });
    h.run(&erased(Echo(vec![]))).await.expect("the same child still serves");
    let log = h.log();
    assert_eq!(log.pids, [P1]);
    assert_eq!(log.sent_to(P1), ["stale", "echo"]);
}
