//! The tracker over real sockets: protocol, matching rules, bad input, scale,
//! text summary.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rpc_runner::tracker::{
    Lease, MAX_FRAME, ReconnectPolicy, TRACKER_MAGIC, Tracker, TrackerClient, TrackerConfig,
    TrackerError, TrackerLink,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::common::{
    LIMIT, RawConn, STOP_KEY, addr_of, eventually, queue, start_tracker, wait_pending, within,
};

async fn client(addr: &str) -> TrackerClient {
    within("client connect", TrackerClient::connect(addr)).await.expect("client connect")
}

async fn link(addr: &str) -> TrackerLink {
    within("link connect", TrackerLink::connect(addr)).await.expect("link connect")
}

/// Requests a lease of `key` on its own connection; reports `(name, lease)`.
fn spawn_request(
    addr: &str,
    key: &'static str,
    priority: i32,
    name: &'static str,
    done: mpsc::UnboundedSender<(&'static str, Lease)>,
) -> JoinHandle<()> {
    let addr = addr.to_owned();
    tokio::spawn(async move {
        let mut c = TrackerClient::connect(&addr).await.expect("connect");
        let lease = c.request_lease(key, priority).await.expect("lease");
        let _ = done.send((name, lease));
    })
}

async fn next_done(
    rx: &mut mpsc::UnboundedReceiver<(&'static str, Lease)>,
) -> (&'static str, Lease) {
    within("a lease", rx.recv()).await.expect("sender alive")
}

#[tokio::test]
async fn handshake_echoes_magic_and_ping_works() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([1])).await;
    assert_eq!(raw.recv_json().await, json!(0));
    let mut c = client(&addr).await;
    c.ping().await.unwrap();
    c.ping().await.unwrap();
    tracker.shutdown().await.unwrap();
}

#[tokio::test]
async fn put_then_request_gives_peer_ip_or_custom_addr() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut server = link(&addr).await;
    server.put("cpu", 9090, "cpu:0.1", None).await.unwrap();
    server.put("cpu", 9091, "cpu:0.2", Some("10.1.2.3")).await.unwrap();
    let mut c = client(&addr).await;
    let lease = within("lease", c.request_lease("cpu", 1)).await.unwrap();
    assert_eq!(lease, Lease { host: "127.0.0.1".into(), port: 9090, matchkey: "cpu:0.1".into() });
    let lease = within("lease", c.request_lease("cpu", 1)).await.unwrap();
    assert_eq!(lease, Lease { host: "10.1.2.3".into(), port: 9091, matchkey: "cpu:0.2".into() });

    // The raw reply is TVM's `[0, [host, port, matchkey]]`.
    server.put("cpu", 7, "cpu:0.3", None).await.unwrap();
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([4, "cpu", "", 0])).await;
    assert_eq!(raw.recv_json().await, json!([0, ["127.0.0.1", 7, "cpu:0.3"]]));
}

#[tokio::test]
async fn request_waits_until_a_put_arrives() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _req = spawn_request(&addr, "late", 0, "r", tx);
    let mut observer = client(&addr).await;
    wait_pending(&mut observer, "late", 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "no server yet, no lease");

    let mut server = link(&addr).await;
    server.put("late", 1234, "late:0.5", None).await.unwrap();
    let (_, lease) = next_done(&mut rx).await;
    assert_eq!(lease.matchkey, "late:0.5");
    assert_eq!(queue(&mut observer, "late").await.pending, 0);
    assert_eq!(queue(&mut observer, "late").await.free, 0);
}

