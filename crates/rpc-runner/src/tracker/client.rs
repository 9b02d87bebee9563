//! Clients of a tracker (ours or TVM's): [`TrackerClient`] for users and the
//! query tool, [`TrackerLink`] for a device server's registration.
//!
//! Every network wait is bounded by the client's timeout, except
//! [`TrackerClient::request_lease`], which waits for a free server for as
//! long as it takes; wrap it in `tokio::time::timeout` (or drop it) to give
//! up. A call that is cancelled or fails midway closes the connection, so a
//! reply can never be read as the answer to a later request. Replies are
//! read up to [`MAX_REPLY`](super::MAX_REPLY) bytes (TVM's tracker sends
//! summaries above 1 MiB); requests are sent up to 1 MiB.
//!
//! `request_lease` survives a tracker restart: when the connection is lost
//! while it waits, it reconnects and asks again, a bounded number of times
//! with backoff ([`ReconnectPolicy`], like the `max_retry` of TVM's
//! `TrackerSession.request`).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use super::codec::{JsonFrameCodec, TRACKER_AT_CAPACITY, TRACKER_MAGIC, read_magic, write_magic};
use super::error::TrackerError;
use super::proto::{Lease, TrackerRequest, expect_success, success_body};
use super::summary::{Summary, text_summary_of};

/// The default bound on connecting and on each request's reply: 10 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

type Transport = Framed<TcpStream, JsonFrameCodec>;

/// Connects to `addr` and exchanges the tracker magic, within `limit`.
async fn dial(addr: &str, limit: Duration) -> Result<Transport, TrackerError> {
    let connect = TcpStream::connect(addr);
    let mut stream = match tokio::time::timeout(limit, connect).await {
        Err(_) => return Err(TrackerError::Timeout { what: "connecting to the tracker", limit }),
        Ok(Err(source)) => return Err(TrackerError::Connect { addr: addr.to_owned(), source }),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let handshake = async {
        write_magic(&mut stream, TRACKER_MAGIC).await?;
        let magic = read_magic(&mut stream).await?;
        if magic != TRACKER_AT_CAPACITY {
            return Ok((magic, None));
        }
        // Our tracker follows the refusal with its limit; tolerate its absence.
        let limit = read_magic(&mut stream).await.ok().and_then(|n| u32::try_from(n).ok());
        Ok::<_, std::io::Error>((magic, limit))
    };
    match tokio::time::timeout(limit, handshake).await {
        Err(_) => Err(TrackerError::Timeout { what: "the tracker handshake", limit }),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(TrackerError::Closed)
        }
        Ok(Err(err)) => Err(err.into()),
        Ok(Ok((TRACKER_AT_CAPACITY, limit))) => Err(TrackerError::AtCapacity { limit }),
        Ok(Ok((magic, _))) if magic != TRACKER_MAGIC => Err(TrackerError::BadMagic { got: magic }),
        Ok(Ok(_)) => Ok(Framed::new(stream, JsonFrameCodec::client())),
    }
}

