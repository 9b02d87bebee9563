//! Starting: handshake problems and oversized payloads.

use super::*;

#[tokio::test(start_paused = true)]
async fn handshake_problems_are_spawn_errors() {
    let speaks = format!("this parent speaks {PROTOCOL_VERSION}");
    let cases: [(Greeting, &[&str]); 3] = [
        (Greeting::WrongVersion, &["protocol version 99", &speaks]),
        (Greeting::NotHello, &["did not start with a handshake"]),
        (Greeting::CloseFirst, &["before its handshake", "exit code 3", "serve_if_worker"]),
    ];
    for (greeting, needles) in cases {
        let mut h = Harness::scripted(options(false), |s| s.greeting = greeting);
        let err = h.run_err(&erased(Echo(vec![]))).await;
        assert_spawn_error(&err, needles);
        assert_eq!(h.core.pid(), None, "{greeting:?}");
        let log = h.log();
        // A child that closed its channel is reaped; one that talked nonsense, killed.
        let ended = if greeting == Greeting::CloseFirst { &log.reaps } else { &log.kills };
        assert_eq!(ended, &[P1], "{greeting:?}");
        assert!(log.sent.is_empty(), "{greeting:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn launch_failure_is_a_spawn_error() {
    let mut h = Harness::scripted(options(false), |s| s.fail_launch = true);
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["fake: cannot start /bin/worker"]);
    assert!(h.log().pids.is_empty());

    // The next task tries again.
    h.log().script.fail_launch = false;
    h.run(&erased(Echo(vec![]))).await.expect("the second launch works");
    assert_eq!(h.log().launch_attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn start_timeout_is_a_spawn_error() {
    let opts = WorkerOptions { start_timeout: Duration::from_secs(1), ..options(false) };
    let mut h = Harness::scripted(opts.clone(), |s| s.greeting = Greeting::Silent);
    let start = Instant::now();
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["handshake", "within 1s"]);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(h.log().kills, [P1]);
    assert!(h.log().alive().is_empty());

    // The initializer runs within the same start timeout.
    let opts = WorkerOptions { initializer: Some(ErasedTask::new(&Hang(()))), ..opts };
    let mut h = Harness::new(opts);
    let start = Instant::now();
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["initializer", "within 1s"]);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(h.log().sent_to(P1), ["hang"]);
    assert!(h.log().alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn oversized_payload_is_refused_without_launching() {
    let mut h = Harness::new(WorkerOptions { max_frame_bytes: 64, ..options(false) });
    let task = erased(Echo(vec![0; 100]));
    let err = h.run_err(&task).await;
    assert_eq!(err, PoolError::FrameTooLarge { len: task.payload.len(), max: 64 });
    assert_eq!(h.log().launch_attempts, 0);

    // A payload that fits but whose frame does not: refused by the encoder,
    // before anything was written, so the child is kept.
    let err = h.run_err(&erased(Echo(vec![0; 60]))).await;
    assert!(matches!(err, PoolError::FrameTooLarge { max: 64, .. }), "{err:?}");
    assert_eq!(h.core.pid(), Some(P1));
    let log = h.log();
    assert!(log.sent.is_empty() && log.kills.is_empty());
}
