//! Workers forked by a zygote (`Zygote`): the same workers as spawned ones
//! (children of this process, their own process group, directory and
//! cgroup; crashes reported with their signal), nothing of the zygote
//! leaks into them, and the zygote goes away with its last handle. The
//! worker program is the dedicated worker example (a libtest binary cannot
//! be a zygote).

use std::time::Duration;

use popen_pool::{ExitInfo, PoolError, PopenPool, PopenWorker, Task, TaskFailure};
use popen_pool::{WorkerContext, WorkerProgram, Zygote};
use serde::{Deserialize, Serialize};

use crate::basics::dedicated_worker_path;
use crate::common::{child_pids, open_fds, pid_exists, wait_gone};

#[derive(Serialize, Deserialize)]
struct WhereAmI(String);
impl Task for WhereAmI {
    const NAME: &'static str = "whereami";
    type Output = (String, u32, u32, Option<String>);
    fn run(self, _: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        unreachable!("runs in the dedicated worker")
    }
}

#[derive(Serialize, Deserialize)]
struct Abort;
impl Task for Abort {
    const NAME: &'static str = "abort";
    type Output = ();
    fn run(self, _: &mut WorkerContext) -> Result<(), TaskFailure> {
        unreachable!("runs in the dedicated worker")
    }
}

#[derive(Serialize, Deserialize)]
struct ForksPrepared;
impl Task for ForksPrepared {
    const NAME: &'static str = "forks_prepared";
    type Output = u64;
    fn run(self, _: &mut WorkerContext) -> Result<u64, TaskFailure> {
        unreachable!("runs in the dedicated worker")
    }
}

fn program() -> WorkerProgram {
    WorkerProgram::binary(dedicated_worker_path()).env("ZYGOTE_TEST_VAR", "from the program")
}

/// Parent pid of `pid`, from /proc.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The targets of `pid`'s open fds (sockets and pipes by inode).
fn fd_targets(pid: u32) -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), link.display().to_string())
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_forked_worker_is_our_child_in_its_own_dir_group_and_cgroup() {
    let fds_before = open_fds();
    let zygote = Zygote::new(&program()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut w =
        PopenWorker::builder(program().current_dir(dir.path())).zygote(&zygote).build().unwrap();
    let pid = w.start().await.unwrap();
    let zpid = zygote.pid().expect("the zygote started with the first worker");
    assert_ne!(pid, zpid);
    assert_eq!(parent_of(zpid), std::process::id());
    // Forked by the zygote, but our child (CLONE_PARENT), not the zygote's.
    assert_eq!(parent_of(pid), std::process::id());
    let (cwd, ppid, pgid, var) = w.run(WhereAmI("ZYGOTE_TEST_VAR".into())).await.unwrap();
    assert_eq!(std::path::Path::new(&cwd), dir.path().canonicalize().unwrap());
    assert_eq!(ppid, std::process::id());
    assert_eq!(pgid, pid, "the worker leads its own process group");
    assert_eq!(var.as_deref(), Some("from the program"));
    let (_, _, _, zvar) = w.run(WhereAmI("POPEN_POOL_ZYGOTE".into())).await.unwrap();
    assert_eq!(zvar, None, "the zygote's marker is not the worker's");
    if matches!(w.containment(), popen_pool::Containment::Cgroup { .. }) {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let zyg = std::fs::read_to_string(format!("/proc/{zpid}/cgroup")).unwrap();
        assert_ne!(own, zyg, "the worker was created in a cgroup of its own");
    }
    // The worker's fds are a spawned worker's: none of the zygote's socket.
    let mut plain = PopenWorker::builder(program()).build().unwrap();
    let plain_pid = plain.start().await.unwrap();
    plain.run(WhereAmI("X".into())).await.unwrap();
    let kinds = |pid: u32| -> Vec<String> {
        fd_targets(pid)
            .into_iter()
            .map(|(n, t)| format!("{n}:{}", t.split(':').next().unwrap_or_default()))
            .collect()
    };
    assert_eq!(kinds(pid), kinds(plain_pid), "fds of a forked and of a spawned worker");
    plain.shutdown().await;
    w.shutdown().await;
    assert!(wait_gone(pid, Duration::from_secs(10)).await);
    // The zygote lives as long as a handle does, then goes (reaped).
    assert!(pid_exists(zpid));
    drop(zygote);
    assert!(wait_gone(zpid, Duration::from_secs(10)).await, "the zygote outlived its handles");
    assert!(child_pids().is_empty(), "children left: {:?}", child_pids());
    assert_eq!(open_fds(), fds_before, "fds leaked");
}

/// The registry's `before_fork` hook runs in the zygote before each fork:
/// each forked worker inherits its effect (here a counter), a spawned
/// worker has none, and a hook that panics does not stop the forks.
#[tokio::test]
async fn the_before_fork_hook_runs_in_the_zygote_before_each_fork() {
    for panics in [false, true] {
        let prog =
            if panics { program().env("DEDICATED_WORKER_HOOK_PANICS", "1") } else { program() };
        let zygote = Zygote::new(&prog).unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut w = PopenWorker::builder(prog.clone()).zygote(&zygote).build().unwrap();
            w.start().await.unwrap();
            seen.push(w.run(ForksPrepared).await.unwrap());
            w.shutdown().await;
        }
        assert_eq!(seen, [1, 2, 3], "forks prepared, as each worker saw them (panics: {panics})");
        let mut plain = PopenWorker::builder(prog.clone()).build().unwrap();
        plain.start().await.unwrap();
        assert_eq!(plain.run(ForksPrepared).await.unwrap(), 0, "a spawned worker runs no hook");
        plain.shutdown().await;
        let zpid = zygote.pid().unwrap();
        drop(zygote);
        assert!(wait_gone(zpid, Duration::from_secs(10)).await);
    }
    assert!(child_pids().is_empty(), "children left: {:?}", child_pids());
}

