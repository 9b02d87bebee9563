//! Linux/Unix process plumbing: process groups, parent-death signal, the
//! channel fd, group kills and RSS.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The fd number at which a worker finds its channel.
pub(crate) const CHANNEL_FD: RawFd = 3;

/// Makes `cmd` start its child as the leader of a new process group, with the
/// channel at fd 3, and (on Linux) SIGKILLed when the spawning thread's
/// process goes away.
///
/// `cmd` takes ownership of the child's end of the channel: it stays open
/// exactly as long as the command (through the fork), so its fd number cannot
/// be reused by something else before the child has duplicated it.
pub(crate) fn prepare_command(
    cmd: &mut tokio::process::Command,
    child_end: OwnedFd,
    parent_pid: i32,
) {
    cmd.process_group(0);
    let child_fd = child_end.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, dup2, fcntl, _exit).
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &child_end;
            #[cfg(target_os = "linux")]
            {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent_pid {
                    libc::_exit(111);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent_pid;
            if child_fd == CHANNEL_FD {
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

/// SIGKILLs every process in the group led by `pgid`. Harmless if it is gone.
pub(crate) fn kill_group(pgid: u32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: plain syscall; a negative pid addresses the process group.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// Marks `fd` close-on-exec, so a task's own child processes do not inherit it.
pub(crate) fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd number; failure is reported, not UB.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The parent's pid, as the worker sees it.
pub(crate) fn parent_pid() -> i32 {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() }
}

/// Resident set size of `pid` in bytes (Linux: /proc/PID/statm).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf cannot fail for _SC_PAGESIZE.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}
