//! One session on the device server: the request loop, its temp dir and its
//! worker, torn down however the session ends.
//!
//! The loop is a single task that never recurses: each turn it waits for
//! the first of shutdown, the session deadline, progress of the running
//! operation (a call, a streamed answer) and the next frame from the client.
//! While an operation runs, a `Cancel` for it (or any new request, which
//! implicitly cancels it) stops it; a new request is held until the
//! cancelled operation has been answered, so answers stay in order.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use popen_pool::{ErasedTask, PopenWorker};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::ops::{self, Call, Step, Stream, Tx, Upload};
use super::{ServerConfig, Shared};
use crate::wire::codec::{FrameCodec, Inbound};
use crate::wire::error::WireError;
use crate::wire::proto::{
    CALL_DONE, CHUNK, MAX_SESSION_FRAME, Request, Response, data_frame, msg_frame, peek_id,
};

type Rx = FramedRead<OwnedReadHalf, FrameCodec>;

/// How long the server keeps reading after its last frame, so the client
/// reads that frame rather than a connection reset.
const DRAIN: Duration = Duration::from_secs(5);
/// How long teardown waits for a cancelled call's worker to be reaped.
pub(super) const KILL_WAIT: Duration = Duration::from_secs(10);
/// Longest time limit a client can give a call (longer ones are saturated).
const MAX_CALL_LIMIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the request loop stopped.
pub(super) enum End {
    /// The client closed the connection (or it broke).
    Gone,
    /// The client sent `Close { id }`.
    Close(u64),
    /// The server ends the session with this error (timeout, shutdown, protocol).
    Terminate(WireError),
}

/// The operation in progress.
pub(super) enum Op {
    Idle,
    Upload(Upload),
    Stream(Stream),
    Call(Call),
}

impl Op {
    fn id(&self) -> Option<u64> {
        match self {
            Op::Idle => None,
            Op::Upload(u) => Some(u.id),
            Op::Stream(s) => Some(s.id),
            Op::Call(c) => Some(c.id),
        }
    }
}

/// What the running operation did.
enum Progress {
    Call(Box<ops::CallOutcome>),
    Stream(Step),
}

async fn progress(op: &mut Op, tx: &mut Tx) -> Progress {
    match op {
        Op::Call(c) => Progress::Call(Box::new(c.wait().await)),
        Op::Stream(s) => Progress::Stream(s.step(tx).await),
        Op::Idle | Op::Upload(_) => std::future::pending().await,
    }
}

pub(super) struct Session<'a> {
    pub(super) cfg: &'a ServerConfig,
    pub(super) dir: PathBuf,
    pub(super) tx: Tx,
    /// The session's worker, while no call holds it.
    pub(super) worker: Option<PopenWorker>,
    pub(super) op: Op,
    /// A request that arrived while the previous one was being cancelled.
    pub(super) held: Option<Inbound>,
    /// The highest request id seen.
    pub(super) last_id: u64,
    pub(super) deadline: Option<Instant>,
    pub(super) limit: Option<Duration>,
    /// Told at the session's first call: make the next warm spare.
    pub(super) want_spare: Option<&'a tokio::sync::Notify>,
    /// Held by the previous session's teardown while it finishes in the
    /// background: the first call waits for it (taken by that call).
    pub(super) teardown: Option<Arc<tokio::sync::Mutex<()>>>,
    /// The server's record of the last `AllocArgs` call (warm spare only).
    pub(super) last_alloc: &'a super::spare::LastAlloc,
    /// The work root is in memory (`ops::in_memory`).
    pub(super) in_memory: bool,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The connection of an ended session, still to be drained (see [`Farewell::drain`]).
#[must_use = "drain the connection"]
pub(crate) struct Farewell {
    tx: Tx,
    rx: Rx,
}

impl Farewell {
    /// Closes our side, then reads (discarding) until the client closes, for
    /// at most [`DRAIN`], so the client reads our last frame rather than a
    /// connection reset. The device is free already. Ends at once when the
    /// server shuts down.
    pub(crate) async fn drain(mut self, shutdown: &CancellationToken) {
        let _ = self.tx.get_mut().shutdown().await;
        let drained = async { while let Some(Ok(_)) = self.rx.next().await {} };
        tokio::select! {
            () = shutdown.cancelled() => {}
            _ = tokio::time::timeout(DRAIN, drained) => {}
        }
    }
}