/// How [`TrackerClient::request_lease`] (and so `request`, `request_with`,
/// `request_and_run`) reconnects when the tracker connection is lost while
/// it waits: up to `max_reconnects` reconnects per call, the first after
/// `initial_backoff`, each next one after twice the previous wait, at most
/// `max_backoff`. After a reconnect the request is sent again (it keeps its
/// priority, not its place in line: the old tracker's queue is gone).
///
/// The default, 5 reconnects from 0.5 s up to 5 s (12.5 s of waiting in
/// all), mirrors TVM's `max_retry=5`. `max_reconnects: 0` disables it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rpc_runner::tracker::ReconnectPolicy;
///
/// let patient = ReconnectPolicy { max_reconnects: 20, ..ReconnectPolicy::default() };
/// assert_eq!(patient.initial_backoff, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Reconnects tried per call before giving up.
    pub max_reconnects: u32,
    /// The wait before the first reconnect.
    pub initial_backoff: Duration,
    /// The longest wait between two reconnects.
    pub max_backoff: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            max_reconnects: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl ReconnectPolicy {
    /// No reconnect: a lost connection fails the call at once.
    pub const NEVER: ReconnectPolicy = ReconnectPolicy {
        max_reconnects: 0,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
}

/// A request-reply connection. The transport is taken out for the duration
/// of a call and put back only when a reply arrived, so a cancelled or failed
/// call leaves it closed.
#[derive(Debug)]
struct Channel {
    addr: String,
    timeout: Duration,
    transport: Option<Transport>,
}

impl Channel {
    async fn connect(addr: &str, timeout: Duration) -> Result<Self, TrackerError> {
        let transport = dial(addr, timeout).await?;
        Ok(Channel { addr: addr.to_owned(), timeout, transport: Some(transport) })
    }

    /// Sends `request` and reads one reply, waiting at most `reply_limit`
    /// for it (forever when `None`).
    async fn call(
        &mut self,
        request: &Value,
        reply_limit: Option<Duration>,
    ) -> Result<Value, TrackerError> {
        let mut transport = self.transport.take().ok_or(TrackerError::Closed)?;
        let limit = self.timeout;
        match tokio::time::timeout(limit, transport.send(request)).await {
            Err(_) => {
                return Err(TrackerError::Timeout { what: "sending a tracker request", limit });
            }
            Ok(res) => res?,
        }
        let reply = match reply_limit {
            Some(limit) => match tokio::time::timeout(limit, transport.next()).await {
                Err(_) => {
                    return Err(TrackerError::Timeout {
                        what: "waiting for the tracker's reply",
                        limit,
                    });
                }
                Ok(reply) => reply,
            },
            None => transport.next().await,
        };
        let reply = reply.ok_or(TrackerError::Closed)??;
        self.transport = Some(transport);
        Ok(reply)
    }
}

/// A client of the tracker: what users, tuners and the query tool use.
///
/// It works against this crate's tracker and TVM's alike. A call that fails
/// or is cancelled closes the connection; the next call reconnects (as TVM's
/// `TrackerSession` does).
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), rpc_runner::tracker::TrackerError> {
/// use std::time::Duration;
/// use rpc_runner::tracker::TrackerClient;
///
/// let mut client = TrackerClient::connect("127.0.0.1:9190").await?;
/// println!("{}", client.text_summary().await?);
/// let lease = tokio::time::timeout(Duration::from_secs(60), client.request_lease("rasp4", 1))
///     .await
///     .expect("no rasp4 free within a minute")?;
/// println!("connect to {}:{} with client:{}", lease.host, lease.port, lease.matchkey);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TrackerClient {
    channel: Channel,
    reconnect: ReconnectPolicy,
}

impl TrackerClient {
    /// Connects to the tracker at `addr` (`"host:port"`) and checks its magic,
    /// within [`DEFAULT_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// [`TrackerError::Connect`], [`TrackerError::Timeout`],
    /// [`TrackerError::BadMagic`] (not a tracker), [`TrackerError::Closed`].
    pub async fn connect(addr: &str) -> Result<Self, TrackerError> {
        Self::connect_with_timeout(addr, DEFAULT_TIMEOUT).await
    }

