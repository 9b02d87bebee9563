//! Linux/Unix process plumbing: process groups, parent-death signal, child
//! subreaper, cgroup placement, the channel fd, group and tree kills, RSS.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

/// The fd number at which a worker finds its channel when it starts (it
/// moves it to a high fd right away; see `serve`).
pub(crate) const CHANNEL_FD: RawFd = 3;

/// Where a worker whose stdout starts as `/dev/null` finds its real stdout
/// (see `test_entry`: it moves it to fd 1 once libtest's banner is behind).
pub(crate) const STDOUT_FD: RawFd = 4;

/// Where a new worker writes itself into its cgroup, and where it reports a
/// failure to do so (an `errno`, 4 bytes native-endian).
#[derive(Debug)]
pub(crate) struct Placement {
    pub(crate) procs: CString,
    pub(crate) report: OwnedFd,
}

/// A pipe whose write end goes to the child (close-on-exec, so it closes at
/// exec) and whose read end tells the parent what went wrong before exec.
pub(crate) fn report_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?)
}

/// Reads a placement report: `Some(errno)` if the child could not join its
/// cgroup. Call after the spawn returned (the child has exec'd by then).
pub(crate) fn read_report(read_end: &OwnedFd) -> Option<io::Error> {
    let mut buf = [0u8; 4];
    let n = nix::unistd::read(read_end, &mut buf).unwrap_or(0);
    (n == 4).then(|| io::Error::from_raw_os_error(i32::from_ne_bytes(buf)))
}

