//! The device server: registers with a tracker, accepts one session at a
//! time, and isolates each session's work in a `PopenWorker`.

mod config;
mod error;
mod handlers;
mod ops;
mod paths;
mod registration;
mod session;
mod spare;

pub use config::{ServerConfig, default_work_root};
pub use error::ServerError;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::wire::handshake::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, ClientHello,
    MAX_KEY_LEN, RPC_MAGIC, read_i32, read_str, write_str,
};

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
    /// Why the server cannot serve sessions now (e.g. its work dir is gone or
    /// unwritable). While set, the server is not registered with its tracker
    /// and clients that connect directly are told this reason
    /// ([`SessionError::SetupFailed`](crate::SessionError::SetupFailed)); it
    /// is cleared when the server can serve again (checked every `tracker_poll`).
    pub unavailable: Option<String>,
    /// The pid of the warm spare's worker while one is ready for the next
    /// session ([`ServerConfig::warm_spare`]; always `None` without it).
    pub spare: Option<u32>,
    /// The warm spare holds the argument sets of the last session's
    /// `AllocArgs`, filled while the server was idle: a session asking for
    /// the same shapes, `alloc_repeat` and seed gets them without a fill.
    pub spare_filled: bool,
    /// The last session's teardown is finishing: its processes are killed
    /// (they run no more code) and are being reaped, its cgroup and temp dir
    /// removed. The next session's first call waits until this is false.
    pub retiring: bool,
}

pub(crate) struct Shared {
    pub(crate) cfg: ServerConfig,
    pub(crate) port: u16,
    pub(crate) state: Mutex<ServerStatus>,
    pub(crate) status: watch::Sender<ServerStatus>,
    /// A session ended, or a leased key was burnt: register a fresh match key.
    pub(crate) rekey: Notify,
    /// The server became unavailable: check when it can serve again.
    pub(crate) recheck: Notify,
    /// The warm spare, if one is ready (locked while one is being made).
    pub(crate) spare: tokio::sync::Mutex<Option<spare::Spare>>,
    /// A session took the spare or found none: make the next one.
    pub(crate) spare_wanted: Notify,
    /// Held while a session's teardown finishes in the background
    /// (`session::retire`); a session's first call waits for it.
    pub(crate) teardown: Arc<tokio::sync::Mutex<()>>,
    /// The server's tasks (its shutdown waits for them all).
    pub(crate) tasks: TaskTracker,
    /// The last session's `AllocArgs` call, which the next spare is given.
    pub(crate) last_alloc: spare::LastAlloc,
    /// A session's request loop runs: its calls may be timing a kernel on
    /// the workers' CPU (the spare is not prefilled meanwhile).
    pub(crate) serving: std::sync::atomic::AtomicBool,
    /// The work root is in memory (tmpfs, ramfs): a session's small
    /// filesystem steps run on the runtime's thread (`ops::quick`).
    pub(crate) in_memory: bool,
}

impl Shared {
    pub(crate) fn update(&self, f: impl FnOnce(&mut ServerStatus)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        self.status.send_replace(st.clone());
    }