/// Runs a session on `stream` (handshake done) until it ends, then kills its
/// worker, removes its temp dir and sends the last frame (`Closed` or
/// `Terminated`); the worker's reap finishes in the background (see
/// [`retire`]). If the
/// temp dir cannot be made, the client is told why and the server marks
/// itself unavailable.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    stream: TcpStream,
    timeout: Option<Duration>,
    shutdown: CancellationToken,
) -> Farewell {
    let cfg = &shared.cfg;
    let (rd, wr) = stream.into_split();
    let mut rx = FramedRead::new(rd, FrameCodec::new(MAX_SESSION_FRAME));
    let mut tx = FramedWrite::new(wr, FrameCodec::new(MAX_SESSION_FRAME));
    let root = cfg.root();
    // The warm spare's dir and started worker, else a dir of our own (the
    // worker then starts with the first call).
    let (made, worker) = match super::spare::take(shared).await {
        Some(spare) => (Ok(spare.dir), Some(spare.worker)),
        None => (super::spare::session_dir(shared).await, None),
    };
    let dir = match made {
        Ok(dir) => {
            shared.update(|st| st.unavailable = None);
            dir
        }
        Err(e) => {
            let message = format!("cannot create a session directory in {}: {e}", root.display());
            tracing::error!(%message, "session refused; the server is unavailable until it can");
            shared.update(|st| st.unavailable = Some(message.clone()));
            shared.recheck.notify_one();
            let error = WireError::SetupFailed { message };
            last_frame(&mut tx, Response::Terminated { error }).await;
            return Farewell { tx, rx };
        }
    };
    let limit = match (timeout, cfg.session_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut session = Session {
        cfg,
        dir: dir.path().to_path_buf(),
        tx,
        worker,
        op: Op::Idle,
        held: None,
        last_id: 0,
        deadline: limit.and_then(|l| Instant::now().checked_add(l)),
        limit,
        want_spare: cfg.warm_spare.then_some(&shared.spare_wanted),
        teardown: Some(Arc::clone(&shared.teardown)),
        last_alloc: &shared.last_alloc,
        in_memory: shared.in_memory,
    };
    shared.serving.store(true, Ordering::SeqCst);
    let end = session.serve(&mut rx, &shutdown).await;
    session.stop_op().await;
    // Nothing of this session runs on the workers' CPU any more: the spare
    // can be prefilled while the rest of the teardown and the next lease go on.
    shared.serving.store(false, Ordering::SeqCst);
    if cfg.warm_spare {
        shared.spare_wanted.notify_one();
    }
    retire(shared, session.worker.take(), dir).await;
    let last = match end {
        End::Gone => None,
        End::Close(id) => Some(Response::Closed { id }),
        End::Terminate(error) => Some(Response::Terminated { error }),
    };
    if let Some(msg) = last {
        last_frame(&mut session.tx, msg).await;
    }
    tracing::info!(dir = %session.dir.display(), "session ended");
    Farewell { tx: session.tx, rx }
}

/// Tears a session down: every process of its worker is sent SIGKILL (it
/// runs no more of the session's code) and the session's temp dir is
/// removed before this returns; reaping the processes and removing the
/// worker's cgroup go on in a background task of the server, tracked by its
/// `TaskTracker` (the server's shutdown waits for it) and holding
/// `Shared::teardown`, which the next session's first call waits for: no
/// call runs while the old worker still exits. `ServerStatus::retiring` is
/// true meanwhile. The client is answered, and the server offered again,
/// without waiting for the reap (a process exit here takes 0.3-1 ms, most
/// of a teardown). Both waits for an earlier teardown are bounded by
/// `KILL_WAIT` (a worker stuck in the kernel does not stall the server).
async fn retire(shared: &Arc<Shared>, worker: Option<PopenWorker>, dir: tempfile::TempDir) {
    let path = dir.path().to_path_buf();
    // Waits only if the previous session's teardown is still running, and
    // not for a worker stuck in the kernel past KILL_WAIT.
    let guard =
        tokio::time::timeout(KILL_WAIT, Arc::clone(&shared.teardown).lock_owned()).await.ok();
    shared.update(|st| st.retiring = true);
    let done = Arc::clone(shared);
    let mut reap = Box::pin(async move {
        if let Some(mut worker) = worker {
            // Signals the worker's whole tree when first polled.
            worker.kill().await;
        }
        done.update(|st| st.retiring = false);
        drop(guard);
    });
    // The first poll sends the kill; the reap goes on in the background.
    if futures::poll!(reap.as_mut()).is_pending() {
        shared.tasks.spawn(reap);
    }
    if let Err(e) = ops::remove_session_dir(shared.in_memory, dir).await {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove session directory");
    }
}

/// Sends the session's last frame (bounded: the client may not read).
async fn last_frame(tx: &mut Tx, msg: Response<'_>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(msg_frame(&msg))).await;
}

impl Session<'_> {
    /// Sends a small answer. A reply too large for a frame is answered with
    /// `FrameTooLarge` instead.
    pub(super) async fn send(&mut self, msg: &Response<'_>) -> Result<(), End> {
        let frame = msg_frame(msg);
        let (len, limit) = (frame.len() as u64, MAX_SESSION_FRAME as u64);
        let frame = match msg.id() {
            Some(id) if len > limit => {
                msg_frame(&Response::Error { id, error: WireError::FrameTooLarge { len, limit } })
            }
            _ => frame,
        };
        self.tx.send(frame).await.map_err(|_| End::Gone)
    }

    pub(super) async fn send_error(&mut self, id: u64, error: WireError) -> Result<(), End> {
        self.send(&Response::Error { id, error }).await
    }

    fn timed_out(limit: Option<Duration>) -> End {
        let limit_ms = millis(limit.unwrap_or_default());
        tracing::info!(limit_ms, "session timed out");
        End::Terminate(WireError::SessionTimeout { limit_ms })
    }

    async fn serve(&mut self, rx: &mut Rx, shutdown: &CancellationToken) -> End {
        loop {
            // A request held back while its predecessor was cancelled.
            if matches!(self.op, Op::Idle) {
                if let Some(item) = self.held.take() {
                    if let Err(end) = self.guarded(item, shutdown).await {
                        return end;
                    }
                    continue;
                }
            }
            // Read on unless a request is held, or a cancelled call is
            // winding down (its answer must come first).
            let winding_down = matches!(&self.op, Op::Call(c) if c.is_cancelled());
            let can_read = self.held.is_none() && !winding_down;
            let deadline = self.deadline;
            enum Ev {
                Shutdown,
                Deadline,
                Progress(Progress),
                Frame(Option<std::io::Result<Inbound>>),
            }
            let ev = tokio::select! {
                biased;
                () = shutdown.cancelled() => Ev::Shutdown,
                () = sleep_until(deadline) => Ev::Deadline,
                p = progress(&mut self.op, &mut self.tx) => Ev::Progress(p),
                f = rx.next(), if can_read => Ev::Frame(f),
            };
            let step = match ev {
                Ev::Shutdown => return End::Terminate(WireError::ServerShutdown),
                Ev::Deadline => return Self::timed_out(self.limit),
                Ev::Progress(p) => self.progressed(p).await,
                Ev::Frame(None) => return End::Gone,
                Ev::Frame(Some(Err(e))) => {
                    tracing::debug!(error = %e, "session connection failed");
                    return End::Gone;
                }
                Ev::Frame(Some(Ok(item))) => self.guarded(item, shutdown).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Handles one frame, bounded by the deadline and shutdown.
    async fn guarded(&mut self, item: Inbound, shutdown: &CancellationToken) -> Result<(), End> {
        let (deadline, limit) = (self.deadline, self.limit);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Err(End::Terminate(WireError::ServerShutdown)),
            () = sleep_until(deadline) => Err(Self::timed_out(limit)),
            r = self.on_frame(item) => r,
        }
    }

    /// The running operation made progress.
    async fn progressed(&mut self, p: Progress) -> Result<(), End> {
        match p {
            Progress::Call(done) => {
                let (worker, outcome) = *done;
                let Op::Call(call) = std::mem::replace(&mut self.op, Op::Idle) else {
                    unreachable!("only a call reports a call outcome")
                };
                self.worker = Some(worker);
                let id = call.id;
                match outcome {
                    None => self.send_error(id, WireError::Cancelled).await,
                    Some(Err(e)) => self.send_error(id, WireError::from_pool(e)).await,
                    Some(Ok(out)) if out.len() <= CHUNK => {
                        self.tx.send(data_frame(CALL_DONE, id, &out)).await.map_err(|_| End::Gone)
                    }
                    Some(Ok(out)) => {
                        let len = out.len() as u64;
                        self.send(&Response::CallBegin { id, len }).await?;
                        self.op = Op::Stream(Stream::bytes(id, out));
                        Ok(())
                    }
                }
            }
            Progress::Stream(step) => match step {
                Step::More => Ok(()),
                Step::Done => {
                    self.op = Op::Idle;
                    Ok(())
                }
                Step::Gone => Err(End::Gone),
                Step::Failed(error) => {
                    let id = self.op.id().unwrap_or_default();
                    self.op = Op::Idle;
                    self.send_error(id, error).await
                }
            },
        }
    }

    /// Stops the running operation and answers it `Cancelled` if it was not
    /// answered yet (a call's answer comes once its worker is reaped,
    /// through `progressed`; a streamed answer just stops).
    async fn cancel_op(&mut self) -> Result<(), End> {
        match std::mem::replace(&mut self.op, Op::Idle) {
            Op::Idle => Ok(()),
            Op::Call(call) => {
                call.cancel();
                self.op = Op::Call(call);
                Ok(())
            }
            Op::Upload(up) => {
                let (id, failed) = (up.id, up.writer.is_none());
                up.discard().await;
                // A failed upload was answered already.
                if failed { Ok(()) } else { self.send_error(id, WireError::Cancelled).await }
            }
            // A streamed answer just stops: it was answered (`DownloadBegin`,
            // `CallBegin`), and writing anything now could block on chunks the
            // client has yet to read while the client blocks writing to us.
            Op::Stream(_) => Ok(()),
        }
    }

    /// Teardown: stops the running operation without answering it.
    async fn stop_op(&mut self) {
        match std::mem::replace(&mut self.op, Op::Idle) {
            Op::Call(mut call) => {
                call.cancel();
                if let Ok((worker, _)) = tokio::time::timeout(KILL_WAIT, call.wait()).await {
                    self.worker = Some(worker);
                }
            }
            Op::Upload(up) => up.discard().await,
            Op::Idle | Op::Stream(_) => {}
        }
    }

    async fn on_frame(&mut self, item: Inbound) -> Result<(), End> {
        let frame = match item {
            Inbound::Frame(f) => f,
            Inbound::TooLarge { len, head } => return self.too_large(len, &head).await,
        };
        let frame = frame.freeze();
        let req: Request<'_> = postcard::from_bytes(&frame).map_err(|e| {
            End::Terminate(WireError::Protocol { message: format!("undecodable request: {e}") })
        })?;
        // Frames that belong to the running operation.
        match (&req, &self.op) {
            (Request::Cancel { id }, op) => {
                return if op.id() == Some(*id) { self.cancel_op().await } else { Ok(()) };
            }
            (Request::UploadChunk { id, data }, Op::Upload(up)) if up.id == *id => {
                let data = frame.slice_ref(data);
                return self.upload_chunk(data).await;
            }
            (Request::UploadEnd { id }, Op::Upload(up)) if up.id == *id => {
                return self.upload_end().await;
            }
            (Request::UploadChunk { id, .. } | Request::UploadEnd { id }, _) => {
                if *id <= self.last_id {
                    return Ok(()); // the rest of a cancelled or failed upload
                }
                return Err(End::Terminate(WireError::Protocol {
                    message: format!("{} for an upload that was not started", req.kind()),
                }));
            }
            (_, Op::Idle) => {}
            (_, op) => {
                // A new request implicitly cancels the running operation;
                // it is handled once that is answered.
                let winding_down = matches!(op, Op::Call(c) if c.is_cancelled());
                self.held = Some(Inbound::Frame(BytesMut::from(&frame[..])));
                return if winding_down { Ok(()) } else { self.cancel_op().await };
            }
        }
        if let Some(id) = request_id(&req) {
            self.last_id = self.last_id.max(id);
        }
        match req {
            Request::Hello { version } => self.hello(version).await,
            Request::UploadBegin { id, path, len } => self.upload_begin(id, path, len).await,
            Request::Download { id, path } => self.download(id, path).await,
            Request::Remove { id, path } => self.remove(id, path).await,
            Request::ListDir { id, path } => self.listdir(id, path).await,
            Request::Call { id, name, payload, timeout_ms } => {
                let task = ErasedTask::from_raw(name.to_owned(), frame.slice_ref(payload));
                let limit = timeout_ms.map(|ms| Duration::from_millis(ms).min(MAX_CALL_LIMIT));
                self.call(id, task, limit).await
            }
            Request::Close { id } => Err(End::Close(id)),
            Request::UploadChunk { .. } | Request::UploadEnd { .. } | Request::Cancel { .. } => {
                unreachable!("handled above")
            }
        }
    }

    /// A frame over the limit: answer the request it starts, if it can be told.
    async fn too_large(&mut self, len: u64, head: &[u8]) -> Result<(), End> {
        let limit = MAX_SESSION_FRAME as u64;
        let error = WireError::FrameTooLarge { len, limit };
        let Some((_, id)) = peek_id(head) else {
            return Err(End::Terminate(error));
        };
        let current = self.op.id();
        match &mut self.op {
            Op::Upload(up) if up.id == id => {
                // The upload fails; its later chunks are dropped.
                if let Some(w) = up.writer.take() {
                    let _ = w.finish().await;
                    return self.send_error(id, error).await;
                }
                Ok(())
            }
            Op::Idle => {
                self.last_id = self.last_id.max(id);
                self.send_error(id, error).await
            }
            _ if current == Some(id) => Err(End::Terminate(error)),
            _ => {
                self.held = Some(Inbound::TooLarge { len, head: Bytes::copy_from_slice(head) });
                self.cancel_op().await
            }
        }
    }
}

fn request_id(req: &Request<'_>) -> Option<u64> {
    match req {
        Request::Hello { .. } => None,
        Request::UploadBegin { id, .. }
        | Request::UploadChunk { id, .. }
        | Request::UploadEnd { id }
        | Request::Download { id, .. }
        | Request::Remove { id, .. }
        | Request::ListDir { id, .. }
        | Request::Call { id, .. }
        | Request::Close { id }
        | Request::Cancel { id } => Some(*id),
    }
}
