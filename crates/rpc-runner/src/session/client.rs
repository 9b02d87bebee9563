//! The client side of a session: `Session`.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::SinkExt as _;
use popen_pool::Task;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::error::SessionError;
use super::io::{ChunkSink, Got};
pub(crate) use super::options::ConnectOptions;
use crate::wire::codec::{FrameCodec, Inbound};
use crate::wire::handshake::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_UNAUTHORIZED, ClientHello,
    HandshakeFailure, client_handshake_recv, client_handshake_send,
};
use crate::wire::proto::{
    DirEntry, MAX_SESSION_FRAME, Request, Response, SESSION_PROTOCOL_VERSION, msg_frame,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    Open,
    /// `Close` with this id was sent; its answer is awaited.
    Closing(u64),
    Closed,
    /// The connection broke, the server ended the session, or the protocol
    /// lost sync: the reason.
    Broken(String),
}

/// A session with a device server.
///
/// Its lifetime is explicit: [`close`](Session::close) tells the server, waits
/// until it has cleaned up (worker killed, temp dir removed) and returns the
/// outcome; it is idempotent. Dropping a session without closing it closes
/// its socket at once, and the server notices and frees the device
/// immediately. Methods take `&mut self`: one request at a time.
///
/// # Cancel safety
///
/// Every method is cancel-safe: if its future is dropped (a `select!`, a
/// `tokio::time::timeout`), the session stays usable. The next request
/// tells the server to cancel the abandoned one (`Cancel`) and skips what
/// the server still sends for it. What cancelling does on the server: a
/// running [`call`](Session::call) has its worker killed, so the next call
/// starts a fresh worker (kernels loaded and buffers allocated by earlier
/// calls are gone); an upload stops and its partial file is removed; a
/// download stops. A dropped [`close`](Session::close) is resumed by the
/// next `close`. If the connection broke or the server ended the session,
/// every method fails fast with [`SessionError::Broken`] and the reason.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> Result<(), rpc_runner::SessionError> {
/// use rpc_runner::{ConnectOptions, Session};
/// let mut sess = Session::connect("127.0.0.1:9090", "cpu", &ConnectOptions::default()).await?;
/// sess.upload_bytes(b"int main;", "kernels/a.c").await?;
/// assert_eq!(sess.listdir("kernels").await?.len(), 1);
/// sess.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session {
    pub(super) tx: FramedWrite<OwnedWriteHalf, FrameCodec>,
    pub(super) rx: FramedRead<OwnedReadHalf, FrameCodec>,
    /// Frames read while a write waited (see `io.rs`).
    pub(super) stash: VecDeque<std::io::Result<Inbound>>,
    /// The server closed its side.
    pub(super) rx_ended: bool,
    pub(super) state: State,
    pub(super) next_id: u64,
    /// A request sent whose answer was not read to the end (its future was
    /// dropped); the next request cancels it.
    pub(super) in_flight: Option<u64>,
    addr: String,
    server_key: String,
    workdir: String,
    pub(super) max_upload: u64,
    /// Largest frame this client accepts.
    pub(super) max_frame: u64,
    /// Largest frame the server accepts.
    pub(super) server_max_frame: u64,
    max_reply: u64,
    session_timeout: Option<Duration>,
    pub(super) request_timeout: Duration,
}

impl Session {
    /// Connects to the device server at `addr` (`host:port`) with its match
    /// key (without a tracker: the server's key).
    ///
    /// # Errors
    ///
    /// [`SessionError::Connect`], [`SessionError::KeyMismatch`],
    /// [`SessionError::Busy`], [`SessionError::Unauthorized`],
    /// [`SessionError::AtCapacity`], [`SessionError::SetupFailed`],
    /// [`SessionError::Handshake`], [`SessionError::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the half-open connection; the server
    /// notices and stays free.
    pub async fn connect(
        addr: &str,
        matchkey: &str,
        opts: &ConnectOptions,
    ) -> Result<Session, SessionError> {
        let limit = opts.connect_timeout;
        let timeout = SessionError::Timeout { what: "connecting to the device server", limit };
        tokio::time::timeout(limit, Self::connect_inner(addr, matchkey, opts))
            .await
            .map_err(|_| timeout)?
    }

