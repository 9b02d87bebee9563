//! The worker's startup, right after exec and before its handshake: what
//! a `pre_exec` closure used to do in the parent's forked child (workers
//! are started with `posix_spawn` now, see `process`), then the channel.
//!
//! Order: the parent-death signal (where pidfds are missing) and only then
//! the check that the parent is still the one that started us (it may have
//! died before the signal was armed); child subreaper; wait until the
//! parent has placed us in our cgroup; the channel off fd 3; the guard. No
//! task code runs before the handshake, and the parent sends no task before
//! it has placed the worker, so a task never runs outside its cgroup.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::codec::{CodecError, DEFAULT_MAX_FRAME};
use crate::serve::{ENV_CGROUP, ENV_MARKER, ENV_MAX_FRAME, ENV_STDOUT, contain};
use crate::unix::{self, CHANNEL_FD};

/// The byte the parent writes on the channel once it has placed a worker
/// in its cgroup (only when [`ENV_CGROUP`] is set).
pub(crate) const PLACED: u8 = 0xC9;

/// The lowest fd number the worker moves its channel to: high enough to be
/// out of the way, low enough to fit the initial fd table of 64 (growing a
/// table shared by threads waits for an RCU grace period, ~10 ms).
const HIGH_FD: i32 = 50;

/// A started worker's channel and context.
pub(crate) struct Started {
    pub(crate) channel: UnixStream,
    /// This worker's cgroup directory, if it has one.
    pub(crate) cgroup: Option<PathBuf>,
    /// The maximum frame size.
    pub(crate) max: usize,
}

fn startup_error(what: &str, e: std::io::Error) -> CodecError {
    CodecError::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Runs the startup. A worker whose parent is gone exits at once (code 111).
pub(crate) fn start() -> Result<Started, CodecError> {
    let parent = std::env::var(ENV_MARKER).ok().and_then(|v| v.parse::<i32>().ok());
    if !unix::have_pidfd() {
        // No pidfd to watch the parent with: the kernel kills us instead.
        unix::set_parent_death_kill().map_err(|e| startup_error("cannot set PDEATHSIG", e))?;
    }
    if parent != Some(unix::parent_pid()) {
        unix::exit_now(111);
    }
    // Orphans of the task's processes are re-parented to the worker, not
    // to init: they stay in its tree.
    unix::set_child_subreaper().map_err(|e| startup_error("cannot become a subreaper", e))?;
    if std::env::var_os(ENV_CGROUP).is_some() {
        // The parent writes our pid to the cgroup, then this byte (EOF: it
        // gave up on us, or died).
        match unix::read_byte(CHANNEL_FD) {
            Ok(Some(PLACED)) => {}
            Ok(_) => unix::exit_now(111),
            Err(e) => return Err(startup_error("waiting for the cgroup placement", e)),
        }
    }
    let max =
        std::env::var(ENV_MAX_FRAME).ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_FRAME);
    // Off fd 3 at once, close-on-exec (tasks may spawn programs of their own,
    // which must not inherit it); fd 3 becomes /dev/null, so task code that
    // writes to fd 3 cannot corrupt the channel.
    let fd = unix::move_fd_high(CHANNEL_FD, HIGH_FD)?;
    // A libtest worker: its real stdout waits at fd 4 (what libtest printed
    // before this went to /dev/null).
    if std::env::var_os(ENV_STDOUT).is_some() {
        unix::restore_stdout()?;
    }
    let cgroup = own_cgroup();
    start_guard(cgroup.clone());
    // SAFETY: `fd` is our end of the socketpair, freshly duplicated, and
    // nothing else in this process owns it.
    let channel = unsafe { UnixStream::from_raw_fd(fd) };
    Ok(Started { channel, cgroup, max })
}

/// This worker's cgroup directory, if the parent placed it in one and it is
/// really there.
fn own_cgroup() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(ENV_CGROUP)?);
    let me = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = me.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_owned();
    (!path.is_empty() && path != "/" && dir.ends_with(path.trim_start_matches('/'))).then_some(dir)
}

/// The worker-side guard: when the parent process dies, kill the whole task
/// (cgroup, or tree and group) and this worker. Watches the parent through
/// a pidfd from a thread of its own. (Where pidfds are missing the worker
/// set a parent-death signal instead, which kills this worker but not what
/// left its process group.)
fn start_guard(cgroup: Option<PathBuf>) {
    let Some(parent) = std::env::var(ENV_MARKER).ok().and_then(|v| v.parse::<u32>().ok()) else {
        return;
    };
    if !unix::have_pidfd() {
        return;
    }
    let Ok(pidfd) = unix::pidfd_open(parent) else {
        contain(cgroup.as_deref(), true); // it is gone already
        return;
    };
    if unix::parent_pid() != parent as i32 {
        contain(cgroup.as_deref(), true); // it died before we watched it
    }
    let watched: Option<PathBuf> = cgroup.clone();
    let spawned = std::thread::Builder::new().name("popen-pool-guard".into()).spawn(move || {
        unix::wait_pidfd(&pidfd);
        contain(watched.as_deref().map(Path::new), true);
    });
    if spawned.is_err() {
        contain(cgroup.as_deref(), true); // unguarded: refuse to serve
    }
}
