//! Starting a worker without forking the parent, and reaping it.
//!
//! A `fork()` copies the parent's page tables, so its cost grows with the
//! parent's memory (185 ms from a 4 GiB parent). Workers are started with
//! `posix_spawn` instead, which glibc and musl implement with
//! `clone(CLONE_VM | CLONE_VFORK)`: the child borrows the parent's memory
//! until it execs, nothing is copied, and the cost does not depend on the
//! parent's size. Everything the child needs before exec is expressed as
//! spawn attributes (new process group, empty signal mask, SIGPIPE back to
//! its default) and file actions (stdio, the channel and the real stdout
//! duplicated to their numbers: `dup2` clears close-on-exec on the target
//! only). What used to run between fork and exec (parent-death signal, the
//! parent check, child subreaper) the worker now does itself, first thing
//! (see `startup`); the parent places it in its cgroup before the handshake.
//!
//! Without `tokio::process` the child is reaped here: [`Process`] waits on
//! a pidfd (or SIGCHLD where pidfds are missing), kills on drop, and hands a
//! child that does not die at once to a reaper thread, so no zombie is left.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use crate::spawner::Keep;

/// Where a standard output stream of the child goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stdio {
    Inherit,
    Null,
    Piped,
}

/// Everything needed to start one child.
pub(crate) struct Spec {
    /// The program: a path, or a bare name looked up in `PATH`.
    pub(crate) program: CString,
    /// `argv`, `argv[0]` included.
    pub(crate) args: Vec<CString>,
    /// The whole environment, `KEY=value`.
    pub(crate) env: Vec<CString>,
    pub(crate) cwd: Option<CString>,
    pub(crate) stdout: Stdio,
    pub(crate) stderr: Stdio,
    /// Fds the child finds at the given numbers (>= 3); closed in the parent
    /// once the spawn is done.
    pub(crate) fds: Vec<(OwnedFd, RawFd)>,
    /// Kept alive until the spawn is done (dropped before the reply).
    pub(crate) hold: Option<Keep>,
    /// The cgroup directory to start the child in, if it can be done at
    /// creation (see `clone3`); else the caller moves it there.
    pub(crate) cgroup: Option<OwnedFd>,
    /// Fork it from this zygote if it can (see `zygote`); else spawn it.
    pub(crate) zygote: Option<crate::zygote::Zygote>,
}

/// A started child and the parent's ends of its piped streams.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) process: Process,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    /// The child was created in `Spec::cgroup` (nothing left to move).
    pub(crate) placed: bool,
}

/// Lowest fd number for the parent's temporary copies of what the child
/// gets, so that no copy sits at a number a file action writes to.
const SOURCE_MIN_FD: RawFd = 10;

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
}

/// A close-on-exec copy of `fd` at a number >= [`SOURCE_MIN_FD`].
fn raised(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on an fd number; the result is a fresh fd we own.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SOURCE_MIN_FD) };
    if high < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// Owns the spawn attributes and file actions for their lifetime.