#[tokio::test]
async fn higher_priority_first_then_arrival_order() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = client(&addr).await;
    let mut server = link(&addr).await;

    // The only server is busy (leased).
    server.put("dev", 9000, "dev:0", None).await.unwrap();
    let busy = within("lease", observer.request_lease("dev", 0)).await.unwrap();
    assert_eq!(busy.matchkey, "dev:0");

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, (name, prio)) in [("low-a", 1), ("high-a", 5), ("low-b", 1), ("high-b", 5), ("mid", 3)]
        .into_iter()
        .enumerate()
    {
        tasks.push(spawn_request(&addr, "dev", prio, name, tx.clone()));
        wait_pending(&mut observer, "dev", i + 1).await;
    }
    let mut order = Vec::new();
    for i in 1..=5 {
        // The server comes back after each session, with a new matchkey.
        let matchkey = format!("dev:{i}");
        server.put("dev", 9000, &matchkey, None).await.unwrap();
        let (name, lease) = next_done(&mut rx).await;
        assert_eq!(lease.matchkey, matchkey);
        order.push(name);
    }
    assert_eq!(order, ["high-a", "high-b", "mid", "low-a", "low-b"]);
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn free_servers_are_leased_first_in_first_out() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut a = link(&addr).await;
    let mut b = link(&addr).await;
    a.put("k", 1, "k:1", None).await.unwrap();
    b.put("k", 2, "k:2", None).await.unwrap();
    a.put("k", 3, "k:3", None).await.unwrap();
    b.put("other", 4, "other:4", None).await.unwrap();
    let mut c = client(&addr).await;
    for want in ["k:1", "k:2", "k:3"] {
        assert_eq!(within("lease", c.request_lease("k", 0)).await.unwrap().matchkey, want);
    }
    assert_eq!(queue(&mut c, "other").await.free, 1);
}

#[tokio::test]
async fn a_closed_server_connection_is_removed() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = client(&addr).await;
    let mut gone = link(&addr).await;
    gone.update_info("k", None, 1).await.unwrap();
    gone.put("k", 1, "k:gone", None).await.unwrap();
    let summary = observer.summary().await.unwrap();
    assert_eq!(summary.server_info.len(), 1);
    assert_eq!(summary.queue_info["k"].free, 1);

    drop(gone);
    eventually("the closed server to disappear", async || {
        let s = observer.summary().await.unwrap();
        // Its key has no server, no request and no holder left: forgotten.
        s.server_info.is_empty() && !s.queue_info.contains_key("k")
    })
    .await;

    // A waiting request is not matched to the server that left...
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _req = spawn_request(&addr, "k", 0, "r", tx);
    wait_pending(&mut observer, "k", 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err());
    // ...but to the next one.
    let mut next = link(&addr).await;
    next.put("k", 2, "k:next", None).await.unwrap();
    assert_eq!(next_done(&mut rx).await.1.matchkey, "k:next");
}

#[tokio::test]
async fn a_closed_requester_loses_its_place() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = client(&addr).await;

    let mut quitter = client(&addr).await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(200), quitter.request_lease("k", 100)).await;
    assert!(gave_up.is_err(), "no server: the request times out");
    // The cancelled request closed its connection, which withdrew it.
    wait_pending(&mut observer, "k", 0).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let _req = spawn_request(&addr, "k", 0, "next", tx);
    wait_pending(&mut observer, "k", 1).await;
    let mut server = link(&addr).await;
    server.put("k", 1, "k:1", None).await.unwrap();
    assert_eq!(
        next_done(&mut rx).await,
        ("next", Lease { host: "127.0.0.1".into(), port: 1, matchkey: "k:1".into() })
    );

    // The client that gave up reconnects transparently and can lease again.
    server.put("k", 1, "k:2", None).await.unwrap();
    assert_eq!(within("lease", quitter.request_lease("k", 0)).await.unwrap().matchkey, "k:2");
}

#[tokio::test]
async fn a_lease_for_a_dropped_raw_requester_goes_back_to_the_front() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = client(&addr).await;
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([4, "k", "", 9])).await;
    wait_pending(&mut observer, "k", 1).await;
    drop(raw);
    wait_pending(&mut observer, "k", 0).await;
    let mut server = link(&addr).await;
    server.put("k", 1, "k:first", None).await.unwrap();
    server.put("k", 1, "k:second", None).await.unwrap();
    assert_eq!(within("lease", observer.request_lease("k", 0)).await.unwrap().matchkey, "k:first");
}

#[tokio::test]
async fn a_lease_for_the_requesting_connection_itself_precedes_the_put_reply() {
    // TVM writes the lease (from inside `put`) before PUT's own `0`.
    let tracker = start_tracker().await;
    let mut raw = RawConn::handshake(&addr_of(&tracker)).await;
    raw.send_json(&json!([4, "self", "", 0])).await;
    raw.send_json(&json!([3, "self", [9000, "self:1"], null])).await;
    assert_eq!(raw.recv_json().await, json!([0, ["127.0.0.1", 9000, "self:1"]]));
    assert_eq!(raw.recv_json().await, json!(0));
}

