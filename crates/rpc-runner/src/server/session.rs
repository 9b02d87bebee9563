//! One session on the device server: the request loop, its temp dir and its
//! worker, torn down however the session ends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use popen_pool::{ErasedTask, PopenWorker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::ServerConfig;
use super::paths::resolve;
use crate::session::proto::{
    CHUNK, DirEntry, Request, Response, SESSION_PROTOCOL_VERSION, WireError, session_codec,
};

type Tx = SplitSink<Framed<TcpStream, LengthDelimitedCodec>, Bytes>;
type Rx = SplitStream<Framed<TcpStream, LengthDelimitedCodec>>;

/// Why the request loop stopped.
enum End {
    /// The client closed the connection (or it broke).
    Gone,
    /// The client sent `Close { id }`.
    Close(u64),
    /// The server ends the session with this error (timeout, shutdown, protocol).
    Terminate(WireError),
}

/// An upload in progress.
struct Upload {
    id: u64,
    /// `None` once it failed (the error was sent); later chunks are dropped.
    writer: Option<Writer>,
    expected: u64,
    written: u64,
}

/// Writes an upload's chunks to its file on a blocking thread, straight from
/// the received frames, while the session goes on reading the next ones.
struct Writer {
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Writer {
    fn new(mut file: std::fs::File) -> Self {
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let done = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            while let Some(chunk) = rx.blocking_recv() {
                file.write_all(&chunk)?;
            }
            Ok(())
        });
        Writer { chunks, done }
    }

    /// Queues a chunk; `Err` with the writer's own error if it stopped.
    async fn write(&mut self, chunk: Bytes) -> Result<(), WireError> {
        if self.chunks.send(chunk).await.is_ok() {
            return Ok(());
        }
        Err(self.finish_now().await)
    }

    async fn finish_now(&mut self) -> WireError {
        match (&mut self.done).await {
            Ok(Err(e)) => WireError::Io { message: e.to_string() },
            Ok(Ok(())) => WireError::Io { message: "upload writer stopped early".into() },
            Err(e) => WireError::Io { message: format!("upload writer failed: {e}") },
        }
    }

    /// Waits until every chunk is written.
    async fn finish(self) -> Result<(), WireError> {
        let Writer { chunks, done } = self;
        drop(chunks);
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(WireError::Io { message: e.to_string() }),
            Err(e) => Err(WireError::Io { message: format!("upload writer failed: {e}") }),
        }
    }
}

struct Session<'a> {
    cfg: &'a ServerConfig,
    dir: PathBuf,
    tx: Tx,
    worker: Option<PopenWorker>,
    upload: Option<Upload>,
    deadline: Option<Instant>,
    limit: Option<Duration>,
}

