//! The tracker server: accepts connections, speaks the protocol on each, and
//! matches leases through the shared [`State`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use popen_pool::error_chain;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::codec::{
    JsonFrameCodec, RequestCodec, TRACKER_AT_CAPACITY, TRACKER_MAGIC, read_magic, write_magic,
};
use super::config::TrackerConfig;
use super::error::TrackerError;
use super::proto::{TrackerRequest, random_matchkey};
use super::state::{Applied, ConnId, Delivery, State};

/// At most this many refusals (connections over the limit being told so)
/// are in progress at once; beyond it a connection is closed unanswered.
const MAX_REFUSING: usize = 64;

/// The initial read buffer of a connection, in bytes.
const READ_BUFFER: usize = 256;

/// A connection's write buffer is kept between replies up to this capacity
/// (a lease is ~60 bytes); a larger one (a big `SUMMARY`) is freed.
const OUT_KEPT: usize = 16 << 10;

/// The RPC tracker server, wire-compatible with Apache TVM's
/// (`python -m tvm.exec.rpc_tracker`).
///
/// Serve with [`Tracker::run`] on a listener you own, or [`Tracker::start`] a
/// background tracker and keep its [`TrackerHandle`].
#[derive(Debug, Clone, Copy)]
pub struct Tracker;

impl Tracker {
    /// Serves on `listener` until `shutdown` resolves or a `STOP` with the
    /// right key arrives, then closes every connection and waits for the
    /// connection handlers to finish before returning.
    ///
    /// A connection that breaks the protocol (bad magic, bad frame, invalid
    /// JSON, an ill-typed request, an unknown code) is logged and closed;
    /// the others are not affected. A request over one of the config's
    /// limits is answered `[-1, reason]` and the connection is served on.
    /// Connections beyond `max_connections` are refused at the handshake.
    ///
    /// # Errors
    ///
    /// None in practice: failures to accept a connection are logged and
    /// retried. The `Result` leaves room for setup failures.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// use rpc_runner::tracker::{Tracker, TrackerConfig};
    ///
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:9190").await?;
    /// let ctrl_c = async {
    ///     let _ = tokio::signal::ctrl_c().await;
    /// };
    /// Tracker::run(listener, TrackerConfig::default(), ctrl_c).await
    /// # }
    /// ```
    pub async fn run(
        listener: TcpListener,
        config: TrackerConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let stop_key = config.stop_key.clone().unwrap_or_else(|| random_matchkey("tracker"));
        serve(listener, config, stop_key, CancellationToken::new(), shutdown).await
    }

    /// Binds `addr` (e.g. `"127.0.0.1:0"`) and runs a tracker in a background
    /// task. Dropping the handle stops it too.
    ///
    /// # Errors
    ///
    /// The bind error. Must be called within a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use rpc_runner::tracker::{Tracker, TrackerConfig};
    ///
    /// let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default()).await?;
    /// println!("tracker on {}", tracker.addr());
    /// tracker.shutdown().await
    /// # }
    /// ```
    pub async fn start(addr: &str, config: TrackerConfig) -> io::Result<TrackerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let stop_key = config.stop_key.clone().unwrap_or_else(|| random_matchkey("tracker"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            config,
            stop_key.clone(),
            stop.clone(),
            stop.clone().cancelled_owned(),
        ));
        Ok(TrackerHandle { addr: local, stop_key, stop, task: Some(task) })
    }
}

