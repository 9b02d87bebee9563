//! Initializer.

use super::*;

#[tokio::test(start_paused = true)]
async fn initializer_runs_once_per_child_and_is_not_a_use() {
    let opts = WorkerOptions {
        initializer: Some(ErasedTask::new(&Init(()))),
        maximum_process_uses: Some(2),
        ..options(false)
    };
    let mut h = Harness::new(opts);
    for _ in 0..3 {
        h.run(&erased(Echo(vec![]))).await.unwrap();
    }
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["init", "echo", "echo"]);
    assert_eq!(log.sent_to(P2), ["init", "echo"]);
    drop(log);
    assert_eq!(h.stats().completed, 3, "the initializer is not a completed task");
}

#[tokio::test(start_paused = true)]
async fn initializer_with_one_use_per_child_still_runs_each_task() {
    let opts = WorkerOptions {
        initializer: Some(ErasedTask::new(&Init(()))),
        maximum_process_uses: Some(1),
        ..options(true)
    };
    let mut h = Harness::new(opts);
    for _ in 0..3 {
        h.run(&erased(Echo(vec![]))).await.unwrap();
    }
    let log = h.log();
    for pid in [P1, P2, P3] {
        assert_eq!(log.sent_to(pid), ["init", "echo"], "child {pid}");
    }
}

#[tokio::test(start_paused = true)]
async fn failing_initializer_is_an_initializer_error() {
    let opts =
        WorkerOptions { initializer: Some(ErasedTask::new(&InitFail(()))), ..options(false) };
    let mut h = Harness::new(opts);
    let err = h.run_err(&erased(Echo(vec![]))).await;
    let source = PoolError::Task { kind: "init".into(), message: "init_fail went wrong".into() };
    assert_eq!(err, PoolError::Initializer { source: Box::new(source) });
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["init_fail"], "the task itself never ran");
    assert_eq!(log.kills, [P1]);
}
