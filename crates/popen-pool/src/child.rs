//! The worker process behind a small trait, so the state machine in
//! [`core`](crate::core) is unit-tested with a fake child; and the real one.

use std::collections::HashSet;
use std::future::Future;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::codec::Framed;

use crate::codec::{CodecError, FrameCodec};
use crate::config::{OutputMode, WorkerOptions, WorkerProgram};
use crate::error::{ExitInfo, PoolError};
use crate::protocol::ToWorker;
use crate::serve::{ENV_MARKER, ENV_MAX_FRAME};
use crate::{spawner, unix};

/// One started worker process, seen from the parent.
pub(crate) trait Child: Send + 'static {
    /// The process id (also its process-group id).
    fn pid(&self) -> u32;
    /// Sends one message.
    fn send(&mut self, msg: &ToWorker<'_>) -> impl Future<Output = Result<(), PoolError>> + Send;
    /// The next frame; `Ok(None)` when the worker closed its channel.
    fn recv(&mut self) -> impl Future<Output = Result<Option<BytesMut>, PoolError>> + Send;
    /// Kills the worker's whole process group now and reaps the worker.
    fn kill(&mut self) -> impl Future<Output = ExitInfo> + Send;
    /// After the channel closed: kills leftovers of the group and reaps.
    fn reap(&mut self) -> impl Future<Output = ExitInfo> + Send;
    /// Asks the worker to exit, waits up to `grace`, then kills the group.
    fn shutdown(&mut self, grace: Duration) -> impl Future<Output = ExitInfo> + Send;
    /// Resident memory in bytes, if known.
    fn rss_bytes(&self) -> Option<u64>;
}

/// Starts worker processes.
pub(crate) trait Launcher: Send + Sync + 'static {
    /// The child this launcher starts.
    type Child: Child;
    /// Starts one process (the handshake is the caller's job).
    fn launch(&self) -> impl Future<Output = Result<Self::Child, PoolError>> + Send;
    /// Kills every process this launcher started that is still alive, now.
    fn kill_all(&self) {}
}

/// Pids of live workers, so a dropped pool can kill them synchronously.
#[derive(Debug, Default)]
pub(crate) struct LivePids(Mutex<HashSet<u32>>);

impl LivePids {
    fn add(&self, pid: u32) {
        self.0.lock().expect("live pid set").insert(pid);
    }
    fn remove(&self, pid: u32) {
        self.0.lock().expect("live pid set").remove(&pid);
    }
    fn snapshot(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.0.lock().expect("live pid set").iter().copied().collect();
        pids.sort_unstable();
        pids
    }
    pub(crate) fn kill_all(&self) {
        for &pid in self.0.lock().expect("live pid set").iter() {
            unix::kill_group(pid);
        }
    }
}

/// Starts real worker processes.
#[derive(Debug)]
pub(crate) struct ProcessLauncher {
    program: WorkerProgram,
    opts: Arc<WorkerOptions>,
    live: Arc<LivePids>,
}

impl ProcessLauncher {
    pub(crate) fn new(program: WorkerProgram, opts: Arc<WorkerOptions>) -> Self {
        ProcessLauncher { program, opts, live: Arc::default() }
    }

    pub(crate) fn live_pids(&self) -> Vec<u32> {
        self.live.snapshot()
    }
}

fn stdio(mode: OutputMode) -> Stdio {
    match mode {
        OutputMode::Inherit => Stdio::inherit(),
        OutputMode::Null => Stdio::null(),
        OutputMode::Tracing => Stdio::piped(),
    }
}

fn forward_lines(pipe: Option<impl AsyncRead + Send + Unpin + 'static>, pid: u32, stderr: bool) {
    let Some(pipe) = pipe else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if stderr {
                tracing::warn!(target: "popen_pool::worker", pid, stream = "stderr", "{line}");
            } else {
                tracing::info!(target: "popen_pool::worker", pid, stream = "stdout", "{line}");
            }
        }
    });
}