/// A tracker running in the background ([`Tracker::start`]).
///
/// Dropping the handle asks the tracker to stop (without waiting for it);
/// [`shutdown`](Self::shutdown) stops it and waits.
#[derive(Debug)]
pub struct TrackerHandle {
    addr: SocketAddr,
    stop_key: String,
    stop: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TrackerHandle {
    /// The address the tracker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The key that stops the tracker through a `STOP` request.
    pub fn stop_key(&self) -> &str {
        &self.stop_key
    }

    /// True once the tracker has stopped (e.g. after a `STOP`).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the tracker: closes the listener and every connection, and
    /// waits for the handlers to finish.
    ///
    /// # Errors
    ///
    /// The tracker task's error, or its panic as an `io::Error`.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits until the tracker stops by itself (a `STOP` request), without
    /// asking it to.
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    pub async fn wait(mut self) -> io::Result<()> {
        self.join().await
    }

    async fn join(&mut self) -> io::Result<()> {
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for TrackerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the connections share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop_key: String,
    config: TrackerConfig,
    /// Cancelled to stop the tracker (shutdown, or a valid `STOP`).
    stop: CancellationToken,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state has no invariant a panic could break halfway that matters
        // more than staying up.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn serve(
    listener: TcpListener,
    config: TrackerConfig,
    stop_key: String,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "tracker listening");
    tracing::debug!(%stop_key, "tracker stop key");
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(config.limits())),
        stop_key,
        config,
        stop: stop.clone(),
    });
    let handlers = TaskTracker::new();
    let max_connections = shared.config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::debug_span!("tracker_conn", %peer);
                    match Arc::clone(&slots).try_acquire_owned() {
                        Ok(slot) => {
                            let conn = handle_conn(stream, peer, Arc::clone(&shared), slot);
                            handlers.spawn(conn.instrument(span));
                        }
                        Err(_) => {
                            tracing::warn!(%peer, limit = max_connections, "tracker at its connection limit: refusing a connection");
                            if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                                let refusal = refuse(stream, max_connections, Arc::clone(&shared), permit);
                                handlers.spawn(refusal.instrument(span));
                            }
                            // Else: too many refusals in flight; dropping the
                            // stream closes it unanswered.
                        }
                    }
                }
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %err, "tracker failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    stop.cancel();
    drop(listener);
    handlers.close();
    handlers.wait().await;
    tracing::info!(addr = ?local, "tracker stopped");
    Ok(())
}

/// Tells a connection over the limit so: reads its magic, answers
/// `TRACKER_AT_CAPACITY` and the limit, closes. Bounded by the handshake
/// timeout (at most 2 s) and by the tracker's stop.
async fn refuse(
    mut stream: TcpStream,
    limit: usize,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let bound = shared.config.handshake_timeout.min(Duration::from_secs(2));
    let answer = async {
        // Read the client's magic first: closing with it unread would reset
        // the connection, and the client might lose the answer.
        read_magic(&mut stream).await?;
        let mut bytes = TRACKER_AT_CAPACITY.to_le_bytes().to_vec();
        bytes.extend_from_slice(&i32::try_from(limit).unwrap_or(i32::MAX).to_le_bytes());
        tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut stream).await
    };
    tokio::select! {
        () = shared.stop.cancelled() => {}
        res = tokio::time::timeout(bound, answer) => {
            if let Ok(Err(err)) = res {
                tracing::debug!(error = %err, "refusing a connection failed");
            }
        }
    }
}

