//! Starting a worker does not fork the parent (so its cost does not grow
//! with the parent's memory). Not a timing test: a real `fork()`
//! write-protects every private page of the parent, so writing them again
//! afterwards takes one minor page fault per page; a `posix_spawn`
//! (`CLONE_VM | CLONE_VFORK`) copies nothing and leaves them writable. The
//! test first checks that a real fork is seen that way here.
//!
//! (Under `cargo test`, which runs tests as threads of one process, another
//! test forking at the same moment would show up too: run it with nextest,
//! one process per test, as the project does.)

use std::os::unix::process::CommandExt;

use popen_pool::PopenPool;

use crate::common::Int;
use crate::test_worker_program;

const PAGE: usize = 4096;
const PAGES: usize = 16 * 1024; // 64 MiB

/// Minor page faults taken by this thread so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
        usage.ru_minflt
    }
}

/// A private anonymous mapping in small pages, every page written.
struct Region(*mut u8);

impl Region {
    fn new() -> Region {
        // SAFETY: a fresh anonymous mapping, unmapped in Drop; writes stay
        // inside it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            // Small pages, so one fault per page (a huge page would fault once).
            libc::madvise(p, PAGES * PAGE, libc::MADV_NOHUGEPAGE);
            let r = Region(p.cast());
            r.rewrite();
            r
        }
    }

    /// Writes every page; returns the minor faults that took.
    fn rewrite(&self) -> i64 {
        let before = minor_faults();
        for i in 0..PAGES {
            // SAFETY: inside the mapping.
            unsafe { self.0.add(i * PAGE).write_volatile(i as u8) };
        }
        minor_faults() - before
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.0.cast(), PAGES * PAGE) };
    }
}

#[tokio::test]
async fn starting_a_worker_does_not_fork_the_parent() {
    let region = Region::new();
    assert!(region.rewrite() < (PAGES / 16) as i64, "rewriting faults without any spawn");

    // The calibration: a real fork (std forks when given a `pre_exec`).
    let mut cmd = std::process::Command::new("true");
    // SAFETY: the closure does nothing.
    unsafe { cmd.pre_exec(|| Ok(())) };
    assert!(cmd.spawn().unwrap().wait().unwrap().success());
    let forked = region.rewrite();
    assert!(forked >= (PAGES / 2) as i64, "a fork is not seen here: {forked} faults");

    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    assert_eq!(pool.submit(Int(7)).await, Ok(7));
    let spawned = region.rewrite();
    pool.shutdown().await;
    assert!(
        spawned < (PAGES / 16) as i64,
        "starting a worker forked the parent: {spawned} faults rewriting {PAGES} pages \
         ({forked} after a real fork)"
    );
}

/// A worker whose parent died before it got to `serve_if_worker` (the
/// parent exited while the start was in progress) exits at once instead of
/// running the program's own `main`: here the test binary re-run as a
/// worker with a dead parent's pid must not go on to run the (passing)
/// entry test of libtest.
#[test]
fn a_worker_whose_parent_is_gone_does_not_run_the_program() {
    let mut gone = std::process::Command::new("true").spawn().expect("true starts");
    let dead = gone.id();
    gone.wait().expect("true is reaped");
    let exe = std::env::current_exe().expect("the test binary");
    let run = |parent: u32| {
        std::process::Command::new(&exe)
            .args(["__popen_pool_worker_entry", "--test-threads=1", "-q"])
            .env("POPEN_POOL_WORKER_PARENT", parent.to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("the test binary runs")
    };
    let orphan = run(dead);
    assert_eq!(
        orphan.status.code(),
        Some(111),
        "an orphaned worker ran the program: {:?} {}",
        orphan.status,
        String::from_utf8_lossy(&orphan.stdout)
    );
    // The marker of a live process that is not the parent (as a process a
    // task started inherits it; pid 1 here): the program runs normally.
    let normal = run(1);
    assert!(
        normal.status.success(),
        "{:?} {}",
        normal.status,
        String::from_utf8_lossy(&normal.stderr)
    );
}

/// A worker start dropped at any point (before the spawn, during it, while
/// the worker is placed or shakes hands) leaves no process behind: the
/// spawner kills what it started for a caller that is gone, and a started
/// process is killed and reaped when its owner is dropped.
#[tokio::test]
async fn a_dropped_worker_start_leaves_no_process() {
    use std::time::Duration;
    for i in 0..60u64 {
        let mut worker = popen_pool::PopenWorker::builder(test_worker_program()).build().unwrap();
        // 0 to 2.9 ms: from "not yet spawned" to "handshake done".
        let limit = Duration::from_micros(100 * (i % 30));
        let _ = tokio::time::timeout(limit, worker.start()).await;
        drop(worker);
    }
    assert!(
        crate::hygiene::eventually(crate::hygiene::SOON, || crate::common::child_pids().is_empty())
            .await,
        "children left: {:?}",
        crate::common::child_pids()
    );
}