impl Launcher for ProcessLauncher {
    type Child = ProcessChild;

    async fn launch(&self) -> Result<ProcessChild, PoolError> {
        let path = &self.program.path;
        let fail = |what: &str, e: std::io::Error| {
            PoolError::spawn(format!("{what} for worker program {}: {e}", path.display()))
        };
        let (parent_end, child_end) =
            std::os::unix::net::UnixStream::pair().map_err(|e| fail("cannot create channel", e))?;
        let mut cmd = tokio::process::Command::new(path);
        cmd.args(&self.program.args)
            .envs(self.program.env.iter().map(|(k, v)| (k, v)))
            .env(ENV_MARKER, std::process::id().to_string())
            .env(ENV_MAX_FRAME, self.opts.max_frame_bytes.to_string())
            .stdin(Stdio::null())
            .stdout(stdio(self.opts.stdout))
            .stderr(stdio(self.opts.stderr))
            .kill_on_drop(true);
        if let Some(dir) = &self.program.current_dir {
            cmd.current_dir(dir);
        }
        unix::prepare_command(&mut cmd, child_end.into(), std::process::id() as i32);
        // The spawner drops `cmd`, closing our copy of the child's end, right
        // after the fork: from then on EOF on our end means the worker is gone.
        let child = spawner::spawn(cmd).await.map_err(|e| fail("cannot start", e))?;
        let pid = child.id().ok_or_else(|| PoolError::spawn("worker exited during spawn"))?;
        self.live.add(pid);
        let mut proc =
            ProcessChild { child, pid, io: None, reaped: None, live: Arc::clone(&self.live) };
        parent_end.set_nonblocking(true).map_err(|e| fail("cannot configure channel", e))?;
        let stream = tokio::net::UnixStream::from_std(parent_end)
            .map_err(|e| fail("cannot register channel", e))?;
        proc.io = Some(Framed::new(stream, FrameCodec::new(self.opts.max_frame_bytes)));
        forward_lines(proc.child.stdout.take(), pid, false);
        forward_lines(proc.child.stderr.take(), pid, true);
        Ok(proc)
    }

    fn kill_all(&self) {
        self.live.kill_all();
    }
}

/// A real worker process: leader of its own process group, channel on fd 3.
#[derive(Debug)]
pub(crate) struct ProcessChild {
    child: tokio::process::Child,
    pid: u32,
    io: Option<Framed<tokio::net::UnixStream, FrameCodec>>,
    reaped: Option<ExitInfo>,
    live: Arc<LivePids>,
}

fn channel_error(e: CodecError) -> PoolError {
    match e {
        CodecError::TooLarge { len, max } => PoolError::FrameTooLarge { len, max },
        other => PoolError::protocol(other.to_string()),
    }
}

impl ProcessChild {
    async fn wait(&mut self) -> ExitInfo {
        if let Some(exit) = self.reaped {
            return exit;
        }
        let exit = match self.child.wait().await {
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

    async fn recv(&mut self) -> Result<Option<BytesMut>, PoolError> {
        let io = self.io.as_mut().ok_or_else(|| PoolError::protocol("channel closed"))?;
        match io.next().await {
            None => Ok(None),
            Some(Ok(frame)) => Ok(Some(frame)),
            // A reset means the worker is gone, like EOF.
            Some(Err(CodecError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Ok(None)
            }
            Some(Err(e)) => Err(channel_error(e)),
        }
    }

    async fn kill(&mut self) -> ExitInfo {
        if self.reaped.is_none() {
            unix::kill_group(self.pid);
        }
        self.io = None;
        self.wait().await
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
}

impl Drop for ProcessChild {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // Last line of defence: tokio's kill_on_drop signals only the
            // leader and reaps it in the background; take the group down too.
            unix::kill_group(self.pid);
            self.live.remove(self.pid);
        }
    }
}
