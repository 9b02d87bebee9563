//! Starting a worker directly in its cgroup: `clone3(CLONE_VM |
//! CLONE_VFORK | CLONE_INTO_CGROUP)` (Linux >= 5.7, x86_64).
//!
//! Moving a process into a cgroup after it started (writing its pid to
//! `cgroup.procs`) takes the kernel's cgroup threadgroup lock for writing,
//! which waits for an RCU grace period unless another move happened just
//! before: ~10 ms per worker on a quiet machine. A process created inside
//! the cgroup (`CLONE_INTO_CGROUP`) takes that lock for reading only.
//! `posix_spawn` cannot do that, so this is the same vfork-and-exec, by
//! hand: the child shares our memory (nothing is copied, whatever our
//! size), runs on a stack of its own, and this thread is suspended until it
//! has exec'd or failed.
//!
//! What the child does before `execve` is what `posix_spawn`'s attributes
//! and file actions do in [`process`](crate::process): new process group,
//! `dup2` of the prepared fds onto their numbers, working dir, SIGPIPE to
//! its default, then the signal mask emptied. It runs only plain system
//! call wrappers (no allocation, no lock: the other threads of this process
//! go on running meanwhile), with every signal blocked until just before
//! the exec and every handler reset (`CLONE_CLEAR_SIGHAND`). A failure
//! before the exec is reported through a shared word and the child exits.
//!
//! Anything `clone3` refuses (an older kernel, a seccomp filter, a cgroup
//! that cannot take the process) makes the caller fall back to
//! `posix_spawn` and the write to `cgroup.procs`.

use std::ffi::{CStr, c_void};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The child's stack: it runs a few system call wrappers.
const STACK: usize = 64 << 10;

/// The most fds the child puts at given numbers.
pub(crate) const MAX_DUPS: usize = 8;

/// Set once `clone3` is found unusable here: later spawns go straight to
/// `posix_spawn`.
static UNUSABLE: AtomicBool = AtomicBool::new(false);

/// `struct clone_args` (its version 2 layout, with `cgroup`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    pub(crate) cgroup: u64,
}

/// Everything the child reads, prepared by the parent (pointers into
/// memory that outlives the spawn).
pub(crate) struct Plan<'a> {
    pub(crate) path: &'a CStr,
    /// Null-terminated.
    pub(crate) argv: &'a [*mut libc::c_char],
    /// Null-terminated.
    pub(crate) envp: &'a [*mut libc::c_char],
    pub(crate) cwd: Option<&'a CStr>,
    /// `(source, target)`: `dup2(source, target)`, in order. Sources are
    /// close-on-exec and at numbers no target uses.
    pub(crate) dups: &'a [(RawFd, RawFd)],
    /// The cgroup directory, opened `O_RDONLY | O_DIRECTORY`.
    pub(crate) cgroup: RawFd,
}

struct Shared<'a> {
    plan: &'a Plan<'a>,
    /// errno of the step that failed in the child, 0 if it exec'd.
    error: AtomicI32,
}

/// Starts `plan.path` in the cgroup `plan.cgroup`. `None`: `clone3` cannot
/// do it here (fall back); `Some(Err)`: the program could not be started
/// (e.g. it does not exist), the child already reaped.
pub(crate) fn spawn(plan: &Plan<'_>) -> Option<io::Result<libc::pid_t>> {
    if UNUSABLE.load(Ordering::Relaxed) || plan.dups.len() > MAX_DUPS {
        return None;
    }
    let shared = Shared { plan, error: AtomicI32::new(0) };
    // 16-byte aligned top of stack for the SysV call in the child.
    let mut stack = vec![0u128; STACK / 16];
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64
            | CLONE_CLEAR_SIGHAND
            | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: STACK as u64,
        cgroup: plan.cgroup as u64,
        ..CloneArgs::default()
    };
    // Every signal blocked on this thread while the child shares our
    // memory: no handler of ours may run on its stack. Restored below.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain sigset manipulation on local values.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `args` describes a valid stack we own for the whole call, the
    // child runs `child_main` on it and never returns into our frames; with
    // CLONE_VFORK this thread resumes only once the child has exec'd or
    // exited, so `shared` and `stack` outlive its use of them.
    let ret = unsafe {
        raw_clone3(&args, child_main, std::ptr::from_ref(&shared).cast_mut().cast::<c_void>())
    };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if ret < 0 {
        let errno = -ret as i32;
        if matches!(errno, libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EPERM) {
            // Not this kernel's (or this sandbox's): never again.
            UNUSABLE.store(true, Ordering::Relaxed);
        }
        return None;
    }
    let pid = ret as libc::pid_t;
    match shared.error.load(Ordering::Acquire) {
        0 => Some(Ok(pid)),
        errno => {
            // The child exited (127) before its exec: reap it.
            let mut status = 0;
            // SAFETY: waitpid on the child just created.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Some(Err(io::Error::from_raw_os_error(errno)))
        }
    }
}

/// `clone3` whose child calls `f(arg)` on its new stack (it must not
/// return). Returns the child's pid, or `-errno`.
///
/// # Safety
///
/// `args` must describe a valid, 16-byte aligned stack of its size that
/// stays allocated until the child has exec'd or exited (CLONE_VFORK).
#[cfg(target_arch = "x86_64")]
unsafe fn raw_clone3(
    args: &CloneArgs,
    f: extern "C" fn(*mut c_void) -> !,
    arg: *mut c_void,
) -> isize {
    let ret: isize;
    // SAFETY: the caller's contract. In the child (rax = 0) the kernel set
    // rsp to the top of the new stack; it calls `f(arg)` from there and
    // never comes back here (ud2 if it did). The parent only has rax,
    // rcx and r11 changed (the syscall's).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") std::ptr::from_ref(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Elsewhere: unusable, the caller falls back.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn raw_clone3(
    _args: &CloneArgs,
    _f: extern "C" fn(*mut c_void) -> !,
    _arg: *mut c_void,
) -> isize {
    -(libc::ENOSYS as isize)
}

/// The child, between clone and exec: system call wrappers only.
extern "C" fn child_main(arg: *mut c_void) -> ! {
    // SAFETY: `arg` is the parent's `Shared`, alive until we exec or exit
    // (the parent is suspended meanwhile).
    let shared = unsafe { &*arg.cast::<Shared<'_>>() };
    let plan = shared.plan;
    let fail = |errno: i32| -> ! {
        shared.error.store(if errno == 0 { libc::EIO } else { errno }, Ordering::Release);
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(127) }
    };
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // SAFETY: plain system call wrappers on values the parent prepared.
    unsafe {
        if libc::setpgid(0, 0) != 0 {
            fail(errno());
        }
        for &(src, dst) in plan.dups {
            if libc::dup2(src, dst) < 0 {
                fail(errno());
            }
        }
        if let Some(dir) = plan.cwd {
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(errno());
            }
        }
        // Rust ignores SIGPIPE; the program gets the default back (other
        // handlers were reset by CLONE_CLEAR_SIGHAND).
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr().cast(), plan.envp.as_ptr().cast());
    }
    fail(errno())
}
