//! The device server: registers with a tracker, accepts one session at a
//! time, and isolates each session's work in a `PopenWorker`.

mod paths;
mod registration;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popen_pool::{OutputMode, WorkerProgram};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::handshake::{
    CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, ClientHello, MAX_KEY_LEN,
    RPC_MAGIC, read_i32, read_str, write_str,
};

/// How a device server runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The device key clients request through the tracker (e.g. `"cpu"`).
    pub key: String,
    /// The tracker to register with (`host:port`); `None`: no tracker, and
    /// the match key is the key itself.
    pub tracker: Option<String>,
    /// The address the tracker hands out for this server when it cannot see
    /// the right one (NAT, containers). `None`: the peer address the tracker sees.
    pub custom_addr: Option<String>,
    /// If set, clients must present this token (`-token=` in the handshake).
    pub token: Option<String>,
    /// Upper bound of every session's length, whatever the client asks.
    pub session_timeout: Option<Duration>,
    /// Largest upload accepted, in bytes (default 1 GiB).
    pub max_upload_bytes: u64,
    /// The program the session workers run: it serves the task types a
    /// client can `call` (the `rpc-runner` binary itself, or a test binary).
    pub worker: WorkerProgram,
    /// Where session temp dirs are created (default: the system temp dir).
    pub work_root: Option<PathBuf>,
    /// Where the session workers' stdout/stderr go (default: inherited).
    pub worker_output: OutputMode,
    /// How long a client may take to complete its handshake (default 10 s).
    pub handshake_timeout: Duration,
    /// Re-register with a fresh match key when the current one was leased
    /// but no client connected for this long (default 4 s, as TVM).
    pub unused_lease_timeout: Duration,
    /// How often the server checks its lease with the tracker (default 1 s).
    pub tracker_poll: Duration,
}

impl ServerConfig {
    /// A configuration for `key` whose sessions run `worker`, with defaults.
    pub fn new(key: impl Into<String>, worker: WorkerProgram) -> Self {
        ServerConfig {
            key: key.into(),
            tracker: None,
            custom_addr: None,
            token: None,
            session_timeout: None,
            max_upload_bytes: 1 << 30,
            worker,
            work_root: None,
            worker_output: OutputMode::Inherit,
            handshake_timeout: Duration::from_secs(10),
            unused_lease_timeout: Duration::from_secs(4),
            tracker_poll: Duration::from_secs(1),
        }
    }
}

/// What a device server is doing, observable through [`ServerHandle::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStatus {
    /// A session is running.
    pub busy: bool,
    /// Sessions served so far.
    pub sessions: u64,
    /// The server is registered with its tracker and its current match key
    /// is PUT (always false without a tracker).
    pub registered: bool,
    /// The current match key.
    pub matchkey: String,
}

pub(crate) struct Shared {
    pub(crate) cfg: ServerConfig,
    pub(crate) port: u16,
    pub(crate) state: Mutex<ServerStatus>,
    pub(crate) status: watch::Sender<ServerStatus>,
    /// A session ended: register a fresh match key.
    pub(crate) rekey: Notify,
}

impl Shared {
    pub(crate) fn update(&self, f: impl FnOnce(&mut ServerStatus)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        self.status.send_replace(st.clone());
    }

    fn snapshot(&self) -> ServerStatus {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The device server.
#[derive(Debug)]
pub struct DeviceServer;

impl DeviceServer {
    /// Serves on `listener` until `shutdown` resolves, then ends any running
    /// session (its client gets "server is shutting down"), cleans up, and
    /// returns.
    ///
    /// # Errors
    ///
    /// An error of the listener itself (accept failing persistently).
    pub async fn run(
        listener: TcpListener,
        config: ServerConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let (status, _) = watch::channel(ServerStatus::default());
        run_with(listener, config, shutdown, status).await
    }

    /// Binds `addr` (e.g. `"127.0.0.1:0"`) and serves in a background task.
    ///
    /// # Errors
    ///
    /// If `addr` cannot be bound.
    pub async fn start(addr: &str, config: ServerConfig) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let stop = CancellationToken::new();
        let (status, status_rx) = watch::channel(ServerStatus::default());
        let token = stop.clone();
        let task = tokio::spawn(async move {
            run_with(listener, config, token.cancelled_owned(), status).await
        });
        Ok(ServerHandle { addr: local, stop, task: Some(task), status: status_rx })
    }
}

/// A device server running in the background; dropping it stops the server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    status: watch::Receiver<ServerStatus>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A receiver of the server's status (wait for `registered`, `busy`...).
    pub fn status(&self) -> watch::Receiver<ServerStatus> {
        self.status.clone()
    }

