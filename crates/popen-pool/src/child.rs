//! The worker process behind a small trait, so the state machine in
//! [`core`](crate::core) is unit-tested with a fake child; and the real one.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::codec::{Encoder, Framed};

use crate::cgroup::{Containment, PoolCgroup, WorkerCgroup};
use crate::codec::{CodecError, FrameCodec};
use crate::config::{OutputMode, WorkerOptions, WorkerProgram};
use crate::controls::ENV_CONTROLS;
use crate::error::{ExitInfo, PoolError};
use crate::protocol::ToWorker;
use crate::serve::{ENV_CGROUP, ENV_MARKER, ENV_MAX_FRAME, ENV_STDOUT};
use crate::unix::Placement;
use crate::{spawner, unix};

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
    fn add(&self, pid: u32, cgroup: Option<Arc<WorkerCgroup>>) {
        self.lock().insert(pid, cgroup);
    }
    fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }
    fn snapshot(&self) -> Vec<u32> {
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

/// Starts real worker processes.
#[derive(Debug)]
pub(crate) struct ProcessLauncher {
    program: WorkerProgram,
    opts: Arc<WorkerOptions>,
    live: Arc<LivePids>,
    cgroups: Arc<PoolCgroup>,
}

impl ProcessLauncher {
    pub(crate) fn new(program: WorkerProgram, opts: Arc<WorkerOptions>) -> Self {
        let cgroups = PoolCgroup::new(opts.cgroups, opts.memory_limit.is_some());
        ProcessLauncher { program, opts, live: Arc::default(), cgroups }
    }

    pub(crate) fn live_pids(&self) -> Vec<u32> {
        self.live.snapshot()
    }

    /// One fork+exec. `Ok(Err(..))`: the child started but could not join its
    /// cgroup (it was killed and reaped; try again).
    async fn launch_once(&self) -> Result<Result<ProcessChild, ()>, PoolError> {
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
        let controls = self.opts.controls.encode();
        if controls.is_empty() {
            cmd.env_remove(ENV_CONTROLS);
        } else {
            cmd.env(ENV_CONTROLS, controls);
        }
        let cgroup = self.cgroups.worker().map(Arc::new);
        // The ceiling is set before the worker joins its cgroup; where the
        // kernel cannot enforce it, the parent watches the worker's RSS.
        let ceiling = self.opts.memory_limit.map(|limit| Ceiling {
            limit,
            watch: (!cgroup.as_ref().is_some_and(|cg| cg.set_memory_max(limit))).then_some(0),
        });
        let mut report = None;
        let placement = match &cgroup {
            Some(cg) => {
                cmd.env(ENV_CGROUP, cg.path());
                let (read, write) =
                    unix::report_pipe().map_err(|e| fail("cannot create pipe", e))?;
                report = Some(read);
                Some(Placement { procs: cg.procs().clone(), report: write })
            }
            None => {
                cmd.env_remove(ENV_CGROUP);
                None
            }
        };
        // A libtest worker starts with stdout on /dev/null (libtest's banner
        // goes there); the real one waits at fd 4 until it serves.
        // (If our stdout cannot be duplicated, it is not open: nothing to hide.)
        let real_stdout = (self.program.libtest && self.opts.stdout == OutputMode::Inherit)
            .then(|| std::io::stdout().as_fd().try_clone_to_owned().ok())
            .flatten();
        if real_stdout.is_some() {
            cmd.stdout(Stdio::null()).env(ENV_STDOUT, "4");
        } else {
            cmd.env_remove(ENV_STDOUT);
        }
        let pdeathsig = !unix::have_pidfd();
        let me = std::process::id() as i32;
        unix::prepare_command(&mut cmd, child_end.into(), me, placement, pdeathsig, real_stdout);
        // The spawner drops `cmd`, closing our copy of the child's end, right
        // after the fork: from then on EOF on our end means the worker is gone.
        // If this future is dropped, the spawner kills and reaps the child,
        // then drops its reference to the cgroup (which removes it).
        let keep = cgroup.clone().map(|c| Box::new(c) as spawner::Keep);
        let mut child = spawner::spawn(cmd, keep).await.map_err(|e| fail("cannot start", e))?;
        if let (Some(read), Some(cg)) = (&report, &cgroup) {
            if let Some(err) = unix::read_report(read) {
                let _ = child.start_kill();
                let _ = child.wait().await;
                if let Some(dir) = cg.path().parent() {
                    self.cgroups.placement_failed(dir, &err);
                }
                return Ok(Err(()));
            }
        }
        let pid = child.id().ok_or_else(|| PoolError::spawn("worker exited during spawn"))?;
        self.live.add(pid, cgroup.clone());
        let pidfd = unix::pidfd_open(pid).ok().and_then(|fd| {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
            // returns the same fd number for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
        });
        let mut proc = ProcessChild {
            child,
            pid,
            io: None,
            reaped: None,
            live: Arc::clone(&self.live),
            cgroup,
            pidfd,
            exited: false,
            grace: self.opts.kill_grace,
            ceiling: ceiling.map(|c| Ceiling { watch: c.watch.map(|_| pid), ..c }),
        };
        parent_end.set_nonblocking(true).map_err(|e| fail("cannot configure channel", e))?;
        let stream = tokio::net::UnixStream::from_std(parent_end)
            .map_err(|e| fail("cannot register channel", e))?;
        proc.io = Some(Framed::new(stream, FrameCodec::new(self.opts.max_frame_bytes)));
        // libtest's banner on a piped stdout: the blank line and "running 1 test".
        let banner = if self.program.libtest { 2 } else { 0 };
        forward_lines(proc.child.stdout.take(), pid, false, banner);
        forward_lines(proc.child.stderr.take(), pid, true, 0);
        Ok(Ok(proc))
    }
}

fn stdio(mode: OutputMode) -> Stdio {
    match mode {
        OutputMode::Inherit => Stdio::inherit(),
        OutputMode::Null => Stdio::null(),
        OutputMode::Tracing => Stdio::piped(),
    }
}

/// Emits each line of `pipe` as a tracing event, leaving out libtest's
/// banner (up to `banner` leading lines: a blank one, then `running 1 test`).
fn forward_lines(
    pipe: Option<impl AsyncRead + Send + Unpin + 'static>,
    pid: u32,
    stderr: bool,
    mut banner: usize,
) {
    let Some(pipe) = pipe else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if banner > 0 {
                banner -= 1;
                if line.is_empty() || line.starts_with("running 1 test") {
                    continue;
                }
                banner = 0;
            }
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
        // At most: own cgroup refused, sibling refused, then no cgroup.
        for _ in 0..3 {
            if let Ok(child) = self.launch_once().await? {
                return Ok(child);
            }
        }
        Err(PoolError::spawn(format!(
            "cannot place worker program {} in a cgroup",
            self.program.path.display()
        )))
    }

    fn program(&self) -> String {
        self.program.path.display().to_string()
    }

    fn containment(&self) -> Containment {
        self.cgroups.containment()
    }

    fn kill_all(&self) {
        self.live.kill_all();
    }
}

/// A real worker process: leader of its own process group and a child
/// subreaper, in its own cgroup where one is available.
#[derive(Debug)]
pub(crate) struct ProcessChild {
    child: tokio::process::Child,
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
            spawner::kill_and_reap_blocking(&mut self.child, Duration::from_millis(200));
            self.live.remove(self.pid);
        }
        // Then the cgroup (if this was its last user) is removed.
    }
}
