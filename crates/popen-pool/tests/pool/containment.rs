//! Containment of a task's whole process tree: daemons (`setsid` or
//! `setpgid`, double fork) die with a timeout, a shutdown and a SIGKILLed
//! parent, with a cgroup per worker and without (process tree and guard);
//! no cgroup directory outlives its pool.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use popen_pool::{Containment, PoolError, PopenPool};

use crate::common::*;
use crate::hygiene::{
    SOON, TempDir, alive, comm_of, eventually, eventually_blocking, proc_stat, read_pid_file,
};
use crate::test_worker_program;

/// The pool's cgroup directory, or `None` (with a loud line) where this
/// machine has no writable cgroup2 hierarchy.
fn cgroup_dir(pool: &PopenPool) -> Option<PathBuf> {
    match pool.containment() {
        Containment::Cgroup { dir } => Some(dir),
        other => {
            eprintln!("SKIPPED the cgroup part: no cgroup containment here ({other:?})");
            None
        }
    }
}

fn daemon_pool(file: &Path, cgroups: bool) -> PopenPool {
    let program = test_worker_program().env("SLEEPER_PID_FILE", file);
    PopenPool::builder(program).max_workers(1).cgroups(cgroups).build().unwrap()
}

#[track_caller]
fn assert_mode(pool: &PopenPool, cgroups: bool) {
    let got = pool.containment();
    if !cgroups {
        assert!(
            matches!(&got, Containment::ProcessTree { reason } if reason.contains("disabled")),
            "{got:?}"
        );
    }
}

async fn daemon_dies_with_a_timeout(cgroups: bool, setsid: bool) {
    let dir = TempDir::new("daemon-timeout");
    let file = dir.path().join("daemon.pid");
    let pool = daemon_pool(&file, cgroups);
    assert_mode(&pool, cgroups);
    let limit = Duration::from_secs(2);
    let handle =
        pool.submit_with_timeout(Daemonize { setsid, then_sleep_ms: 600_000 }, Some(limit));
    let daemon = read_pid_file(&file).await;
    assert!(alive(daemon), "the daemon {daemon} runs while its task does");
    assert_eq!(comm_of(daemon), "sleep");
    assert_eq!(handle.await, Err(PoolError::Timeout { limit }));
    assert!(
        eventually(SOON, || !alive(daemon)).await,
        "daemon {daemon} (setsid {setsid}, cgroups {cgroups}) survived its task's timeout: {:?}",
        proc_stat(daemon)
    );
    assert_eq!(pool.submit(Int(3)).await, Ok(3), "the pool serves on");
    pool.shutdown().await;
}

async fn daemon_dies_at_shutdown(cgroups: bool, setsid: bool) {
    let dir = TempDir::new("daemon-shutdown");
    let file = dir.path().join("daemon.pid");
    let pool = daemon_pool(&file, cgroups);
    let daemon = pool.submit(Daemonize { setsid, then_sleep_ms: 0 }).await.unwrap();
    assert!(alive(daemon), "the daemon {daemon} outlives its task (the task returned)");
    pool.shutdown().await;
    assert!(
        eventually(SOON, || !alive(daemon)).await,
        "daemon {daemon} (setsid {setsid}, cgroups {cgroups}) survived shutdown(): {:?}",
        proc_stat(daemon)
    );
}

#[tokio::test]
async fn daemons_die_with_a_timeout_in_a_cgroup() {
    daemon_dies_with_a_timeout(true, true).await;
    daemon_dies_with_a_timeout(true, false).await;
}

#[tokio::test]
async fn daemons_die_with_a_timeout_without_cgroups() {
    daemon_dies_with_a_timeout(false, true).await;
    daemon_dies_with_a_timeout(false, false).await;
}

#[tokio::test]
async fn daemons_die_at_shutdown_in_a_cgroup() {
    daemon_dies_at_shutdown(true, true).await;
    daemon_dies_at_shutdown(true, false).await;
}

#[tokio::test]
async fn daemons_die_at_shutdown_without_cgroups() {
    daemon_dies_at_shutdown(false, true).await;
    daemon_dies_at_shutdown(false, false).await;
}

