//! Recycling and warm spares.

use super::*;

#[tokio::test(start_paused = true)]
async fn maximum_process_uses_recycles_gracefully() {
    let mut h = Harness::new(WorkerOptions { maximum_process_uses: Some(2), ..options(false) });
    let echo = erased(Echo(vec![1]));
    h.run(&echo).await.unwrap();
    h.run(&echo).await.unwrap();
    assert_eq!(h.core.pid(), None, "retired after its second use");
    assert_eq!(h.stats().recycled, 1);
    settle().await;
    assert_eq!(h.log().shutdowns, [P1]);
    assert!(h.log().kills.is_empty(), "a graceful shutdown, not a kill");
    assert_eq!(h.log().pids, [P1]);

    h.run(&echo).await.unwrap();
    let log = h.log();
    assert_eq!(log.pids, [P1, P2]);
    assert_eq!((log.sent_to(P1).len(), log.sent_to(P2).len()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn warm_spare_starts_during_the_last_use() {
    let mut h = Harness::new(WorkerOptions { maximum_process_uses: Some(2), ..options(true) });
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().launch_attempts, 1, "no spare before the last use");

    let log = Arc::clone(&h.log);
    let peek = async move {
        sleep(ms(10)).await;
        lock(&log).pids.clone()
    };
    let slow = erased(Slow(100));
    let (res, during) = tokio::join!(within(h.core.run(&slow, None, None)), peek);
    res.expect("slow succeeds");
    assert_eq!(during, [P1, P2], "the spare started while the last use ran");
    assert_eq!(h.stats().recycled, 1);

    h.run(&erased(Echo(vec![]))).await.unwrap();
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.shutdowns[..]), (2, &[P1][..]));
    assert_eq!(log.sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn resident_memory_over_the_limit_recycles() {
    let mut h =
        Harness::scripted(WorkerOptions { max_rss_bytes: Some(1 << 20), ..options(false) }, |s| {
            s.rss = Some(1 << 21)
        });
    h.run(&erased(Echo(vec![]))).await.unwrap();
    assert_eq!((h.core.pid(), h.stats().recycled), (None, 1));
    settle().await;
    assert_eq!(h.log().shutdowns, [P1]);

    h.log().script.rss = Some(1 << 19);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    assert_eq!((h.core.pid(), h.stats().recycled), (Some(P2), 1));
}
