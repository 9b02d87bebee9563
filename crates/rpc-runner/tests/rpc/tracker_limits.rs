//! The tracker's bounds over real sockets: the connection limit, what one
//! peer may make the tracker hold (info size and depth, keys), replies
//! larger than a request frame, and the client's reconnects after a
//! tracker restart.

use std::time::Duration;

use rpc_runner::tracker::{
    MAX_FRAME, ReconnectPolicy, TRACKER_AT_CAPACITY, Tracker, TrackerClient, TrackerConfig,
    TrackerError, TrackerHandle, TrackerLink,
};
use rpc_runner::{RequestOptions, SessionError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    RawConn, STOP_KEY, addr_of, eventually, queue, start_tracker, wait_pending, within,
};

async fn start_with(config: TrackerConfig) -> TrackerHandle {
    let config = config.stop_key(STOP_KEY);
    Tracker::start("127.0.0.1:0", config).await.expect("start tracker")
}

/// Open file descriptors of this process (nextest runs each test in its
/// own process, so the count is this test's).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn under_nextest() -> bool {
    std::env::var_os("NEXTEST_RUN_ID").is_some()
}

/// A `[0, {...}]` SUMMARY reply with `n` distinct keys of 24 bytes each:
/// 1.4 MB for 30,000 keys, what TVM's tracker sends after that many keys
/// were requested once.
fn big_summary(n: usize) -> Value {
    let queue_info: serde_json::Map<String, Value> =
        (0..n).map(|i| (format!("device-key-{i:013}"), json!({"free": 0, "pending": 0}))).collect();
    json!([0, {"queue_info": queue_info, "server_info": []}])
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_a_typed_error() {
    let fds_before = open_fds();
    let tracker = start_with(TrackerConfig::default().max_connections(3)).await;
    let addr = addr_of(&tracker);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(within("link", TrackerLink::connect(&addr)).await.unwrap());
    }

    let err = within("refused connect", TrackerClient::connect(&addr)).await.unwrap_err();
    assert!(matches!(err, TrackerError::AtCapacity { limit: Some(3) }), "{err:?}");
    assert_eq!(err.to_string(), "tracker refused the connection: at its connection limit (3)");
    // On the wire: the refusal code and the limit instead of the echo, then the close.
    let mut raw = RawConn::connect(&addr).await;
    raw.send_bytes(&rpc_runner::tracker::TRACKER_MAGIC.to_le_bytes()).await;
    let mut want = TRACKER_AT_CAPACITY.to_le_bytes().to_vec();
    want.extend_from_slice(&3i32.to_le_bytes());
    assert_eq!(raw.closed_by_tracker().await, want);

    // The connections served are unaffected; a freed slot is usable again.
    for link in &mut held {
        link.ping().await.unwrap();
    }
    held.pop();
    let mut client = None;
    eventually("a slot to free up", async || {
        client = TrackerClient::connect(&addr).await.ok();
        client.is_some()
    })
    .await;
    let mut client = client.unwrap();
    client.ping().await.unwrap();

    // Many refusals at once leave nothing behind.
    let mut refused = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        refused.push(tokio::spawn(async move { TrackerClient::connect(&addr).await }));
    }
    for r in refused {
        let res = within("refusal", r).await.unwrap();
        assert!(res.is_err(), "over the limit");
    }
    drop((held, client));
    within("shutdown", tracker.shutdown()).await.unwrap();
    if under_nextest() {
        eventually("the tracker's sockets to close", async || open_fds() <= fds_before).await;
    }
}

#[tokio::test]
async fn big_infos_are_refused_and_the_summary_keeps_working() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    let mut open = Vec::new();
    // Two 600 KB infos: each fits a request frame, both together would not
    // fit a 1 MiB summary.
    for i in 0..2 {
        let mut raw = RawConn::handshake(&addr).await;
        let pad = "p".repeat(600_000);
        raw.send_json(
            &json!([5, {"key": format!("server:big{i}"), "addr": [null, 1], "pad": pad}]),
        )
        .await;
        let reply = raw.recv_json().await;
        assert_eq!(reply[0], json!(-1), "refused");
        assert!(reply[1].as_str().unwrap().contains("exceeds the limit of 4096"), "{reply}");
        // The connection goes on.
        raw.send_json(&json!([1])).await;
        assert_eq!(raw.recv_json().await, json!(0));
        open.push(raw); // the connection stays open for the rest of the test
    }
    let summary = within("summary", observer.summary()).await.unwrap();
    assert!(summary.server_info.is_empty());

    // Our link reports the refusal as a typed error, and stays usable.
    let mut link = TrackerLink::connect(&addr).await.unwrap();
    link.update_info("small", None, 9).await.unwrap();
    let summary = within("summary", observer.summary()).await.unwrap();
    assert_eq!(summary.server_info.len(), 1);
    within("text summary", observer.text_summary()).await.unwrap();
}

