//! The client side of a session: `Session`.

use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use popen_pool::Task;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::error::SessionError;
use super::handshake::{
    CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, ClientHello, MAX_KEY_LEN,
    RPC_MAGIC, read_i32, read_str, write_str,
};
use super::proto::{
    CHUNK, DirEntry, Request, Response, SESSION_PROTOCOL_VERSION, session_codec,
    upload_chunk_header,
};

/// How to open a session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Ask the server to end the session after this long (TVM's `session_timeout`).
    pub session_timeout: Option<Duration>,
    /// The server's shared token, if it requires one.
    pub token: Option<String>,
    /// Limit of the TCP connect plus handshake (default 10 s).
    pub connect_timeout: Duration,
    /// Limit of each request's wait for its answer (default 10 min); a call's
    /// own timeout, if longer, extends it.
    pub request_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            session_timeout: None,
            token: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
        }
    }
}

impl ConnectOptions {
    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, limit: Option<Duration>) -> Self {
        self.session_timeout = limit;
        self
    }

    /// Sets the token.
    #[must_use]
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Closed,
    /// The connection broke or the server ended the session.
    Broken,
}

/// A session with a device server.
///
/// Its lifetime is explicit: [`close`](Session::close) tells the server, waits
/// until it has cleaned up (worker killed, temp dir removed) and returns the
/// outcome; it is idempotent. Dropping a session without closing it closes
/// its socket at once, and the server notices and frees the device
/// immediately. Methods take `&mut self`: one request at a time.
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
    io: Framed<TcpStream, LengthDelimitedCodec>,
    state: State,
    next_id: u64,
    addr: String,
    server_key: String,
    workdir: String,
    max_upload: u64,
    session_timeout: Option<Duration>,
    request_timeout: Duration,
}

/// An answer to one request, decoded.
enum Reply {
    Ok,
    DownloadBegin(u64),
    Listing(Vec<DirEntry>),
    CallDone(Bytes),
    Closed,
}

fn io_lost(e: std::io::Error) -> SessionError {
    SessionError::ConnectionLost { source: Some(e) }
}