    pub(crate) fn snapshot(&self) -> ServerStatus {
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
    /// [`ServerError::WorkDir`] or [`ServerError::WorkerProgram`] if the
    /// server could not serve any session (checked before it registers),
    /// [`ServerError::Accept`] if accepting connections fails persistently.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the running session's connection and kills
    /// its worker (without waiting for it); prefer resolving `shutdown`.
    pub async fn run(
        listener: TcpListener,
        config: ServerConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        validate(&config).await?;
        let (status, _) = watch::channel(ServerStatus::default());
        run_with(listener, config, shutdown, status).await
    }

    /// Checks the configuration, binds `addr` (e.g. `"127.0.0.1:0"`) and
    /// serves in a background task.
    ///
    /// # Errors
    ///
    /// [`ServerError::Bind`] if `addr` cannot be bound;
    /// [`ServerError::WorkDir`] / [`ServerError::WorkerProgram`] as [`run`](DeviceServer::run).
    pub async fn start(addr: &str, config: ServerConfig) -> Result<ServerHandle, ServerError> {
        validate(&config).await?;
        let bind_err = |source| ServerError::Bind { addr: addr.to_owned(), source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
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
    task: Option<JoinHandle<Result<(), ServerError>>>,
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
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(ServerError::Accept(std::io::Error::other(format!("server task failed: {e}"))))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Checks that the server can serve a session at all: the work dir can
/// hold session dirs, and the worker program exists.
async fn validate(config: &ServerConfig) -> Result<(), ServerError> {
    let root = config.root();
    if let Err(source) = ops::probe_work_root(&root).await {
        return Err(ServerError::WorkDir { path: root, source });
    }
    let program = config.worker.path().to_path_buf();
    let check = program.clone();
    match ops::blocking(move || std::fs::metadata(&check)).await {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ServerError::WorkerProgram {
            path: program,
            source: std::io::Error::other("not a regular file"),
        }),
        Err(source) => Err(ServerError::WorkerProgram { path: program, source }),
    }
}

/// Serves with a configuration already checked by [`validate`].
async fn run_with(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
    status: watch::Sender<ServerStatus>,
) -> Result<(), ServerError> {
    let port = listener.local_addr().map_err(ServerError::Accept)?.port();
    let matchkey = match &config.tracker {
        Some(_) => crate::tracker::random_matchkey(&config.key),
        None => config.key.clone(),
    };
    let initial = ServerStatus { matchkey, ..ServerStatus::default() };
    status.send_replace(initial.clone());
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut config = config;
    if config.use_zygote {
        // This server's own fork server for its session workers (killed
        // with the server's last handle on it); a test-entry program has
        // none.
        config.zygote = popen_pool::Zygote::new(&config.worker).ok();
    }
    let root = config.root();
    let in_memory = ops::blocking(move || Ok(ops::in_memory(&root))).await.unwrap_or(false);
    let shared = Arc::new(Shared {
        in_memory,
        cfg: config,
        port,
        state: Mutex::new(initial),
        status,
        rekey: Notify::new(),
        recheck: Notify::new(),
        spare: tokio::sync::Mutex::new(None),
        spare_wanted: Notify::new(),
        teardown: Arc::new(tokio::sync::Mutex::new(())),
        tasks: TaskTracker::new(),
        last_alloc: spare::LastAlloc::default(),
        serving: std::sync::atomic::AtomicBool::new(false),
    });
    let tasks = shared.tasks.clone();
    let stop = CancellationToken::new();
    if let Some(tracker) = shared.cfg.tracker.clone() {
        tasks.spawn(registration::run(Arc::clone(&shared), tracker, stop.clone()));
    }
    tasks.spawn(recheck(Arc::clone(&shared), stop.clone()));
    if shared.cfg.warm_spare {
        tasks.spawn(spare::keep(Arc::clone(&shared), stop.clone()));
    }
    tracing::info!(port, key = %shared.cfg.key, "device server listening");
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        let conn = handle_conn(Arc::clone(&shared), stream, peer, stop.clone());
                        tasks.spawn(async move {
                            conn.await;
                            drop(permit);
                        });
                    }
                    Err(_) => match Arc::clone(&refusals).try_acquire_owned() {
                        Ok(permit) => {
                            tracing::warn!(%peer, limit = shared.cfg.max_connections, "connection refused: at the connection limit");
                            tasks.spawn(async move {
                                refuse(stream).await;
                                drop(permit);
                            });
                        }
                        // Flooded: drop the connection at once.
                        Err(_) => drop(stream),
                    },
                },
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break Err(ServerError::Accept(e)),
            },
        }
    };
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!(port, "device server stopped");
    result
}

