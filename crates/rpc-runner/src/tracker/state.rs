//! The tracker's shared state and its matching rules, free of I/O.
//!
//! Per device key: free servers first in, first out; waiting requests by
//! priority (higher first), then arrival. A match hands a [`Delivery`] to the
//! requester's connection task through its channel; if that connection is
//! gone, the server goes back to the front of the free queue and the next
//! request is tried. Connection tasks return undeliverable leases with
//! [`State::requeue`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::proto::Lease;

/// Connections are numbered in accept order; numbers are never reused.
pub(crate) type ConnId = u64;

/// The order of a waiting request: priority descending, then arrival.
type WaitKey = (Reverse<i64>, u64);

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
    /// This connection's waiting requests.
    waiting: BTreeSet<(String, WaitKey)>,
    /// Merged `UPDATE_INFO` objects.
    info: Map<String, Value>,
}

/// Everything the tracker knows, behind one mutex held only briefly.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Every key ever put or requested (TVM never forgets a key either).
    queues: BTreeMap<String, KeyQueue>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_request: u64,
}

impl State {
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
        }
        for key in &conn.put_keys {
            if let Some(q) = self.queues.get_mut(key) {
                q.free.retain(|s| s.conn != id);
            }
        }
    }

    /// `PUT`: `conn` reports a free server for `key`.
    pub(crate) fn put(
        &mut self,
        conn: ConnId,
        key: &str,
        port: u16,
        matchkey: String,
        custom_addr: Option<String>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let host = custom_addr.unwrap_or_else(|| c.peer_host.clone());
        if !c.pending.contains(&matchkey) {
            c.pending.push(matchkey.clone());
        }
        c.put_keys.insert(key.to_owned());
        self.queues.entry(key.to_owned()).or_default().free.push_back(FreeServer {
            conn,
            host,
            port,
            matchkey,
        });
        self.schedule(key);
    }

    /// `REQUEST`: `conn` waits for a server of `key`.
    pub(crate) fn request(&mut self, conn: ConnId, key: &str, priority: i64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let wait = (Reverse(priority), self.next_request);
        self.next_request += 1;
        c.waiting.insert((key.to_owned(), wait));
        self.queues.entry(key.to_owned()).or_default().waiting.insert(wait, conn);
        self.schedule(key);
    }

    /// Puts an undelivered lease back at the front of its queue (if its
    /// server's connection is still there) and matches again.
    pub(crate) fn requeue(&mut self, delivery: Delivery) {
        let Delivery { key, server } = delivery;
        let Some(owner) = self.conns.get_mut(&server.conn) else { return };
        if !owner.pending.contains(&server.matchkey) {
            owner.pending.push(server.matchkey.clone());
        }
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
                    }
                }
                // The requester's task is gone: the server stays first in line.
                Err(failed) => q.free.push_front(failed.0.server),
            }
        }
    }

    /// `UPDATE_INFO`: merges `info` into the connection's, filling a `null`
    /// host with the peer's IP. `info["addr"]` was validated by the parser.
    pub(crate) fn update_info(&mut self, conn: ConnId, mut info: Map<String, Value>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let Some(Value::Array(addr)) = info.get_mut("addr") {
            if let Some(host @ Value::Null) = addr.first_mut() {
                *host = Value::String(c.peer_host.clone());
            }
        }
        c.info.extend(info);
    }

    /// `GET_PENDING_MATCHKEYS`: matchkeys put on `conn` and not leased.
    pub(crate) fn pending_matchkeys(&self, conn: ConnId) -> Vec<String> {
        self.conns.get(&conn).map(|c| c.pending.clone()).unwrap_or_default()
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
        s.put(srv, "k", 1, "k:a".into(), None);
        s.put(srv, "k", 2, "k:b".into(), Some("h".into()));
        assert_eq!(s.pending_matchkeys(srv), ["k:a", "k:b"]);
        s.request(cli, "k", 0);
        let d = crx.try_recv().unwrap();
        assert_eq!(d.lease(), Lease { host: "10.1.1.1".into(), port: 1, matchkey: "k:a".into() });
        s.request(cli, "k", 0);
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
            s.request(c, "k", prio);
            rxs.push(rx);
        }
        let mut order = Vec::new();
        for i in 0..5 {
            s.put(srv, "k", 1, format!("k:{i}"), None);
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
        s.request(dead, "k", 9);
        s.request(alive, "k", 1);
        drop(rx); // its task ended but has not disconnected yet
        s.put(srv, "k", 1, "k:a".into(), None);
        assert_eq!(got(&mut arx).as_deref(), Some("k:a"));
        let q = &s.summary()["queue_info"]["k"];
        assert_eq!(q, &json!({"free": 0, "pending": 0}));
    }

    #[test]
    fn requeue_goes_to_the_front_unless_the_server_left() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (cli, mut crx) = conn(&mut s);
        s.put(srv, "k", 1, "k:a".into(), None);
        s.put(srv, "k", 1, "k:b".into(), None);
        s.request(cli, "k", 0);
        let d = crx.try_recv().unwrap();
        s.requeue(d);
        assert_eq!(s.pending_matchkeys(srv), ["k:b", "k:a"]);
        s.request(cli, "k", 0);
        assert_eq!(got(&mut crx).as_deref(), Some("k:a"));
        s.request(cli, "k", 0);
        let d = crx.try_recv().unwrap();
        s.disconnect(srv);
        s.requeue(d);
        assert_eq!(s.summary()["queue_info"]["k"], json!({"free": 0, "pending": 0}));
    }

    #[test]
    fn disconnect_removes_servers_requests_and_info() {
        let mut s = State::default();
        let (srv, _srx) = conn(&mut s);
        let (cli, _crx) = conn(&mut s);
        s.update_info(
            srv,
            json!({"key": "server:k", "addr": [null, 9]}).as_object().unwrap().clone(),
        );
        s.put(srv, "k", 9, "k:a".into(), None);
        s.request(cli, "other", 0);
        assert_eq!(
            s.summary(),
            json!({
                "queue_info": {"k": {"free": 1, "pending": 0}, "other": {"free": 0, "pending": 1}},
                "server_info": [{"key": "server:k", "addr": ["10.1.1.1", 9]}],
            })
        );
        s.disconnect(srv);
        s.disconnect(cli);
        assert_eq!(
            s.summary(),
            json!({
                "queue_info": {"k": {"free": 0, "pending": 0}, "other": {"free": 0, "pending": 0}},
                "server_info": [],
            })
        );
    }
}
