//! Device server and sessions end to end: a real tracker, real servers on
//! 127.0.0.1:0, real session workers (this test binary, re-run).

use std::path::Path;
use std::time::{Duration, Instant};

use popen_pool::{ExitInfo, PoolError};
use rpc_runner::tasks::WorkerInfo;
use rpc_runner::tracker::{Tracker, TrackerClient, TrackerConfig, TrackerHandle};
use rpc_runner::{
    ConnectOptions, DeviceServer, RequestOptions, ServerConfig, ServerHandle, Session, SessionError,
};

use crate::tasks::*;

const SOON: Duration = Duration::from_secs(20);

pub(crate) async fn tracker() -> TrackerHandle {
    Tracker::start("127.0.0.1:0", TrackerConfig::default()).await.expect("tracker starts")
}

/// A server for `key` registered with `tracker` (or none), with `tweak`
/// applied to its configuration; returns once it is registered.
pub(crate) async fn server(
    tracker: Option<&TrackerHandle>,
    key: &str,
    tweak: impl FnOnce(ServerConfig) -> ServerConfig,
) -> ServerHandle {
    // Unpinned: tests run in parallel, and every server pinning its session
    // workers to the same (last) CPU would make them share it. The
    // fidelity tests pin explicitly.
    let mut cfg = ServerConfig::new(key, crate::test_worker_program()).no_worker_cpu_affinity();
    if let Some(t) = tracker {
        cfg = cfg.tracker(t.addr().to_string());
    }
    let cfg = tweak(cfg);
    let has_tracker = tracker.is_some();
    let handle = DeviceServer::start("127.0.0.1:0", cfg).await.expect("server starts");
    if has_tracker {
        handle.wait_for(SOON, |s| s.registered).await.expect("server registers");
    }
    handle
}

async fn client(tracker: &TrackerHandle) -> TrackerClient {
    TrackerClient::connect(&tracker.addr().to_string()).await.expect("tracker client")
}

fn opts(session_timeout: Option<Duration>) -> RequestOptions {
    RequestOptions::new(1, session_timeout)
}

/// The seed's scenario: a session leased inside a helper and dropped there.
async fn lease_and_forget(tc: &mut TrackerClient) -> String {
    let mut sess = tc.request("cpu", 1, Some(Duration::from_secs(20))).await.unwrap();
    sess.upload_bytes(b"x", "a.bin").await.unwrap();
    sess.workdir().to_owned()
    // `sess` dropped here without close().
}

