//! The request/answer plumbing of a [`Session`]: framed writes, reading the
//! answer to one request while skipping answers to abandoned ones, and the
//! bookkeeping that makes every `Session` method cancel-safe.
//!
//! # Cancel safety
//!
//! Every frame goes through the `FramedWrite` sink, which encodes a frame
//! into its buffer in one step: a dropped future leaves either nothing or
//! whole frames in the buffer, and the next write flushes them first, so the
//! byte stream never carries half a frame. Reading keeps partial frames in
//! the `FramedRead` buffer. While a write waits for the socket, reading goes
//! on (answers to abandoned requests are dropped, a few others kept), so the
//! client never waits for a server that is itself waiting for the client. A request whose future is dropped before its answer was read
//! stays in `in_flight`; the next request first sends `Cancel` for it, and
//! answers to ids below the current one are skipped. So after any dropped
//! future the session is usable, or (if the connection broke or the server
//! ended the session) marked broken and failing fast with the reason.

use std::time::Duration;

use bytes::BytesMut;
use futures::{FutureExt, SinkExt, StreamExt};

use super::client::{Session, State};
use super::error::SessionError;
use crate::wire::codec::{Inbound, Outbound};
use crate::wire::error::error_chain;
use crate::wire::proto::{Request, Response, msg_frame, peek_id};

/// How long a client keeps reading after a write failed, looking for the
/// server's reason (`Terminated`).
const SALVAGE: Duration = Duration::from_secs(2);

/// Frames from the server kept while a write waits (beyond it, reading
/// pauses until the write is done).
const STASH: usize = 16;

/// True if `frame` answers a request below `floor` (abandoned).
fn stale(frame: &[u8], floor: u64) -> bool {
    postcard::from_bytes::<Response<'_>>(frame)
        .ok()
        .and_then(|r| r.id())
        .is_some_and(|id| id < floor)
}

/// One frame from the server, decoded enough to route it.
pub(super) enum Got {
    /// A frame within the limit (decode it with `postcard`).
    Frame(bytes::Bytes),
    /// A frame over this client's limit, for request `id` (if it could be told).
    TooLarge { len: u64, id: Option<u64> },
}

impl Session {
    /// Fails fast if the session cannot take a request.
    pub(super) fn check_open(&self) -> Result<(), SessionError> {
        match &self.state {
            State::Open => Ok(()),
            State::Closing(_) | State::Closed => Err(SessionError::Closed),
            State::Broken(reason) => Err(SessionError::Broken { reason: reason.clone() }),
        }
    }

    /// Marks the session broken by `e` and returns `e`.
    pub(super) fn fail(&mut self, e: SessionError) -> SessionError {
        if matches!(self.state, State::Open | State::Closing(_)) {
            self.state = State::Broken(error_chain(&e));
        }
        e
    }

    /// Starts a request: cancels a request abandoned by a dropped future,
    /// then returns the new request's id (recorded as in flight).
    pub(super) async fn begin(&mut self) -> Result<u64, SessionError> {
        self.check_open()?;
        let old = self.in_flight.take();
        self.next_id += 1;
        self.in_flight = Some(self.next_id);
        if let Some(old) = old {
            // From here on the old request's answers are stale (and dropped
            // while we write).
            self.write(msg_frame(&Request::Cancel { id: old }), false).await?;
        }
        Ok(self.next_id)
    }

    /// The request `id` is answered completely: nothing of it is left on the wire.
    pub(super) fn done(&mut self, id: u64) {
        if self.in_flight == Some(id) {
            self.in_flight = None;
        }
    }

    /// Gives up on request `id` now (a local error mid-answer): tells the
    /// server, and its remaining answers will be skipped.
    pub(super) async fn abandon(&mut self, id: u64) {
        if self.in_flight == Some(id) {
            // Stale from here on (also while the cancel is written).
            self.in_flight = None;
            let _ = self.write(msg_frame(&Request::Cancel { id }), true).await;
        }
    }

    /// The lowest request id whose answers still matter.
    fn live_floor(&self) -> u64 {
        self.in_flight.unwrap_or(self.next_id + 1)
    }

