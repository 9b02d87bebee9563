//! Linux/Unix process plumbing: process groups, parent-death signal, child
//! subreaper, cgroup placement, the channel fd, group and tree kills, RSS.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

/// The fd number at which a worker finds its channel when it starts (it
/// moves it to a high fd right away; see `serve`).
pub(crate) const CHANNEL_FD: RawFd = 3;

/// Where a worker whose stdout starts as `/dev/null` finds its real stdout
/// (see `test_entry`: it moves it to fd 1 once libtest's banner is behind).
pub(crate) const STDOUT_FD: RawFd = 4;

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
/// True unless `pid` certainly does not exist (`kill(pid, 0)` says ESRCH).
pub(crate) fn process_alive(pid: i32) -> bool {
    let res = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    !matches!(res, Err(nix::errno::Errno::ESRCH))
}

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

/// Asks for SIGKILL when the thread that spawned this process exits
/// (Linux; elsewhere a no-op).
pub(crate) fn set_parent_death_kill() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes this process a child subreaper (Linux; elsewhere a no-op): orphans
/// of its descendants are re-parented to it, not to init.
pub(crate) fn set_child_subreaper() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads one byte from `fd`, blocking. `None` at EOF.
pub(crate) fn read_byte(fd: RawFd) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: a read into a local buffer of the given length.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            return Ok(Some(b[0]));
        }
        if n == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