#[tokio::test]
async fn a_pool_of_forked_workers_reports_crashes_and_replaces_them() {
    let zygote = Zygote::new(&program()).unwrap();
    let pool = PopenPool::builder(program()).max_workers(2).zygote(&zygote).build().unwrap();
    // A crash is seen with its signal: the pool reaps its own child.
    match pool.submit(Abort).await {
        Err(PoolError::WorkerDied { exit: ExitInfo::Signal(sig) }) => {
            assert_eq!(sig, libc::SIGABRT);
        }
        other => panic!("expected a SIGABRT death, got {other:?}"),
    }
    let zpid = zygote.pid().unwrap();
    for _ in 0..10 {
        let (_, ppid, _, _) = pool.submit(WhereAmI("X".into())).await.unwrap();
        assert_eq!(ppid, std::process::id());
    }
    assert_eq!(zygote.pid(), Some(zpid), "one zygote served every spawn");
    // A zygote killed under the pool: workers still start (spawned, then
    // forked by a new zygote).
    // SAFETY: a signal to the zygote, our child.
    unsafe { libc::kill(zpid as i32, libc::SIGKILL) };
    for _ in 0..4 {
        assert!(matches!(pool.submit(Abort).await, Err(PoolError::WorkerDied { .. })));
        let (_, ppid, _, _) = pool.submit(WhereAmI("X".into())).await.unwrap();
        assert_eq!(ppid, std::process::id());
    }
    let restarted = zygote.pid().expect("a new zygote after the old one died");
    assert_ne!(restarted, zpid);
    pool.shutdown().await;
    drop(zygote);
    assert!(wait_gone(restarted, Duration::from_secs(10)).await);
    assert!(child_pids().is_empty(), "children left: {:?}", child_pids());
}

#[tokio::test]
async fn a_zygote_is_refused_for_test_entries_and_other_programs() {
    let err = Zygote::new(&crate::test_worker_program()).unwrap_err();
    assert!(matches!(err, PoolError::Config { .. }), "{err:?}");
    let zygote = Zygote::new(&program()).unwrap();
    let other = WorkerProgram::binary(dedicated_worker_path());
    let err = PopenWorker::builder(other).zygote(&zygote).build().unwrap_err();
    assert!(err.to_string().contains("zygote"), "{err}");
    // Not started: making one costs nothing.
    assert_eq!(zygote.pid(), None);
}

#[tokio::test]
async fn a_program_with_threads_before_serving_is_spawned_not_forked() {
    let program = program().env("DEDICATED_WORKER_THREAD_FIRST", "1");
    let zygote = Zygote::new(&program).unwrap();
    let mut w = PopenWorker::builder(program).zygote(&zygote).build().unwrap();
    let pid = w.start().await.unwrap();
    // The zygote refused (two threads) and is gone; the worker was spawned.
    assert_eq!(zygote.pid(), None, "a multi-threaded zygote was kept");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !environ.split(|&b| b == 0).any(|kv| kv.starts_with(b"POPEN_POOL_ZYGOTE=")),
        "the worker was forked by the refused zygote"
    );
    let (_, ppid, _, _) = w.run(WhereAmI("X".into())).await.unwrap();
    assert_eq!(ppid, std::process::id());
    w.shutdown().await;
    assert!(child_pids().is_empty(), "children left: {:?}", child_pids());
}

#[tokio::test]
async fn a_zygote_that_dies_between_a_fork_and_its_reply_leaves_no_child() {
    // The zygote forks the worker, then exits without telling us its pid.
    let program = program().env("POPEN_POOL_ZYGOTE_TEST_DIE_AFTER_FORK", "1");
    let zygote = Zygote::new(&program).unwrap();
    let pool = PopenPool::builder(program).max_workers(1).zygote(&zygote).build().unwrap();
    for _ in 0..3 {
        let (_, ppid, _, _) = pool.submit(WhereAmI("X".into())).await.unwrap();
        assert_eq!(ppid, std::process::id());
        assert!(matches!(pool.submit(Abort).await, Err(PoolError::WorkerDied { .. })));
    }
    pool.shutdown().await;
    drop(zygote);
    // The forked-then-abandoned workers were killed and reaped (a zombie
    // counts as a child here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !child_pids().is_empty() {
        assert!(std::time::Instant::now() < deadline, "children left: {:?}", child_pids());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