#[tokio::test]
async fn pending_matchkeys_lists_unleased_puts_of_this_connection() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut a = link(&addr).await;
    let mut b = link(&addr).await;
    assert!(a.pending_matchkeys().await.unwrap().is_empty());
    a.put("k", 1, "k:1", None).await.unwrap();
    a.put("k", 1, "k:2", None).await.unwrap();
    a.put("j", 1, "j:3", None).await.unwrap();
    assert_eq!(a.pending_matchkeys().await.unwrap(), ["k:1", "k:2", "j:3"]);
    assert!(b.pending_matchkeys().await.unwrap().is_empty());
    let mut c = client(&addr).await;
    within("lease", c.request_lease("k", 0)).await.unwrap();
    assert_eq!(a.pending_matchkeys().await.unwrap(), ["k:2", "j:3"]);
    // Raw shape: a bare JSON list.
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([7])).await;
    assert_eq!(raw.recv_json().await, json!([]));
    b.ping().await.unwrap();
}

#[tokio::test]
async fn update_info_shows_in_the_summary() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut a = link(&addr).await;
    let mut b = link(&addr).await;
    a.update_info("rasp4", None, 9090).await.unwrap();
    b.update_info("gpu", Some("10.0.0.7"), 9091).await.unwrap();
    // A client-ish key is not listed (TVM lists only keys starting with "server").
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([5, {"key": "client:x", "addr": [null, 1]}])).await;
    assert_eq!(raw.recv_json().await, json!(0));

    let mut c = client(&addr).await;
    let summary = c.summary().await.unwrap();
    let servers: Vec<_> =
        summary.server_info.iter().map(|s| (s.key.as_str(), s.addr.0.as_str(), s.addr.1)).collect();
    assert_eq!(servers, [("server:rasp4", "127.0.0.1", 9090), ("server:gpu", "10.0.0.7", 9091)]);
    assert_eq!(summary.server_info[0].device_key(), "rasp4");
    assert!(summary.queue_info.is_empty(), "info alone creates no queue");
    assert_eq!(
        summary.raw,
        json!({"queue_info": {}, "server_info": [
            {"key": "server:rasp4", "addr": ["127.0.0.1", 9090]},
            {"key": "server:gpu", "addr": ["10.0.0.7", 9091]},
        ]})
    );
    // A later UPDATE_INFO merges into the connection's info.
    a.update_info("rasp4", Some("10.9.9.9"), 9095).await.unwrap();
    let summary = c.summary().await.unwrap();
    assert_eq!(summary.server_info[0].addr, ("10.9.9.9".to_owned(), 9095));
}

