//! Pool benchmark: prints one JSON line with the keys of `bench/pool_tvm.py`,
//! measuring the same workloads as TVM's `PopenPoolExecutor` there.
//!
//! `cargo run --release -p popen-pool --example pool_bench [-- --quick]`
//! (`--quick`: fewer repetitions and tasks, for CI smoke runs; `--no-cgroups`:
//! workers without a cgroup each, to see what cgroup containment costs; env
//! `POOL_BENCH_N` sets the task count of the throughput runs).
//!
//! Each figure is the median of several repetitions:
//! - `cold_start_s`: build a 2-worker pool until the first identity task returns;
//! - `submit_tasks_per_s`: 2 warm workers, N identity tasks submitted one by one;
//! - `map_tasks_per_s`: 2 warm workers, `map_with_error_catching` over N items;
//! - `timeout_50ms_observed_s`: 1 worker, 50 ms limit, a task sleeping 10 s,
//!   from submit to the timeout error;
//! - `respawn_after_timeout_s`: right after that, the next identity task;
//! - `recycle_every_task_s_per_task`: 2 workers with `maximum_process_uses = 1`,
//!   M identity tasks, time per task;
//! - `worker_start_s_parent_6m` / `_1g` / `_4g`: with this process holding
//!   that much touched memory (a `Vec` written through; `--quick`: 6 MiB,
//!   64 MiB, 256 MiB under the same keys), 1 worker with
//!   `maximum_process_uses = 1`, time of one identity task = one worker start,
//!   handshake and task round trip (median of 15, `--quick` 5);
//! - `spawn_true_s_parent_*` (the limit: `std::process::Command` without
//!   `pre_exec`, posix_spawn of `/bin/true` until it is reaped) and
//!   `fork_true_s_parent_*` (the same with a no-op `pre_exec`, a real fork:
//!   how popen-pool started workers before), same parent sizes.
//! - `raw_socketpair_roundtrips_per_s`: the physical limit one worker's
//!   channel is bound by without pipelining: two *processes* (this one and
//!   a forked copy, both plain blocking code) passing a 32-byte message
//!   back and forth over a socketpair, measured in the same run; and the
//!   ratios `submit_ratio_to_raw`, `map_ratio_to_raw` of the 2-worker pool
//!   rates to it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use popen_pool::{PoolError, PopenPool, Registry, Task, TaskFailure, WorkerContext, WorkerProgram};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Identity(u64);

impl Task for Identity {
    const NAME: &'static str = "identity";
    type Output = u64;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        Ok(self.0)
    }
}

#[derive(Serialize, Deserialize)]
struct SleepSecs(f64);

