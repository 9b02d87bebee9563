//! The edges of the device server and sessions: cancelled calls and
//! transfers, replies over the frame limit, the server's reason after a
//! failed write, consumed match keys, a broken work dir, caller-given
//! durations and the connection cap.

use std::time::Duration;

use rpc_runner::tracker::TrackerClient;
use rpc_runner::{ConnectOptions, DeviceServer, ServerError, Session, SessionError};
use tokio::net::TcpStream;

use crate::common::{LIMIT, eventually, within};
use crate::sessions::{server, tracker};
use crate::tasks::*;

async fn connect(addr: &str, key: &str) -> Session {
    within("connect", Session::connect(addr, key, &ConnectOptions::default()))
        .await
        .expect("session opens")
}

/// Item 1: a client that abandons calls in a tight loop cannot overflow the
/// server's stack; each abandoned call is cancelled explicitly, the session
/// stays usable, and a cancelled call leaves a fresh worker (its state is gone).
#[tokio::test]
async fn abandoning_calls_in_a_loop_leaves_server_and_session_usable() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let mut sess = connect(&addr, "dev").await;
    assert_eq!(within("count", sess.call(Count, None)).await.unwrap(), 1);
    assert_eq!(within("count", sess.call(Count, None)).await.unwrap(), 2);
    // Before the fix every abandoned call recursed once on the server; a few
    // thousand overflowed its stack (and took this test process down).
    let start = std::time::Instant::now();
    let mut abandoned = 0;
    while abandoned < 3000 && start.elapsed() < Duration::from_secs(4) {
        let r = tokio::time::timeout(Duration::from_millis(1), sess.call(SleepMs(20), None)).await;
        if r.is_err() {
            abandoned += 1;
        }
        assert!(sess.is_open(), "an abandoned call keeps the session open");
    }
    assert!(abandoned > 100, "only {abandoned} calls were abandoned");
    // The session is in sync: a call answers with its own result.
    assert_eq!(
        within("echo", sess.call(Echo(b"after".to_vec()), None)).await.unwrap(),
        b"after"[..]
    );
    // A cancelled call killed the worker: the count starts again.
    assert_eq!(within("count", sess.call(Count, None)).await.unwrap(), 1);
    within("close", sess.close()).await.unwrap();
    // The server serves the next client.
    let mut next = connect(&addr, "dev").await;
    assert!(within("listdir", next.listdir("")).await.unwrap().is_empty());
    within("close", next.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Item 2: a call output far over the frame limit streams in chunks; one
/// over the client's reply limit is a typed error and the session goes on.
#[tokio::test]
async fn large_call_outputs_stream_and_over_limit_ones_are_typed_errors() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let mut sess = connect(&addr, "dev").await;
    let len = 80 << 20; // over the 64 MiB session frame
    let out = within("80 MiB output", sess.call(Fill { len, byte: 7 }, None)).await.unwrap();
    assert_eq!(out.len(), len);
    assert!(out.iter().all(|&b| b == 7));

    within("close", sess.close()).await.unwrap();
    let opts = ConnectOptions::default().max_reply_bytes(1 << 20);
    let mut small = within("connect", Session::connect(&addr, "dev", &opts)).await.unwrap();
    match within("2 MiB output", small.call(Fill { len: 2 << 20, byte: 1 }, None)).await {
        Err(SessionError::ReplyTooLarge { len, limit }) => {
            assert!(len > 2 << 20, "{len}");
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected ReplyTooLarge, got {other:?}"),
    }
    // The rest of the refused reply is skipped: the session is in sync.
    assert_eq!(
        within("echo", small.call(Echo(b"next".to_vec()), None)).await.unwrap(),
        b"next"[..]
    );
    // A task larger than the server accepts fails before anything is sent.
    match within("70 MiB task", small.call(Echo(vec![0; 70 << 20]), None)).await {
        Err(SessionError::FrameTooLarge { len, limit }) => assert!(len > limit, "{len} {limit}"),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(within("echo", small.call(Echo(b"ok".to_vec()), None)).await.unwrap(), b"ok"[..]);
    within("close", small.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Item 3: cancelled uploads and downloads leave the session usable (no
/// half frame on the wire, no hang until the request timeout), the partial
/// upload is removed, and no error message carries a chunk's bytes.
#[tokio::test]
async fn cancelled_transfers_leave_the_session_usable() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    // A short request timeout: a desynchronized session would hit it.
    let opts = ConnectOptions::default().request_timeout(Duration::from_secs(8));
    let mut sess = within("connect", Session::connect(&addr, "dev", &opts)).await.unwrap();
    let big = vec![5u8; 48 << 20];
    within("upload", sess.upload_bytes(&big, "big.bin")).await.unwrap();
    for round in 0..20u64 {
        let cut = Duration::from_micros(200 + 500 * round);
        let _ = tokio::time::timeout(cut, sess.upload_bytes(&big, "partial.bin")).await;
        assert!(sess.is_open());
        let listing = within("listdir after a cancelled upload", sess.listdir("")).await;
        for e in listing.expect("listdir works") {
            // Only a complete upload stays.
            assert_eq!(e.size, big.len() as u64, "{e:?} in round {round}");
        }
        let _ = tokio::time::timeout(cut, sess.download("big.bin")).await;
        match within("echo after a cancelled download", sess.call(Echo(vec![round as u8]), None))
            .await
        {
            Ok(out) => assert_eq!(out.as_ref(), &[round as u8]),
            Err(e) => {
                panic!("session out of sync after a cancelled download: {:.200}", e.to_string())
            }
        }
    }
    // A cancelled upload's partial file is removed (the last complete one may stay).
    let _ =
        tokio::time::timeout(Duration::from_millis(2), sess.upload_bytes(&big, "cut.bin")).await;
    let names: Vec<_> =
        within("listdir", sess.listdir("")).await.unwrap().into_iter().map(|e| e.name).collect();
    assert!(!names.contains(&"cut.bin".to_owned()), "partial upload left behind: {names:?}");
    assert_eq!(within("download", sess.download("big.bin")).await.unwrap().len(), big.len());
    within("close", sess.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Item 4: the server's reason wins over a broken pipe.
#[tokio::test]
async fn a_session_timeout_during_an_upload_is_reported_as_such() {
    let s = server(None, "dev", |c| c.session_timeout(Duration::from_millis(300))).await;
    let addr = s.addr().to_string();
    let data = vec![1u8; 256 << 20];
    // The timeout fires before the upload starts...
    let mut sess = connect(&addr, "dev").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    match within("upload after the timeout", sess.upload_bytes(&data, "a.bin")).await {
        Err(SessionError::SessionTimeout { limit }) => {
            assert_eq!(limit, Duration::from_millis(300))
        }
        other => panic!("expected SessionTimeout, got {other:?}"),
    }
    // ... and every later call says why the session is unusable.
    match sess.listdir("").await {
        Err(SessionError::Broken { reason }) => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("expected Broken, got {other:?}"),
    }
    // ... or while it runs.
    let mut sess = connect(&addr, "dev").await;
    let r = within("upload across the timeout", async {
        loop {
            if let Err(e) = sess.upload_bytes(&data, "b.bin").await {
                return e;
            }
        }
    })
    .await;
    assert!(matches!(r, SessionError::SessionTimeout { .. }), "{r:?}");
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Item 5: a match key is good for one session, also while the tracker is
/// unreachable; a refused handshake does not burn the lease.
#[tokio::test]
async fn a_consumed_match_key_is_refused() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| {
        c.token("right").unused_lease_timeout(Duration::from_secs(120))
    })
    .await;
    let addr = s.addr().to_string();
    let opts = ConnectOptions::default().token(Some("right".into()));
    let key = s.status().borrow().matchkey.clone();
    let mut sess = within("connect", Session::connect(&addr, &key, &opts)).await.unwrap();
    within("close", sess.close()).await.unwrap();
    match within("reuse", Session::connect(&addr, &key, &opts)).await {
        Err(SessionError::KeyMismatch { .. }) => {}
        other => panic!("a consumed key was accepted: {other:?}"),
    }
    // Now without a tracker: the key in force stays until it is used once.
    s.wait_for(LIMIT, |st| st.registered).await.expect("registered again");
    let _ = t.shutdown().await;
    s.wait_for(LIMIT, |st| !st.registered).await.expect("registration lost");
    let key = s.status().borrow().matchkey.clone();
    let mut sess = within("connect", Session::connect(&addr, &key, &opts)).await.unwrap();
    within("close", sess.close()).await.unwrap();
    assert!(matches!(
        within("reuse", Session::connect(&addr, &key, &opts)).await,
        Err(SessionError::KeyMismatch { .. })
    ));
    within("shutdown", s.shutdown()).await.unwrap();
}

#[tokio::test]
async fn a_refused_handshake_gives_the_lease_back_at_once() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| {
        c.token("right").unused_lease_timeout(Duration::from_secs(120))
    })
    .await;
    let mut tc = TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    let mut wrong = rpc_runner::RequestOptions::new(1, None);
    wrong.connect = wrong.connect.token(Some("wrong".into()));
    wrong.max_retry = 0;
    let err = within("lease with a wrong token", tc.request_with("cpu", &wrong)).await.unwrap_err();
    assert!(matches!(err, SessionError::Unauthorized), "{err:?}");
    // Before the fix the lease stayed burnt until the unused-lease timeout (120 s here).
    let mut right = rpc_runner::RequestOptions::new(1, None);
    right.connect = right.connect.token(Some("right".into()));
    let mut sess =
        within("lease with the right token", tc.request_with("cpu", &right)).await.unwrap();
    within("close", sess.close()).await.unwrap();
    drop(s);
}

/// Item 6: a server whose work dir is missing does not start; one whose work
/// dir goes away tells clients why and leaves the tracker until it is back.
#[tokio::test]
async fn a_broken_work_dir_is_reported_and_takes_the_server_out_of_the_tracker() {
    let missing = std::env::temp_dir().join(format!("no-such-dir-{}", std::process::id()));
    let cfg = rpc_runner::ServerConfig::new("cpu", crate::test_worker_program())
        .work_root(missing.clone());
    match DeviceServer::start("127.0.0.1:0", cfg).await {
        Err(ServerError::WorkDir { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected a WorkDir error, got {other:?}"),
    }

    let t = tracker().await;
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let w = work.clone();
    let s =
        server(Some(&t), "cpu", move |c| c.work_root(w).tracker_poll(Duration::from_millis(100)))
            .await;
    std::fs::remove_dir(&work).unwrap();
    let key = s.status().borrow().matchkey.clone();
    let addr = s.addr().to_string();
    match within("connect", Session::connect(&addr, &key, &ConnectOptions::default())).await {
        Err(SessionError::SetupFailed { message }) => {
            assert!(message.contains("session directory"), "{message}")
        }
        other => panic!("expected SetupFailed, got {other:?}"),
    }
    let st = s.wait_for(LIMIT, |st| st.unavailable.is_some() && !st.registered).await;
    st.expect("the server says it is unavailable and leaves the tracker");
    let mut tc = TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    eventually("the tracker forgets the server", async || {
        let summary = tc.summary().await.unwrap();
        summary.queue_info.get("cpu").is_none_or(|q| q.free == 0)
    })
    .await;
    // Back: it serves and registers again.
    std::fs::create_dir(&work).unwrap();
    s.wait_for(LIMIT, |st| st.unavailable.is_none() && st.registered).await.expect("back");
    let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
    within("close", sess.close()).await.unwrap();
    drop(s);
}

/// Item 7: durations from callers are saturated, not a panic.
#[tokio::test]
async fn huge_durations_from_callers_do_not_panic() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let opts = ConnectOptions::default().session_timeout(Some(Duration::MAX));
    let mut sess = within("connect", Session::connect(&addr, "dev", &opts)).await.unwrap();
    let out = within("call", sess.call(Echo(b"x".to_vec()), Some(Duration::MAX))).await;
    assert_eq!(out.unwrap(), b"x"[..]);
    let out =
        within("call", sess.call(SleepMs(1), Some(Duration::from_secs(u64::MAX / 1000)))).await;
    assert_eq!(out.unwrap(), 1);
    within("close", sess.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Item 9: connections beyond the cap are refused with a clear error, and
/// the server serves again once they are gone.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_clearly() {
    let s =
        server(None, "dev", |c| c.max_connections(2).handshake_timeout(Duration::from_secs(30)))
            .await;
    let addr = s.addr().to_string();
    // Two clients that stall in their handshake hold both permits.
    let a = TcpStream::connect(&addr).await.unwrap();
    let b = TcpStream::connect(&addr).await.unwrap();
    let mut refused = false;
    for _ in 0..50 {
        match within("connect", Session::connect(&addr, "dev", &ConnectOptions::default())).await {
            Err(SessionError::AtCapacity) => {
                refused = true;
                break;
            }
            // The server may not have accepted the stalled ones yet.
            Ok(sess) => drop(sess),
            Err(e) => panic!("expected AtCapacity, got {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a third connection was never refused");
    drop((a, b));
    eventually("the server serves again", async || {
        Session::connect(&addr, "dev", &ConnectOptions::default()).await.is_ok()
    })
    .await;
    within("shutdown", s.shutdown()).await.unwrap();
}

/// Process controls pass through the server to its session workers: a pinned
/// worker reports its CPU; a task over the memory ceiling fails alone with a
/// typed error, and the session goes on with a fresh worker.
#[tokio::test]
async fn session_workers_get_the_servers_process_controls() {
    let s = server(None, "dev", |c| c.worker_cpu_affinity([0]).worker_memory_limit(96 << 20)).await;
    let mut sess = connect(&s.addr().to_string(), "dev").await;
    assert_eq!(within("cpus", sess.call(CpusAllowed, None)).await.unwrap(), "0");
    match within("hog", sess.call(Hog(256 << 20), None)).await {
        Err(SessionError::Task(popen_pool::PoolError::MemoryLimit { limit })) => {
            assert_eq!(limit, 96 << 20)
        }
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    assert_eq!(within("small", sess.call(Hog(1 << 20), None)).await.unwrap(), 1 << 20);
    assert_eq!(within("cpus", sess.call(CpusAllowed, None)).await.unwrap(), "0");
    within("close", sess.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
}