#[tokio::test]
async fn daemons_die_when_the_pool_is_killed_or_dropped() {
    for cgroups in [true, false] {
        let dir = TempDir::new("daemon-kill");
        let file = dir.path().join("daemon.pid");
        let pool = daemon_pool(&file, cgroups);
        let first = pool.submit(Daemonize { setsid: true, then_sleep_ms: 0 }).await.unwrap();
        let running = pool.submit(Daemonize { setsid: true, then_sleep_ms: 600_000 });
        let _ = std::fs::remove_file(&file);
        let second = read_pid_file(&file).await;
        pool.kill().await;
        assert_eq!(running.await, Err(PoolError::Shutdown));
        drop(pool);
        for d in [first, second] {
            assert!(
                eventually(SOON, || !alive(d)).await,
                "daemon {d} (cgroups {cgroups}) survived kill(): {:?}",
                proc_stat(d)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A SIGKILLed parent: its workers' daemons die too (the worker-side guard).

const PARENT_ENV: &str = "POPEN_POOL_TEST_DAEMON_PARENT";

/// Not a test of its own: re-run with `POPEN_POOL_TEST_DAEMON_PARENT=cgroup`
/// or `=tree`, it plays the parent program of the tests below: a 2-worker
/// pool whose tasks started daemons; it prints them and waits to be killed.
#[test]
fn daemon_parent_program_entry() {
    let Some(mode) = std::env::var_os(PARENT_ENV) else { return };
    let cgroups = mode == "cgroup";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pool = PopenPool::builder(test_worker_program())
            .max_workers(2)
            .cgroups(cgroups)
            .build()
            .unwrap();
        let mut daemons = Vec::new();
        for i in 0..10 {
            daemons.push(pool.submit(Daemonize { setsid: i % 2 == 0, then_sleep_ms: 0 }));
        }
        // And two running tasks whose daemons are still their children's.
        let running: Vec<_> = (0..2)
            .map(|_| pool.submit(Daemonize { setsid: true, then_sleep_ms: 600_000 }))
            .collect();
        let mut pids = Vec::new();
        for d in daemons {
            pids.push(d.await.unwrap());
        }
        let mut out = std::io::stdout().lock();
        let line: Vec<String> = pids.iter().map(u32::to_string).collect();
        writeln!(out, "DAEMONS {}", line.join(" ")).unwrap();
        writeln!(out, "WORKERS {:?} {:?}", pool.worker_pids(), pool.containment()).unwrap();
        out.flush().unwrap();
        drop(out);
        let test = std::os::unix::process::parent_id();
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::os::unix::process::parent_id() == test && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(running);
        std::process::exit(1);
    });
}

fn killed_parent_leaves_no_daemons(mode: &str) {
    let (mut parent, rx) = crate::hygiene::spawn_parent_program(
        module_path!(),
        "daemon_parent_program_entry",
        (PARENT_ENV, mode),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let daemons: Vec<u32> = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(line)) => {
                // After libtest's "test <name> ... " on the same line.
                if let Some(rest) = line.split_once("DAEMONS ").map(|(_, r)| r) {
                    break rest.split_whitespace().map(|p| p.parse().unwrap()).collect();
                }
                seen.push(line);
            }
            other => {
                let _ = parent.kill();
                let _ = parent.wait();
                panic!("the parent program printed no DAEMONS line ({other:?}); output: {seen:?}");
            }
        }
    };
    let workers = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(daemons.len(), 10, "{daemons:?}");
    for &d in &daemons {
        assert!(alive(d), "daemon {d} runs before the parent dies");
    }
    parent.kill().unwrap();
    parent.wait().unwrap();
    let gone = eventually_blocking(SOON, || daemons.iter().all(|&p| !alive(p)));
    let left: Vec<_> = daemons.iter().filter(|&&p| alive(p)).map(|&p| (p, comm_of(p))).collect();
    assert!(gone, "{mode}: daemons outlived their SIGKILLed parent: {left:?} ({workers:?})");
}

#[test]
fn killed_parent_leaves_no_daemons_with_cgroups() {
    killed_parent_leaves_no_daemons("cgroup");
}

#[test]
fn killed_parent_leaves_no_daemons_without_cgroups() {
    killed_parent_leaves_no_daemons("tree");
}

// ---------------------------------------------------------------------------
// Cgroup directories: none outlives its pool; stale ones are cleaned up.

fn worker_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect()
}