#[tokio::test]
async fn an_info_nested_too_deep_is_refused_and_the_connection_goes_on() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    let mut raw = RawConn::handshake(&addr).await;
    // 125 deep is accepted by TVM's tracker, and then breaks every client's
    // summary; 200 deep is beyond serde_json's own recursion limit.
    for depth in [125usize, 200, 100_000] {
        let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let body =
            format!(r#"[5, {{"key": "server:deep", "addr": [null, 1], "nested": {nested}}}]"#);
        let mut frame = (body.len() as i32).to_le_bytes().to_vec();
        frame.extend_from_slice(body.as_bytes());
        raw.send_bytes(&frame).await;
        let reply = raw.recv_json().await;
        assert_eq!(reply[0], json!(-1), "depth {depth}: {reply}");
        assert!(reply[1].as_str().unwrap().contains("deeper than 33 levels"), "{reply}");
        raw.send_json(&json!([1])).await;
        assert_eq!(raw.recv_json().await, json!(0), "the connection goes on");
    }
    // Brackets inside strings do not count.
    let deep_string = "[".repeat(1000);
    raw.send_json(&json!([5, {"key": "server:ok", "addr": [null, 1], "s": deep_string}])).await;
    assert_eq!(raw.recv_json().await, json!(0));
    let summary = within("summary", observer.summary()).await.unwrap();
    assert_eq!(summary.server_info.len(), 1);
    assert_eq!(summary.server_info[0].key, "server:ok");
}

#[tokio::test]
async fn keys_requested_once_are_forgotten_and_new_keys_are_bounded() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    // 30,000 distinct keys, requested once each then given up (100 per
    // connection): before, they stayed in every summary forever (1.4 MB).
    for c in 0..300 {
        let mut raw = RawConn::handshake(&addr).await;
        let mut bytes = Vec::new();
        for i in 0..100 {
            let body = json!([4, format!("device-key-{:013}", c * 100 + i), "", 0]).to_string();
            bytes.extend_from_slice(&(body.len() as i32).to_le_bytes());
            bytes.extend_from_slice(body.as_bytes());
        }
        // A PING after them (in the same write: no Nagle delay): once it is
        // answered, the requests were handled.
        bytes.extend_from_slice(&[3, 0, 0, 0, b'[', b'1', b']']);
        raw.send_bytes(&bytes).await;
        assert_eq!(raw.recv_json().await, json!(0));
    }
    eventually("every given-up key to be forgotten", async || {
        observer.summary().await.is_ok_and(|s| s.queue_info.is_empty())
    })
    .await;

    // A tracker with few keys refuses a new one, typed, and serves on.
    let small = start_with(TrackerConfig::default().max_keys(2)).await;
    let small_addr = addr_of(&small);
    let mut raw = RawConn::handshake(&small_addr).await;
    raw.send_json(&json!([4, "a", "", 0])).await;
    raw.send_json(&json!([4, "b", "", 0])).await;
    raw.send_json(&json!([4, "c", "", 0])).await;
    let reply = raw.recv_json().await;
    assert_eq!(reply[0], json!(-1), "{reply}");
    assert!(reply[1].as_str().unwrap().contains("2 device keys"), "{reply}");
    let mut client = TrackerClient::connect(&small_addr).await.unwrap();
    let err = within("refused request", client.request_lease("d", 0)).await.unwrap_err();
    assert!(matches!(err, TrackerError::Refused { request: "REQUEST", .. }), "{err:?}");
    assert!(err.to_string().contains("device keys"), "{err}");
    wait_pending(&mut client, "a", 1).await;
    // A known key is still served.
    let mut link = TrackerLink::connect(&small_addr).await.unwrap();
    link.put("a", 1, "a:1", None).await.unwrap();
    assert_eq!(raw.recv_json().await, json!([0, ["127.0.0.1", 1, "a:1"]]));
}

#[tokio::test]
async fn the_client_reads_a_summary_larger_than_a_request_frame() {
    // A stand-in for TVM's tracker, which caps only what it receives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let reply = big_summary(30_000).to_string();
    assert!(reply.len() > MAX_FRAME, "{} bytes", reply.len());
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        loop {
            let Ok(len) = s.read_i32_le().await else { return };
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).await.unwrap();
            s.write_all(&(reply.len() as i32).to_le_bytes()).await.unwrap();
            s.write_all(reply.as_bytes()).await.unwrap();
        }
    });
    let mut client = TrackerClient::connect(&addr).await.unwrap();
    let summary = within("big summary", client.summary()).await.unwrap();
    assert_eq!(summary.queue_info.len(), 30_000);
    let text = within("big text summary", client.text_summary()).await.unwrap();
    assert!(text.starts_with("Server List"));
    drop(client);
    within("fake tracker", fake).await.unwrap();
}

/// A policy quick enough for tests.
fn quick(max_reconnects: u32) -> ReconnectPolicy {
    ReconnectPolicy {
        max_reconnects,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    }
}

/// Starts a tracker on exactly `addr` (the old one's port), retrying while
/// the port is still taken.
async fn restart_on(addr: &str) -> TrackerHandle {
    let config = TrackerConfig::default().stop_key(STOP_KEY);
    let mut started = None;
    eventually("the tracker to restart on its port", async || {
        started = Tracker::start(addr, config.clone()).await.ok();
        started.is_some()
    })
    .await;
    started.unwrap()
}

