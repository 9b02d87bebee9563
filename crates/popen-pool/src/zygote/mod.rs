//! A fork server: a worker program started once, in zygote mode, that forks
//! each new worker of that program from itself instead of the parent
//! spawning and exec'ing a fresh copy.
//!
//! A fresh exec pays the dynamic loader (relocations, symbol lookups), the
//! C library's and std's CPU feature probes (each `cpuid` traps to the
//! hypervisor on a VM) and a page fault for every page of text and data it
//! touches: ~1 ms of CPU per worker on the 2-core test machine. A fork of a
//! small process that already did all that costs ~0.1 ms (the worker's own
//! start and handshake come on top, either way).
//!
//! The zygote forks with `clone3(CLONE_PARENT)`: the new worker is a child
//! of the *pool's* process, exactly as if the pool had spawned it, so the
//! pool reaps it, reads its exit status (crash detection is unchanged),
//! opens its pidfd, and the worker's own parent checks and parent-death
//! guard (`startup`) see the pool, not the zygote. `CLONE_INTO_CGROUP`
//! creates it in its cgroup, as the pool's own `clone3` does.
//!
//! The zygote must be single-threaded when it forks (the child runs normal
//! Rust code, allocator included): it enters its loop from [`serve`] before
//! anything else of popen-pool runs, and a program that starts threads
//! before calling [`serve_if_worker`] must not use a zygote. A libtest
//! binary is multi-threaded: [`WorkerProgram::test_entry`] programs are
//! refused.
//!
//! Requests and replies go over a `SOCK_SEQPACKET` pair (one message each,
//! the worker's fds as `SCM_RIGHTS`). The zygote exits when its end of the
//! pair reads EOF (the pool dropped its [`Zygote`], or died) and, as a
//! backup, by a parent-death signal. Anything that goes wrong with the
//! zygote makes that one spawn fall back to the normal path; a zygote that
//! does not greet as one is never used again.
//!
//! [`serve`]: crate::serve
//! [`serve_if_worker`]: crate::serve_if_worker

use std::ffi::CString;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};

use crate::config::WorkerProgram;
use crate::error::PoolError;
use crate::process::{self, Process, Spawned, Spec, Stdio};
use crate::unix::CHANNEL_FD;

/// Set in the zygote's environment (to `1`).
pub(crate) const ENV_ZYGOTE: &str = "POPEN_POOL_ZYGOTE";

/// The variables that differ from worker to worker: sent with each request
/// (set or removed in the child), never part of the zygote's own
/// environment.
const PER_WORKER: [&str; 4] = [
    crate::serve::ENV_CGROUP,
    crate::serve::ENV_STDOUT,
    crate::serve::ENV_MAX_FRAME,
    crate::controls::ENV_CONTROLS,
];

/// What a zygote sends first.
const HELLO: &[u8] = b"popen-pool zygote 1";

/// Set (in the program's environment) to make a zygote exit right after
/// its first fork, before replying: what a zygote killed at that moment
/// does, for the tests.
const TEST_DIE_AFTER_FORK: &str = "POPEN_POOL_ZYGOTE_TEST_DIE_AFTER_FORK";

/// How a zygote that cannot serve begins its explanation.
const REFUSED: &str = "popen-pool zygote refused: ";

/// The largest request (the environment variables above and a directory).
const MAX_REQUEST: usize = 64 << 10;

/// The most fds one request carries.
const MAX_FDS: usize = 12;

/// How long the pool waits for the zygote's greeting or a reply.
const REPLY_LIMIT: Duration = Duration::from_secs(10);

/// Times a zygote is restarted after it died or stopped answering, before
/// it is given up.
const MAX_RESTARTS: u32 = 3;

/// A fork server for one worker program, shared by the workers and pools
/// given it with `zygote(..)` on their builders. It is started (as one
/// more process of that program) at the first spawn that uses it, and
/// killed and reaped when the last clone of it is dropped.
///
/// Workers forked from it are the same as spawned ones (children of this
/// process, in their own cgroup and process group, same handshake, same
/// controls) with two differences, both documented on the builder option:
/// the environment is this process's as it was when the zygote started
/// (plus the program's own variables), and the worker's memory starts as a
/// copy of the zygote's instead of a fresh exec.
#[derive(Clone, Debug)]
pub struct Zygote {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    program: WorkerProgram,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Idle { restarts: u32 },
    Running { process: Process, sock: OwnedFd, restarts: u32 },
    Unusable,
}