/// Makes `cmd` start its child as the leader of a new process group and a
/// child subreaper, in its cgroup (if `placement`), with the channel at fd
/// 3. With `pdeathsig` (Linux without pidfds) the child is SIGKILLed when the
/// spawning thread's process goes away; otherwise the worker's own guard
/// watches the parent (see `serve`): a parent-death signal would kill the
/// worker before the guard could kill the task's processes, and it cannot
/// be cleared from another thread (it is a per-thread setting).
///
/// `cmd` takes ownership of the child's end of the channel: it stays open
/// exactly as long as the command (through the fork), so its fd number cannot
/// be reused by something else before the child has duplicated it.
pub(crate) fn prepare_command(
    cmd: &mut tokio::process::Command,
    child_end: OwnedFd,
    parent_pid: i32,
    placement: Option<Placement>,
    pdeathsig: bool,
    stdout: Option<OwnedFd>,
) {
    cmd.process_group(0);
    let child_fd = child_end.as_raw_fd();
    let stdout_fd = stdout.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, open, write, close, dup2,
    // fcntl, _exit) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = (&child_end, &stdout);
            if let Some(p) = &placement {
                // Join the cgroup before anything else can run, let alone fork.
                let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                let ok = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                if !ok {
                    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    let bytes = errno.to_ne_bytes();
                    libc::write(p.report.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                }
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            #[cfg(target_os = "linux")]
            {
                if pdeathsig
                    && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent_pid {
                    libc::_exit(111);
                }
                // Orphans of the task's processes are re-parented to the
                // worker, not to init: they stay in its tree.
                if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = (parent_pid, pdeathsig);
            if let Some(out) = stdout_fd {
                // Both to fresh numbers first (close-on-exec copies), so
                // neither target number clobbers the other source.
                let ch = libc::fcntl(child_fd, libc::F_DUPFD_CLOEXEC, 10);
                let out = libc::fcntl(out, libc::F_DUPFD_CLOEXEC, 10);
                if ch < 0
                    || out < 0
                    || libc::dup2(ch, CHANNEL_FD) < 0
                    || libc::dup2(out, STDOUT_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if child_fd == CHANNEL_FD {
                let flags = libc::fcntl(CHANNEL_FD, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(CHANNEL_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// SIGKILLs every process in the group led by `pgid`. Harmless if it is gone.
pub(crate) fn kill_group(pgid: u32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    signal(-(pgid as i32), Signal::SIGKILL);
}

/// Most processes a tree kill handles, and passes over /proc it makes.
const TREE_MAX: usize = 4096;
const TREE_PASSES: usize = 64;

/// (ppid, state) of every process, from /proc.
fn process_table() -> HashMap<u32, (u32, char)> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let Some(ppid) = f.next().and_then(|p| p.parse().ok()) else { continue };
        out.insert(pid, (ppid, state));
    }
    out
}

/// SIGKILLs every descendant of `root` (and `root` itself unless
/// `spare_root`): each is SIGSTOPped as it is found so that nothing forks
/// past the walk, until a pass over /proc finds nothing new and everything
/// found has stopped; then all are killed. Without cgroups this is how a
/// worker's whole tree is reached: the worker is a child subreaper, so the
/// orphans of a daemonizing task are re-parented to it and stay in its tree.
/// Bounded by [`TREE_MAX`] processes and [`TREE_PASSES`] passes.
pub(crate) fn kill_tree(root: u32, spare_root: bool) {
    if root == 0 || root > i32::MAX as u32 {
        return;
    }
    let mut found: HashSet<u32> = HashSet::new();
    if !spare_root {
        signal(root as i32, Signal::SIGSTOP);
    }
    for _ in 0..TREE_PASSES {
        let table = process_table();
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&pid, &(ppid, _)) in &table {
            children.entry(ppid).or_default().push(pid);
        }
        let mut fresh = false;
        let mut stack = vec![root];
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            if !seen.insert(p) || seen.len() > TREE_MAX {
                continue;
            }
            for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                if found.insert(c) {
                    signal(c as i32, Signal::SIGSTOP);
                    fresh = true;
                }
                stack.push(c);
            }
        }
        let settled = found
            .iter()
            .all(|p| table.get(p).is_none_or(|&(_, state)| matches!(state, 'T' | 't' | 'Z' | 'X')));
        if !fresh && settled {
            break;
        }
        std::thread::yield_now();
    }
    for &p in &found {
        signal(p as i32, Signal::SIGKILL);
    }
    if !spare_root {
        signal(root as i32, Signal::SIGKILL);
    }
}

/// Reaps every child of this process that has exited, without waiting.
pub(crate) fn reap_exited_children() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    for _ in 0..TREE_MAX {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A pidfd for `pid` (Linux >= 5.3): readable once the process has exited,
/// without reaping it.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscall; the returned fd is ours (close-on-exec).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// True if this kernel has pidfds (then workers guard themselves).
pub(crate) fn have_pidfd() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| pidfd_open(std::process::id()).is_ok())
}

/// True if the process behind `pidfd` has exited (without waiting).
pub(crate) fn pidfd_exited(pidfd: &impl AsFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Blocks until the process behind `pidfd` has exited.
pub(crate) fn wait_pidfd(pidfd: &OwnedFd) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
}

/// Moves `fd` to a free fd number >= `min` (close-on-exec) and points `fd`
/// at /dev/null, so later writes to the old number go nowhere.
pub(crate) fn move_fd_high(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: fcntl/open/dup2/close on fd numbers; failures are reported.
    unsafe {
        let mut high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min);
        if high < 0 {
            high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, fd + 1);
        }
        if high < 0 {
            return Err(io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 || libc::dup3(null, fd, libc::O_CLOEXEC) < 0 {
            let e = io::Error::last_os_error();
            libc::close(high);
            return Err(e);
        }
        libc::close(null);
        Ok(high)
    }
}

/// Moves fd 4 (the worker's real stdout) to fd 1.
pub(crate) fn restore_stdout() -> io::Result<()> {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: fd-number syscalls; fd 4 was set up by the parent for this.
    unsafe {
        if libc::dup2(STDOUT_FD, 1) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(STDOUT_FD);
    }
    Ok(())
}

/// Exits the process at once, without running destructors or atexit handlers.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(code) }
}

/// The parent's pid, as the worker sees it.
pub(crate) fn parent_pid() -> i32 {
    std::os::unix::process::parent_id() as i32
}

/// This process's process-group id.
pub(crate) fn own_group() -> i32 {
    nix::unistd::getpgrp().as_raw()
}

/// Resident set size of `pid` in bytes (Linux: /proc/PID/statm).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten();
    Some(pages * page.and_then(|p| u64::try_from(p).ok()).unwrap_or(4096))
}