#[tokio::test]
async fn no_cgroup_dir_outlives_its_pool() {
    for how in ["shutdown", "kill", "drop"] {
        let pool = PopenPool::builder(test_worker_program())
            .max_workers(2)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let Some(dir) = cgroup_dir(&pool) else { return };
        assert!(dir.is_dir(), "{}", dir.display());
        // A timeout, crashes, a daemon: each lost worker's cgroup goes.
        let _ = pool.submit_with_timeout(Sleep(600_000), Some(Duration::from_millis(100))).await;
        let _ = pool.submit(ExitSelf(3)).await;
        let _ = pool.submit(Segfault).await;
        let _ = pool.submit(Daemonize { setsid: true, then_sleep_ms: 0 }).await.unwrap();
        let running: Vec<_> = (0..2).map(|_| pool.submit(Sleep(600_000))).collect();
        crate::hygiene::wait_running(&pool, 2).await;
        let live = pool.worker_pids().len();
        assert!(
            eventually(SOON, || worker_dirs(&dir).len() == live).await,
            "one cgroup per live worker ({live}): {:?}",
            worker_dirs(&dir)
        );
        match how {
            "shutdown" => {
                for h in &running {
                    h.abort();
                }
                pool.shutdown().await;
                assert!(
                    !dir.exists(),
                    "{} outlived shutdown(): {:?}",
                    dir.display(),
                    worker_dirs(&dir)
                );
            }
            "kill" => {
                pool.kill().await;
                assert!(worker_dirs(&dir).is_empty(), "kill(): {:?}", worker_dirs(&dir));
                drop(pool);
                assert!(!dir.exists(), "{} outlived its killed pool", dir.display());
            }
            _ => {
                drop(pool);
                for h in running {
                    assert_eq!(h.await, Err(PoolError::Shutdown));
                }
                assert!(
                    eventually(SOON, || !dir.exists()).await,
                    "{} outlived its dropped pool: {:?}",
                    dir.display(),
                    worker_dirs(&dir)
                );
            }
        }
    }
}

/// A task that makes cgroups below its worker's (it runs a pool itself):
/// its worker's cgroup still goes when the worker does, and at once.
#[tokio::test]
async fn cgroups_a_task_nests_in_its_worker_go_with_the_worker() {
    for how in ["crash", "shutdown"] {
        let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
        let Some(dir) = cgroup_dir(&pool) else { return };
        let task = NestCgroups { pool_dir: dir.display().to_string() };
        let deepest = PathBuf::from(pool.submit(task).await.unwrap());
        assert!(deepest.is_dir() && deepest.starts_with(&dir), "{}", deepest.display());
        let started = std::time::Instant::now();
        match how {
            "crash" => {
                // The worker dies; the next task gets a fresh one.
                assert!(pool.submit(Segfault).await.is_err());
                assert!(
                    eventually(SOON, || worker_dirs(&dir).len() <= 1).await,
                    "the crashed worker's cgroup stays: {:?}",
                    worker_dirs(&dir)
                );
                assert!(!deepest.exists(), "{} outlived its worker", deepest.display());
                assert_eq!(pool.submit(Int(5)).await, Ok(5));
                pool.shutdown().await;
            }
            _ => pool.shutdown().await,
        }
        assert!(
            !dir.exists(),
            "{how}: {} outlived its pool: {:?}",
            dir.display(),
            worker_dirs(&dir)
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{how}: removing them took {took:?}");
    }
}

#[tokio::test]
async fn a_new_pool_removes_cgroups_left_by_a_dead_process() {
    let probe = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    let Some(dir) = cgroup_dir(&probe) else { return };
    probe.shutdown().await;
    let base = dir.parent().unwrap();
    // A pid that is surely dead.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let stale = base.join(format!("popen-pool-{pid}-1-0"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(stale.join("w0")).unwrap();
    // A pool made by a process that ran inside a worker's cgroup nests its
    // own dirs there (a worker program that runs pools itself).
    let nested = stale.join(format!("w1/popen-pool-{pid}-2-0/w0"));
    std::fs::create_dir_all(&nested).unwrap();
    let started = std::time::Instant::now();
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    assert!(!stale.exists(), "the stale {} was not removed", stale.display());
    // Empty dirs go at once; the scan waits only for dirs that do not.
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(900), "the scan took {took:?}");
    assert_eq!(pool.submit(Int(1)).await, Ok(1));
    pool.shutdown().await;
}

#[tokio::test]
async fn cgroup_containment_is_on_where_available_and_can_be_turned_off() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    if let Some(dir) = cgroup_dir(&pool) {
        let pid = pool.submit(Pid).await.unwrap();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let line = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap().to_owned();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(line.contains(&name), "worker {pid} is in {line}, not under {}", dir.display());
    }
    pool.shutdown().await;
    let off =
        PopenPool::builder(test_worker_program()).max_workers(1).cgroups(false).build().unwrap();
    assert_mode(&off, false);
    assert_eq!(off.submit(Int(2)).await, Ok(2));
    off.shutdown().await;
}