impl Zygote {
    /// A zygote for `program` (not started yet). The program's `main` must
    /// call [`serve_if_worker`](crate::serve_if_worker) or
    /// [`serve`](crate::serve) before it starts any thread. Its
    /// `current_dir` is ignored: each worker gets the one of the program it
    /// is forked for.
    ///
    /// # Errors
    ///
    /// [`PoolError::Config`] for a [`WorkerProgram::test_entry`] program
    /// (libtest runs tests on threads: it cannot fork safely).
    pub fn new(program: &WorkerProgram) -> Result<Zygote, PoolError> {
        if program.libtest {
            return Err(PoolError::Config {
                message: "a test-entry worker program cannot have a zygote (libtest is \
                          multi-threaded, it cannot fork)"
                    .into(),
            });
        }
        let mut program = program.clone();
        program.current_dir = None;
        let state = Mutex::new(State::Idle { restarts: 0 });
        Ok(Zygote { inner: Arc::new(Inner { program, state }) })
    }

    /// The zygote process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        match &*self.inner.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running { process, .. } => Some(process.id()),
            _ => None,
        }
    }

    /// True if `program` is the one this zygote forks (its directory aside).
    pub(crate) fn serves(&self, program: &WorkerProgram) -> bool {
        let p = &self.inner.program;
        p.path == program.path && p.args == program.args && p.env == program.env && !program.libtest
    }

    /// Forks the worker `spec` describes (blocking; on the spawner thread).
    /// `None`: the zygote cannot (it is logged); spawn it normally.
    pub(crate) fn spawn(&self, spec: &Spec) -> Option<Spawned> {
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Idle { restarts } = *state {
            *state = match start(spec) {
                Ok((process, sock)) => State::Running { process, sock, restarts },
                Err(e) => {
                    tracing::warn!(error = %e, "the zygote did not start; workers are spawned");
                    State::Unusable
                }
            };
        }
        let State::Running { sock, restarts, process } = &*state else { return None };
        let (restarts, zpid) = (*restarts, process.id());
        // Our children before the request: the worker is forked as a child
        // of this thread (`CLONE_PARENT`: the zygote's parent), and only
        // this thread spawns.
        let before = thread_children();
        match request(sock, spec) {
            Ok(Ok(spawned)) => Some(spawned),
            Ok(Err(errno)) => {
                // It cannot fork this one: spawn it. A kernel or sandbox
                // without `clone3(CLONE_PARENT)` refuses every fork: stop
                // asking.
                if matches!(errno, libc::ENOSYS | libc::EPERM) {
                    tracing::warn!(errno, "the zygote cannot fork here; workers are spawned");
                    *state = State::Unusable;
                }
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "the zygote failed; restarting it");
                // It may have forked the worker and died before saying so:
                // that child holds this spawn's fds and would be a zombie
                // nobody reaps. Kill and reap whatever child is new.
                for pid in thread_children() {
                    if pid != zpid && !before.contains(&pid) {
                        Process::adopt(pid).kill_and_reap_blocking(Duration::from_secs(5));
                    }
                }
                // Dropping the old state kills and reaps the zygote.
                *state = if restarts < MAX_RESTARTS {
                    State::Idle { restarts: restarts + 1 }
                } else {
                    State::Unusable
                };
                None
            }
        }
    }
}