#[tokio::test]
async fn dropped_session_frees_the_device_at_once() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c.session_timeout(Duration::from_secs(20))).await;
    let mut tc = client(&t).await;
    let workdir = lease_and_forget(&mut tc).await;
    let start = Instant::now();
    let mut again = tc.request("cpu", 1, Some(Duration::from_secs(20))).await.unwrap();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "second lease took {elapsed:?}");
    assert!(!Path::new(&workdir).exists(), "the dropped session's dir {workdir} was removed");
    again.close().await.unwrap();

    // Same with an explicit close(), which is idempotent.
    let mut sess = tc.request("cpu", 1, Some(Duration::from_secs(20))).await.unwrap();
    let workdir = sess.workdir().to_owned();
    sess.close().await.unwrap();
    assert!(!Path::new(&workdir).exists(), "close() returns after the dir is removed");
    sess.close().await.unwrap();
    assert!(matches!(sess.listdir("").await, Err(SessionError::Closed)));
    let start = Instant::now();
    tc.request("cpu", 1, None).await.unwrap().close().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "lease after close took {:?}",
        start.elapsed()
    );
    s.wait_for(SOON, |st| st.sessions == 4).await.expect("four sessions served");
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn files_round_trip_and_stay_inside_the_session_dir() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let mut sess = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
    assert_eq!(sess.server_key(), "dev");
    let big: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 253) as u8).collect();
    sess.upload_bytes(&big, "nested/dir/big.bin").await.unwrap();
    sess.upload_bytes(b"", "empty").await.unwrap();
    let local = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(local.path(), b"from a file").unwrap();
    sess.upload(local.path(), "file.txt").await.unwrap();
    assert_eq!(sess.download("nested/dir/big.bin").await.unwrap(), big);
    assert_eq!(sess.download("file.txt").await.unwrap(), b"from a file");
    assert_eq!(sess.download("empty").await.unwrap(), b"");
    let names: Vec<_> =
        sess.listdir("").await.unwrap().into_iter().map(|e| (e.name, e.is_dir)).collect();
    assert_eq!(
        names,
        vec![("empty".into(), false), ("file.txt".into(), false), ("nested".into(), true)]
    );
    let nested = sess.listdir("nested/dir").await.unwrap();
    assert_eq!((nested[0].name.as_str(), nested[0].size), ("big.bin", 5 << 20));

    // The worker runs in the session dir and sees the uploads.
    let info = sess.call(WorkerInfo, None).await.unwrap();
    assert_eq!(Path::new(&info.cwd), Path::new(sess.workdir()));
    assert_eq!(
        sess.call(ReadFile("file.txt".into()), None).await.unwrap().as_slice(),
        b"from a file"
    );

    for bad in ["../escape", "/etc/passwd", "a/../../b", ""] {
        match sess.upload_bytes(b"x", bad).await {
            Err(SessionError::BadPath { path, .. }) => assert_eq!(path, bad),
            other => panic!("upload to {bad:?}: {other:?}"),
        }
    }
    match sess.download("../../etc/passwd").await {
        Err(SessionError::BadPath { reason, .. }) => assert!(reason.contains(".."), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(sess.listdir("/").await, Err(SessionError::BadPath { .. })));
    assert!(matches!(sess.download("missing").await, Err(SessionError::NotFound { .. })));

    sess.remove("nested").await.unwrap();
    sess.remove("file.txt").await.unwrap();
    assert!(matches!(sess.remove("file.txt").await, Err(SessionError::NotFound { .. })));
    let names: Vec<_> = sess.listdir("").await.unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["empty".to_owned()]);
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

/// A session's dir is gone when `close` returns, whether it is small (removed
/// on the runtime's thread when the work root is in memory) or not (a
/// subdir, many files, many bytes: on a blocking thread), on tmpfs (the
/// default root) and on disk.
#[tokio::test]
async fn session_dirs_are_gone_at_close_small_or_large_in_memory_or_on_disk() {
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for root in [None, Some(disk.path().to_path_buf())] {
        let s = server(None, "dev", |c| match &root {
            Some(r) => c.work_root(r),
            None => c,
        })
        .await;
        let addr = s.addr().to_string();
        type Fill = fn(&mut Session) -> futures::future::BoxFuture<'_, ()>;
        let fills: [(&str, Fill); 4] = [
            ("one small file", |s| Box::pin(async { s.upload_bytes(b"k", "k.so").await.unwrap() })),
            ("a subdir", |s| Box::pin(async { s.upload_bytes(b"k", "d/k.so").await.unwrap() })),
            ("many files", |s| {
                Box::pin(async {
                    for i in 0..40 {
                        s.upload_bytes(b"k", &format!("f{i}")).await.unwrap();
                    }
                })
            }),
            ("many bytes", |s| {
                Box::pin(async { s.upload_bytes(&vec![7u8; 5 << 20], "big").await.unwrap() })
            }),
        ];
        for (what, fill) in fills {
            let mut sess =
                Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
            let dir = std::path::PathBuf::from(sess.workdir());
            if let Some(r) = &root {
                assert!(
                    dir.starts_with(r),
                    "{what}: {} is not under {}",
                    dir.display(),
                    r.display()
                );
            }
            fill(&mut sess).await;
            assert!(dir.exists(), "{what}");
            sess.close().await.unwrap();
            assert!(!dir.exists(), "{what} ({root:?}): {} is left after close", dir.display());
        }
        s.shutdown().await.unwrap();
    }
    assert_eq!(std::fs::read_dir(disk.path()).unwrap().count(), 0, "nothing left in the root");
}