#[tokio::test]
async fn a_waiting_request_survives_a_tracker_restart() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let client = TrackerClient::connect(&addr).await.unwrap().with_reconnect(quick(50));
        waiters.push(tokio::spawn(async move {
            let mut client = client;
            client.request_lease("cpu", 1).await
        }));
    }
    wait_pending(&mut observer, "cpu", 3).await;

    within("shutdown", tracker.shutdown()).await.unwrap();
    let tracker = restart_on(&addr).await;
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    // The requests come back by themselves...
    wait_pending(&mut observer, "cpu", 3).await;
    // ...and are served by a server of the new tracker.
    let mut link = TrackerLink::connect(&addr).await.unwrap();
    for i in 0..3 {
        link.put("cpu", 9000, &format!("cpu:{i}"), None).await.unwrap();
    }
    let mut got = Vec::new();
    for w in waiters {
        got.push(within("lease after restart", w).await.unwrap().unwrap().matchkey);
    }
    got.sort();
    assert_eq!(got, ["cpu:0", "cpu:1", "cpu:2"]);
    assert_eq!(queue(&mut observer, "cpu").await.pending, 0);
    tracker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tracker_gone_for_good_fails_the_request_saying_why() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    let mut client = TrackerClient::connect(&addr).await.unwrap().with_reconnect(quick(3));
    let waiting = tokio::spawn(async move { client.request_lease("cpu", 1).await });
    let mut session_client = TrackerClient::connect(&addr).await.unwrap().with_reconnect(quick(2));
    let session = tokio::spawn(async move {
        session_client.request_with("cpu", &RequestOptions::default()).await.map(drop)
    });
    wait_pending(&mut observer, "cpu", 2).await;
    within("shutdown", tracker.shutdown()).await.unwrap();

    let err = within("the request to give up", waiting).await.unwrap().unwrap_err();
    let TrackerError::ConnectionLost { key, reconnects, source } = &err else { panic!("{err:?}") };
    assert_eq!((key.as_str(), *reconnects), ("cpu", 3));
    assert!(matches!(**source, TrackerError::Connect { .. }), "{source:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "tracker connection lost while waiting for a 'cpu' device (3 reconnects failed): cannot connect to the tracker at {addr}: "
        )),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "the os cause is in the message: {msg}");

    // Through the session API the message is the same (not "tracker error").
    let err = within("the session request to give up", session).await.unwrap().unwrap_err();
    assert!(matches!(err, SessionError::Tracker(TrackerError::ConnectionLost { .. })), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "tracker connection lost while waiting for a 'cpu' device (2 reconnects failed): cannot connect"
        ),
        "{err}"
    );

    // Reconnecting disabled: the loss itself is the cause.
    let tracker = restart_on(&addr).await;
    let mut observer = TrackerClient::connect(&addr).await.unwrap();
    let mut client =
        TrackerClient::connect(&addr).await.unwrap().with_reconnect(ReconnectPolicy::NEVER);
    let waiting = tokio::spawn(async move { client.request_lease("gpu", 1).await });
    wait_pending(&mut observer, "gpu", 1).await;
    within("shutdown", tracker.shutdown()).await.unwrap();
    let err = within("the request to fail", waiting).await.unwrap().unwrap_err();
    assert!(
        err.to_string().starts_with(
            "tracker connection lost while waiting for a 'gpu' device (0 reconnects failed): "
        ),
        "{err}"
    );
}

/// A peer that sends requests but never reads the replies is closed once a
/// reply has waited `write_timeout` for room in its socket (the timer is
/// armed only when a write pends), and its info leaves the summary.
#[tokio::test]
async fn a_peer_that_does_not_read_its_replies_is_closed_after_the_write_timeout() {
    let tracker =
        start_with(TrackerConfig::default().write_timeout(Duration::from_millis(300))).await;
    let addr = addr_of(&tracker);
    let mut raw = RawConn::handshake(&addr).await;
    let pad = "p".repeat(3900);
    raw.send_json(&json!([5, {"key": "server:stuck", "addr": [null, 1], "pad": pad}])).await;
    assert_eq!(raw.recv_json().await, json!(0));
    let mut client = within("connect", TrackerClient::connect(&addr)).await.unwrap();
    let summary = within("summary", client.summary()).await.unwrap();
    assert_eq!(summary.server_info.len(), 1, "{summary:?}");
    // 5,000 summaries of ~4 KB each (20 MB) cannot all fit in the socket
    // buffers: the tracker's writes pend while we read nothing.
    let frame = {
        let mut f = 3i32.to_le_bytes().to_vec();
        f.extend_from_slice(b"[6]");
        f.repeat(5000)
    };
    raw.send_bytes(&frame).await;
    eventually("the non-reading connection to be closed", async || {
        within("summary", client.summary()).await.unwrap().server_info.is_empty()
    })
    .await;
    assert_eq!(within("ping", client.ping()).await.unwrap(), ());
    drop(raw);
    within("shutdown", tracker.shutdown()).await.unwrap();
}