impl Session {
    /// Connects to the device server at `addr` (`host:port`) with its match
    /// key (without a tracker: the server's key).
    ///
    /// # Errors
    ///
    /// [`SessionError::Connect`], [`SessionError::KeyMismatch`],
    /// [`SessionError::Busy`], [`SessionError::Unauthorized`],
    /// [`SessionError::Handshake`], [`SessionError::Timeout`].
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
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| SessionError::Connect { addr: addr.to_owned(), source })?;
        let _ = stream.set_nodelay(true);
        let hello = ClientHello {
            matchkey: matchkey.to_owned(),
            timeout: opts.session_timeout,
            token: opts.token.clone(),
        };
        let handshake_err = |e: std::io::Error| SessionError::Handshake {
            message: format!("{e} (is {addr} an RPC server?)"),
        };
        stream.write_all(&RPC_MAGIC.to_le_bytes()).await.map_err(handshake_err)?;
        write_str(&mut stream, &hello.to_wire()).await.map_err(handshake_err)?;
        let code = read_i32(&mut stream).await.map_err(handshake_err)?;
        match code {
            CODE_SUCCESS => {}
            CODE_MISMATCH => {
                return Err(SessionError::KeyMismatch { matchkey: matchkey.to_owned() });
            }
            CODE_DUPLICATE => return Err(SessionError::Busy),
            CODE_UNAUTHORIZED => return Err(SessionError::Unauthorized),
            other => {
                return Err(SessionError::Handshake {
                    message: format!("unexpected handshake answer {other:#x}"),
                });
            }
        }
        let server = read_str(&mut stream, MAX_KEY_LEN).await.map_err(handshake_err)?;
        let server_key = server.strip_prefix("server:").unwrap_or(&server).to_owned();
        let mut sess = Session {
            io: Framed::new(stream, session_codec()),
            state: State::Open,
            next_id: 1,
            addr: addr.to_owned(),
            server_key,
            workdir: String::new(),
            max_upload: u64::MAX,
            session_timeout: None,
            request_timeout: opts.request_timeout,
        };
        sess.send(&Request::Hello { version: SESSION_PROTOCOL_VERSION }).await?;
        let frame = sess.next_frame(opts.connect_timeout).await?;
        match postcard::from_bytes::<Response<'_>>(&frame) {
            Ok(Response::Hello { version, workdir, max_upload, session_timeout_ms, .. })
                if version == SESSION_PROTOCOL_VERSION =>
            {
                sess.workdir = workdir;
                sess.max_upload = max_upload;
                sess.session_timeout = session_timeout_ms.map(Duration::from_millis);
                Ok(sess)
            }
            Ok(Response::Terminated { error }) => Err(SessionError::from_wire(error)),
            Ok(other) => Err(SessionError::protocol(format!("expected Hello, got {other:?}"))),
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

    fn check_open(&self) -> Result<(), SessionError> {
        match self.state {
            State::Open => Ok(()),
            State::Closed => Err(SessionError::Closed),
            State::Broken => Err(SessionError::ConnectionLost { source: None }),
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn encode(req: &Request<'_>) -> Result<Bytes, SessionError> {
        postcard::to_stdvec(req).map(Bytes::from).map_err(|e| SessionError::protocol(e.to_string()))
    }

    async fn send(&mut self, req: &Request<'_>) -> Result<(), SessionError> {
        let frame = Self::encode(req)?;
        if let Err(e) = self.io.send(frame).await {
            self.state = State::Broken;
            return Err(io_lost(e));
        }
        Ok(())
    }

    async fn feed(&mut self, req: &Request<'_>) -> Result<(), SessionError> {
        let frame = Self::encode(req)?;
        if let Err(e) = self.io.feed(frame).await {
            self.state = State::Broken;
            return Err(io_lost(e));
        }
        Ok(())
    }

    /// Writes one `UploadChunk` frame straight from `data` (no copy into the
    /// codec's buffer): the header through the socket, then the bytes.
    async fn write_chunk(&mut self, id: u64, data: &[u8]) -> Result<(), SessionError> {
        let header = upload_chunk_header(id, data.len());
        let mut prefix = ((header.len() + data.len()) as u32).to_be_bytes().to_vec();
        prefix.extend_from_slice(&header);
        let result = async {
            SinkExt::<Bytes>::flush(&mut self.io).await?;
            let stream = self.io.get_mut();
            stream.write_all(&prefix).await?;
            stream.write_all(data).await
        }
        .await;
        if let Err(e) = result {
            self.state = State::Broken;
            return Err(io_lost(e));
        }
        Ok(())
    }

    async fn next_frame(&mut self, limit: Duration) -> Result<BytesMut, SessionError> {
        match tokio::time::timeout(limit, self.io.next()).await {
            Err(_) => {
                self.state = State::Broken;
                Err(SessionError::Timeout { what: "waiting for the device server", limit })
            }
            Ok(None) => {
                self.state = State::Broken;
                Err(SessionError::ConnectionLost { source: None })
            }
            Ok(Some(Err(e))) => {
                self.state = State::Broken;
                Err(io_lost(e))
            }
            Ok(Some(Ok(frame))) => Ok(frame),
        }
    }

    /// Reads frames until the answer to `id` (skipping answers to requests
    /// abandoned earlier).
    async fn reply(&mut self, id: u64, limit: Duration) -> Result<Reply, SessionError> {
        loop {
            let frame = self.next_frame(limit).await?.freeze();
            let resp = match postcard::from_bytes::<Response<'_>>(&frame) {
                Ok(r) => r,
                Err(e) => {
                    self.state = State::Broken;
                    return Err(SessionError::protocol(format!("undecodable response: {e}")));
                }
            };
            let (rid, reply) = match resp {
                Response::Terminated { error } => {
                    self.state = State::Broken;
                    return Err(SessionError::from_wire(error));
                }
                Response::Error { id: rid, error } => (rid, Err(SessionError::from_wire(error))),
                Response::Ok { id: rid } => (rid, Ok(Reply::Ok)),
                Response::DownloadBegin { id: rid, len } => (rid, Ok(Reply::DownloadBegin(len))),
                Response::Listing { id: rid, entries } => (rid, Ok(Reply::Listing(entries))),
                Response::CallDone { id: rid, payload } => {
                    (rid, Ok(Reply::CallDone(frame.slice_ref(payload))))
                }
                Response::Closed { id: rid } => (rid, Ok(Reply::Closed)),
                Response::Hello { .. } | Response::DownloadChunk { .. } => {
                    self.state = State::Broken;
                    return Err(SessionError::protocol(format!("unexpected frame {resp:?}")));
                }
            };
            if rid == id {
                return reply;
            }
            if rid > id {
                self.state = State::Broken;
                return Err(SessionError::protocol(format!("answer to {rid} before {id}")));
            }
        }
    }

    /// Uploads `data` to `remote` (a path relative to the session dir).
    ///
    /// # Errors
    ///
    /// [`SessionError::BadPath`], [`SessionError::UploadTooLarge`],
    /// [`SessionError::RemoteIo`], connection errors.
    pub async fn upload_bytes(&mut self, data: &[u8], remote: &str) -> Result<(), SessionError> {
        self.check_open()?;
        let len = data.len() as u64;
        if len > self.max_upload {
            return Err(SessionError::UploadTooLarge { len, limit: self.max_upload });
        }
        let id = self.new_id();
        self.feed(&Request::UploadBegin { id, path: remote, len }).await?;
        for chunk in data.chunks(CHUNK) {
            self.write_chunk(id, chunk).await?;
        }
        self.send(&Request::UploadEnd { id }).await?;
        self.expect_ok(id).await
    }

    /// Uploads the local file `local` to `remote`, streaming it in chunks.
    ///
    /// # Errors
    ///
    /// As [`upload_bytes`](Session::upload_bytes), and
    /// [`SessionError::LocalIo`] if the file cannot be read.
    pub async fn upload(
        &mut self,
        local: impl AsRef<Path>,
        remote: &str,
    ) -> Result<(), SessionError> {
        self.check_open()?;
        let local = local.as_ref();
        let local_err =
            |source| SessionError::LocalIo { path: local.display().to_string(), source };
        let mut file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let len = file.metadata().await.map_err(local_err)?.len();
        if len > self.max_upload {
            return Err(SessionError::UploadTooLarge { len, limit: self.max_upload });
        }
        let id = self.new_id();
        self.feed(&Request::UploadBegin { id, path: remote, len }).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < len {
            let want = CHUNK.min((len - sent) as usize);
            if let Err(e) = file.read_exact(&mut buf[..want]).await {
                // The server expects `len` bytes; this session cannot go on.
                self.state = State::Broken;
                return Err(local_err(e));
            }
            self.write_chunk(id, &buf[..want]).await?;
            sent += want as u64;
        }
        self.send(&Request::UploadEnd { id }).await?;
        self.expect_ok(id).await
    }

    async fn expect_ok(&mut self, id: u64) -> Result<(), SessionError> {
        match self.reply(id, self.request_timeout).await? {
            Reply::Ok => Ok(()),
            _ => Err(self.broken("expected Ok")),
        }
    }

    fn broken(&mut self, what: &str) -> SessionError {
        self.state = State::Broken;
        SessionError::protocol(format!("{what}: the server answered something else"))
    }

    /// Downloads the remote file `remote`.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`], connection errors.
    pub async fn download(&mut self, remote: &str) -> Result<Vec<u8>, SessionError> {
        let mut out = Vec::new();
        self.download_with(remote, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Downloads `remote` into the local file `local`; returns its size.
    ///
    /// # Errors
    ///
    /// As [`download`](Session::download), and [`SessionError::LocalIo`].
    pub async fn download_to(
        &mut self,
        remote: &str,
        local: impl AsRef<Path>,
    ) -> Result<u64, SessionError> {
        let local = local.as_ref();
        let data = self.download(remote).await?;
        tokio::fs::write(local, &data).await.map_err(|source| SessionError::LocalIo {
            path: local.display().to_string(),
            source,
        })?;
        Ok(data.len() as u64)
    }

    async fn download_with(
        &mut self,
        remote: &str,
        mut sink: impl FnMut(&[u8]) -> Result<(), SessionError>,
    ) -> Result<u64, SessionError> {
        self.check_open()?;
        let id = self.new_id();
        self.send(&Request::Download { id, path: remote }).await?;
        let len = match self.reply(id, self.request_timeout).await? {
            Reply::DownloadBegin(len) => len,
            _ => return Err(self.broken("expected a download")),
        };
        let mut got = 0u64;
        while got < len {
            let frame = self.next_frame(self.request_timeout).await?;
            match postcard::from_bytes::<Response<'_>>(&frame) {
                Ok(Response::DownloadChunk { id: rid, data }) if rid == id => {
                    got += data.len() as u64;
                    sink(data)?;
                }
                Ok(Response::Terminated { error }) => {
                    self.state = State::Broken;
                    return Err(SessionError::from_wire(error));
                }
                _ => return Err(self.broken("expected a download chunk")),
            }
        }
        Ok(len)
    }

    /// Removes a remote file or directory (recursively).
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`], connection errors.
    pub async fn remove(&mut self, remote: &str) -> Result<(), SessionError> {
        self.check_open()?;
        let id = self.new_id();
        self.send(&Request::Remove { id, path: remote }).await?;
        self.expect_ok(id).await
    }

    /// Lists a remote directory (`""`: the session dir), sorted by name.
    ///
    /// # Errors
    ///
    /// [`SessionError::NotFound`], [`SessionError::BadPath`], connection errors.
    pub async fn listdir(&mut self, remote: &str) -> Result<Vec<DirEntry>, SessionError> {
        self.check_open()?;
        let id = self.new_id();
        self.send(&Request::ListDir { id, path: remote }).await?;
        match self.reply(id, self.request_timeout).await? {
            Reply::Listing(entries) => Ok(entries),
            _ => Err(self.broken("expected a listing")),
        }
    }

    /// Runs `task` in the session's worker on the server (a task type the
    /// server's worker program registers), with an optional time limit. The
    /// worker, and what the task keeps in its `WorkerContext`, lives until the
    /// session ends; a crash or timeout replaces it.
    ///
    /// # Errors
    ///
    /// [`SessionError::Task`] with the pool's error (e.g. `worker died (SIGSEGV)`,
    /// a timeout, the task's own error), [`SessionError::SessionTimeout`],
    /// connection errors.
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
    /// the postcard-encoded output.
    ///
    /// # Errors
    ///
    /// As [`call`](Session::call).
    pub async fn call_raw(
        &mut self,
        name: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Bytes, SessionError> {
        self.check_open()?;
        let id = self.new_id();
        let timeout_ms = timeout.map(|t| t.as_millis() as u64);
        self.send(&Request::Call { id, name, payload, timeout_ms }).await?;
        let limit = match timeout {
            Some(t) => self.request_timeout.max(t + Duration::from_secs(30)),
            None => self.request_timeout,
        };
        match self.reply(id, limit).await? {
            Reply::CallDone(out) => Ok(out),
            _ => Err(self.broken("expected a call result")),
        }
    }

    /// Ends the session: the server kills the session's worker and removes its
    /// temp dir, then acknowledges. Idempotent: later calls return `Ok(())`.
    ///
    /// # Errors
    ///
    /// If the connection broke before the acknowledgement, or the server had
    /// already ended the session (e.g. [`SessionError::SessionTimeout`] was
    /// reported earlier: then the session is gone and `close` says so once).
    pub async fn close(&mut self) -> Result<(), SessionError> {
        match self.state {
            State::Closed => return Ok(()),
            State::Broken => {
                self.state = State::Closed;
                let _ = self.io.get_mut().shutdown().await;
                return Err(SessionError::ConnectionLost { source: None });
            }
            State::Open => {}
        }
        let id = self.new_id();
        let result = async {
            self.send(&Request::Close { id }).await?;
            match self.reply(id, self.request_timeout).await? {
                Reply::Closed => Ok(()),
                _ => Err(SessionError::protocol("expected Closed")),
            }
        }
        .await;
        self.state = State::Closed;
        let _ = self.io.get_mut().shutdown().await;
        result
    }
}