/// Answers a connection over the limit with `CODE_AT_CAPACITY`, after reading
/// its handshake (briefly) so the client reads the code, not a reset.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = read_i32(&mut stream).await?;
        let _ = read_str(&mut stream, MAX_KEY_LEN).await?;
        refusal(&mut stream, CODE_AT_CAPACITY).await;
        std::io::Result::Ok(())
    })
    .await;
}

/// Sends a refusal `code`, then reads (and drops) what the client sent
/// after its handshake until it closes, for at most 1 s and 64 KiB: a
/// client may send its first frame without waiting for the answer, and
/// closing with that unread would reset the connection, which can discard
/// the code before the client reads it.
async fn refusal(stream: &mut TcpStream, code: i32) {
    use tokio::io::AsyncReadExt as _;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&code.to_le_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// While the server is unavailable, checks every `tracker_poll` whether it
/// can serve again (its work dir holds a probe dir), and clears the reason.
async fn recheck(shared: Arc<Shared>, stop: CancellationToken) {
    let root = shared.cfg.root();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = shared.recheck.notified() => {}
        }
        while shared.snapshot().unavailable.is_some() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(shared.cfg.tracker_poll) => {}
            }
            if ops::probe_work_root(&root).await.is_ok() {
                tracing::info!(dir = %root.display(), "work dir usable again; serving");
                shared.update(|st| st.unavailable = None);
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// Compares a presented token with the server's in time that depends only
/// on the server's token length (not on where they differ, nor on the
/// presented token's length).
fn same_token(given: &str, expected: &str) -> bool {
    let (g, e) = (given.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(g.len() != e.len());
    for (i, &b) in e.iter().enumerate() {
        diff |= b ^ g.get(i).copied().unwrap_or(!b);
    }
    std::hint::black_box(diff) == 0
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
    let with_tracker = shared.cfg.tracker.is_some();
    let (code, burnt) = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let token_ok = match &shared.cfg.token {
            Some(t) => hello.token.as_deref().is_some_and(|given| same_token(given, t)),
            None => true,
        };
        let key_ok = hello.matchkey == st.matchkey;
        let outcome = if !token_ok {
            // A refused client holding the current key consumed its lease:
            // rotate the key so the server is handed out again at once.
            (CODE_UNAUTHORIZED, key_ok && !st.busy && with_tracker)
        } else if !key_ok {
            (CODE_MISMATCH, false)
        } else if st.busy {
            (CODE_DUPLICATE, false)
        } else {
            (CODE_SUCCESS, false)
        };
        if outcome.0 == CODE_SUCCESS {
            st.busy = true;
        }
        if with_tracker && (outcome.0 == CODE_SUCCESS || outcome.1) {
            // A key is good for one session: the consumed key is dead from
            // this moment (the next one is PUT when the server is free).
            st.matchkey = crate::tracker::random_matchkey(&shared.cfg.key);
            st.registered = false;
        }
        shared.status.send_replace(st.clone());
        outcome
    };
    if burnt {
        shared.rekey.notify_one();
    }
    if code != CODE_SUCCESS {
        tracing::info!(%peer, code = format!("{code:#x}"), "session refused");
        refusal(&mut stream, code).await;
        return;
    }
    tracing::info!(%peer, timeout = ?hello.timeout, "session started");
    let mut accepted = code.to_le_bytes().to_vec();
    let _ = write_str(&mut accepted, &format!("server:{}", shared.cfg.key)).await;
    let farewell = match stream.write_all(&accepted).await {
        Ok(()) => Some(session::run(&shared, stream, hello.timeout, stop.clone()).await),
        Err(_) => None,
    };
    // Everything of the session is gone: the device is free, before the
    // connection is drained.
    shared.update(|st| {
        st.busy = false;
        st.sessions += 1;
    });
    shared.rekey.notify_one();
    if shared.cfg.warm_spare {
        shared.spare_wanted.notify_one();
    }
    if let Some(farewell) = farewell {
        farewell.drain(&stop).await;
    }
}

#[cfg(test)]
mod tests;