impl Task for SleepSecs {
    const NAME: &'static str = "sleep";
    type Output = ();
    fn run(self, _ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        std::thread::sleep(Duration::from_secs_f64(self.0));
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::new().register::<Identity>().register::<SleepSecs>()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn builder() -> popen_pool::PoolBuilder {
    let cgroups = !std::env::args().any(|a| a == "--no-cgroups");
    PopenPool::builder(program()).cgroups(cgroups)
}

fn program() -> WorkerProgram {
    WorkerProgram::current_exe().expect("current exe")
}

async fn throughput(pool: &PopenPool, n: u64, map: bool) -> f64 {
    let start = Instant::now();
    if map {
        let mut stream = pool.map_with_error_catching((0..n).map(Identity));
        let mut i = 0;
        while let Some(r) = stream.next().await {
            assert_eq!(r.expect("identity"), i);
            i += 1;
        }
        assert_eq!(i, n);
    } else {
        let handles: Vec<_> = (0..n).map(|i| pool.submit(Identity(i))).collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.expect("identity"), i as u64);
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// One worker start (and its first task), as a recycling pool pays it.
async fn worker_start(reps: usize) -> anyhow::Result<f64> {
    let pool = builder().max_workers(1).maximum_process_uses(1).build()?;
    pool.submit(Identity(0)).await?;
    let mut starts = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        pool.submit(Identity(1)).await?;
        starts.push(start.elapsed().as_secs_f64());
    }
    pool.shutdown().await;
    Ok(median(starts))
}

/// `/bin/true` spawned and reaped, with a no-op `pre_exec` (a real fork) or
/// without (posix_spawn).
fn spawn_true(reps: usize, fork: bool) -> anyhow::Result<f64> {
    use std::os::unix::process::CommandExt;
    let mut times = Vec::new();
    for _ in 0..reps {
        let mut cmd = std::process::Command::new("/bin/true");
        if fork {
            // SAFETY: the closure does nothing.
            unsafe { cmd.pre_exec(|| Ok(())) };
        }
        let start = Instant::now();
        cmd.spawn()?.wait()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// The worker-start figures with the parent holding 6 MiB, 1 GiB and 4 GiB.
async fn parent_sizes(
    quick: bool,
    out: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let sizes =
        if quick { [6 * MIB, 64 * MIB, 256 * MIB] } else { [6 * MIB, 1024 * MIB, 4096 * MIB] };
    let reps = if quick { 5 } else { 15 };
    for (size, key) in sizes.into_iter().zip(["6m", "1g", "4g"]) {
        // Touched for real: every byte written (no zero page, no lazy fault).
        let held = std::hint::black_box(vec![1u8; size]);
        out.insert(format!("worker_start_s_parent_{key}"), worker_start(reps).await?.into());
        out.insert(format!("spawn_true_s_parent_{key}"), spawn_true(reps, false)?.into());
        out.insert(format!("fork_true_s_parent_{key}"), spawn_true(reps, true)?.into());
        drop(std::hint::black_box(held));
    }
    Ok(())
}

/// Round trips per second of a 32-byte message between this process and a
/// forked child over a socketpair (blocking reads and writes on both sides).
/// Called before any other thread exists, so the fork is safe.
fn raw_socketpair_roundtrips_per_s(n: u32) -> f64 {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (mut parent, mut child) = UnixStream::pair().expect("socketpair");
    // SAFETY: single-threaded here; the child only does reads, writes and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(parent);
        let mut buf = [0u8; 32];
        while child.read_exact(&mut buf).is_ok() {
            if child.write_all(&buf).is_err() {
                break;
            }
        }
        // SAFETY: ends the forked child without running the parent's atexit state.
        unsafe { libc::_exit(0) };
    }
    drop(child);
    let mut buf = [7u8; 32];
    let start = Instant::now();
    for _ in 0..n {
        parent.write_all(&buf).expect("write");
        parent.read_exact(&mut buf).expect("read");
    }
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    drop(parent);
    let mut status = 0;
    // SAFETY: reaps the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    rate
}

fn main() -> anyhow::Result<()> {
    popen_pool::serve_if_worker(registry());
    let quick = std::env::args().any(|a| a == "--quick");
    let raw_n = if quick { 20_000 } else { 100_000 };
    let raw: Vec<f64> =
        (0..if quick { 3 } else { 7 }).map(|_| raw_socketpair_roundtrips_per_s(raw_n)).collect();
    let raw = median(raw);
    tokio::runtime::Runtime::new()?.block_on(bench(raw))
}

async fn bench(raw: f64) -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let default_n = if quick { 5_000 } else { 50_000 };
    let n: u64 =
        std::env::var("POOL_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(default_n);

    let mut cold = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let pool = builder().max_workers(2).build()?;
        pool.submit(Identity(1)).await?;
        cold.push(start.elapsed().as_secs_f64());
        pool.shutdown().await;
    }

    let pool = builder().max_workers(2).build()?;
    throughput(&pool, 1000, false).await;
    let mut submit = Vec::new();
    let mut map = Vec::new();
    for _ in 0..reps {
        submit.push(throughput(&pool, n, false).await);
        map.push(throughput(&pool, n, true).await);
    }
    pool.shutdown().await;

    let pool = builder().max_workers(1).timeout(Duration::from_millis(50)).build()?;
    let mut observed = Vec::new();
    let mut respawn = Vec::new();
    for _ in 0..reps {
        pool.submit(Identity(0)).await?;
        let start = Instant::now();
        let err = pool.submit(SleepSecs(10.0)).await.expect_err("must time out");
        observed.push(start.elapsed().as_secs_f64());
        assert!(matches!(err, PoolError::Timeout { .. }), "{err}");
        let start = Instant::now();
        pool.submit(Identity(1)).await?;
        respawn.push(start.elapsed().as_secs_f64());
    }
    pool.shutdown().await;

    let m = if quick { 50 } else { 200 };
    let pool = builder().max_workers(2).maximum_process_uses(1).build()?;
    throughput(&pool, 10, false).await;
    let mut recycle = Vec::new();
    for _ in 0..reps {
        let per_s = throughput(&pool, m, false).await;
        recycle.push(1.0 / per_s);
    }
    let stats = pool.stats();
    pool.shutdown().await;
    assert!(stats.recycled >= m * reps as u64, "recycled {} workers", stats.recycled);

    let (submit, map) = (median(submit), median(map));
    let mut out = serde_json::json!({
        "cold_start_s": median(cold),
        "submit_tasks_per_s": submit,
        "map_tasks_per_s": map,
        "raw_socketpair_roundtrips_per_s": raw,
        "raw_socketpair_peers": "two processes",
        "submit_ratio_to_raw": submit / raw,
        "map_ratio_to_raw": map / raw,
        "timeout_50ms_observed_s": median(observed),
        "respawn_after_timeout_s": median(respawn),
        "recycle_every_task_s_per_task": median(recycle),
    });
    if let Some(map) = out.as_object_mut() {
        parent_sizes(quick, map).await?;
    }
    println!("{out}");
    Ok(())
}