    /// As [`connect`](Self::connect), with `timeout` bounding the connection
    /// and every later reply (but a lease's).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn connect_with_timeout(addr: &str, timeout: Duration) -> Result<Self, TrackerError> {
        let channel = Channel::connect(addr, timeout).await?;
        Ok(TrackerClient { channel, reconnect: ReconnectPolicy::default() })
    }

    /// The tracker's address, as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.channel.addr
    }

    /// Sets how [`request_lease`](Self::request_lease) reconnects after
    /// losing the tracker (default: [`ReconnectPolicy::default`]).
    pub fn set_reconnect(&mut self, policy: ReconnectPolicy) {
        self.reconnect = policy;
    }

    /// As [`set_reconnect`](Self::set_reconnect), by value.
    #[must_use]
    pub fn with_reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// The reconnect policy of [`request_lease`](Self::request_lease).
    pub fn reconnect_policy(&self) -> ReconnectPolicy {
        self.reconnect
    }

    async fn call(
        &mut self,
        request: &Value,
        reply_limit: Option<Duration>,
    ) -> Result<Value, TrackerError> {
        if self.channel.transport.is_none() {
            self.channel.transport = Some(dial(&self.channel.addr, self.channel.timeout).await?);
        }
        self.channel.call(request, reply_limit).await
    }

    /// `PING`: checks that the tracker is alive.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn ping(&mut self) -> Result<(), TrackerError> {
        let reply = self.call(&TrackerRequest::Ping.to_json(), Some(self.channel.timeout)).await?;
        expect_success(&reply, "PING")
    }

    async fn summary_json(&mut self) -> Result<Value, TrackerError> {
        let reply =
            self.call(&TrackerRequest::Summary.to_json(), Some(self.channel.timeout)).await?;
        Ok(success_body(&reply, "SUMMARY")?.clone())
    }

    /// `SUMMARY`: every key's queue and the servers that described themselves.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors (a reply not of TVM's shape).
    pub async fn summary(&mut self) -> Result<Summary, TrackerError> {
        Summary::from_json(self.summary_json().await?)
    }

    /// The summary as text, laid out exactly as TVM's
    /// `TrackerSession.text_summary()` (and `query_rpc_tracker`): the server
    /// list, then the queue status table.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn text_summary(&mut self) -> Result<String, TrackerError> {
        text_summary_of(&self.summary_json().await?)
    }

    /// `REQUEST`: waits until a server of `key` is free and leases it.
    /// Higher `priority` is served first; equal priorities in arrival order.
    ///
    /// This waits as long as it takes: wrap it in `tokio::time::timeout`.
    /// If the connection is lost meanwhile (the tracker restarted, the
    /// network broke) or cannot be made, it reconnects and sends the request
    /// again, as the [`ReconnectPolicy`] says.
    ///
    /// Cancel safety: cancelling it (also during a reconnect's backoff)
    /// closes the connection, which withdraws the request (a lease already
    /// sent is lost to this client; TVM servers re-register a matchkey
    /// nobody used after a few seconds, ours as well). The next call
    /// reconnects.
    ///
    /// # Errors
    ///
    /// [`TrackerError::ConnectionLost`] once the reconnects are spent (its
    /// message names the key and the last cause); [`TrackerError::Refused`]
    /// when the tracker refuses the request (e.g. over one of its limits);
    /// protocol errors.
    pub async fn request_lease(&mut self, key: &str, priority: i32) -> Result<Lease, TrackerError> {
        let request = TrackerRequest::Request {
            key: key.to_owned(),
            user: String::new(),
            priority: priority.into(),
        }
        .to_json();
        let policy = self.reconnect;
        let mut reconnects = 0;
        let mut backoff = policy.initial_backoff;
        loop {
            // `call` dials first when the connection is closed: the first
            // round reuses the open connection, later ones are reconnects.
            let err = match self.call(&request, None).await {
                Ok(reply) => return Lease::from_reply(&reply),
                Err(err) if err.is_transient() => err,
                Err(err) => return Err(err),
            };
            if reconnects >= policy.max_reconnects {
                return Err(TrackerError::ConnectionLost {
                    key: key.to_owned(),
                    reconnects,
                    source: Box::new(err),
                });
            }
            tracing::warn!(
                tracker = %self.channel.addr, key, error = %err, reconnects,
                "tracker connection lost while waiting for a device; reconnecting"
            );
            reconnects += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(policy.max_backoff);
        }
    }

    /// `STOP`: stops the tracker, given its stop key.
    ///
    /// # Errors
    ///
    /// [`TrackerError::Refused`] when the key is wrong (the tracker keeps
    /// running); connection and protocol errors.
    pub async fn stop(&mut self, stop_key: &str) -> Result<(), TrackerError> {
        let request = TrackerRequest::Stop { stop_key: stop_key.to_owned() };
        let reply = self.call(&request.to_json(), Some(self.channel.timeout)).await?;
        expect_success(&reply, "STOP")?;
        // The tracker is going away; do not keep its connection.
        self.channel.transport = None;
        Ok(())
    }
}

