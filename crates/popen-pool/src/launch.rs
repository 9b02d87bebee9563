//! Starting real worker processes: the spawn spec, cgroup placement, the
//! channel and the output forwarding.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::codec::Framed;

use crate::cgroup::{Containment, PoolCgroup};
use crate::child::{Ceiling, Launcher, LivePids, ProcessChild};
use crate::codec::FrameCodec;
use crate::config::{OutputMode, WorkerOptions, WorkerProgram};
use crate::controls::ENV_CONTROLS;
use crate::error::PoolError;
use crate::process::{Spec, Stdio};
use crate::serve::{ENV_CGROUP, ENV_MARKER, ENV_MAX_FRAME, ENV_STDOUT};
use crate::startup::PLACED;
use crate::unix::{CHANNEL_FD, STDOUT_FD};
use crate::{spawner, unix};

/// Starts real worker processes.
#[derive(Debug)]
pub(crate) struct ProcessLauncher {
    program: WorkerProgram,
    opts: Arc<WorkerOptions>,
    live: Arc<LivePids>,
    cgroups: Arc<PoolCgroup>,
}

fn c_string(s: impl Into<Vec<u8>>, what: &str) -> Result<CString, PoolError> {
    CString::new(s).map_err(|_| PoolError::spawn(format!("{what} contains a NUL byte")))
}

fn c_path(p: &Path, what: &str) -> Result<CString, PoolError> {
    c_string(p.as_os_str().as_bytes(), what)
}

impl ProcessLauncher {
    /// `single`: the launcher of one [`PopenWorker`](crate::PopenWorker),
    /// whose workers go under the process's shared pool directory.
    pub(crate) fn new(program: WorkerProgram, opts: Arc<WorkerOptions>, single: bool) -> Self {
        let (on, memory) = (opts.cgroups, opts.memory_limit.is_some());
        let cgroups =
            if single { PoolCgroup::shared(on, memory) } else { PoolCgroup::new(on, memory) };
        ProcessLauncher { program, opts, live: Arc::default(), cgroups }
    }

    pub(crate) fn live_pids(&self) -> Vec<u32> {
        self.live.snapshot()
    }