async fn handle_conn(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
) {
    match serve_conn(stream, peer, &shared).await {
        Ok(()) => tracing::debug!("tracker connection closed"),
        Err(err) if err.is_disconnect() => {
            tracing::debug!(error = %error_chain(&err), "tracker connection lost");
        }
        Err(err) => tracing::warn!(error = %error_chain(&err), "closing tracker connection"),
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<(), TrackerError> {
    let _ = stream.set_nodelay(true);
    let limit = shared.config.handshake_timeout;
    let magic = tokio::select! {
        () = shared.stop.cancelled() => return Ok(()),
        read = tokio::time::timeout(limit, read_magic(&mut stream)) => match read {
            Err(_) => return Err(TrackerError::Timeout { what: "waiting for the handshake magic", limit }),
            Ok(Err(err)) if err.kind() == io::ErrorKind::UnexpectedEof => return Err(TrackerError::Closed),
            Ok(Err(err)) => return Err(err.into()),
            Ok(Ok(magic)) => magic,
        },
    };
    if magic != TRACKER_MAGIC {
        return Err(TrackerError::BadMagic { got: magic });
    }
    let limit = shared.config.write_timeout;
    match tokio::time::timeout(limit, write_magic(&mut stream, TRACKER_MAGIC)).await {
        Err(_) => return Err(TrackerError::Timeout { what: "writing the handshake magic", limit }),
        Ok(res) => res?,
    }

    // A v4-mapped peer on a dual-stack listener is reported as plain v4.
    let peer_host = peer.ip().to_canonical().to_string();
    let (tx, mut leases) = mpsc::unbounded_channel();
    let id = shared.state().connect(peer_host.clone(), tx);
    tracing::debug!(conn = id, "tracker connection open");
    let (read, write) = stream.into_split();
    let mut conn = Conn {
        id,
        peer_host,
        // Requests are tens of bytes: start small (the codec reserves room
        // for a longer frame once its length is read) instead of 8 KiB per
        // connection.
        reader: FramedRead::with_capacity(read, shared.config.request_codec(), READ_BUFFER),
        writer: write,
        encoder: JsonFrameCodec::tracker(0),
        out: BytesMut::new(),
        shared,
    };
    let result = conn.run(&mut leases).await;

    // No lease can reach this connection once it is out of the state; those
    // already on their way go back to the front of their queues.
    let mut state = shared.state();
    state.disconnect(id);
    leases.close();
    while let Ok(delivery) = leases.try_recv() {
        state.requeue(delivery);
    }
    result
}

/// One open tracker connection.
struct Conn<'a> {
    id: ConnId,
    peer_host: String,
    reader: FramedRead<OwnedReadHalf, RequestCodec>,
    writer: OwnedWriteHalf,
    encoder: JsonFrameCodec,
    /// The frame being written (empty between writes; see [`OUT_KEPT`]).
    out: BytesMut,
    shared: &'a Shared,
}

impl Conn<'_> {
    async fn run(&mut self, leases: &mut UnboundedReceiver<Delivery>) -> Result<(), TrackerError> {
        // One waiter on the stop token for the connection's whole life: a
        // fresh `cancelled()` per event would lock the token's waiter list,
        // which every connection shares, twice per request.
        let shared = self.shared;
        let stopped = shared.stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                () = &mut stopped => return Ok(()),
                Some(delivery) = leases.recv() => self.deliver(delivery).await?,
                frame = self.reader.next() => {
                    let value = match frame {
                        None => return Ok(()),
                        Some(frame) => frame?,
                    };
                    let applied = match value {
                        Ok(value) => {
                            let request = TrackerRequest::parse(&value)?;
                            tracing::trace!(conn = self.id, code = request.code().name(), "tracker request");
                            self.shared.state().apply(self.id, request, &self.shared.stop_key)
                        }
                        // A frame nested too deep (consumed whole): refused.
                        Err(err) => Applied::Refused(err.to_string()),
                    };
                    // As in TVM, a lease this request triggered for this very
                    // connection is written before the request's own reply.
                    while let Ok(delivery) = leases.try_recv() {
                        self.deliver(delivery).await?;
                    }
                    match applied {
                        Applied::Send(value) => self.send_reply(&value).await?,
                        Applied::Later => {}
                        Applied::Refused(reason) => {
                            tracing::warn!(conn = self.id, peer = %self.peer_host, %reason, "tracker request refused");
                            self.send(&json!([-1, reason])).await?;
                        }
                        Applied::WrongStopKey => {
                            tracing::warn!(peer = %self.peer_host, "STOP with a wrong stop key refused");
                            self.send(&json!(-1)).await?;
                        }
                        Applied::Stop => {
                            self.send(&json!(0)).await?;
                            tracing::info!(peer = %self.peer_host, "tracker stopped by a STOP request");
                            self.shared.stop.cancel();
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Sends a reply; one too large for a frame (it cannot happen within
    /// the default limits) is answered `[-1, reason]` instead.
    async fn send_reply(&mut self, value: &Value) -> Result<(), TrackerError> {
        match self.send(value).await {
            Err(err @ TrackerError::FrameTooLarge { .. }) => {
                tracing::warn!(conn = self.id, error = %err, "tracker reply too large");
                self.send(&json!([-1, err.to_string()])).await
            }
            other => other,
        }
    }

    /// Writes a lease; if that fails the server goes back to the front of its
    /// queue and the connection is closed.
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), TrackerError> {
        let reply = json!([0, delivery.lease().to_json()]);
        if let Err(err) = self.send(&reply).await {
            self.shared.state().requeue(delivery);
            return Err(err);
        }
        tracing::debug!(conn = self.id, key = %delivery.key, matchkey = %delivery.server.matchkey, "lease sent");
        Ok(())
    }

    /// Writes one frame within the write timeout. The timer is only armed
    /// if the socket does not take the frame at once (the common case needs
    /// no timer registration).
    async fn send(&mut self, value: &Value) -> Result<(), TrackerError> {
        let limit = self.shared.config.write_timeout;
        self.out.clear();
        if self.out.capacity() > OUT_KEPT {
            self.out = BytesMut::new();
        }
        self.encoder.encode(value, &mut self.out)?;
        let mut write = std::pin::pin!(self.writer.write_all(&self.out));
        let res = match futures::poll!(&mut write) {
            Poll::Ready(res) => res.map_err(TrackerError::from),
            Poll::Pending => match tokio::time::timeout(limit, write).await {
                Ok(res) => res.map_err(TrackerError::from),
                Err(_) => Err(TrackerError::Timeout { what: "writing a reply", limit }),
            },
        };
        self.out.clear();
        res
    }
}