    /// Queues a frame (and sends the queue if `flush`). A request larger than
    /// the server accepts fails here, before anything is written.
    ///
    /// While the write waits for the socket, frames from the server are read
    /// on: answers to abandoned requests are dropped, others kept (a few) for
    /// the next read. So a server busy writing to us never waits for us
    /// while we wait for it. A write that cannot finish within the request
    /// timeout breaks the session.
    pub(super) async fn write(
        &mut self,
        frame: Outbound<'_>,
        flush: bool,
    ) -> Result<(), SessionError> {
        let len = frame.len() as u64;
        if len > self.server_max_frame {
            return Err(SessionError::FrameTooLarge { len, limit: self.server_max_frame });
        }
        let floor = self.live_floor();
        let limit = self.request_timeout;
        let Session { tx, rx, stash, rx_ended, .. } = self;
        let written = async {
            let fut = async { if flush { tx.send(frame).await } else { tx.feed(frame).await } };
            tokio::pin!(fut);
            loop {
                let can_read = !*rx_ended && stash.len() < STASH;
                tokio::select! {
                    biased;
                    r = &mut fut => return r,
                    item = rx.next(), if can_read => match item {
                        None => *rx_ended = true,
                        Some(Ok(Inbound::Frame(f))) if stale(&f, floor) => {}
                        Some(Ok(Inbound::TooLarge { head, .. }))
                            if peek_id(&head).is_some_and(|(_, id)| id < floor) => {}
                        Some(item) => stash.push_back(item),
                    },
                }
            }
        };
        match tokio::time::timeout(limit, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost(e).await),
            Err(_) => {
                Err(self
                    .fail(SessionError::Timeout { what: "writing to the device server", limit }))
            }
        }
    }

    /// A write failed: the server may have ended the session and said why
    /// (`Terminated`) before closing; report that reason if it did.
    async fn lost(&mut self, e: std::io::Error) -> SessionError {
        let salvage = async {
            while let Some(Ok(Inbound::Frame(f))) = self.read_item().await {
                if let Ok(Response::Terminated { error }) = postcard::from_bytes(&f) {
                    return Some(SessionError::from_wire(error));
                }
            }
            None
        };
        let reason = tokio::time::timeout(SALVAGE, salvage).await.ok().flatten();
        let err = reason.unwrap_or(SessionError::ConnectionLost { source: Some(e) });
        self.fail(err)
    }

    /// The next item from the server: a frame kept while writing, or the socket's.
    async fn read_item(&mut self) -> Option<std::io::Result<Inbound>> {
        if let Some(item) = self.stash.pop_front() {
            return Some(item);
        }
        if self.rx_ended {
            return None;
        }
        self.rx.next().await
    }

    /// The next frame, waiting at most `limit`.
    pub(super) async fn next(&mut self, limit: Duration) -> Result<Got, SessionError> {
        match tokio::time::timeout(limit, self.read_item()).await {
            Err(_) => Err(SessionError::Timeout { what: "waiting for the device server", limit }),
            Ok(Some(item)) => self.route(item),
            Ok(None) => Err(self.fail(SessionError::ConnectionLost { source: None })),
        }
    }

    /// A frame that has already arrived, without waiting.
    pub(super) fn next_now(&mut self) -> Result<Option<Got>, SessionError> {
        match self.read_item().now_or_never() {
            None => Ok(None),
            Some(Some(item)) => self.route(item).map(Some),
            Some(None) => Err(self.fail(SessionError::ConnectionLost { source: None })),
        }
    }

    fn route(&mut self, item: std::io::Result<Inbound>) -> Result<Got, SessionError> {
        match item {
            Ok(Inbound::Frame(f)) => Ok(Got::Frame(f.freeze())),
            Ok(Inbound::TooLarge { len, head }) => {
                Ok(Got::TooLarge { len, id: peek_id(&head).map(|(_, id)| id) })
            }
            Err(e) => Err(self.fail(SessionError::ConnectionLost { source: Some(e) })),
        }
    }

    /// Reads until the first answer to request `id`, skipping answers to
    /// earlier (abandoned) requests. `Terminated` ends the session with the
    /// server's reason; a frame too large for this client fails request `id`.
    ///
    /// The answer is returned as the frame it came in (decode it again with
    /// `postcard::from_bytes`, which borrows from it).
    pub(super) async fn answer(
        &mut self,
        id: u64,
        limit: Duration,
    ) -> Result<Answer, SessionError> {
        loop {
            match self.next(limit).await {
                Err(e @ SessionError::Timeout { .. }) => {
                    // The server may still answer later: give the request up
                    // and keep the session usable.
                    self.abandon(id).await;
                    return Err(e);
                }
                Err(e) => return Err(e),
                Ok(Got::TooLarge { len, id: rid }) => match rid {
                    Some(rid) if rid < id => continue,
                    Some(rid) if rid == id => {
                        self.abandon(id).await;
                        return Err(SessionError::FrameTooLarge { len, limit: self.max_frame });
                    }
                    _ => {
                        let err = SessionError::FrameTooLarge { len, limit: self.max_frame };
                        return Err(self.fail(err));
                    }
                },
                Ok(Got::Frame(frame)) => {
                    let resp = match postcard::from_bytes::<Response<'_>>(&frame) {
                        Ok(r) => r,
                        Err(e) => {
                            let err = SessionError::protocol(format!("undecodable answer: {e}"));
                            return Err(self.fail(err));
                        }
                    };
                    match resp.id() {
                        None => {
                            if let Response::Terminated { error } = resp {
                                return Err(self.fail(SessionError::from_wire(error)));
                            }
                            let what = format!("unexpected {} while waiting for {id}", resp.kind());
                            return Err(self.fail(SessionError::protocol(what)));
                        }
                        Some(rid) if rid < id => continue,
                        Some(rid) if rid > id => {
                            let what = format!("answer {} before the answer to {id}", resp.kind());
                            return Err(self.fail(SessionError::protocol(what)));
                        }
                        Some(_) => {
                            if let Response::Error { error, .. } = resp {
                                self.done(id);
                                return Err(SessionError::from_wire(error));
                            }
                            drop(resp);
                            return Ok(Answer(frame));
                        }
                    }
                }
            }
        }
    }

    /// An answer's kind did not fit the request: the protocol is out of sync.
    pub(super) fn unexpected(&mut self, answer: &Answer, wanted: &str) -> SessionError {
        let got = answer.decode().map(|r| r.kind()).unwrap_or_default();
        self.fail(SessionError::protocol(format!("expected {wanted}, the server sent {got}")))
    }

    /// Receives the `len` bytes of a streamed answer to `id` (`Chunk`s),
    /// passing each to `sink`. A local error from `sink` abandons the rest.
    pub(super) async fn receive_chunks(
        &mut self,
        id: u64,
        len: u64,
        mut sink: ChunkSink<'_>,
    ) -> Result<(), SessionError> {
        let mut got = 0u64;
        while got < len {
            let answer = self.answer(id, self.request_timeout).await?;
            let data = match answer.decode() {
                Some(Response::Chunk { data, .. }) => data,
                _ => return Err(self.unexpected(&answer, "a chunk")),
            };
            got += data.len() as u64;
            if got > len {
                let what = format!("the server sent more than the {len} bytes announced");
                return Err(self.fail(SessionError::protocol(what)));
            }
            if let Err(e) = sink.take(data).await {
                self.abandon(id).await;
                return Err(e);
            }
        }
        self.done(id);
        Ok(())
    }
}