    /// The worker's whole environment: ours, the program's, then the
    /// popen-pool variables (`None`: removed).
    fn environment(&self, ours: &[(&str, Option<String>)]) -> Result<Vec<CString>, PoolError> {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        env.extend(self.program.env.iter().cloned());
        for (k, v) in ours {
            match v {
                Some(v) => env.insert((*k).into(), v.into()),
                None => env.remove(std::ffi::OsStr::new(k)),
            };
        }
        env.into_iter()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                c_string(kv, "an environment variable")
            })
            .collect()
    }

    /// One spawn. `Ok(Err(..))`: the child started but could not be placed
    /// in its cgroup (it was killed and reaped; try again).
    async fn launch_once(&self) -> Result<Result<ProcessChild, ()>, PoolError> {
        let path = &self.program.path;
        let fail = |what: &str, e: std::io::Error| {
            PoolError::spawn(format!("{what} for worker program {}: {e}", path.display()))
        };
        let (parent_end, child_end) =
            std::os::unix::net::UnixStream::pair().map_err(|e| fail("cannot create channel", e))?;
        let cgroup = self.cgroups.worker().map(Arc::new);
        // The ceiling is set before the worker joins its cgroup; where the
        // kernel cannot enforce it, the parent watches the worker's RSS.
        let ceiling = self.opts.memory_limit.map(|limit| Ceiling {
            limit,
            watch: (!cgroup.as_ref().is_some_and(|cg| cg.set_memory_max(limit))).then_some(0),
        });
        // A libtest worker starts with stdout on /dev/null (libtest's banner
        // goes there); the real one waits at fd 4 until it serves.
        // (If our stdout cannot be duplicated, it is not open: nothing to hide.)
        let real_stdout = (self.program.libtest && self.opts.stdout == OutputMode::Inherit)
            .then(|| std::io::stdout().as_fd().try_clone_to_owned().ok())
            .flatten();
        let controls = self.opts.controls.encode();
        let env = self.environment(&[
            (ENV_MARKER, Some(std::process::id().to_string())),
            (ENV_MAX_FRAME, Some(self.opts.max_frame_bytes.to_string())),
            (ENV_CONTROLS, (!controls.is_empty()).then_some(controls)),
            (ENV_CGROUP, cgroup.as_ref().map(|cg| cg.path().display().to_string())),
            (ENV_STDOUT, real_stdout.as_ref().map(|_| STDOUT_FD.to_string())),
        ])?;
        let mut args = vec![c_path(path, "the worker program's path")?];
        for a in &self.program.args {
            args.push(c_string(a.as_bytes(), "a worker argument")?);
        }
        let mut fds: Vec<(OwnedFd, i32)> = vec![(child_end.into(), CHANNEL_FD)];
        let stdout = match real_stdout {
            Some(fd) => {
                fds.push((fd, STDOUT_FD));
                Stdio::Null
            }
            None => stdio(self.opts.stdout),
        };
        let spec = Spec {
            program: args[0].clone(),
            args,
            env,
            cwd: self
                .program
                .current_dir
                .as_deref()
                .map(|d| c_path(d, "the worker's directory"))
                .transpose()?,
            stdout,
            stderr: stdio(self.opts.stderr),
            fds,
            hold: None,
            // Where the kernel can, the worker is created in its cgroup
            // (no move afterwards: see `clone3`).
            cgroup: cgroup
                .as_ref()
                .and_then(|cg| std::fs::File::open(cg.path()).ok())
                .map(OwnedFd::from),
            zygote: self.opts.zygote.clone().filter(|z| z.serves(&self.program)),
        };
        // The spawner drops the spec, closing our copy of the child's end,
        // before it replies: from then on EOF on our end means the worker is
        // gone. If this future is dropped, the spawner kills and reaps the
        // child, then drops its reference to the cgroup (which removes it).
        let keep = cgroup.clone().map(|c| Box::new(c) as spawner::Keep);
        let spawned = spawner::spawn(spec, keep).await.map_err(|e| fail("cannot start", e))?;
        let mut child = spawned.process;
        let pid = child.id();
        if let Some(cg) = &cgroup {
            // Placed before the handshake, so before any task code runs; the
            // worker waits for the byte below before it does anything else.
            let procs = Path::new(std::ffi::OsStr::from_bytes(cg.procs().as_bytes()));
            let placed = if spawned.placed {
                Ok(()) // created there
            } else {
                std::fs::write(procs, pid.to_string())
            };
            if let Err(err) = placed {
                child.start_kill();
                let _ = child.wait(None).await;
                if let Some(dir) = cg.path().parent() {
                    self.cgroups.placement_failed(dir, &err);
                }
                return Ok(Err(()));
            }
            // A fresh socketpair's buffer takes one byte without blocking. A
            // failure means the child is gone: the handshake reports it.
            let _ = (&parent_end).write_all(&[PLACED]);
        }
        self.live.add(pid, cgroup.clone());
        let pidfd = unix::pidfd_open(pid).ok().and_then(|fd| {
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and
            // returns the same fd number for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
        });
        let grace = self.opts.kill_grace;
        let ceiling = ceiling.map(|c| Ceiling { watch: c.watch.map(|_| pid), ..c });
        let live = Arc::clone(&self.live);
        let mut proc = ProcessChild::new(child, live, cgroup, pidfd, grace, ceiling);
        parent_end.set_nonblocking(true).map_err(|e| fail("cannot configure channel", e))?;
        let stream = tokio::net::UnixStream::from_std(parent_end)
            .map_err(|e| fail("cannot register channel", e))?;
        proc.set_io(Framed::new(stream, FrameCodec::new(self.opts.max_frame_bytes)));
        // libtest's banner on a piped stdout: the blank line and "running 1 test".
        let banner = if self.program.libtest { 2 } else { 0 };
        forward_lines(spawned.stdout, pid, false, banner);
        forward_lines(spawned.stderr, pid, true, 0);
        Ok(Ok(proc))
    }
}

fn stdio(mode: OutputMode) -> Stdio {
    match mode {
        OutputMode::Inherit => Stdio::Inherit,
        OutputMode::Null => Stdio::Null,
        OutputMode::Tracing => Stdio::Piped,
    }
}

/// Emits each line of `pipe` as a tracing event, leaving out libtest's
/// banner (up to `banner` leading lines: a blank one, then `running 1 test`).
fn forward_lines(pipe: Option<OwnedFd>, pid: u32, stderr: bool, banner: usize) {
    let Some(pipe) = pipe else { return };
    // (A pipe that cannot be registered is dropped: the worker's writes to
    // it fail with EPIPE, as to a closed terminal.)
    if let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        forward(rx, pid, stderr, banner);
    }
}

fn forward(
    pipe: impl AsyncRead + Send + Unpin + 'static,
    pid: u32,
    stderr: bool,
    mut banner: usize,
) {
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
