//! The zygote's own side: the fork loop a worker program runs when it is
//! started as a zygote, and each forked worker's setup.

use std::ffi::OsStr;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};

use super::{ENV_ZYGOTE, HELLO, MAX_FDS, MAX_REQUEST, REFUSED, TEST_DIE_AFTER_FORK};
use crate::unix::CHANNEL_FD;

/// In a worker program started as a zygote: serves fork requests until the
/// pool goes away (then exits), and returns only in each forked worker,
/// which then goes on as a normal worker. Elsewhere returns at once.
/// `before_fork` (the registry's hook) runs before each fork.
pub(crate) fn run_if_zygote(before_fork: Option<fn()>) {
    if std::env::var_os(ENV_ZYGOTE).is_none() {
        return;
    }
    // The pool waits for our greeting; if it died, the kernel kills us.
    if crate::unix::set_parent_death_kill().is_err() || !crate::serve::is_worker() {
        crate::unix::exit_now(111);
    }
    // Feature probes a worker would otherwise run after each fork.
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    // SAFETY: the socket the pool put at CHANNEL_FD, ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    // A fork copies only the calling thread: with others (a runtime started
    // before `serve_if_worker`), a lock one of them holds would stay held in
    // every worker. Refuse; the pool then spawns its workers.
    let threads = std::fs::read_dir("/proc/self/task").map(Iterator::count).unwrap_or(0);
    if threads != 1 {
        let why = format!(
            "{REFUSED}this process has {threads} threads at `serve_if_worker`, not 1 \
             (call it before starting a runtime or any thread)"
        );
        let _ = send_all(&sock, why.as_bytes());
        crate::unix::exit_now(0);
    }
    if send_all(&sock, HELLO).is_err() {
        crate::unix::exit_now(0);
    }
    // Tests only: die between a fork and its reply.
    let die_after_fork = std::env::var_os(TEST_DIE_AFTER_FORK).is_some();
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (n, fds) = match receive(&sock, &mut buf) {
            Ok(Some(got)) => got,
            Ok(None) | Err(_) => crate::unix::exit_now(0), // EOF: the pool is gone
        };
        let pid = match parse(&buf[..n], &fds) {
            Some(req) => {
                if let Some(hook) = before_fork {
                    // Caught: a failing hook costs its own work, not the fork.
                    let _ = std::panic::catch_unwind(hook);
                }
                fork(&req, &fds, sock.as_raw_fd())
            }
            None => -libc::EINVAL,
        };
        if pid == 0 {
            // The new worker: its fds are in place; on to the handshake.
            std::mem::forget(sock);
            return;
        }
        if die_after_fork {
            crate::unix::exit_now(0); // test hook: the pool must clean up
        }
        drop(fds);
        if send_all(&sock, &pid.to_le_bytes()).is_err() {
            crate::unix::exit_now(0);
        }
    }
}

pub(super) fn send_all(sock: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    socket::send(sock.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL).map(|_| ()).map_err(Into::into)
}

/// One request's bytes and fds; `None` at EOF.
fn receive(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: fresh fds the kernel just gave us.
            fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((if truncated { 0 } else { n }, fds)))
}

/// A parsed request: indexes into its fds.
struct Request {
    /// `(fd index, target number)`.
    dups: Vec<(usize, RawFd)>,
    cgroup: Option<usize>,
    env: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    cwd: Option<Vec<u8>>,
}

/// Reads a request; `None` if it is malformed or its fds do not match.
fn parse(msg: &[u8], fds: &[OwnedFd]) -> Option<Request> {
    let mut at = 0usize;
    let mut byte = || -> Option<u8> {
        let b = *msg.get(at)?;
        at += 1;
        Some(b)
    };
    let n = byte()? as usize;
    let mut targets = Vec::with_capacity(n);
    let mut next_fd = 0usize;
    let mut dups = Vec::new();
    for _ in 0..n {
        let t = [byte()?, byte()?, byte()?, byte()?];
        targets.push(RawFd::from_le_bytes(t));
    }
    for t in targets {
        dups.push((next_fd, t));
        next_fd += 1;
    }
    for target in [1, 2] {
        if byte()? == 1 {
            dups.push((next_fd, target));
            next_fd += 1;
        }
    }
    let cgroup = (byte()? == 1).then(|| {
        next_fd += 1;
        next_fd - 1
    });
    let count = byte()? as usize;
    let mut rest = &msg[at..];
    let take = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let v = rest.get(4..4 + len)?.to_vec();
        *rest = &rest[4 + len..];
        Some(v)
    };
    let mut env = Vec::with_capacity(count);
    for _ in 0..count {
        let k = take(&mut rest)?;
        let set = *rest.first()?;
        rest = &rest[1..];
        env.push((k, if set == 1 { Some(take(&mut rest)?) } else { None }));
    }
    let has_cwd = *rest.first()?;
    rest = &rest[1..];
    let cwd = if has_cwd == 1 { Some(take(&mut rest)?) } else { None };
    (next_fd == fds.len() && dups.iter().all(|&(_, t)| t >= 0)).then_some(Request {
        dups,
        cgroup,
        env,
        cwd,
    })
}

/// Forks the worker: its pid here, 0 in the worker (set up), `-errno` if
/// the fork failed.
fn fork(req: &Request, fds: &[OwnedFd], sock: RawFd) -> i32 {
    let mut flags = libc::CLONE_PARENT as u64;
    let mut args = crate::clone3::CloneArgs::default();
    if let Some(i) = req.cgroup {
        flags |= crate::clone3::CLONE_INTO_CGROUP;
        args.cgroup = fds[i].as_raw_fd() as u64;
    }
    args.flags = flags;
    // SAFETY: a fork-like clone3 (no CLONE_VM, no new stack): the child
    // continues here with a copy of this single-threaded process. Unlike
    // glibc's fork() this skips the atfork handlers (none can be pending in
    // a single thread) and leaves the thread's cached tid and robust-mutex
    // list as the zygote's: the tid is only compared with itself (owner of
    // a recursive lock) and no code here uses robust mutexes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_ref(&args),
            std::mem::size_of::<crate::clone3::CloneArgs>(),
        )
    };
    if ret < 0 {
        return -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    }
    if ret > 0 {
        return ret as i32;
    }
    if setup_child(req, fds, sock).is_err() {
        crate::unix::exit_now(127);
    }
    0
}

/// In the new worker: its fds at their numbers, its process group,
/// directory and environment.
fn setup_child(req: &Request, fds: &[OwnedFd], sock: RawFd) -> io::Result<()> {
    let check = |r: libc::c_int| if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain system calls on fds this process owns.
    unsafe {
        check(libc::setpgid(0, 0))?;
        for &(i, target) in &req.dups {
            check(libc::dup2(fds[i].as_raw_fd(), target))?;
        }
        // The zygote's socket is not the worker's (unless a dup replaced it).
        if !req.dups.iter().any(|&(_, t)| t == sock) {
            libc::close(sock);
        }
    }
    if let Some(dir) = &req.cwd {
        std::env::set_current_dir(OsStr::from_bytes(dir))?;
    }
    // SAFETY (set_var/remove_var): this process has a single thread.
    unsafe {
        std::env::remove_var(ENV_ZYGOTE);
        for (k, v) in &req.env {
            let k = OsStr::from_bytes(k);
            match v {
                Some(v) => std::env::set_var(k, OsStr::from_bytes(v)),
                None => std::env::remove_var(k),
            }
        }
    }
    Ok(())
}