fn encode(msg: &Response<'_>) -> Bytes {
    postcard::to_stdvec(msg).expect("responses always serialize").into()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Runs a session on `stream` (handshake done) until it ends, then kills its
/// worker and removes its temp dir.
pub(crate) async fn run(
    cfg: &ServerConfig,
    stream: TcpStream,
    timeout: Option<Duration>,
    shutdown: CancellationToken,
) {
    let dir = match tempfile::Builder::new()
        .prefix("rpc-session-")
        .tempdir_in(cfg.work_root.clone().unwrap_or_else(std::env::temp_dir))
    {
        Ok(dir) => dir,
        Err(e) => {
            tracing::error!(error = %e, "cannot create a session directory");
            return;
        }
    };
    let limit = match (timeout, cfg.session_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (tx, mut rx) = Framed::with_capacity(stream, session_codec(), 4 << 20).split();
    let mut session = Session {
        cfg,
        dir: dir.path().to_path_buf(),
        tx,
        worker: None,
        upload: None,
        deadline: limit.map(|l| Instant::now() + l),
        limit,
    };
    let end = session.serve(&mut rx, &shutdown).await;
    // Tear down first, answer `Closed` after: the client learns the server is
    // clean when close() returns.
    if let Some(mut worker) = session.worker.take() {
        worker.kill().await;
    }
    session.upload = None;
    let dir_path = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        tracing::warn!(dir = %dir_path.display(), error = %e, "cannot remove session directory");
    }
    let farewell = match end {
        End::Gone => None,
        End::Close(id) => Some(Response::Closed { id }),
        End::Terminate(error) => Some(Response::Terminated { error }),
    };
    if let Some(msg) = farewell {
        let _ = tokio::time::timeout(Duration::from_secs(5), session.tx.send(encode(&msg))).await;
    }
    // Close our side, then wait briefly for the client to close, so that the
    // client reads our last frame rather than a connection reset.
    if let Ok(framed) = session.tx.reunite(rx) {
        let mut stream = framed.into_inner();
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
    tracing::info!(dir = %dir_path.display(), "session ended");
}

impl Session<'_> {
    async fn send(&mut self, msg: &Response<'_>) -> Result<(), End> {
        self.tx.send(encode(msg)).await.map_err(|_| End::Gone)
    }

    async fn send_error(&mut self, id: u64, error: WireError) -> Result<(), End> {
        self.send(&Response::Error { id, error }).await
    }

    async fn serve(&mut self, rx: &mut Rx, shutdown: &CancellationToken) -> End {
        loop {
            let frame = tokio::select! {
                biased;
                () = shutdown.cancelled() => return End::Terminate(WireError::ServerShutdown),
                () = sleep_until(self.deadline) => return self.timed_out(),
                frame = rx.next() => frame,
            };
            let frame = match frame {
                None => return End::Gone,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "session connection failed");
                    return End::Gone;
                }
                Some(Ok(frame)) => frame,
            };
            if let Err(end) = self.handle(frame, rx, shutdown).await {
                return end;
            }
        }
    }

    fn timed_out(&self) -> End {
        let limit_ms = self.limit.unwrap_or_default().as_millis() as u64;
        tracing::info!(limit_ms, "session timed out");
        End::Terminate(WireError::SessionTimeout { limit_ms })
    }

    async fn handle(
        &mut self,
        frame: BytesMut,
        rx: &mut Rx,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let frame = frame.freeze();
        let req: Request<'_> = postcard::from_bytes(&frame).map_err(|e| {
            End::Terminate(WireError::Protocol { message: format!("undecodable request: {e}") })
        })?;
        match req {
            Request::Hello { version } => {
                if version != SESSION_PROTOCOL_VERSION {
                    return Err(End::Terminate(WireError::Protocol {
                        message: format!(
                            "client speaks session protocol {version}, server {SESSION_PROTOCOL_VERSION}"
                        ),
                    }));
                }
                let hello = Response::Hello {
                    version: SESSION_PROTOCOL_VERSION,
                    key: self.cfg.key.clone(),
                    workdir: self.dir.display().to_string(),
                    max_upload: self.cfg.max_upload_bytes,
                    session_timeout_ms: self.limit.map(|l| l.as_millis() as u64),
                };
                self.send(&hello).await
            }
            Request::UploadBegin { id, path, len } => self.upload_begin(id, path, len).await,
            Request::UploadChunk { id, data } => self.upload_chunk(id, frame.slice_ref(data)).await,
            Request::UploadEnd { id } => self.upload_end(id).await,
            Request::Download { id, path } => self.download(id, path).await,
            Request::Remove { id, path } => self.remove(id, path).await,
            Request::ListDir { id, path } => self.listdir(id, path).await,
            Request::Call { id, name, payload, timeout_ms } => {
                let task = ErasedTask::from_raw(name.to_owned(), Bytes::copy_from_slice(payload));
                self.call(id, task, timeout_ms.map(Duration::from_millis), rx, shutdown).await
            }
            Request::Close { id } => Err(End::Close(id)),
        }
    }

    async fn upload_begin(&mut self, id: u64, path: &str, len: u64) -> Result<(), End> {
        self.upload = Some(Upload { id, writer: None, expected: len, written: 0 });
        let limit = self.cfg.max_upload_bytes;
        if len > limit {
            return self.send_error(id, WireError::UploadTooLarge { len, limit }).await;
        }
        let target = match resolve(&self.dir, path, false) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        match create_file(&target).await {
            Ok(file) => {
                // Reserve the blocks up front: the writes then only fill them.
                if len > 0 {
                    let _ = nix::fcntl::posix_fallocate(&file, 0, len as i64);
                }
                if let Some(up) = self.upload.as_mut() {
                    up.writer = Some(Writer::new(file));
                }
                Ok(())
            }
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    async fn upload_chunk(&mut self, id: u64, data: Bytes) -> Result<(), End> {
        let Some(up) = self.upload.as_mut().filter(|u| u.id == id) else {
            return Err(End::Terminate(WireError::Protocol {
                message: format!("chunk for upload {id}, which was not started"),
            }));
        };
        let Some(writer) = up.writer.as_mut() else { return Ok(()) }; // failed: drop the rest
        up.written += data.len() as u64;
        let result = if up.written > up.expected {
            Err(WireError::Protocol {
                message: format!("upload {id} sent more than the {} bytes announced", up.expected),
            })
        } else {
            writer.write(data).await
        };
        if let Err(e) = result {
            up.writer = None;
            return self.send_error(id, e).await;
        }
        Ok(())
    }

    async fn upload_end(&mut self, id: u64) -> Result<(), End> {
        let Some(mut up) = self.upload.take().filter(|u| u.id == id) else {
            return Err(End::Terminate(WireError::Protocol {
                message: format!("end of upload {id}, which was not started"),
            }));
        };
        let Some(writer) = up.writer.take() else {
            return Ok(()); // the error was already sent
        };
        let written = writer.finish().await;
        if up.written != up.expected {
            let message = format!("upload {id} sent {} of {} bytes", up.written, up.expected);
            return self.send_error(id, WireError::Protocol { message }).await;
        }
        match written {
            Ok(()) => self.send(&Response::Ok { id }).await,
            Err(e) => self.send_error(id, e).await,
        }
    }

    async fn download(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, false) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        let mut file = match tokio::fs::File::open(&target).await {
            Ok(f) => f,
            Err(e) => return self.send_error(id, io_error(&e, path)).await,
        };
        let len = match file.metadata().await {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                let error = WireError::Io { message: format!("{path:?} is not a regular file") };
                return self.send_error(id, error).await;
            }
            Err(e) => return self.send_error(id, io_error(&e, path)).await,
        };
        self.send(&Response::DownloadBegin { id, len }).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < len {
            let want = CHUNK.min((len - sent) as usize);
            if let Err(e) = file.read_exact(&mut buf[..want]).await {
                // The client expects `len` bytes: the stream is unusable now.
                return Err(End::Terminate(WireError::Io {
                    message: format!("reading {path:?} failed mid-download: {e}"),
                }));
            }
            self.tx
                .feed(encode(&Response::DownloadChunk { id, data: &buf[..want] }))
                .await
                .map_err(|_| End::Gone)?;
            sent += want as u64;
        }
        self.tx.flush().await.map_err(|_| End::Gone)
    }

    async fn remove(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, false) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        let result = match tokio::fs::symlink_metadata(&target).await {
            Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(&target).await,
            Ok(_) => tokio::fs::remove_file(&target).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.send(&Response::Ok { id }).await,
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    async fn listdir(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, true) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        match list(&target).await {
            Ok(entries) => self.send(&Response::Listing { id, entries }).await,
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    async fn call(
        &mut self,
        id: u64,
        task: ErasedTask,
        limit: Option<Duration>,
        rx: &mut Rx,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        if self.worker.is_none() {
            let program = self.cfg.worker.clone().current_dir(&self.dir);
            let worker = PopenWorker::builder(program)
                .stdout(self.cfg.worker_output)
                .stderr(self.cfg.worker_output)
                .build();
            match worker {
                Ok(w) => self.worker = Some(w),
                Err(e) => return self.send_error(id, WireError::from_pool(e)).await,
            }
        }
        let worker = self.worker.as_mut().expect("worker was just created");
        let deadline = self.deadline;
        // While the task runs, the session still watches its deadline, the
        // server's shutdown and the client's connection.
        enum Ev {
            Done(Result<Bytes, popen_pool::PoolError>),
            Deadline,
            Shutdown,
            Client(Option<Result<BytesMut, std::io::Error>>),
        }
        let ev = {
            let run = worker.run_erased(&task, limit);
            tokio::pin!(run);
            tokio::select! {
                biased;
                r = &mut run => Ev::Done(r),
                () = shutdown.cancelled() => Ev::Shutdown,
                () = sleep_until(deadline) => Ev::Deadline,
                f = rx.next() => Ev::Client(f),
            }
        };
        match ev {
            Ev::Done(Ok(out)) => self.send(&Response::CallDone { id, payload: &out }).await,
            Ev::Done(Err(e)) => self.send_error(id, WireError::from_pool(e)).await,
            // The dropped `run` future killed the worker; `run` (the caller)
            // tears the rest down.
            Ev::Shutdown => Err(End::Terminate(WireError::ServerShutdown)),
            Ev::Deadline => Err(self.timed_out()),
            Ev::Client(None | Some(Err(_))) => Err(End::Gone),
            Ev::Client(Some(Ok(frame))) => {
                // The client gave up on the call (its future was dropped) and
                // moved on: the call is abandoned, the worker killed.
                if let Some(mut w) = self.worker.take() {
                    w.kill().await;
                }
                let error = WireError::Worker { message: "call abandoned by the client".into() };
                self.send_error(id, error).await?;
                Box::pin(self.handle(frame, rx, shutdown)).await
            }
        }
    }
}

async fn create_file(target: &Path) -> std::io::Result<std::fs::File> {
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    Ok(tokio::fs::File::create(target).await?.into_std().await)
}

async fn list(dir: &Path) -> std::io::Result<Vec<DirEntry>> {
    let mut rd = tokio::fs::read_dir(dir).await?;
    let mut entries = Vec::new();
    while let Some(e) = rd.next_entry().await? {
        let meta = e.metadata().await?;
        entries.push(DirEntry {
            name: e.file_name().to_string_lossy().into_owned(),
            is_dir: meta.is_dir(),
            size: if meta.is_dir() { 0 } else { meta.len() },
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn io_error(e: &std::io::Error, path: &str) -> WireError {
    if e.kind() == std::io::ErrorKind::NotFound {
        WireError::NotFound { path: path.to_owned() }
    } else {
        WireError::Io { message: format!("{path:?}: {e}") }
    }
}