#[tokio::test]
async fn upload_over_the_limit_is_refused() {
    let s = server(None, "dev", |c| c.max_upload_bytes(1000)).await;
    let addr = s.addr().to_string();
    let mut sess = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
    match sess.upload_bytes(&[0u8; 1001], "big").await {
        Err(SessionError::UploadTooLarge { len, limit }) => assert_eq!((len, limit), (1001, 1000)),
        other => panic!("{other:?}"),
    }
    sess.upload_bytes(&[0u8; 1000], "fits").await.unwrap();
    assert_eq!(sess.listdir("").await.unwrap().len(), 1);
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_upload_onto_a_directory_fails_clearly_small_or_large_and_the_session_goes_on() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let mut sess = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
    sess.upload_bytes(b"x", "d/inner").await.unwrap();
    // A small upload is written at its end, a large one streamed: both
    // report the path and the OS error.
    for len in [10usize, 3 << 20] {
        let err = sess.upload_bytes(&vec![7u8; len], "d").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"d\"") && text.to_lowercase().contains("directory"),
            "{len}: {text}"
        );
    }
    sess.upload_bytes(&vec![1u8; 3 << 20], "large").await.unwrap();
    sess.upload_bytes(b"small", "small").await.unwrap();
    let mut names: Vec<_> = sess.listdir("").await.unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["d", "large", "small"]);
    assert_eq!(sess.download("small").await.unwrap(), b"small");
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crashing_kernel_fails_the_call_not_the_server() {
    let s = server(None, "dev", |c| c).await;
    let addr = s.addr().to_string();
    let mut sess = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
    assert_eq!(sess.call(Count, None).await.unwrap(), 1);
    assert_eq!(sess.call(Count, None).await.unwrap(), 2, "the worker keeps state across calls");
    let err = sess.call(Segfault, None).await.unwrap_err();
    assert!(
        matches!(&err, SessionError::Task(PoolError::WorkerDied { exit: ExitInfo::Signal(11) })),
        "{err:?}"
    );
    assert!(err.to_string().contains("worker died (SIGSEGV)"), "{err}");
    // The session goes on with a fresh worker.
    assert_eq!(sess.call(Count, None).await.unwrap(), 1);
    let err = sess.call(SleepMs(10_000), Some(Duration::from_millis(100))).await.unwrap_err();
    assert!(matches!(err, SessionError::Task(PoolError::Timeout { .. })), "{err:?}");
    assert_eq!(
        sess.call(Echo(b"still here".to_vec()), None).await.unwrap().as_slice(),
        b"still here"
    );
    sess.close().await.unwrap();
    // And the next session works.
    let mut next = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
    assert_eq!(next.call(Count, None).await.unwrap(), 1);
    next.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn session_timeout_is_enforced_by_the_server() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let mut tc = client(&t).await;
    let mut sess = tc.request_with("cpu", &opts(Some(Duration::from_millis(700)))).await.unwrap();
    assert_eq!(sess.session_timeout(), Some(Duration::from_millis(700)));
    let workdir = sess.workdir().to_owned();
    let start = Instant::now();
    let err = sess.call(SleepMs(60_000), None).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10), "timed out after {:?}", start.elapsed());
    match &err {
        SessionError::SessionTimeout { limit } => assert_eq!(*limit, Duration::from_millis(700)),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(!Path::new(&workdir).exists());
    assert!(sess.close().await.is_err(), "close reports the session was already gone");
    assert!(sess.close().await.is_ok(), "and is idempotent");
    // The device is free again.
    let start = Instant::now();
    tc.request("cpu", 1, None).await.unwrap().close().await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_match_key_and_wrong_token_are_refused() {
    let s = server(None, "dev", |c| c.token("s3cret")).await;
    let addr = s.addr().to_string();
    let with_token = |t: &str| ConnectOptions::default().token(Some(t.to_owned()));
    match Session::connect(&addr, "dev", &ConnectOptions::default()).await {
        Err(SessionError::Unauthorized) => {}
        other => panic!("no token: {other:?}"),
    }
    assert!(matches!(
        Session::connect(&addr, "dev", &with_token("guess")).await,
        Err(SessionError::Unauthorized)
    ));
    match Session::connect(&addr, "other", &with_token("s3cret")).await {
        Err(SessionError::KeyMismatch { matchkey }) => assert_eq!(matchkey, "other"),
        other => panic!("wrong key: {other:?}"),
    }
    let mut ok = Session::connect(&addr, "dev", &with_token("s3cret")).await.unwrap();
    // One session at a time.
    assert!(matches!(
        Session::connect(&addr, "dev", &with_token("s3cret")).await,
        Err(SessionError::Busy)
    ));
    ok.close().await.unwrap();
    Session::connect(&addr, "dev", &with_token("s3cret")).await.unwrap().close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_and_run_always_closes() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let mut tc = client(&t).await;
    let dir = tc
        .request_and_run("cpu", &opts(None), async |sess| {
            sess.upload_bytes(b"1", "x").await?;
            Ok(sess.workdir().to_owned())
        })
        .await
        .unwrap();
    assert!(!Path::new(&dir).exists());
    let err = tc
        .request_and_run("cpu", &opts(None), async |sess| -> Result<(), SessionError> {
            sess.download("missing").await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotFound { .. }), "{err:?}");
    s.wait_for(SOON, |st| st.sessions == 2 && st.registered && !st.busy).await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn priority_decides_who_gets_the_busy_device_next() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let mut holder = client(&t).await;
    let sess = holder.request("cpu", 1, None).await.unwrap();
    let addr = t.addr().to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for (name, priority) in [("low", 1), ("high", 10)] {
        let mut c = TrackerClient::connect(&addr).await.unwrap();
        let tx = tx.clone();
        waiters.push(tokio::spawn(async move {
            let sess = c.request("cpu", priority, None).await.unwrap();
            tx.send(name).unwrap();
            drop(sess);
        }));
        // The low request is queued first.
        let mut probe = TrackerClient::connect(&addr).await.unwrap();
        let deadline = Instant::now() + SOON;
        while probe.summary().await.unwrap().queue_info.get("cpu").map_or(0, |q| q.pending)
            < waiters.len()
        {
            assert!(Instant::now() < deadline, "request never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(sess);
    assert_eq!(rx.recv().await, Some("high"));
    assert_eq!(rx.recv().await, Some("low"));
    for w in waiters {
        w.await.unwrap();
    }
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn server_restarts_and_tracker_restarts_are_survived() {
    let t = tracker().await;
    let tracker_addr = t.addr();
    let s = server(Some(&t), "cpu", |c| c.tracker_poll(Duration::from_millis(100))).await;
    // The tracker goes away and comes back on the same port.
    t.shutdown().await.unwrap();
    s.wait_for(SOON, |st| !st.registered).await.expect("server notices the tracker is gone");
    let t2 = Tracker::start(&tracker_addr.to_string(), TrackerConfig::default()).await.unwrap();
    s.wait_for(SOON, |st| st.registered).await.expect("server re-registers");
    let mut tc = client(&t2).await;
    tc.request("cpu", 1, None).await.unwrap().close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lease_nobody_uses_is_given_back() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| {
        c.tracker_poll(Duration::from_millis(50))
            .unused_lease_timeout(Duration::from_millis(300))
            .custom_addr("127.0.0.1")
    })
    .await;
    let first_key = s.status().borrow().matchkey.clone();
    let mut tc = client(&t).await;
    // A client leases the device and never connects (it crashed, say).
    let lease = tc.request_lease("cpu", 1).await.unwrap();
    assert_eq!(lease.matchkey, first_key);
    assert_eq!(lease.host, "127.0.0.1", "the custom address is what the tracker hands out");
    // The server notices and registers a fresh key; the device is leasable again.
    let start = Instant::now();
    let mut sess = tc.request("cpu", 1, None).await.unwrap();
    assert!(start.elapsed() < SOON);
    assert_ne!(s.status().borrow().matchkey, first_key);
    // The stale key is refused.
    let stale =
        Session::connect(&s.addr().to_string(), &first_key, &ConnectOptions::default()).await;
    assert!(
        matches!(stale, Err(SessionError::KeyMismatch { .. }) | Err(SessionError::Busy)),
        "{stale:?}"
    );
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}
