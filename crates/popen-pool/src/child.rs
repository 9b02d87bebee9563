//! The worker process behind a small trait, so the state machine in
//! [`core`](crate::core) is unit-tested with a fake child; and the real one.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::unix::AsyncFd;
use tokio_util::codec::{Encoder, Framed};

use crate::cgroup::{Containment, WorkerCgroup};
use crate::codec::{CodecError, FrameCodec};
use crate::error::{ExitInfo, PoolError};
use crate::process::Process;
use crate::protocol::ToWorker;
use crate::unix;

pub(crate) use crate::launch::ProcessLauncher;

/// One started worker process, seen from the parent.
pub(crate) trait Child: Send + 'static {
    /// The process id (also its process-group id).
    fn pid(&self) -> u32;
    /// Sends one message.
    fn send(&mut self, msg: &ToWorker<'_>) -> impl Future<Output = Result<(), PoolError>> + Send;
    /// Encodes one message into the write buffer without writing it
    /// (`flush` writes). `Err(FrameTooLarge)` leaves the buffer as it was.
    fn feed(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError>;
    /// Writes what `feed` buffered.
    fn flush(&mut self) -> impl Future<Output = Result<(), PoolError>> + Send;
    /// The next frame; `Ok(None)` when the worker closed its channel or exited.
    fn recv(&mut self) -> impl Future<Output = Result<Option<BytesMut>, PoolError>> + Send;
    /// Kills the worker and every process of its task now and reaps the worker.
    fn kill(&mut self) -> impl Future<Output = ExitInfo> + Send;
    /// After the channel closed: kills leftovers of the group and reaps.
    fn reap(&mut self) -> impl Future<Output = ExitInfo> + Send;
    /// Asks the worker to exit, waits up to `grace`, then kills the group.
    fn shutdown(&mut self, grace: Duration) -> impl Future<Output = ExitInfo> + Send;
    /// Resident memory in bytes, if known.
    fn rss_bytes(&self) -> Option<u64>;
    /// The memory ceiling of this worker, and how it is enforced.
    fn memory_ceiling(&self) -> Option<Ceiling> {
        None
    }
    /// True if the kernel killed a process of this worker for crossing its
    /// cgroup's `memory.max`. Asked before the worker is reaped.
    fn oom_killed(&self) -> bool {
        false
    }
}

/// A worker's memory ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ceiling {
    /// Bytes.
    pub(crate) limit: u64,
    /// `Some(pid)`: no kernel enforcement; the parent samples this
    /// process's RSS while a task runs. `None`: the worker's cgroup
    /// enforces it (`memory.max`), learned through [`Child::oom_killed`].
    pub(crate) watch: Option<u32>,
}

/// Starts worker processes.
pub(crate) trait Launcher: Send + Sync + 'static {
    /// The child this launcher starts.
    type Child: Child;
    /// Starts one process (the handshake is the caller's job).
    fn launch(&self) -> impl Future<Output = Result<Self::Child, PoolError>> + Send;
    /// The program it starts, for error messages.
    fn program(&self) -> String {
        "the worker program".to_owned()
    }
    /// How the processes it starts are contained.
    fn containment(&self) -> Containment {
        Containment::ProcessTree { reason: "not a process launcher".to_owned() }
    }
    /// Kills every process this launcher started that is still alive, now.
    fn kill_all(&self) {}
}

/// Live workers (pid and cgroup), so a dropped pool can kill them synchronously.
#[derive(Debug, Default)]
pub(crate) struct LivePids(Mutex<HashMap<u32, Option<Arc<WorkerCgroup>>>>);

impl LivePids {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Option<Arc<WorkerCgroup>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn add(&self, pid: u32, cgroup: Option<Arc<WorkerCgroup>>) {
        self.lock().insert(pid, cgroup);
    }
    fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }
    pub(crate) fn snapshot(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.lock().keys().copied().collect();
        pids.sort_unstable();
        pids
    }
    pub(crate) fn kill_all(&self) {
        for (&pid, cgroup) in self.lock().iter() {
            kill_everything(pid, cgroup.as_deref());
        }
    }
}

/// Kills worker `pid` (not yet reaped) and every process of its task: its
/// cgroup if it has one, else its process tree; and its process group.
fn kill_everything(pid: u32, cgroup: Option<&WorkerCgroup>) {
    match cgroup {
        Some(cg) => cg.kill(),
        None => unix::kill_tree(pid, false),
    }
    unix::kill_group(pid);
}

/// A real worker process: leader of its own process group and a child
/// subreaper, in its own cgroup where one is available.
#[derive(Debug)]
pub(crate) struct ProcessChild {
    child: Process,
    pid: u32,
    io: Option<Framed<tokio::net::UnixStream, FrameCodec>>,
    reaped: Option<ExitInfo>,
    live: Arc<LivePids>,
    cgroup: Option<Arc<WorkerCgroup>>,
    /// Readable once the process has exited (zombie, not yet reaped).
    pidfd: Option<AsyncFd<OwnedFd>>,
    /// The process was seen to exit while the channel was still open.
    exited: bool,
    grace: Duration,
    ceiling: Option<Ceiling>,
}

fn channel_error(e: CodecError) -> PoolError {
    match e {
        CodecError::TooLarge { len, max } => PoolError::FrameTooLarge { len, max },
        other => PoolError::protocol(other.to_string()),
    }
}