#[tokio::test]
async fn stop_with_a_wrong_key_is_refused_and_the_right_key_stops() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    assert_eq!(tracker.stop_key(), STOP_KEY);
    let mut c = client(&addr).await;
    let err = c.stop("wrong").await.unwrap_err();
    assert!(matches!(err, TrackerError::Refused { request: "STOP", .. }), "{err:?}");
    c.ping().await.unwrap();
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_json(&json!([2, "also wrong"])).await;
    assert_eq!(raw.recv_json().await, json!(-1));
    raw.send_json(&json!([1])).await;
    assert_eq!(raw.recv_json().await, json!(0));

    // A waiting request (that does not reconnect) learns that the tracker went away.
    let mut waiter = client(&addr).await.with_reconnect(ReconnectPolicy::NEVER);
    let waiting = tokio::spawn(async move { waiter.request_lease("k", 0).await });
    wait_pending(&mut c, "k", 1).await;

    c.stop(STOP_KEY).await.unwrap();
    within("tracker to stop", tracker.wait()).await.unwrap();
    let err = within("waiter", waiting).await.unwrap().unwrap_err();
    let TrackerError::ConnectionLost { source, .. } = &err else { panic!("{err:?}") };
    assert!(matches!(**source, TrackerError::Closed | TrackerError::Io(_)), "{err:?}");
    assert!(raw.closed_by_tracker().await.is_empty());
    let err = TrackerClient::connect(&addr).await.unwrap_err();
    assert!(matches!(err, TrackerError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_tracker() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut c = client(&addr).await;
    within("shutdown", tracker.shutdown()).await.unwrap();
    assert!(c.ping().await.is_err());

    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    drop(tracker);
    eventually("a dropped tracker to stop listening", async || {
        TrackerClient::connect(&addr).await.is_err()
    })
    .await;
}

/// How a bad-input case ends.
enum Expect {
    /// The tracker closes the connection by itself, having sent exactly this.
    Closes(Vec<u8>),
    /// We close our writing side; the tracker then closes too.
    ClosesAfterEof,
}

/// Runs one bad-input case on its own connection, then checks that the
/// well-behaved `client` and `server` connections still work.
async fn check_case(
    addr: &str,
    name: &str,
    magic: bool,
    bytes: &[u8],
    expect: Expect,
    client: &mut TrackerClient,
    server: &mut TrackerLink,
) {
    let mut raw = if magic { RawConn::handshake(addr).await } else { RawConn::connect(addr).await };
    raw.send_bytes(bytes).await;
    match expect {
        Expect::Closes(want) => {
            let got = raw.closed_by_tracker().await;
            assert_eq!(got, want, "{name}: bytes received before the close");
        }
        Expect::ClosesAfterEof => {
            raw.shutdown_write().await;
            raw.closed_by_tracker().await;
        }
    }
    client.ping().await.unwrap_or_else(|e| panic!("{name}: client ping: {e}"));
    server.ping().await.unwrap_or_else(|e| panic!("{name}: server ping: {e}"));
    let q = queue(client, "good").await;
    assert_eq!(q.free, 1, "{name}: the good server is still registered");
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as i32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut good = client(&addr).await;
    let mut server = link(&addr).await;
    server.update_info("good", None, 1).await.unwrap();
    server.put("good", 1, "good:1", None).await.unwrap();

    // Before the handshake: nothing is echoed.
    let pre: Vec<(&str, Vec<u8>)> = vec![
        ("rpc server magic", 0xFF271i32.to_le_bytes().to_vec()),
        ("magic big-endian", TRACKER_MAGIC.to_be_bytes().to_vec()),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("json instead of magic", frame(b"[1]")),
    ];
    for (name, bytes) in pre {
        check_case(&addr, name, false, &bytes, Expect::Closes(vec![]), &mut good, &mut server)
            .await;
    }
    check_case(
        &addr,
        "truncated magic",
        false,
        &[0x71, 0xf2],
        Expect::ClosesAfterEof,
        &mut good,
        &mut server,
    )
    .await;

    // After the handshake: bad lengths and bodies.
    let mut after: Vec<(String, Vec<u8>)> = vec![
        ("zero length".into(), 0i32.to_le_bytes().to_vec()),
        ("negative length".into(), (-5i32).to_le_bytes().to_vec()),
        ("i32::MIN length".into(), i32::MIN.to_le_bytes().to_vec()),
        ("length over 1 MiB".into(), (MAX_FRAME as i32 + 1).to_le_bytes().to_vec()),
        ("i32::MAX length".into(), i32::MAX.to_le_bytes().to_vec()),
        ("invalid utf-8".into(), frame(b"[\"\xc3\x28\"]")),
        ("invalid json".into(), frame(b"[1, ")),
        ("trailing garbage".into(), frame(b"[1] x")),
    ];
    let ill_typed = [
        json!(null),
        json!({"code": 1}),
        json!("PING"),
        json!([]),
        json!(["1"]),
        json!([1.5]),
        json!([true]),
        json!([2]),
        json!([2, 42]),
        json!([3, "k"]),
        json!([3, 7, [1, "m"], null]),
        json!([3, "k", [1], null]),
        json!([3, "k", ["1", "m"], null]),
        json!([3, "k", [-1, "m"], null]),
        json!([3, "k", [1, 2], null]),
        json!([3, "k", [1, "m"], 12]),
        json!([3, "k", {"port": 1}, null]),
        json!([4, "k", ""]),
        json!([4, ["k"], "", 1]),
        json!([4, "k", 0, 1]),
        json!([4, "k", "", "1"]),
        json!([4, "k", "", 1.5]),
        json!([5]),
        json!([5, "info"]),
        json!([5, {"key": "server:k"}]),
        json!([5, {"key": "server:k", "addr": "1.2.3.4"}]),
        json!([5, {"key": "server:k", "addr": [7, 1]}]),
        json!([5, {"key": "server:k", "addr": [null, "1"]}]),
        json!([5, {"key": 1, "addr": [null, 1]}]),
    ];
    for value in ill_typed {
        after.push((format!("ill-typed {value}"), frame(value.to_string().as_bytes())));
    }
    for code in [-1, 0, 8, 99, -7] {
        after.push((format!("unknown code {code}"), frame(format!("[{code}]").as_bytes())));
    }
    for (name, bytes) in &after {
        check_case(&addr, name, true, bytes, Expect::Closes(vec![]), &mut good, &mut server).await;
    }

    // Replies already due are sent before the close.
    let mut bytes = frame(b"[1]");
    bytes.extend(frame(b"[42]"));
    check_case(
        &addr,
        "ping then junk",
        true,
        &bytes,
        Expect::Closes(frame(b"0")),
        &mut good,
        &mut server,
    )
    .await;

    // A truncated frame: the tracker waits for the rest (as TVM does)...
    let mut raw = RawConn::handshake(&addr).await;
    raw.send_bytes(&[10, 0, 0, 0, b'[', b'1']).await;
    raw.assert_quiet(Duration::from_millis(100)).await;
    drop(raw);
    // ...and closes at the end of the stream.
    for (name, bytes) in
        [("truncated body", vec![10u8, 0, 0, 0, b'[']), ("truncated length", vec![3u8, 0])]
    {
        check_case(&addr, name, true, &bytes, Expect::ClosesAfterEof, &mut good, &mut server).await;
    }

    // Random bytes, before and after the handshake.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x2F271);
    for i in 0..30 {
        let len = rng.random_range(1..300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let name = format!("random bytes #{i}");
        check_case(
            &addr,
            &name,
            i % 2 == 0,
            &bytes,
            Expect::ClosesAfterEof,
            &mut good,
            &mut server,
        )
        .await;
    }

    // The tracker's state survived all of it.
    let lease = within("lease", good.request_lease("good", 0)).await.unwrap();
    assert_eq!(lease.matchkey, "good:1");
    let summary = good.summary().await.unwrap();
    assert_eq!(summary.server_info.len(), 1);
}

#[tokio::test]
async fn a_connection_that_never_sends_its_magic_is_closed_after_the_handshake_timeout() {
    let config =
        TrackerConfig::default().stop_key(STOP_KEY).handshake_timeout(Duration::from_millis(200));
    let tracker = Tracker::start("127.0.0.1:0", config).await.unwrap();
    let addr = addr_of(&tracker);
    let silent = RawConn::connect(&addr).await;
    // Others are served meanwhile.
    let mut c = client(&addr).await;
    c.ping().await.unwrap();
    let started = Instant::now();
    assert!(silent.closed_by_tracker().await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_servers_and_thousand_waiting_requests() {
    const N: usize = 1000;
    const LINKS: usize = 4;
    let started = Instant::now();
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut observer = client(&addr).await;

    // 1,000 requests wait (one connection each, as TVM clients do).
    let mut requests = Vec::with_capacity(N);
    for _ in 0..N {
        let addr = addr.clone();
        requests.push(tokio::spawn(async move {
            let mut c = TrackerClient::connect(&addr).await.expect("connect");
            c.request_lease("scale", 0).await.expect("lease")
        }));
    }
    wait_pending(&mut observer, "scale", N).await;
    let waited = started.elapsed();

    // 1,000 servers arrive on a few connections; every request gets one.
    let mut links = Vec::new();
    for _ in 0..LINKS {
        links.push(link(&addr).await);
    }
    let mut put = BTreeSet::new();
    for i in 0..N {
        let matchkey = format!("scale:{i}");
        links[i % LINKS].put("scale", 9000 + (i % LINKS) as u16, &matchkey, None).await.unwrap();
        put.insert(matchkey);
    }
    let mut leased = BTreeSet::new();
    for r in requests {
        let lease = within("lease", r).await.unwrap();
        assert!(leased.insert(lease.matchkey), "a server leased twice");
    }
    assert_eq!(leased, put);
    assert_eq!(
        queue(&mut observer, "scale").await,
        rpc_runner::tracker::QueueInfo { free: 0, pending: 0 }
    );
    let phase1 = started.elapsed();

    // 1,000 servers registered first, then 1,000 requests.
    for (i, l) in links.iter_mut().enumerate() {
        l.update_info("scale2", None, 9000 + i as u16).await.unwrap();
    }
    let mut put = BTreeSet::new();
    for i in 0..N {
        let matchkey = format!("scale2:{i}");
        links[i % LINKS].put("scale2", 9000 + (i % LINKS) as u16, &matchkey, None).await.unwrap();
        put.insert(matchkey);
    }
    let summary = observer.summary().await.unwrap();
    assert_eq!(summary.queue_info["scale2"].free, N);
    assert_eq!(summary.server_info.len(), LINKS);
    let mut requests = Vec::with_capacity(N);
    for _ in 0..N {
        let addr = addr.clone();
        requests.push(tokio::spawn(async move {
            let mut c = TrackerClient::connect(&addr).await.expect("connect");
            c.request_lease("scale2", 0).await.expect("lease")
        }));
    }
    let mut leased = BTreeSet::new();
    for r in requests {
        let lease = within("lease", r).await.unwrap();
        assert_eq!(lease.host, "127.0.0.1");
        assert!(leased.insert(lease.matchkey), "a server leased twice");
    }
    assert_eq!(leased, put);
    let mut pending_total = 0;
    for l in &mut links {
        pending_total += l.pending_matchkeys().await.unwrap().len();
    }
    assert_eq!(pending_total, 0);
    let total = started.elapsed();
    eprintln!("scale: {N} waiting after {waited:?}, matched by {phase1:?}, both phases {total:?}");
    assert!(total < LIMIT, "scale test took {total:?}");
}

#[tokio::test]
async fn text_summary_has_tvms_layout() {
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let mut rasp_a = link(&addr).await;
    rasp_a.update_info("rasp4", None, 9090).await.unwrap();
    rasp_a.put("rasp4", 9090, "rasp4:0.1", None).await.unwrap();
    let mut gpu = link(&addr).await;
    gpu.update_info("gpu-a100", Some("10.0.0.7"), 9091).await.unwrap();
    let mut rasp_b = link(&addr).await;
    rasp_b.update_info("rasp4", Some("192.168.100.200"), 65535).await.unwrap();
    rasp_b.put("rasp4", 65535, "rasp4:0.2", Some("192.168.100.200")).await.unwrap();

    let mut c = client(&addr).await;
    // A key requested and given up is forgotten (TVM would keep it, with
    // nothing to show: its row is omitted from the text either way).
    assert!(
        tokio::time::timeout(Duration::from_millis(50), c.request_lease("idle", 0)).await.is_err()
    );
    // One request waits for the busy GPU.
    let (tx, _rx) = mpsc::unbounded_channel();
    let _req = spawn_request(&addr, "gpu-a100", 0, "gpu", tx);
    wait_pending(&mut c, "gpu-a100", 1).await;
    wait_pending(&mut c, "idle", 0).await;

    let want = "\
Server List
------------------------------
server-address           key
------------------------------
10.0.0.7:9091            server:gpu-a100
127.0.0.1:9090           server:rasp4
192.168.100.200:65535    server:rasp4
------------------------------

Queue Status
--------------------------------
key        total  free  pending
--------------------------------
gpu-a100   1      0     1      \n\
rasp4      2      2     0      \n\
--------------------------------
";
    assert_eq!(c.text_summary().await.unwrap(), want);
    assert_eq!(c.summary().await.unwrap().to_text(), want);
    assert!(!c.summary().await.unwrap().queue_info.contains_key("idle"));
}

#[tokio::test]
async fn clients_report_a_peer_that_is_not_a_tracker() {
    // A listener that answers the magic with something else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut buf = [0u8; 4];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.write_all(&0xFF273i32.to_le_bytes()).await;
        }
    });
    let err = TrackerClient::connect(&addr).await.unwrap_err();
    assert!(matches!(err, TrackerError::BadMagic { got: 0xFF273 }), "{err:?}");
    let err = TrackerLink::connect(&addr).await.unwrap_err();
    assert!(matches!(err, TrackerError::BadMagic { .. }), "{err:?}");
    let err = TrackerClient::connect(&format!("127.0.0.1:{}", crate::common::free_port()))
        .await
        .unwrap_err();
    assert!(matches!(err, TrackerError::Connect { .. }), "{err:?}");
}