    /// Waits until the server's status satisfies `f`, for at most `limit`.
    ///
    /// # Errors
    ///
    /// The last status seen, if `limit` passed first.
    pub async fn wait_for(
        &self,
        limit: Duration,
        f: impl FnMut(&ServerStatus) -> bool,
    ) -> Result<ServerStatus, ServerStatus> {
        let mut rx = self.status.clone();
        match tokio::time::timeout(limit, rx.wait_for(f)).await {
            Ok(Ok(st)) => Ok(st.clone()),
            _ => Err(self.status.borrow().clone()),
        }
    }

    /// Stops the server and waits until it has cleaned up.
    ///
    /// # Errors
    ///
    /// The server's own error, if it failed.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_with(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
    status: watch::Sender<ServerStatus>,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let matchkey = match &config.tracker {
        Some(_) => crate::tracker::random_matchkey(&config.key),
        None => config.key.clone(),
    };
    let initial = ServerStatus { matchkey, ..ServerStatus::default() };
    status.send_replace(initial.clone());
    let shared = Arc::new(Shared {
        cfg: config,
        port,
        state: Mutex::new(initial),
        status,
        rekey: Notify::new(),
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(tracker) = shared.cfg.tracker.clone() {
        tasks.spawn(registration::run(Arc::clone(&shared), tracker, stop.clone()));
    }
    tracing::info!(port, key = %shared.cfg.key, "device server listening");
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(handle_conn(Arc::clone(&shared), stream, peer, stop.clone()));
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break Err(e),
            },
        }
    };
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!(port, "device server stopped");
    result
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// Constant-time comparison, so a token cannot be guessed byte by byte.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle_conn(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let hello = tokio::time::timeout(shared.cfg.handshake_timeout, async {
        let magic = read_i32(&mut stream).await.map_err(|e| e.to_string())?;
        if magic != RPC_MAGIC {
            return Err(format!("bad magic {magic:#x}"));
        }
        let key = read_str(&mut stream, MAX_KEY_LEN).await.map_err(|e| e.to_string())?;
        ClientHello::parse(&key)
    })
    .await;
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => {
            tracing::debug!(%peer, %reason, "handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timed out");
            return;
        }
    };
    let code = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let token_ok = match &shared.cfg.token {
            Some(t) => hello.token.as_deref().is_some_and(|given| same_token(given, t)),
            None => true,
        };
        if !token_ok {
            CODE_UNAUTHORIZED
        } else if hello.matchkey != st.matchkey {
            CODE_MISMATCH
        } else if st.busy {
            CODE_DUPLICATE
        } else {
            st.busy = true;
            shared.status.send_replace(st.clone());
            CODE_SUCCESS
        }
    };
    if code != CODE_SUCCESS {
        tracing::info!(%peer, code = format!("{code:#x}"), "session refused");
        let _ = stream.write_all(&code.to_le_bytes()).await;
        return;
    }
    tracing::info!(%peer, timeout = ?hello.timeout, "session started");
    let accepted = async {
        stream.write_all(&code.to_le_bytes()).await?;
        write_str(&mut stream, &format!("server:{}", shared.cfg.key)).await
    };
    if accepted.await.is_ok() {
        session::run(&shared.cfg, stream, hello.timeout, stop).await;
    }
    shared.update(|st| {
        st.busy = false;
        st.sessions += 1;
    });
    shared.rekey.notify_one();
}