/// The children of the calling thread (`/proc/self/task/TID/children`;
/// empty where the kernel does not list them).
fn thread_children() -> Vec<u32> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    std::fs::read_to_string(format!("/proc/self/task/{tid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Starts the zygote with `spec`'s program, arguments and environment (the
/// per-worker variables left out).
fn start(spec: &Spec) -> io::Result<(Process, OwnedFd)> {
    let (ours, theirs) =
        socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let mut env: Vec<CString> = spec
        .env
        .iter()
        .filter(|kv| !PER_WORKER.iter().any(|k| key_of(kv.as_bytes()) == k.as_bytes()))
        .cloned()
        .collect();
    env.push(CString::new(format!("{ENV_ZYGOTE}=1")).map_err(io::Error::other)?);
    let zspec = Spec {
        program: spec.program.clone(),
        args: spec.args.clone(),
        env,
        cwd: None,
        stdout: Stdio::Inherit,
        stderr: Stdio::Inherit,
        fds: vec![(theirs, CHANNEL_FD)],
        hold: None,
        cgroup: None,
        zygote: None,
    };
    let mut spawned = process::spawn(zspec)?;
    let timeout = nix::sys::time::TimeVal::new(REPLY_LIMIT.as_secs() as i64, 0);
    socket::setsockopt(&ours, socket::sockopt::ReceiveTimeout, &timeout)?;
    socket::setsockopt(&ours, socket::sockopt::SendTimeout, &timeout)?;
    let mut buf = [0u8; 512];
    let n = recv_exact(&ours, &mut buf);
    match n {
        Ok(n) if &buf[..n] == HELLO => Ok((spawned.process, ours)),
        Ok(n) => {
            spawned.process.kill_and_reap_blocking(Duration::from_secs(5));
            let said = String::from_utf8_lossy(&buf[..n]);
            Err(io::Error::other(match said.strip_prefix(REFUSED) {
                Some(why) => why.to_owned(),
                None => "the worker program does not run as a zygote".to_owned(),
            }))
        }
        Err(e) => {
            spawned.process.kill_and_reap_blocking(Duration::from_secs(5));
            Err(io::Error::new(e.kind(), format!("no greeting from the zygote: {e}")))
        }
    }
}

fn key_of(kv: &[u8]) -> &[u8] {
    kv.split(|&b| b == b'=').next().unwrap_or(kv)
}

fn recv_exact(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Appends `bytes` with a u32 length.
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// One request: `Ok(Err(errno))` if the zygote answered that it cannot
/// fork this worker, `Err` if the zygote itself failed.
fn request(sock: &OwnedFd, spec: &Spec) -> io::Result<Result<Spawned, i32>> {
    let mut msg = Vec::with_capacity(256);
    let mut fds: Vec<RawFd> = Vec::new();
    let mut keep: Vec<OwnedFd> = Vec::new(); // our copies, closed after the send
    let mut out = [None, None];
    msg.push(spec.fds.len() as u8);
    for (fd, target) in &spec.fds {
        fds.push(fd.as_raw_fd());
        msg.extend_from_slice(&target.to_le_bytes());
    }
    for (slot, mode) in [spec.stdout, spec.stderr].into_iter().enumerate() {
        match mode {
            Stdio::Inherit => msg.push(0),
            Stdio::Null => {
                let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
                keep.push(null.into());
                msg.push(1);
            }
            Stdio::Piped => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                keep.push(w);
                out[slot] = Some(r);
                msg.push(1);
            }
        }
    }
    fds.extend(keep.iter().map(AsRawFd::as_raw_fd));
    msg.push(u8::from(spec.cgroup.is_some()));
    if let Some(cg) = &spec.cgroup {
        fds.push(cg.as_raw_fd());
    }
    let wanted: Vec<(&[u8], Option<&[u8]>)> = PER_WORKER
        .iter()
        .map(|k| {
            let value = spec.env.iter().find_map(|kv| {
                let kv = kv.as_bytes();
                (key_of(kv) == k.as_bytes()).then(|| &kv[k.len() + 1..])
            });
            (k.as_bytes(), value)
        })
        .collect();
    msg.push(wanted.len() as u8);
    for (k, v) in wanted {
        put(&mut msg, k);
        match v {
            Some(v) => {
                msg.push(1);
                put(&mut msg, v);
            }
            None => msg.push(0),
        }
    }
    // The worker's directory: the program's, else ours now (as a spawn
    // would inherit it).
    let cwd = match &spec.cwd {
        Some(d) => Some(d.as_bytes().to_vec()),
        None => std::env::current_dir().ok().map(|d| d.into_os_string().into_encoded_bytes()),
    };
    msg.push(u8::from(cwd.is_some()));
    if let Some(d) = &cwd {
        put(&mut msg, d);
    }
    if msg.len() > MAX_REQUEST || fds.len() > MAX_FDS {
        return Ok(Err(libc::E2BIG));
    }
    let cmsg = [ControlMessage::ScmRights(&fds)];
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&msg)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    drop(keep);
    let mut reply = [0u8; 8];
    let n = recv_exact(sock, &mut reply)?;
    if n != 4 {
        return Err(io::Error::other(format!("the zygote replied {n} bytes, not 4")));
    }
    let pid = i32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
    if pid <= 0 {
        tracing::debug!(errno = -pid, "the zygote could not fork a worker");
        return Ok(Err(-pid));
    }
    let [stdout, stderr] = out;
    Ok(Ok(Spawned {
        process: Process::adopt(pid as u32),
        stdout,
        stderr,
        placed: spec.cgroup.is_some(),
    }))
}

mod serve;
pub(crate) use serve::run_if_zygote;
