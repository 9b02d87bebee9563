//! Spawn-time process controls: CPU affinity, nice, rlimits, the memory ceiling.

use std::time::Duration;

use popen_pool::{PoolError, PopenPool, PopenWorker};

use crate::common::*;
use crate::test_worker_program;

/// The CPUs this process may run on, from its own `Cpus_allowed_list`.
fn own_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

#[tokio::test]
async fn a_worker_pinned_to_one_cpu_reports_that_cpu_set() {
    // The last CPU this process may use: pinning there is always allowed,
    // and (with more than one) differs from the inherited set.
    let cpu = *own_cpus().last().unwrap();
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .cpu_affinity([cpu])
        .build()
        .unwrap();
    let seen = pool.submit(StatusField("Cpus_allowed_list".into())).await.unwrap();
    assert_eq!(seen, cpu.to_string());
    pool.shutdown().await;
}

#[tokio::test]
async fn an_impossible_affinity_fails_the_spawn_clearly() {
    let mut worker =
        PopenWorker::builder(test_worker_program()).cpu_affinity([1000]).build().unwrap();
    match worker.run(Int(1)).await {
        Err(PoolError::Spawn { message }) => {
            assert!(message.contains("process controls"), "{message}");
            assert!(message.contains("affinity"), "{message}");
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn nice_and_rlimits_are_visible_from_inside_the_task() {
    let defaults = {
        let mut worker = PopenWorker::builder(test_worker_program()).build().unwrap();
        let seen = worker.run(Limits).await.unwrap();
        worker.shutdown().await;
        seen
    };
    assert_eq!(defaults.core, 0, "core dumps are off by default");
    // Raising nice needs no privilege.
    let nice = (defaults.nice + 3).min(19);
    assert_ne!(nice, defaults.nice, "the test needs an inherited nice below 19");
    let mut worker = PopenWorker::builder(test_worker_program())
        .nice(i32::try_from(nice).unwrap())
        .rlimit_open_files(200)
        .rlimit_address_space(64 << 30)
        .rlimit_cpu_time(Duration::from_millis(3_600_500))
        .core_dumps(true)
        .build()
        .unwrap();
    let seen = worker.run(Limits).await.unwrap();
    assert_eq!(seen.nice, nice);
    assert_eq!(seen.nofile, 200);
    assert_eq!(seen.address_space, 64 << 30);
    assert_eq!(seen.cpu, 3601, "RLIMIT_CPU is rounded up to whole seconds");
    let (own_core, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap();
    assert_eq!(seen.core, own_core, "core_dumps(true) keeps the inherited RLIMIT_CORE");
    worker.shutdown().await;
}

#[tokio::test]
async fn a_task_past_the_memory_ceiling_fails_and_the_pool_serves_on() {
    let limit = 96u64 << 20;
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .memory_limit(limit)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let first = pool.submit(Pid).await.unwrap();
    // Holds 256 MiB for a minute: only the ceiling can end it early.
    assert_eq!(pool.submit(HogAndHold(256, 60_000)).await, Err(PoolError::MemoryLimit { limit }));
    assert!(
        crate::hygiene::eventually(crate::hygiene::SOON, || !pid_exists(first)).await,
        "the worker over the ceiling was killed"
    );
    // Under the ceiling: fine, in a fresh worker.
    assert_eq!(pool.submit(Hog(8)).await.map(|pid| pid != first), Ok(true));
    assert_eq!(pool.submit(Int(7)).await, Ok(7));
    let stats = pool.stats();
    assert_eq!(stats.memory_kills, 1);
    assert_eq!(stats.crashes, 0);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_task_that_leaves_its_worker_over_the_ceiling_fails_too() {
    let limit = 64u64 << 20;
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .memory_limit(limit)
        .build()
        .unwrap();
    // Allocates 128 MiB, keeps it, returns at once.
    assert_eq!(pool.submit(Hog(128)).await, Err(PoolError::MemoryLimit { limit }));
    assert_eq!(pool.submit(Int(1)).await, Ok(1));
    pool.shutdown().await;
}
