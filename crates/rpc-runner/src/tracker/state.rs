//! The tracker's shared state and its matching rules, free of I/O.
//!
//! Per device key: free servers first in, first out; waiting requests by
//! priority (higher first), then arrival. A match hands a [`Delivery`] to the
//! requester's connection task through its channel; if that connection is
//! gone, the server goes back to the front of the free queue and the next
//! request is tried. Connection tasks return undeliverable leases with
//! [`State::requeue`].
//!
//! Everything a peer can make the state hold is bounded by [`Limits`]: the
//! number of keys, what one connection has outstanding, the size of its
//! info, the length of keys, matchkeys and addresses. A request over a limit
//! is refused (`[-1, reason]`) and changes nothing. A key is forgotten as
//! soon as it has no free server, no waiting request and no open connection
//! that put a server to it, so the summary never grows with history.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::proto::{Lease, TrackerRequest};

/// Connections are numbered in accept order; numbers are never reused.
pub(crate) type ConnId = u64;

/// The order of a waiting request: priority descending, then arrival.
type WaitKey = (Reverse<i64>, u64);

/// The longest device key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 256;
/// The longest matchkey accepted, in bytes.
pub(crate) const MAX_MATCHKEY_LEN: usize = 512;
/// The longest custom address accepted, in bytes.
pub(crate) const MAX_ADDR_LEN: usize = 256;

/// What the state accepts from peers (from [`TrackerConfig`](super::TrackerConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Device keys known at once.
    pub(crate) max_keys: usize,
    /// Free servers plus waiting requests of one connection.
    pub(crate) max_per_connection: usize,
    /// Serialized size of one connection's merged info.
    pub(crate) max_info_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_keys: 4096, max_per_connection: 1024, max_info_bytes: 4096 }
    }
}

/// A server registered with `PUT` and not leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FreeServer {
    /// The tracker connection that put it (removing it when that closes).
    pub(crate) conn: ConnId,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) matchkey: String,
}

/// A lease on its way to a requester's connection task.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) key: String,
    pub(crate) server: FreeServer,
}