struct Attrs {
    actions: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl Attrs {
    fn new() -> io::Result<Box<Self>> {
        // SAFETY: both are plain C structs, initialised by their init calls
        // before any other use; they stay boxed (never moved) until destroyed.
        unsafe {
            let mut me: Box<Self> = Box::new(std::mem::zeroed());
            check(libc::posix_spawn_file_actions_init(&mut me.actions))?;
            if let Err(e) = check(libc::posix_spawnattr_init(&mut me.attr)) {
                libc::posix_spawn_file_actions_destroy(&mut me.actions);
                return Err(e);
            }
            Ok(me)
        }
    }
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new`.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

fn null_ptrs(v: &[CString]) -> Vec<*mut libc::c_char> {
    v.iter().map(|s| s.as_ptr().cast_mut()).chain(std::iter::once(std::ptr::null_mut())).collect()
}

/// Starts `spec` with `posix_spawn` (no fork of this process). When it
/// returns `Ok`, the child has exec'd the program; a failed exec is an `Err`.
/// Blocking (for the few microseconds until the child execs).
pub(crate) fn spawn(spec: Spec) -> io::Result<Spawned> {
    if let Some(spawned) = spec.zygote.as_ref().and_then(|z| z.spawn(&spec)) {
        drop(spec);
        return Ok(spawned);
    }
    if let Some(spawned) = spawn_in_cgroup(&spec) {
        let spawned = spawned?;
        drop((spec.fds, spec.hold, spec.cgroup));
        return Ok(spawned);
    }
    let mut a = Attrs::new()?;
    let mut copies = Vec::new(); // closed when this returns
    let mut out = [None, None];
    // SAFETY: calls on the initialised attributes, with C strings and fds
    // that outlive the spawn.
    unsafe {
        let fa = &mut a.actions;
        check(libc::posix_spawn_file_actions_addopen(
            fa,
            0,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY,
            0,
        ))?;
        for (slot, (target, mode)) in [(1, spec.stdout), (2, spec.stderr)].into_iter().enumerate() {
            match mode {
                Stdio::Inherit => {}
                Stdio::Null => check(libc::posix_spawn_file_actions_addopen(
                    fa,
                    target,
                    c"/dev/null".as_ptr(),
                    libc::O_WRONLY,
                    0,
                ))?,
                Stdio::Piped => {
                    use nix::fcntl::OFlag;
                    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                    let w = raised(w.as_raw_fd())?;
                    check(libc::posix_spawn_file_actions_adddup2(fa, w.as_raw_fd(), target))?;
                    copies.push(w);
                    out[slot] = Some(r);
                }
            }
        }
        for (fd, target) in &spec.fds {
            let src = raised(fd.as_raw_fd())?;
            check(libc::posix_spawn_file_actions_adddup2(fa, src.as_raw_fd(), *target))?;
            copies.push(src);
        }
        if let Some(dir) = &spec.cwd {
            check(libc::posix_spawn_file_actions_addchdir_np(fa, dir.as_ptr()))?;
        }
        let at = &mut a.attr;
        let flags = libc::POSIX_SPAWN_SETPGROUP | libc::POSIX_SPAWN_SETSIGMASK;
        check(libc::posix_spawnattr_setflags(
            at,
            (flags | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        ))?;
        check(libc::posix_spawnattr_setpgroup(at, 0))?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(libc::posix_spawnattr_setsigmask(at, &set))?;
        // Rust ignores SIGPIPE in its own processes; a child gets the
        // default back, as `std::process::Command` does.
        libc::sigaddset(&mut set, libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigdefault(at, &set))?;

        let argv = null_ptrs(&spec.args);
        let envp = null_ptrs(&spec.env);
        let mut pid: libc::pid_t = 0;
        let search = !spec.program.as_bytes().contains(&b'/');
        let run = if search { libc::posix_spawnp } else { libc::posix_spawn };
        check(run(
            &mut pid,
            spec.program.as_ptr(),
            &a.actions,
            &a.attr,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
        // Our copies close now, before the caller hears of the child.
        drop((spec.fds, spec.hold, spec.cgroup, copies));
        let [stdout, stderr] = out;
        let process = Process { pid: pid as u32, status: None };
        Ok(Spawned { process, stdout, stderr, placed: false })
    }
}

/// [`spawn`] through `clone3` straight into `spec.cgroup`, if there is one
/// and the kernel can (`None`: use `posix_spawn`). Same child setup.
fn spawn_in_cgroup(spec: &Spec) -> Option<io::Result<Spawned>> {
    let cgroup = spec.cgroup.as_ref()?;
    if !spec.program.as_bytes().contains(&b'/') {
        return None; // a PATH search would allocate in the child
    }
    let prepared = (|| -> io::Result<_> {
        let mut copies = Vec::new(); // closed when this returns
        let mut dups = Vec::new();
        let null_in = std::fs::File::open("/dev/null")?;
        let null_in = raised(null_in.as_raw_fd())?;
        dups.push((null_in.as_raw_fd(), 0));
        copies.push(null_in);
        let mut out = [None, None];
        for (slot, (target, mode)) in [(1, spec.stdout), (2, spec.stderr)].into_iter().enumerate() {
            match mode {
                Stdio::Inherit => {}
                Stdio::Null => {
                    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
                    let null = raised(null.as_raw_fd())?;
                    dups.push((null.as_raw_fd(), target));
                    copies.push(null);
                }
                Stdio::Piped => {
                    use nix::fcntl::OFlag;
                    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                    let w = raised(w.as_raw_fd())?;
                    dups.push((w.as_raw_fd(), target));
                    copies.push(w);
                    out[slot] = Some(r);
                }
            }
        }
        for (fd, target) in &spec.fds {
            let src = raised(fd.as_raw_fd())?;
            dups.push((src.as_raw_fd(), *target));
            copies.push(src);
        }
        Ok((copies, dups, out))
    })();
    let (copies, dups, out) = match prepared {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let argv = null_ptrs(&spec.args);
    let envp = null_ptrs(&spec.env);
    let plan = crate::clone3::Plan {
        path: spec.program.as_c_str(),
        argv: &argv,
        envp: &envp,
        cwd: spec.cwd.as_deref(),
        dups: &dups,
        cgroup: cgroup.as_raw_fd(),
    };
    let pid = match crate::clone3::spawn(&plan)? {
        Ok(pid) => pid,
        Err(e) => return Some(Err(e)),
    };
    drop(copies);
    let [stdout, stderr] = out;
    let process = Process { pid: pid as u32, status: None };
    Some(Ok(Spawned { process, stdout, stderr, placed: true }))
}

/// A child of this process, reaped by its owner. Dropped unreaped, it is
/// killed, and reaped here or by the reaper thread.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    /// `Some` once reaped (or found already reaped by someone else).
    status: Option<Option<ExitStatus>>,
}

impl Process {
    /// A child of this process started elsewhere (by a zygote, with
    /// `CLONE_PARENT`): reaped and killed like one spawned here.
    pub(crate) fn adopt(pid: u32) -> Process {
        Process { pid, status: None }
    }

    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// SIGKILLs the child unless it was reaped (its pid could be reused).
    pub(crate) fn start_kill(&self) {
        if self.status.is_none() {
            // SAFETY: a signal to our own unreaped child.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Reaps the child if it has exited, without waiting. `Err`: it was
    /// reaped by someone else (its status is lost).
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.status {
            Some(Some(s)) => return Ok(Some(s)),
            Some(None) => return Err(io::Error::from_raw_os_error(libc::ECHILD)),
            None => {}
        }
        loop {
            let mut st: libc::c_int = 0;
            // SAFETY: waitpid on our own child's pid.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut st, libc::WNOHANG) };
            if r == self.pid as libc::pid_t {
                let s = ExitStatus::from_raw(st);
                self.status = Some(Some(s));
                return Ok(Some(s));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                self.status = Some(None);
                return Err(e);
            }
        }
    }

    /// Waits for the child to exit and reaps it: on `pidfd` (readable once
    /// it exited) if given, else on SIGCHLD (polled every 100 ms as well,
    /// should the signal be missed or unavailable). Cancel-safe: nothing is
    /// lost if the future is dropped.
    pub(crate) async fn wait(
        &mut self,
        pidfd: Option<&AsyncFd<OwnedFd>>,
    ) -> io::Result<ExitStatus> {
        if let Some(fd) = pidfd {
            loop {
                if let Some(s) = self.try_wait()? {
                    return Ok(s);
                }
                let mut ready = fd.readable().await?;
                if self.try_wait()?.is_none() {
                    ready.clear_ready();
                }
            }
        }
        use tokio::signal::unix::{SignalKind, signal};
        let mut sig = signal(SignalKind::child()).ok();
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            let tick = tokio::time::sleep(Duration::from_millis(100));
            match sig.as_mut() {
                Some(sig) => {
                    tokio::select! {
                        _ = sig.recv() => {}
                        () = tick => {}
                    }
                }
                None => tick.await,
            }
        }
    }

    /// Kills the child and reaps it without a runtime, within `limit`.
    /// True if it was reaped.
    pub(crate) fn kill_and_reap_blocking(&mut self, limit: Duration) -> bool {
        self.start_kill();
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if Instant::now() >= deadline => return false,
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() && !self.kill_and_reap_blocking(Duration::from_millis(200)) {
            // Stuck in the kernel: SIGKILLed, it exits eventually.
            if let Some(tx) = reaper() {
                let _ = tx.send(Process { pid: self.pid, status: None });
            }
        }
        self.status = Some(None);
    }
}

/// A thread that reaps killed children that did not exit at once.
fn reaper() -> Option<&'static mpsc::Sender<Process>> {
    static REAPER: OnceLock<Option<mpsc::Sender<Process>>> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Process>();
            let run = move || {
                let mut pending: Vec<Process> = Vec::new();
                loop {
                    let next = if pending.is_empty() {
                        match rx.recv() {
                            Ok(p) => Some(p),
                            Err(_) => return,
                        }
                    } else {
                        match rx.recv_timeout(Duration::from_millis(20)) {
                            Ok(p) => Some(p),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    };
                    pending.extend(next);
                    pending.retain_mut(|p| matches!(p.try_wait(), Ok(None)));
                }
            };
            std::thread::Builder::new().name("popen-pool-reaper".into()).spawn(run).ok()?;
            Some(tx)
        })
        .as_ref()
}
