//! Process hygiene: no stray processes, zombies or fds; a killed parent leaves
//! no workers. Output is in `output`, aborts in `dropping`, one-task failures
//! (unknown tasks, frame limits, spawn failures) in `faults`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use popen_pool::{PoolError, PopenPool};

use crate::chaos::Case;
use crate::common::*;
use crate::test_worker_program;

/// Generous bound for anything that should happen "soon" (reaping, exits).
pub(crate) const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers shared with `chaos`.

/// Re-runs this test binary at the test `entry` of the calling module (as a
/// parent program) with `PARENT_ENV=value`; returns it and its stdout lines.
pub(crate) fn spawn_parent_program(
    module_path: &str,
    entry: &str,
    env: (&str, &str),
) -> (std::process::Child, std::sync::mpsc::Receiver<std::io::Result<String>>) {
    let module = module_path.split_once("::").map_or(module_path, |(_, rest)| rest);
    let entry = format!("{module}::{entry}");
    let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([entry.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = parent.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (parent, rx)
}

/// Polls `cond` every few ms until it holds or `limit` passes; true if it held.
pub(crate) async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocking [`eventually`], for tests without a runtime.
pub(crate) fn eventually_blocking(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fields of /proc/PID/stat after the command name: (state, ppid).
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` runs: it exists and is not a zombie. (An orphaned
/// grandchild is reaped by init, which in a container may be slow or never
/// do it; a zombie is dead for our purposes.)
pub(crate) fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

fn ppid_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|(_, ppid)| ppid)
}

pub(crate) fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// This process's open fds, as `fd -> target`.
fn fd_table() -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return out };
    for e in dir.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let target =
            std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
        out.insert(fd, target);
    }
    out
}

/// What this process holds when no pool is around: no children and these fds.
pub(crate) struct Baseline {
    fds: BTreeMap<u32, String>,
}

/// Has every slot of `pool` run one more task at the same time, so that no
/// worker is still starting (a prestarted one, or the spare that replaces a
/// lost worker): a stable state for a baseline.
pub(crate) async fn settle(pool: &PopenPool) {
    let n = pool.max_workers();
    let handles = (0..n).map(|_| pool.submit_with_timeout(Sleep(200), None));
    for got in futures::future::join_all(handles).await {
        assert_eq!(got, Ok(200));
    }
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), n, "one live worker per slot and no spare: {pids:?}");
}

/// Runs a throwaway pool first, so that whatever tokio and popen-pool create
/// lazily once per process (SIGCHLD pipe, spawner thread) is in the baseline.
pub(crate) async fn warm_up() -> Baseline {
    let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
    assert_eq!(pool.submit(Int(1)).await, Ok(1));
    settle(&pool).await;
    pool.shutdown().await;
    assert!(
        eventually(SOON, || child_pids().is_empty()).await,
        "warm-up pool left children: {:?}",
        child_pids()
    );
    Baseline { fds: fd_table() }
}

impl Baseline {
    /// Waits (bounded) until this process has no child and exactly the
    /// baseline's number of fds; panics describing what is left otherwise.
    pub(crate) async fn assert_clean(&self, after: &str) {
        let clean =
            eventually(SOON, || child_pids().is_empty() && open_fds() == self.fds.len()).await;
        if clean {
            return;
        }
        let children: Vec<String> = child_pids()
            .into_iter()
            .map(|p| format!("{p} ({}, state {:?})", comm_of(p), proc_stat(p).map(|s| s.0)))
            .collect();
        let now = fd_table();
        let added: Vec<_> = now.iter().filter(|(fd, t)| self.fds.get(fd) != Some(t)).collect();
        let removed: Vec<_> = self.fds.iter().filter(|(fd, t)| now.get(fd) != Some(t)).collect();
        panic!(
            "not clean after {after}: children {children:?}; fds {} now vs {} before; \
             new {added:?}; gone {removed:?}",
            now.len(),
            self.fds.len()
        );
    }
}

/// A scratch directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("popen-pool-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded) for a pid written to `file` by `SpawnSleeper`.
pub(crate) async fn read_pid_file(file: &Path) -> u32 {
    let mut pid = None;
    let found = eventually(SOON, || {
        pid = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok());
        pid.is_some()
    })
    .await;
    assert!(found, "the task never wrote the sleeper's pid to {}", file.display());
    pid.unwrap()
}

/// Fifty tasks of every outcome: values, errors, panics, one timeout and
/// three crashes.
fn mixed_cases() -> Vec<Case> {
    (0..50)
        .map(|i| match i {
            7 => Case::Timeout,
            13 => Case::Exit(42),
            21 => Case::Segfault,
            33 => Case::Abort,
            i if i % 5 == 0 => Case::Panic(format!("mixed panic {i}")),
            i if i % 7 == 0 => Case::Fail(format!("mixed failure {i}")),
            i => Case::Value(Val::Text(format!("mixed value {i}"))),
        })
        .collect()
}

/// Runs `cases` on `pool` and checks every outcome.
async fn run_and_check(pool: &PopenPool, cases: &[Case]) {
    let results = futures::future::join_all(cases.iter().map(|c| c.submit(pool))).await;
    for (i, (case, got)) in cases.iter().zip(&results).enumerate() {
        if let Err(why) = case.check(got) {
            panic!("task {i} ({case:?}): {why}");
        }
    }
}

pub(crate) async fn wait_running(pool: &PopenPool, n: u64) {
    assert!(
        eventually(SOON, || pool.stats().running == n).await,
        "expected {n} running tasks: {:?}",
        pool.stats()
    );
}

// ---------------------------------------------------------------------------
// 1. A timed-out task's own children die with its worker.

#[tokio::test]
async fn timeout_kills_the_tasks_own_children() {
    let dir = TempDir::new("sleeper");
    let file = dir.path().join("sleeper.pid");
    let program = test_worker_program().env("SLEEPER_PID_FILE", &file);
    let pool = PopenPool::builder(program).max_workers(1).build().unwrap();
    let worker = pool.submit(Pid).await.unwrap();

    let limit = Duration::from_secs(2);
    let handle = pool.submit_with_timeout(SpawnSleeper { then_sleep_ms: 600_000 }, Some(limit));
    let sleeper = read_pid_file(&file).await;
    assert!(alive(sleeper), "sleeper {sleeper} runs while the task does");
    assert_eq!(comm_of(sleeper), "sleep");
    assert_eq!(ppid_of(sleeper), Some(worker), "the sleeper is the worker's child");

    assert_eq!(handle.await, Err(PoolError::Timeout { limit }));
    assert!(!pid_exists(worker), "the timed-out worker {worker} was killed and reaped");
    let gone = eventually(SOON, || !alive(sleeper)).await;
    assert!(
        gone,
        "`sleep` {sleeper} survived its worker's timeout (state {:?})",
        proc_stat(sleeper)
    );
    assert_eq!(pool.stats().timeouts, 1);

    // The pool still works, in a new worker.
    let next = pool.submit(Pid).await.unwrap();
    assert_ne!(next, worker);
    pool.shutdown().await;
    let clean = eventually(SOON, || child_pids().is_empty()).await;
    assert!(clean, "children left after shutdown: {:?}", child_pids());
}

// ---------------------------------------------------------------------------
// 2. A SIGKILLed parent leaves no workers (PR_SET_PDEATHSIG).

const PARENT_ENV: &str = "POPEN_POOL_TEST_PARENT";

/// Not a test of its own: when this binary is re-run with `POPEN_POOL_TEST_PARENT=1`
/// it plays the parent program of `killed_parent_leaves_no_workers`. Otherwise
/// it returns at once.
#[test]
fn parent_program_entry() {
    if std::env::var_os(PARENT_ENV).is_none_or(|v| v != "1") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
        // Two slow tasks at once: one runs in each worker, so both are up.
        let (a, b) = futures::join!(pool.submit(Sleep(200)), pool.submit(Sleep(200)));
        assert_eq!((a, b), (Ok(200), Ok(200)));
        let pids = pool.worker_pids();
        assert_eq!(pids.len(), 2, "two workers: {pids:?}");
        let line: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut out = std::io::stdout().lock();
        writeln!(out, "PIDS {}", line.join(" ")).unwrap();
        out.flush().unwrap();
        drop(out);
        // Wait to be killed; give up if the test that started us is gone.
        let test = std::os::unix::process::parent_id();
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::os::unix::process::parent_id() == test && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::process::exit(1);
    });
}

#[test]
fn killed_parent_leaves_no_workers() {
    let (mut parent, rx) = crate::hygiene::spawn_parent_program(
        module_path!(),
        "parent_program_entry",
        (PARENT_ENV, "1"),
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let pids: Vec<u32> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(line)) => {
                // After libtest's "test <name> ... " on the same line.
                if let Some(rest) = line.split_once("PIDS ").map(|(_, r)| r) {
                    break rest.split_whitespace().map(|p| p.parse().unwrap()).collect();
                }
                seen.push(line);
            }
            other => {
                let _ = parent.kill();
                let _ = parent.wait();
                panic!("the parent program printed no PIDS line ({other:?}); output: {seen:?}");
            }
        }
    };
    assert_eq!(pids.len(), 2, "{pids:?}");
    for &pid in &pids {
        assert!(alive(pid), "worker {pid} runs before the parent dies");
        assert_eq!(ppid_of(pid), Some(parent.id()), "worker {pid} is the parent program's child");
    }

    parent.kill().unwrap();
    let status = parent.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
    let gone = eventually_blocking(Duration::from_secs(1), || pids.iter().all(|&p| !alive(p)));
    let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).map(|&p| (p, comm_of(p))).collect();
    assert!(gone, "workers outlived their SIGKILLed parent by 1 s: {left:?}");
}
// ---------------------------------------------------------------------------
// 4. No fds or children outlive a pool: shutdown, kill, drop.

/// A 2-worker pool that has run the mixed cases (a timeout, crashes).
async fn used_pool() -> PopenPool {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(2)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    run_and_check(&pool, &mixed_cases()).await;
    pool
}

#[tokio::test]
async fn no_leaks_after_shutdown() {
    let baseline = warm_up().await;
    let pool = used_pool().await;
    // No settling: a spare may still be starting after the last crash, and
    // shutdown must reap it too.
    let stats = pool.stats();
    assert_eq!((stats.timeouts, stats.crashes), (1, 3), "{stats:?}");
    let pids = pool.worker_pids();
    pool.shutdown().await;
    for pid in pids {
        assert!(!pid_exists(pid), "worker {pid} not reaped by shutdown");
    }
    baseline.assert_clean("shutdown").await;
}

#[tokio::test]
async fn no_leaks_after_kill() {
    let baseline = warm_up().await;
    let pool = used_pool().await;
    settle(&pool).await;
    // Killed with two tasks running and more queued.
    let running: Vec<_> = (0..2).map(|_| pool.submit(Sleep(600_000))).collect();
    wait_running(&pool, 2).await;
    let queued: Vec<_> = (0..5).map(|i| pool.submit(Int(i))).collect();
    let pids = pool.worker_pids();
    pool.kill().await;
    for pid in pids {
        assert!(!pid_exists(pid), "worker {pid} not reaped by kill");
    }
    for h in running {
        assert_eq!(h.await, Err(PoolError::Shutdown));
    }
    for h in queued {
        assert_eq!(h.await, Err(PoolError::Shutdown));
    }
    drop(pool);
    baseline.assert_clean("kill").await;
}

#[tokio::test]
async fn no_leaks_after_drop() {
    let baseline = warm_up().await;
    let pool = used_pool().await;
    settle(&pool).await;
    let running: Vec<_> = (0..2).map(|_| pool.submit(Sleep(600_000))).collect();
    wait_running(&pool, 2).await;
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    drop(pool);
    for h in running {
        let got = tokio::time::timeout(SOON, h).await.expect("a dropped pool's task resolves");
        assert_eq!(got, Err(PoolError::Shutdown));
    }
    let gone = eventually(SOON, || pids.iter().all(|&p| !pid_exists(p))).await;
    assert!(
        gone,
        "workers of a dropped pool still exist: {:?}",
        pids.iter().filter(|&&p| pid_exists(p)).collect::<Vec<_>>()
    );
    baseline.assert_clean("drop").await;
}