    async fn connect_inner(
        addr: &str,
        matchkey: &str,
        opts: &ConnectOptions,
    ) -> Result<Session, SessionError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| SessionError::Connect { addr: addr.to_owned(), source })?;
        let _ = stream.set_nodelay(true);
        let hello = ClientHello {
            matchkey: matchkey.to_owned(),
            timeout: opts.session_timeout,
            token: opts.token.clone(),
        };
        // The handshake and the `Hello` go out together; the answers are
        // read in turn (the server reads exactly the handshake first).
        let (mut rd, mut wr) = stream.into_split();
        if let Err(e) = client_handshake_send(&mut wr, &hello).await {
            return Err(handshake_error(e, addr, matchkey));
        }
        let mut tx = FramedWrite::new(wr, FrameCodec::new(MAX_SESSION_FRAME));
        let sent = tx.send(msg_frame(&Request::Hello { version: SESSION_PROTOCOL_VERSION })).await;
        // A server that refused (and closed) may have reset the connection
        // before the Hello got out: its answer is still there to read.
        let server_key = match client_handshake_recv(&mut rd).await {
            Ok(key) => key,
            Err(e) => return Err(handshake_error(e, addr, matchkey)),
        };
        if let Err(e) = sent {
            return Err(SessionError::Handshake { message: format!("sending Hello: {e}") });
        }
        let mut sess = Session {
            tx,
            rx: FramedRead::new(rd, FrameCodec::new(MAX_SESSION_FRAME)),
            stash: VecDeque::new(),
            rx_ended: false,
            state: State::Open,
            next_id: 1,
            in_flight: None,
            addr: addr.to_owned(),
            server_key,
            workdir: String::new(),
            max_upload: u64::MAX,
            max_frame: MAX_SESSION_FRAME as u64,
            server_max_frame: MAX_SESSION_FRAME as u64,
            max_reply: opts.max_reply_bytes,
            session_timeout: None,
            request_timeout: opts.request_timeout,
        };
        let frame = match sess.next(opts.connect_timeout).await? {
            Got::Frame(f) => f,
            Got::TooLarge { len, .. } => {
                return Err(SessionError::FrameTooLarge { len, limit: sess.max_frame });
            }
        };
        match postcard::from_bytes::<Response<'_>>(&frame) {
            Ok(Response::Hello {
                version,
                workdir,
                max_upload,
                session_timeout_ms,
                max_frame,
                ..
            }) if version == SESSION_PROTOCOL_VERSION => {
                sess.workdir = workdir;
                sess.max_upload = max_upload;
                sess.server_max_frame = max_frame;
                sess.session_timeout = session_timeout_ms.map(Duration::from_millis);
                Ok(sess)
            }
            Ok(Response::Terminated { error }) => Err(SessionError::from_wire(error)),
            Ok(other) => {
                Err(SessionError::protocol(format!("expected Hello, got {}", other.kind())))
            }
            Err(e) => Err(SessionError::protocol(format!("undecodable Hello: {e}"))),
        }
    }

    /// The address of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's device key.
    pub fn server_key(&self) -> &str {
        &self.server_key
    }

    /// The session's temp dir on the server (removed when the session ends).
    pub fn workdir(&self) -> &str {
        &self.workdir
    }

    /// The session timeout the server enforces, if any.
    pub fn session_timeout(&self) -> Option<Duration> {
        self.session_timeout
    }

    /// True until the session is closed, broken, or ended by the server.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Downloads the remote file `remote` into memory.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`],
    /// [`SessionError::ReplyTooLarge`] if the file is larger than
    /// [`ConnectOptions::max_reply_bytes`] (use
    /// [`download_to`](Session::download_to) for large files), connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the server stops sending (see [`Session`]).
    pub async fn download(&mut self, remote: &str) -> Result<Vec<u8>, SessionError> {
        let (id, len) = self.download_begin(remote).await?;
        if len > self.max_reply {
            self.abandon(id).await;
            return Err(SessionError::ReplyTooLarge { len, limit: self.max_reply });
        }
        let mut out = BytesMut::with_capacity(len as usize);
        self.receive_chunks(id, len, ChunkSink::Memory(&mut out)).await?;
        Ok(out.to_vec())
    }

    /// Downloads `remote` into the local file `local`, streaming it; returns
    /// its size. No size limit applies.
    ///
    /// # Errors
    ///
    /// As [`download`](Session::download), and [`SessionError::LocalIo`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`download`](Session::download); `local` may then
    /// hold part of the file.
    pub async fn download_to(
        &mut self,
        remote: &str,
        local: impl AsRef<Path>,
    ) -> Result<u64, SessionError> {
        let local = local.as_ref();
        let (id, len) = self.download_begin(remote).await?;
        let mut file = match tokio::fs::File::create(local).await {
            Ok(f) => f,
            Err(source) => {
                self.abandon(id).await;
                return Err(SessionError::LocalIo { path: local.display().to_string(), source });
            }
        };
        self.receive_chunks(id, len, ChunkSink::File { file: &mut file, path: local }).await?;
        file.flush().await.map_err(|source| SessionError::LocalIo {
            path: local.display().to_string(),
            source,
        })?;
        Ok(len)
    }

    async fn download_begin(&mut self, remote: &str) -> Result<(u64, u64), SessionError> {
        let id = self.begin().await?;
        self.write(msg_frame(&Request::Download { id, path: remote }), true).await?;
        let answer = self.answer(id, self.request_timeout).await?;
        match answer.decode() {
            Some(Response::DownloadBegin { len, .. }) => Ok((id, len)),
            _ => Err(self.unexpected(&answer, "a download")),
        }
    }

    /// Removes a remote file or directory (recursively).
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`], connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe (the removal may or may not have happened).
    pub async fn remove(&mut self, remote: &str) -> Result<(), SessionError> {
        let id = self.begin().await?;
        self.write(msg_frame(&Request::Remove { id, path: remote }), true).await?;
        self.expect_ok(id).await
    }

    /// Lists a remote directory (`""`: the session dir), sorted by name.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`],
    /// [`SessionError::FrameTooLarge`] for a listing too large for one
    /// frame, connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn listdir(&mut self, remote: &str) -> Result<Vec<DirEntry>, SessionError> {
        let id = self.begin().await?;
        self.write(msg_frame(&Request::ListDir { id, path: remote }), true).await?;
        let answer = self.answer(id, self.request_timeout).await?;
        match answer.decode() {
            Some(Response::Listing { entries, .. }) => {
                self.done(id);
                Ok(entries)
            }
            _ => Err(self.unexpected(&answer, "a listing")),
        }
    }

    /// Runs `task` in the session's worker on the server (a task type the
    /// server's worker program registers), with an optional time limit. The
    /// worker, and what the task keeps in its `WorkerContext`, lives until the
    /// session ends; a crash, timeout or cancelled call replaces it.
    ///
    /// # Errors
    ///
    /// [`SessionError::Task`] with the pool's error (e.g. `worker died (SIGSEGV)`,
    /// a timeout, the task's own error), [`SessionError::SessionTimeout`],
    /// [`SessionError::FrameTooLarge`] / [`SessionError::ReplyTooLarge`] for a
    /// task or output over a limit, connection errors.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the server kills the session's worker, so the next call
    /// starts a fresh one (see [`Session`]).
    pub async fn call<T: Task>(
        &mut self,
        task: T,
        timeout: Option<Duration>,
    ) -> Result<T::Output, SessionError> {
        let payload =
            postcard::to_stdvec(&task).map_err(|e| SessionError::protocol(e.to_string()))?;
        let out = self.call_raw(T::NAME, &payload, timeout).await?;
        postcard::from_bytes(&out)
            .map_err(|e| SessionError::protocol(format!("undecodable output of {}: {e}", T::NAME)))
    }

    /// Runs the task named `name` on its postcard-encoded `payload`; returns
    /// the postcard-encoded output. Outputs larger than a chunk stream in
    /// chunks, up to [`ConnectOptions::max_reply_bytes`].
    ///
    /// # Errors
    ///
    /// As [`call`](Session::call).
    ///
    /// # Cancel safety
    ///
    /// As [`call`](Session::call).
    pub async fn call_raw(
        &mut self,
        name: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Bytes, SessionError> {
        let id = self.begin().await?;
        let call = Request::Call { id, name, payload, timeout_ms: millis(timeout) };
        if let Err(e) = self.write(msg_frame(&call), true).await {
            self.done(id); // nothing was sent
            return Err(e);
        }
        self.call_answer(id, timeout).await
    }

    /// Reads the answer to the call `id` (sent with `timeout`).
    pub(super) async fn call_answer(
        &mut self,
        id: u64,
        timeout: Option<Duration>,
    ) -> Result<Bytes, SessionError> {
        let limit = match timeout {
            Some(t) => self.request_timeout.max(t.saturating_add(Duration::from_secs(30))),
            None => self.request_timeout,
        };
        let answer = self.answer(id, limit).await?;
        match answer.decode() {
            Some(Response::CallDone { payload, .. }) => {
                let out = answer.0.slice_ref(payload);
                self.done(id);
                Ok(out)
            }
            Some(Response::CallBegin { len, .. }) => {
                if len > self.max_reply {
                    self.abandon(id).await;
                    return Err(SessionError::ReplyTooLarge { len, limit: self.max_reply });
                }
                let mut out = BytesMut::with_capacity(len as usize);
                self.receive_chunks(id, len, ChunkSink::Memory(&mut out)).await?;
                Ok(out.freeze())
            }
            _ => Err(self.unexpected(&answer, "a call result")),
        }
    }

    /// Ends the session: the server kills the session's worker and removes its
    /// temp dir, then acknowledges. Idempotent: later calls return `Ok(())`.
    ///
    /// # Errors
    ///
    /// If the connection broke before the acknowledgement, or the session was
    /// already unusable ([`SessionError::Broken`], e.g. after the server
    /// reported [`SessionError::SessionTimeout`]): then the session is gone
    /// and `close` says so once.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a later `close` resumes waiting for the acknowledgement;
    /// dropping the session instead closes the socket.
    pub async fn close(&mut self) -> Result<(), SessionError> {
        let result = match self.state.clone() {
            State::Closed => return Ok(()),
            State::Broken(reason) => Err(SessionError::Broken { reason }),
            State::Closing(id) => self.await_closed(id).await,
            State::Open => match self.begin().await {
                Ok(id) => {
                    self.state = State::Closing(id);
                    match self.write(msg_frame(&Request::Close { id }), true).await {
                        Ok(()) => self.await_closed(id).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
        };
        self.state = State::Closed;
        let _ = self.tx.get_mut().shutdown().await;
        result
    }

    async fn await_closed(&mut self, id: u64) -> Result<(), SessionError> {
        let answer = self.answer(id, self.request_timeout).await?;
        match answer.decode() {
            Some(Response::Closed { .. }) => Ok(()),
            _ => Err(SessionError::protocol("expected Closed")),
        }
    }
}

/// The session error of a failed handshake with `addr`.
fn handshake_error(e: HandshakeFailure, addr: &str, matchkey: &str) -> SessionError {
    match e {
        HandshakeFailure::Io(e) => {
            SessionError::Handshake { message: format!("{e} (is {addr} an RPC server?)") }
        }
        HandshakeFailure::Refused(code) => match code {
            CODE_MISMATCH => SessionError::KeyMismatch { matchkey: matchkey.to_owned() },
            CODE_DUPLICATE => SessionError::Busy,
            CODE_UNAUTHORIZED => SessionError::Unauthorized,
            CODE_AT_CAPACITY => SessionError::AtCapacity,
            other => SessionError::Handshake {
                message: format!("unexpected handshake answer {other:#x}"),
            },
        },
    }
}

/// A call's time limit in whole milliseconds, as the wire carries it.
pub(super) fn millis(timeout: Option<Duration>) -> Option<u64> {
    timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}