/// A device server's registration connection: what a TVM RPC server keeps
/// open to its tracker (`UPDATE_INFO`, then `PUT` after each session, and
/// `GET_PENDING_MATCHKEYS` to notice a lease nobody used).
///
/// The tracker forgets this server's registrations and info when this
/// connection closes, so it does not reconnect by itself: on an error,
/// connect again and re-register.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), rpc_runner::tracker::TrackerError> {
/// use rpc_runner::tracker::{TrackerLink, random_matchkey};
///
/// let mut link = TrackerLink::connect("127.0.0.1:9190").await?;
/// link.update_info("rasp4", None, 9090).await?;
/// let matchkey = random_matchkey("rasp4");
/// link.put("rasp4", 9090, &matchkey, None).await?;
/// let still_free = link.pending_matchkeys().await?.contains(&matchkey);
/// # let _ = still_free; Ok(()) }
/// ```
#[derive(Debug)]
pub struct TrackerLink {
    channel: Channel,
}

impl TrackerLink {
    /// Connects to the tracker at `addr` (`"host:port"`), within [`DEFAULT_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// As [`TrackerClient::connect`].
    pub async fn connect(addr: &str) -> Result<Self, TrackerError> {
        Self::connect_with_timeout(addr, DEFAULT_TIMEOUT).await
    }

    /// As [`connect`](Self::connect), with `timeout` bounding the connection
    /// and every reply.
    ///
    /// # Errors
    ///
    /// As [`TrackerClient::connect`].
    pub async fn connect_with_timeout(addr: &str, timeout: Duration) -> Result<Self, TrackerError> {
        Ok(TrackerLink { channel: Channel::connect(addr, timeout).await? })
    }

    /// The tracker's address, as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.channel.addr
    }

    /// False once a call failed or was cancelled (the connection is closed).
    pub fn is_open(&self) -> bool {
        self.channel.transport.is_some()
    }

    async fn call_ok(
        &mut self,
        request: &TrackerRequest,
        name: &'static str,
    ) -> Result<(), TrackerError> {
        let reply = self.channel.call(&request.to_json(), Some(self.channel.timeout)).await?;
        expect_success(&reply, name)
    }

    /// `UPDATE_INFO`: describes this server as
    /// `{"key": "server:<key>", "addr": [custom_addr|null, port]}`; it shows
    /// in the tracker's summary (a `null` address becomes the IP this
    /// connection comes from).
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn update_info(
        &mut self,
        key: &str,
        custom_addr: Option<&str>,
        port: u16,
    ) -> Result<(), TrackerError> {
        let info = json!({"key": format!("server:{key}"), "addr": [custom_addr, port]});
        let Value::Object(info) = info else { unreachable!("an object literal") };
        self.call_ok(&TrackerRequest::UpdateInfo { info }, "UPDATE_INFO").await
    }

    /// `PUT`: reports the server free for `key` at `port`, leasable once
    /// with `matchkey` (see [`random_matchkey`](super::random_matchkey)).
    /// Clients are sent to `custom_addr`, or to the IP this connection comes
    /// from.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn put(
        &mut self,
        key: &str,
        port: u16,
        matchkey: &str,
        custom_addr: Option<&str>,
    ) -> Result<(), TrackerError> {
        let request = TrackerRequest::Put {
            key: key.to_owned(),
            port,
            matchkey: matchkey.to_owned(),
            custom_addr: custom_addr.map(str::to_owned),
        };
        self.call_ok(&request, "PUT").await
    }

    /// `GET_PENDING_MATCHKEYS`: the matchkeys put on this connection that
    /// no client has leased yet.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn pending_matchkeys(&mut self) -> Result<Vec<String>, TrackerError> {
        let request = TrackerRequest::GetPendingMatchkeys.to_json();
        let reply = self.channel.call(&request, Some(self.channel.timeout)).await?;
        match reply {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(TrackerError::protocol(format!(
                        "pending matchkey is not a string: {other}"
                    ))),
                })
                .collect(),
            other => Err(TrackerError::protocol(format!(
                "unexpected reply to GET_PENDING_MATCHKEYS: {other}"
            ))),
        }
    }

    /// `PING`: checks that the tracker (and this connection) is alive.
    ///
    /// # Errors
    ///
    /// Connection and protocol errors.
    pub async fn ping(&mut self) -> Result<(), TrackerError> {
        self.call_ok(&TrackerRequest::Ping, "PING").await
    }
}