/// Where received chunks go.
pub(super) enum ChunkSink<'a> {
    /// Appended to a buffer.
    Memory(&'a mut BytesMut),
    /// Written to a local file.
    File { file: &'a mut tokio::fs::File, path: &'a std::path::Path },
}

impl ChunkSink<'_> {
    async fn take(&mut self, data: &[u8]) -> Result<(), SessionError> {
        match self {
            ChunkSink::Memory(buf) => {
                buf.extend_from_slice(data);
                Ok(())
            }
            ChunkSink::File { file, path } => {
                tokio::io::AsyncWriteExt::write_all(*file, data).await.map_err(|source| {
                    SessionError::LocalIo { path: path.display().to_string(), source }
                })
            }
        }
    }
}

/// The frame of an answer (an `Ok`, `DownloadBegin`, `Listing`, `CallDone`,
/// `CallBegin`, `Chunk` or `Closed` for the request waited for).
pub(super) struct Answer(pub(super) bytes::Bytes);

impl Answer {
    pub(super) fn decode(&self) -> Option<Response<'_>> {
        postcard::from_bytes(&self.0).ok()
    }
}

/// A local file to upload: read whole (at most one chunk), or to stream.
#[derive(Debug)]
pub(crate) enum Opened {
    Small(Vec<u8>),
    Large(std::fs::File, u64),
}

/// Opens and sizes `path` in one trip to a blocking thread, reading it
/// whole there if it fits in one chunk (a kernel, typically). Cancel-safe:
/// a dropped call drops what the thread opened.
pub(super) async fn open_local(path: &std::path::Path) -> std::io::Result<Opened> {
    joined(read_ahead(path)).await
}

/// [`open_local`] started now on a blocking thread, to be awaited later
/// (with [`joined`]): an upload's file read while something else is awaited.
/// Dropping the handle lets the read finish and drops what it opened.
pub(crate) fn read_ahead(path: &std::path::Path) -> ReadAhead {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        if len > crate::wire::proto::CHUNK as u64 {
            return Ok(Opened::Large(file, len));
        }
        let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.take(len).read_to_end(&mut data)?;
        Ok(Opened::Small(data))
    })
}

/// A file being opened (and read, if small) on a blocking thread.
pub(crate) type ReadAhead = tokio::task::JoinHandle<std::io::Result<Opened>>;

/// What a [`read_ahead`] gave. Cancel-safe.
pub(crate) async fn joined(read: ReadAhead) -> std::io::Result<Opened> {
    read.await.unwrap_or_else(|e| Err(std::io::Error::other(format!("reading failed: {e}"))))
}
