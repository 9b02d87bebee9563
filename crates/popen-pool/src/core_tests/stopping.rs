//! Stopping the core.

use super::*;

/// A core with a live child P1 and a started spare P2.
async fn live_and_spare() -> Harness {
    let mut h = Harness::new(options(false));
    assert_eq!(within(h.core.ensure_started()).await, Ok(P1));
    h.core.start_spare();
    settle().await;
    assert_eq!(h.log().pids, [P1, P2]);
    h
}

#[tokio::test(start_paused = true)]
async fn kill_kills_the_live_child_and_the_spare() {
    let mut h = live_and_spare().await;
    within(h.core.kill()).await;
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.kills, [P1, P2]);
    assert!(log.alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_live_child_gracefully_and_the_spare() {
    let mut h = live_and_spare().await;
    within(h.core.shutdown()).await;
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.shutdowns, [P1]);
    assert!(log.alive().is_empty(), "alive: {:?}", log.alive());
}

#[tokio::test(start_paused = true)]
async fn kill_leaves_no_spare_that_was_still_launching() {
    let mut h = Harness::new(options(false));
    within(h.core.ensure_started()).await.unwrap();
    h.log().script.launch_delay = Some(Duration::from_secs(5));
    h.core.start_spare();
    settle().await;
    assert_eq!(h.log().launch_attempts, 2);
    within(h.core.kill()).await;
    // Whatever the spare had started is gone when kill returns, and stays gone.
    let alive = h.log().alive();
    assert!(alive.is_empty(), "alive: {alive:?}");
    sleep(Duration::from_secs(10)).await;
    let log = h.log();
    assert!(log.alive().is_empty(), "alive: {:?}", log.alive());
    assert!(log.sent.is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_core_leaves_no_child() {
    let Harness { core, log, .. } = live_and_spare().await;
    drop(core);
    settle().await;
    {
        let log = lock(&log);
        assert_eq!(log.drops, [P1, P2]);
        assert!(log.alive().is_empty());
    }

    // A spare still launching is abandoned.
    let mut h = Harness::new(options(false));
    within(h.core.ensure_started()).await.unwrap();
    h.log().script.launch_delay = Some(Duration::from_secs(5));
    h.core.start_spare();
    settle().await;
    let Harness { core, log, .. } = h;
    drop(core);
    sleep(Duration::from_secs(10)).await;
    let log = lock(&log);
    assert_eq!((log.launch_attempts, &log.pids[..]), (2, &[P1][..]));
    assert!(log.alive().is_empty());
}