impl Delivery {
    pub(crate) fn lease(&self) -> Lease {
        Lease {
            host: self.server.host.clone(),
            port: self.server.port,
            matchkey: self.server.matchkey.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct KeyQueue {
    free: VecDeque<FreeServer>,
    /// Waiting request -> the connection that sent it.
    waiting: BTreeMap<WaitKey, ConnId>,
    /// Open connections that put a server to this key (its busy servers
    /// keep the key, and so its row in the text summary, alive).
    holders: usize,
}

impl KeyQueue {
    fn is_forgettable(&self) -> bool {
        self.free.is_empty() && self.waiting.is_empty() && self.holders == 0
    }
}

#[derive(Debug)]
struct Conn {
    /// The peer's IP, as text (used for a `null` address).
    peer_host: String,
    /// Where this connection's leases are sent.
    leases: UnboundedSender<Delivery>,
    /// Keys this connection put servers to.
    put_keys: BTreeSet<String>,
    /// Matchkeys put on this connection and not leased, in put order, each once.
    pending: Vec<String>,
    /// This connection's servers in the free queues.
    free: usize,
    /// This connection's waiting requests.
    waiting: BTreeSet<(String, WaitKey)>,
    /// Merged `UPDATE_INFO` objects.
    info: Map<String, Value>,
}

/// What a request is answered with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Applied {
    /// Send this value.
    Send(Value),
    /// Nothing now (a `REQUEST`: the lease comes later).
    Later,
    /// Over a limit: send `[-1, reason]`, nothing changed.
    Refused(String),
    /// A `STOP` with the right key: send success, then stop the tracker.
    Stop,
    /// A `STOP` with a wrong key: send `-1` (TVM's bare FAIL).
    WrongStopKey,
}

/// Everything the tracker knows, behind one mutex held only briefly.
#[derive(Debug, Default)]
pub(crate) struct State {
    limits: Limits,
    /// Every key with a free server, a waiting request or an open holder.
    queues: BTreeMap<String, KeyQueue>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_request: u64,
}

impl State {
    /// An empty state enforcing `limits`.
    pub(crate) fn new(limits: Limits) -> Self {
        State { limits, ..State::default() }
    }

    /// Adds a connection whose leases go to `leases`.
    pub(crate) fn connect(
        &mut self,
        peer_host: String,
        leases: UnboundedSender<Delivery>,
    ) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                peer_host,
                leases,
                put_keys: BTreeSet::new(),
                pending: Vec::new(),
                free: 0,
                waiting: BTreeSet::new(),
                info: Map::new(),
            },
        );
        id
    }

    /// Removes a closed connection: its waiting requests, its free servers
    /// and its info. Leases already sent to it must be [`requeue`](Self::requeue)d.
    pub(crate) fn disconnect(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else { return };
        for (key, wait) in &conn.waiting {
            if let Some(q) = self.queues.get_mut(key) {
                q.waiting.remove(wait);
            }
            self.forget_if_empty(key);
        }
        for key in &conn.put_keys {
            if let Some(q) = self.queues.get_mut(key) {
                // Only a connection with free servers has any to remove.
                if conn.free > 0 {
                    q.free.retain(|s| s.conn != id);
                }
                q.holders = q.holders.saturating_sub(1);
            }
            self.forget_if_empty(key);
        }
    }

    /// Answers one request of `conn` (`stop_key` checks a `STOP`).
    pub(crate) fn apply(
        &mut self,
        conn: ConnId,
        request: TrackerRequest,
        stop_key: &str,
    ) -> Applied {
        match request {
            TrackerRequest::Ping => Applied::Send(json!(0)),
            TrackerRequest::Stop { stop_key: given } => {
                if given == stop_key {
                    Applied::Stop
                } else {
                    Applied::WrongStopKey
                }
            }
            TrackerRequest::Put { key, port, matchkey, custom_addr } => {
                match self.put(conn, &key, port, matchkey, custom_addr) {
                    Ok(()) => Applied::Send(json!(0)),
                    Err(reason) => Applied::Refused(reason),
                }
            }
            TrackerRequest::Request { key, priority, .. } => {
                match self.request(conn, &key, priority) {
                    Ok(()) => Applied::Later,
                    Err(reason) => Applied::Refused(reason),
                }
            }
            TrackerRequest::UpdateInfo { info } => match self.update_info(conn, info) {
                Ok(()) => Applied::Send(json!(0)),
                Err(reason) => Applied::Refused(reason),
            },
            TrackerRequest::Summary => Applied::Send(json!([0, self.summary()])),
            TrackerRequest::GetPendingMatchkeys => {
                Applied::Send(json!(self.pending_matchkeys(conn)))
            }
        }
    }

    /// Why `conn` may not add one more free server or waiting request for
    /// `key`, if it may not.
    fn check_new_entry(&self, conn: &Conn, key: &str) -> Result<(), String> {
        if key.len() > MAX_KEY_LEN {
            return Err(format!("key of {} bytes exceeds the limit of {MAX_KEY_LEN}", key.len()));
        }
        let outstanding = conn.free + conn.waiting.len();
        if outstanding >= self.limits.max_per_connection {
            return Err(format!(
                "this connection has {outstanding} free servers and waiting requests, the limit is {}",
                self.limits.max_per_connection
            ));
        }
        if !self.queues.contains_key(key) && self.queues.len() >= self.limits.max_keys {
            return Err(format!(
                "the tracker knows {} device keys, its limit; no new key accepted",
                self.queues.len()
            ));
        }
        Ok(())
    }

    /// `PUT`: `conn` reports a free server for `key`.
    pub(crate) fn put(
        &mut self,
        conn: ConnId,
        key: &str,
        port: u16,
        matchkey: String,
        custom_addr: Option<String>,
    ) -> Result<(), String> {
        let Some(c) = self.conns.get(&conn) else { return Ok(()) };
        self.check_new_entry(c, key)?;
        if matchkey.len() > MAX_MATCHKEY_LEN {
            return Err(format!(
                "matchkey of {} bytes exceeds the limit of {MAX_MATCHKEY_LEN}",
                matchkey.len()
            ));
        }
        if let Some(addr) = custom_addr.as_ref().filter(|a| a.len() > MAX_ADDR_LEN) {
            return Err(format!(
                "custom address of {} bytes exceeds the limit of {MAX_ADDR_LEN}",
                addr.len()
            ));
        }
        let c = self.conns.get_mut(&conn).expect("checked above");
        let host = custom_addr.unwrap_or_else(|| c.peer_host.clone());
        if !c.pending.contains(&matchkey) {
            c.pending.push(matchkey.clone());
        }
        c.free += 1;
        let new_holder = c.put_keys.insert(key.to_owned());
        let q = self.queues.entry(key.to_owned()).or_default();
        q.holders += usize::from(new_holder);
        q.free.push_back(FreeServer { conn, host, port, matchkey });
        self.schedule(key);
        Ok(())
    }

    /// `REQUEST`: `conn` waits for a server of `key`.
    pub(crate) fn request(&mut self, conn: ConnId, key: &str, priority: i64) -> Result<(), String> {
        let Some(c) = self.conns.get(&conn) else { return Ok(()) };
        self.check_new_entry(c, key)?;
        let c = self.conns.get_mut(&conn).expect("checked above");
        let wait = (Reverse(priority), self.next_request);
        self.next_request += 1;
        c.waiting.insert((key.to_owned(), wait));
        self.queues.entry(key.to_owned()).or_default().waiting.insert(wait, conn);
        self.schedule(key);
        Ok(())
    }

    /// Puts an undelivered lease back at the front of its queue (if its
    /// server's connection is still there) and matches again.
    pub(crate) fn requeue(&mut self, delivery: Delivery) {
        let Delivery { key, server } = delivery;
        let Some(owner) = self.conns.get_mut(&server.conn) else { return };
        if !owner.pending.contains(&server.matchkey) {
            owner.pending.push(server.matchkey.clone());
        }
        owner.free += 1;
        // The owner is open and put to `key`, so it holds the queue: it exists.
        self.queues.entry(key.clone()).or_default().free.push_front(server);
        self.schedule(&key);
    }

    /// Matches free servers with waiting requests of `key`.
    fn schedule(&mut self, key: &str) {
        let Some(q) = self.queues.get_mut(key) else { return };
        while !q.free.is_empty() {
            let Some((wait, requester)) = q.waiting.pop_first() else { break };
            let server = q.free.pop_front().expect("not empty");
            let Some(conn) = self.conns.get_mut(&requester) else {
                q.free.push_front(server);
                continue;
            };
            conn.waiting.remove(&(key.to_owned(), wait));
            let matchkey = server.matchkey.clone();
            let owner = server.conn;
            match conn.leases.send(Delivery { key: key.to_owned(), server }) {
                Ok(()) => {
                    if let Some(owner) = self.conns.get_mut(&owner) {
                        owner.pending.retain(|m| *m != matchkey);
                        owner.free = owner.free.saturating_sub(1);
                    }
                }
                // The requester's task is gone: the server stays first in line.
                Err(failed) => q.free.push_front(failed.0.server),
            }
        }
        self.forget_if_empty(key);
    }

    fn forget_if_empty(&mut self, key: &str) {
        if self.queues.get(key).is_some_and(KeyQueue::is_forgettable) {
            self.queues.remove(key);
        }
    }

    /// `UPDATE_INFO`: merges `info` into the connection's, filling a `null`
    /// host with the peer's IP. `info["addr"]` was validated by the parser.
    /// Refused (nothing merged) if the merged info would serialize to more
    /// than [`Limits::max_info_bytes`].
    pub(crate) fn update_info(
        &mut self,
        conn: ConnId,
        mut info: Map<String, Value>,
    ) -> Result<(), String> {
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        if let Some(Value::Array(addr)) = info.get_mut("addr") {
            if let Some(host @ Value::Null) = addr.first_mut() {
                *host = Value::String(c.peer_host.clone());
            }
        }
        let mut merged = c.info.clone();
        merged.extend(info);
        let size = serde_json::to_vec(&merged).map_or(usize::MAX, |v| v.len());
        if size > self.limits.max_info_bytes {
            return Err(format!(
                "UPDATE_INFO info of {size} bytes (merged) exceeds the limit of {}",
                self.limits.max_info_bytes
            ));
        }
        c.info = merged;
        Ok(())
    }

    /// `GET_PENDING_MATCHKEYS`: matchkeys put on `conn` and not leased.
    pub(crate) fn pending_matchkeys(&self, conn: ConnId) -> Vec<String> {
        self.conns.get(&conn).map(|c| c.pending.clone()).unwrap_or_default()
    }

    /// How many device keys the state holds.
    pub(crate) fn key_count(&self) -> usize {
        self.queues.len()
    }

    /// `SUMMARY`'s body, shaped like TVM's.
    pub(crate) fn summary(&self) -> Value {
        let queue_info: Map<String, Value> = self
            .queues
            .iter()
            .map(|(k, q)| (k.clone(), json!({"free": q.free.len(), "pending": q.waiting.len()})))
            .collect();
        let server_info: Vec<Value> = self
            .conns
            .values()
            .filter(|c| {
                c.info.get("key").and_then(Value::as_str).is_some_and(|k| k.starts_with("server"))
            })
            .map(|c| Value::Object(c.info.clone()))
            .collect();
        json!({"queue_info": queue_info, "server_info": server_info})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn conn(state: &mut State) -> (ConnId, UnboundedReceiver<Delivery>) {
        let (tx, rx) = unbounded_channel();
        (state.connect("10.1.1.1".into(), tx), rx)
    }

    fn got(rx: &mut UnboundedReceiver<Delivery>) -> Option<String> {
        rx.try_recv().ok().map(|d| d.server.matchkey)
    }

    #[test]
    fn free_servers_fifo_and_peer_host_default() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (cli, mut crx) = conn(&mut s);
        s.put(srv, "k", 1, "k:a".into(), None).unwrap();
        s.put(srv, "k", 2, "k:b".into(), Some("h".into())).unwrap();
        assert_eq!(s.pending_matchkeys(srv), ["k:a", "k:b"]);
        s.request(cli, "k", 0).unwrap();
        let d = crx.try_recv().unwrap();
        assert_eq!(d.lease(), Lease { host: "10.1.1.1".into(), port: 1, matchkey: "k:a".into() });
        s.request(cli, "k", 0).unwrap();
        assert_eq!(crx.try_recv().unwrap().lease().host, "h");
        assert!(s.pending_matchkeys(srv).is_empty());
    }

    #[test]
    fn priority_then_arrival() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let mut rxs = Vec::new();
        for prio in [1, 5, 1, 5, 3] {
            let (c, rx) = conn(&mut s);
            s.request(c, "k", prio).unwrap();
            rxs.push(rx);
        }
        let mut order = Vec::new();
        for i in 0..5 {
            s.put(srv, "k", 1, format!("k:{i}"), None).unwrap();
            let who = rxs.iter_mut().position(|rx| got(rx).is_some()).unwrap();
            order.push(who);
        }
        assert_eq!(order, [1, 3, 4, 0, 2]);
    }

    #[test]
    fn dead_requester_is_skipped_and_server_stays_first() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (dead, rx) = conn(&mut s);
        let (alive, mut arx) = conn(&mut s);
        s.request(dead, "k", 9).unwrap();
        s.request(alive, "k", 1).unwrap();
        drop(rx); // its task ended but has not disconnected yet
        s.put(srv, "k", 1, "k:a".into(), None).unwrap();
        assert_eq!(got(&mut arx).as_deref(), Some("k:a"));
        let q = &s.summary()["queue_info"]["k"];
        assert_eq!(q, &json!({"free": 0, "pending": 0}));
    }

    #[test]
    fn requeue_goes_to_the_front_unless_the_server_left() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (cli, mut crx) = conn(&mut s);
        s.put(srv, "k", 1, "k:a".into(), None).unwrap();
        s.put(srv, "k", 1, "k:b".into(), None).unwrap();
        s.request(cli, "k", 0).unwrap();
        let d = crx.try_recv().unwrap();
        s.requeue(d);
        assert_eq!(s.pending_matchkeys(srv), ["k:b", "k:a"]);
        s.request(cli, "k", 0).unwrap();
        assert_eq!(got(&mut crx).as_deref(), Some("k:a"));
        s.request(cli, "k", 0).unwrap();
        let d = crx.try_recv().unwrap();
        s.disconnect(srv);
        s.requeue(d);
        // Nobody holds "k" any more: it is forgotten.
        assert_eq!(s.summary()["queue_info"], json!({}));
    }

    #[test]
    fn disconnect_removes_servers_requests_and_info() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (cli, _crx) = conn(&mut s);
        s.update_info(
            srv,
            json!({"key": "server:k", "addr": [null, 9]}).as_object().unwrap().clone(),
        )
        .unwrap();
        s.put(srv, "k", 9, "k:a".into(), None).unwrap();
        s.request(cli, "other", 0).unwrap();
        assert_eq!(
            s.summary(),
            json!({
                "queue_info": {"k": {"free": 1, "pending": 0}, "other": {"free": 0, "pending": 1}},
                "server_info": [{"key": "server:k", "addr": ["10.1.1.1", 9]}],
            })
        );
        s.disconnect(srv);
        s.disconnect(cli);
        // Empty queues nobody holds are forgotten.
        assert_eq!(s.summary(), json!({"queue_info": {}, "server_info": []}));
        assert_eq!(s.key_count(), 0);
    }

    fn info(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn keys_are_forgotten_once_empty_and_unheld() {
        let mut s = State::default();
        let (cli, mut crx) = conn(&mut s);
        let (srv, _srx) = conn(&mut s);
        // 10,000 distinct keys requested and withdrawn leave nothing behind.
        for i in 0..10_000 {
            let (c, _rx) = conn(&mut s);
            s.request(c, &format!("k{i}"), 0).unwrap();
            s.disconnect(c);
        }
        assert_eq!(s.key_count(), 0);
        // A busy server's key stays (its row in the text summary), until
        // its connection closes.
        s.put(srv, "busy", 1, "busy:1".into(), None).unwrap();
        s.request(cli, "busy", 0).unwrap();
        assert!(crx.try_recv().is_ok());
        assert_eq!(s.summary()["queue_info"], json!({"busy": {"free": 0, "pending": 0}}));
        s.disconnect(srv);
        assert_eq!(s.key_count(), 0);
    }

    #[test]
    fn limits_refuse_and_change_nothing() {
        let limits = Limits { max_keys: 3, max_per_connection: 4, max_info_bytes: 100 };
        let mut s = State::new(limits);
        let (a, _arx) = conn(&mut s);
        let (b, _brx) = conn(&mut s);
        for k in ["x", "y", "z"] {
            s.request(a, k, 0).unwrap();
        }
        let err = s.request(b, "w", 0).unwrap_err();
        assert!(err.contains("3 device keys"), "{err}");
        let err = s.put(b, "w", 1, "w:1".into(), None).unwrap_err();
        assert!(err.contains("device keys"), "{err}");
        // Known keys are still fine.
        s.request(b, "x", 0).unwrap();
        s.request(a, "x", 0).unwrap();
        let err = s.request(a, "y", 0).unwrap_err();
        assert!(err.contains("limit is 4"), "{err}");
        assert_eq!(s.summary()["queue_info"]["x"]["pending"], json!(3));

        let (c, _crx) = conn(&mut s);
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(s.put(c, &long, 1, "m".into(), None).unwrap_err().contains("key of"));
        let long_m = "m".repeat(MAX_MATCHKEY_LEN + 1);
        assert!(s.put(c, "x", 1, long_m, None).unwrap_err().contains("matchkey"));
        let long_a = "a".repeat(MAX_ADDR_LEN + 1);
        assert!(s.put(c, "x", 1, "m".into(), Some(long_a)).unwrap_err().contains("address"));
        assert!(s.pending_matchkeys(c).is_empty());

        s.update_info(c, info(json!({"key": "server:x", "addr": [null, 1]}))).unwrap();
        let big = info(json!({"key": "server:x", "addr": [null, 1], "pad": "p".repeat(100)}));
        assert!(s.update_info(c, big).unwrap_err().contains("exceeds the limit of 100"));
        assert_eq!(
            s.summary()["server_info"],
            json!([{"key": "server:x", "addr": ["10.1.1.1", 1]}]),
            "the refused info was not merged"
        );
    }

    #[test]
    fn apply_answers_like_tvm() {
        let mut s = State::default();
        let (c, _rx) = conn(&mut s);
        let parse = |v: Value| TrackerRequest::parse(&v).unwrap();
        assert_eq!(s.apply(c, parse(json!([1])), "key"), Applied::Send(json!(0)));
        assert_eq!(s.apply(c, parse(json!([2, "key"])), "key"), Applied::Stop);
        assert_eq!(s.apply(c, parse(json!([2, "nope"])), "key"), Applied::WrongStopKey);
        assert_eq!(s.apply(c, parse(json!([4, "k", "", 1])), "key"), Applied::Later);
        assert_eq!(s.apply(c, parse(json!([7])), "key"), Applied::Send(json!([])));
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            s.apply(c, parse(json!([3, long, [1, "m"], null])), "key"),
            Applied::Refused(_)
        ));
    }
}