fn frame_or_eof(next: Option<Result<BytesMut, CodecError>>) -> Result<Option<BytesMut>, PoolError> {
    match next {
        None => Ok(None),
        Some(Ok(frame)) => Ok(Some(frame)),
        // A reset means the worker is gone, like EOF.
        Some(Err(CodecError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Some(Err(e)) => Err(channel_error(e)),
    }
}

impl ProcessChild {
    /// A started worker (spawned, placed, registered in `live`).
    pub(crate) fn new(
        child: Process,
        live: Arc<LivePids>,
        cgroup: Option<Arc<WorkerCgroup>>,
        pidfd: Option<AsyncFd<OwnedFd>>,
        grace: Duration,
        ceiling: Option<Ceiling>,
    ) -> Self {
        let pid = child.id();
        ProcessChild {
            child,
            pid,
            io: None,
            reaped: None,
            live,
            cgroup,
            pidfd,
            exited: false,
            grace,
            ceiling,
        }
    }

    pub(crate) fn set_io(&mut self, io: Framed<tokio::net::UnixStream, FrameCodec>) {
        self.io = Some(io);
    }

    async fn wait(&mut self) -> ExitInfo {
        if let Some(exit) = self.reaped {
            return exit;
        }
        let exit = match self.child.wait(self.pidfd.as_ref()).await {
            Ok(status) => ExitInfo::from_status(status),
            Err(_) => ExitInfo::Unknown,
        };
        self.live.remove(self.pid);
        self.reaped = Some(exit);
        exit
    }
}

impl Child for ProcessChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn send(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError> {
        let io = self.io.as_mut().ok_or_else(|| PoolError::protocol("channel closed"))?;
        io.send(msg).await.map_err(channel_error)
    }

    fn feed(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError> {
        let io = self.io.as_mut().ok_or_else(|| PoolError::protocol("channel closed"))?;
        let mut codec = *io.codec();
        codec.encode(msg, io.write_buffer_mut()).map_err(channel_error)
    }

    async fn flush(&mut self) -> Result<(), PoolError> {
        let io = self.io.as_mut().ok_or_else(|| PoolError::protocol("channel closed"))?;
        SinkExt::<&ToWorker<'_>>::flush(io).await.map_err(channel_error)
    }

    /// The next frame, or `None` once the channel closed or the process
    /// exited. A death is learned from the exit too (a forked child of the
    /// task may hold the channel open): then the rest of the task's
    /// processes are killed and whatever the worker sent before dying is
    /// still read, up to EOF (waiting at most the kill grace for it).
    async fn recv(&mut self) -> Result<Option<BytesMut>, PoolError> {
        let ProcessChild { io, pid, cgroup, pidfd, exited, grace, reaped, .. } = self;
        let io = io.as_mut().ok_or_else(|| PoolError::protocol("channel closed"))?;
        if !*exited {
            let watch = async {
                match pidfd {
                    Some(fd) if reaped.is_none() => {
                        let _ = fd.readable().await;
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                next = io.next() => return frame_or_eof(next),
                () = watch => {
                    *exited = true;
                    kill_everything(*pid, cgroup.as_deref());
                }
            }
        }
        match tokio::time::timeout(*grace, io.next()).await {
            Ok(next) => frame_or_eof(next),
            Err(_) => Ok(None),
        }
    }

    async fn kill(&mut self) -> ExitInfo {
        if self.reaped.is_none() {
            let gone = self.pidfd.as_ref().is_some_and(|fd| unix::pidfd_exited(fd.get_ref()));
            if gone && self.cgroup.is_none() {
                // Its tree is orphaned already (nothing to walk): the group
                // is what is left to reach.
                unix::kill_group(self.pid);
            } else {
                kill_everything(self.pid, self.cgroup.as_deref());
            }
        }
        self.io = None;
        let exit = self.wait().await;
        if let Some(cg) = &self.cgroup {
            cg.remove(self.grace.max(Duration::from_secs(1))).await;
        }
        exit
    }

    async fn reap(&mut self) -> ExitInfo {
        // The leader is a zombie (or about to be) until we reap it, so its pid
        // still names the group: kill whatever the task left behind, then reap.
        self.kill().await
    }

    async fn shutdown(&mut self, grace: Duration) -> ExitInfo {
        if self.reaped.is_some() {
            return self.wait().await;
        }
        if let Some(io) = self.io.as_mut() {
            if io.send(&ToWorker::Exit).await.is_ok() {
                // The worker closes its end when it exits; wait for that EOF
                // (without reaping, so the group id stays valid) or the grace.
                let _ = tokio::time::timeout(grace, async {
                    while let Some(Ok(_)) = io.next().await {}
                })
                .await;
            }
        }
        self.kill().await
    }

    fn rss_bytes(&self) -> Option<u64> {
        unix::rss_bytes(self.pid)
    }

    fn memory_ceiling(&self) -> Option<Ceiling> {
        self.ceiling
    }

    fn oom_killed(&self) -> bool {
        self.ceiling.is_some_and(|c| c.watch.is_none())
            && self.cgroup.as_ref().is_some_and(|cg| cg.oom_killed())
    }
}

impl Drop for ProcessChild {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // Last line of defence (a dropped pool, an ending runtime): kill
            // everything and reap the worker here, without the runtime, so
            // that no zombie is left to a reaper that may never run.
            kill_everything(self.pid, self.cgroup.as_deref());
            self.child.kill_and_reap_blocking(Duration::from_millis(200));
            self.live.remove(self.pid);
        }
        // Then the cgroup (if this was its last user) is removed.
    }
}
