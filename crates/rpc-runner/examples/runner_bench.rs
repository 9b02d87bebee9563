//! Per-measurement overhead of the runners: prints one JSON line.
//!
//! `cargo run --release -p rpc-runner --example runner_bench [-- --quick] [--runs N] [--no-ballast] [--only MODE] [--no-zygote]`
//!
//! Workload (issue 11): a kernel that busy-waits 200 µs, three float32
//! `[256, 256]` arguments (768 KiB), `number` 1, `repeat` 1,
//! `min_repeat_ms` 0, one candidate per measurement, `N` candidates in a
//! row per run (64; `--quick`: 16), `--runs` runs (default 3; `--quick`: 1;
//! `--quick` also skips the 4 GiB parent, `--no-ballast` all but 6 MiB).
//!
//! - `overhead_per_measurement_s`: wall time per candidate minus the
//!   kernel's own time (its warm-up and timed call: 2 × 200 µs; with two
//!   servers measuring in parallel, half of it), median over runs, for
//!   `local` (`LocalRunner`), `rpc_1_server` and `rpc_2_servers`
//!   (`RpcRunner` through a tracker, servers in this process with a warm
//!   spare, each pinned to its own CPU) and `rpc_1_server_no_spare` (the
//!   server without the spare: what a lease pays when a worker starts);
//! - `overhead_median_per_measurement_s`: the median over measurements of
//!   their stage times' sum minus the kernel's calls (robust to preemption
//!   on a loaded machine; with two servers, per measurement, not per
//!   candidate of wall time);
//! - `stages_s`: per-stage medians (`StageTimes`) of every runner, the
//!   kernel's median cost and `kernel_slow_share`, the share of
//!   measurements that read the kernel over 5% slow (preempted, or its CPU
//!   shared: what the harness's own work does to the costs);
//! - `cpu_per_measurement_s`: CPU time (user + system) per candidate, median
//!   over runs: `process` is this process (tracker, servers, client),
//!   `workers` its reaped children (session workers and zygotes; the
//!   kernel's own 400 µs is in there);
//! - `worker_start_s_parent_6m` / `_1g` / `_4g`: a session worker's start
//!   seen through a server in this process while it holds that much
//!   touched memory (none for `6m`, the bench's own size): the first call
//!   of a session minus the second, median of several sessions, no spare;
//!   `lease_worker_start_s_parent_*`: the same with the warm spare (what
//!   a lease pays);
//! - `limit_tcp_rtt_s`: a loopback TCP round trip (1 byte each way) in the
//!   same run, the physical floor of a round trip;
//! - `load`: the 1-minute load average before and after.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use popen_pool::WorkerProgram;
use rpc_runner::measure::{
    ArgInfo, BuilderInput, DType, EvaluatorConfig, LocalBuilder, LocalBuilderConfig, LocalRunner,
    Measurement, RpcConfig, RpcRunner, Runner as _, RunnerInput,
};
use rpc_runner::tasks::WorkerInfo;
use rpc_runner::tracker::{Tracker, TrackerConfig};
use rpc_runner::{ConnectOptions, DeviceServer, ServerConfig, Session};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEY: &str = "runner-bench";
/// The kernel's nominal time per call.
const KERNEL_S: f64 = 200e-6;
/// Calls per measurement: the warm-up and one timed call.
const CALLS: f64 = 2.0;

const KERNEL: &str = "#define _POSIX_C_SOURCE 199309L
#include <time.h>
#include \"tuning_harness_kernel.h\"
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {
  (void)args; (void)num_args;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  do {
    clock_gettime(CLOCK_MONOTONIC, &t);
  } while ((t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec) < 200000LL);
  return 0;
}
";

/// Servers fork session workers from a zygote (off: `--no-zygote`, for an
/// A/B of it in one run).
static ZYGOTE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn zygote() -> bool {
    ZYGOTE.load(std::sync::atomic::Ordering::Relaxed)
}

struct Opts {
    quick: bool,
    runs: usize,
    ballast: bool,
    /// `--only MODE`: run just this runner mode (for profiling), no worker-start phase.
    only: Option<String>,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut opts = Opts { quick: false, runs: 0, ballast: true, only: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--no-ballast" => opts.ballast = false,
            "--no-zygote" => ZYGOTE.store(false, std::sync::atomic::Ordering::Relaxed),
            "--only" => opts.only = Some(args.next().context("--only needs a mode")?),
            "--runs" => {
                let n = args.next().context("--runs needs a number")?;
                opts.runs = n.parse().with_context(|| format!("--runs {n:?}"))?;
                if !(1..=20).contains(&opts.runs) {
                    bail!("--runs must be in 1..=20");
                }
            }
            a => bail!(
                "unknown argument {a:?} (usage: runner_bench [--quick] [--runs N] [--no-ballast] [--only MODE] [--no-zygote])"
            ),
        }
    }
    if opts.runs == 0 {
        opts.runs = if opts.quick { 1 } else { 3 };
    }
    Ok(opts)
}

fn main() -> ExitCode {
    // Session workers and build workers are this program, re-executed.
    popen_pool::serve_if_worker(rpc_runner::tasks::registry());
    let result = parse_args().and_then(|opts| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?
            .block_on(run(opts))
    });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runner_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn loadavg() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(Value::Null, |l| json!(l))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn evaluator() -> EvaluatorConfig {
    EvaluatorConfig { number: 1, repeat: 1, min_repeat_ms: 0, ..EvaluatorConfig::default() }
}

fn inputs(artifact: &Path, n: usize) -> Vec<RunnerInput> {
    let args = vec![ArgInfo::tensor(DType::F32, [256, 256]); 3];
    (0..n).map(|_| RunnerInput::new(artifact, args.clone())).collect()
}

/// What one run of one runner gave: overhead per candidate and its measurements.
struct RunOut {
    overhead_s: f64,
    measurements: Vec<Measurement>,
    /// CPU seconds per candidate: this process's, its reaped children's.
    cpu_s: [f64; 2],
}

fn run_out(wall: Duration, n: usize, parallel: f64, ms: Vec<Measurement>, cpu: Cpu) -> RunOut {
    let per = wall.as_secs_f64() / n as f64;
    let cpu = cpu.since();
    RunOut {
        overhead_s: per - CALLS * KERNEL_S / parallel,
        measurements: ms,
        cpu_s: [cpu[0] / n as f64, cpu[1] / n as f64],
    }
}

/// CPU time (user + system) of this process and of its reaped children.
#[derive(Clone, Copy)]
struct Cpu([f64; 2]);

impl Cpu {
    fn now() -> Cpu {
        use nix::sys::resource::{UsageWho, getrusage};
        let secs = |who| {
            getrusage(who).map_or(0.0, |u| {
                let t =
                    |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
                t(u.user_time()) + t(u.system_time())
            })
        };
        Cpu([secs(UsageWho::RUSAGE_SELF), secs(UsageWho::RUSAGE_CHILDREN)])
    }

    fn since(self) -> [f64; 2] {
        let now = Cpu::now().0;
        [now[0] - self.0[0], now[1] - self.0[1]]
    }
}

fn collect(results: Vec<rpc_runner::measure::RunnerResult>) -> anyhow::Result<Vec<Measurement>> {
    results.into_iter().map(|r| r.map_err(anyhow::Error::from)).collect()
}

async fn local_run(program: &WorkerProgram, artifact: &Path, n: usize) -> anyhow::Result<RunOut> {
    let runner = LocalRunner::builder(program.clone()).evaluator(evaluator()).build()?;
    // The worker's start is paid once per runner, not per measurement.
    collect(runner.run(inputs(artifact, 1)).collect_ordered().await)?;
    let cpu = Cpu::now();
    let t = Instant::now();
    let ms = collect(runner.run(inputs(artifact, n)).collect_ordered().await)?;
    let wall = t.elapsed();
    runner.shutdown().await;
    Ok(run_out(wall, n, 1.0, ms, cpu))
}

async fn rpc_run(
    program: &WorkerProgram,
    artifact: &Path,
    n: usize,
    servers: usize,
    spare: bool,
) -> anyhow::Result<RunOut> {
    let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default()).await?;
    let cpus = rpc_runner::measure::CpuPlan::detect();
    let online: Vec<usize> = cpus.measure.iter().chain(&cpus.others).copied().collect();
    let mut handles = Vec::new();
    for i in 0..servers {
        let mut cfg = ServerConfig::new(KEY, program.clone())
            .tracker(tracker.addr().to_string())
            .warm_spare(spare)
            .zygote(zygote());
        if servers > 1 {
            cfg = cfg.worker_cpu_affinity([online[(online.len() - 1 - i) % online.len()]]);
        }
        let h = DeviceServer::start("127.0.0.1:0", cfg).await?;
        h.wait_for(Duration::from_secs(10), |s| s.registered)
            .await
            .map_err(|st| anyhow::anyhow!("a server did not register: {st:?}"))?;
        handles.push(h);
    }
    let rpc = RpcConfig::new("127.0.0.1", tracker.addr().port(), KEY)
        .lease_timeout(Duration::from_secs(60));
    let runner = RpcRunner::builder(rpc).evaluator(evaluator()).build().await?;
    // Warm: the first spares are made, the tracker has seen every server.
    collect(runner.run(inputs(artifact, servers)).collect_ordered().await)?;
    let cpu = Cpu::now();
    let t = Instant::now();
    let ms = collect(runner.run(inputs(artifact, n)).collect_ordered().await);
    let wall = t.elapsed();
    // The shutdown reaps the last workers and the zygotes: their CPU counts.
    for h in handles {
        h.shutdown().await?;
    }
    tracker.shutdown().await?;
    Ok(run_out(wall, n, servers as f64, ms?, cpu))
}

/// Median over measurements of (every stage's time - the kernel's calls):
/// the overhead of a typical measurement, robust to the preemptions of a
/// loaded machine that the wall-time figure includes.
fn per_measurement_median(ms: &[Measurement]) -> Option<f64> {
    let each = ms.iter().map(|m| {
        let t = m.stages;
        let total = t.lease_wait + t.upload + t.load + t.alloc + t.evaluate + t.cleanup;
        total.as_secs_f64() - CALLS * m.run_secs.first().copied().unwrap_or(KERNEL_S)
    });
    median(each.collect())
}

/// The share of measurements whose timed call read over 5% above the
/// kernel's nominal time (preempted, or sharing its CPU).
fn slow_share(ms: &[Measurement]) -> f64 {
    let slow = ms.iter().filter(|m| m.run_secs.first().is_some_and(|&c| c > 1.05 * KERNEL_S));
    slow.count() as f64 / ms.len().max(1) as f64
}

/// Per-stage medians of these measurements.
fn stages(ms: &[Measurement]) -> Value {
    let pick = |f: &dyn Fn(&Measurement) -> Duration| {
        median(ms.iter().map(|m| f(m).as_secs_f64()).collect())
    };
    json!({
        "lease_wait": pick(&|m| m.stages.lease_wait),
        "upload": pick(&|m| m.stages.upload),
        "load": pick(&|m| m.stages.load),
        "alloc": pick(&|m| m.stages.alloc),
        "evaluate": pick(&|m| m.stages.evaluate),
        "cleanup": pick(&|m| m.stages.cleanup),
        "kernel_median": median(ms.iter().filter_map(|m| m.run_secs.first().copied()).collect()),
        "kernel_slow_share": slow_share(ms),
    })
}

/// First call of a session minus its second (a trivial task), median over
/// `sessions` sessions to a server in this process.
async fn worker_start(
    program: &WorkerProgram,
    spare: bool,
    sessions: usize,
) -> anyhow::Result<f64> {
    let cfg = ServerConfig::new(KEY, program.clone()).warm_spare(spare).zygote(zygote());
    let server = DeviceServer::start("127.0.0.1:0", cfg).await?;
    let addr = server.addr().to_string();
    let mut gaps = Vec::new();
    for i in 0..=sessions {
        // Let the spare be made, as it is while a tuner builds candidates.
        tokio::time::sleep(Duration::from_millis(if spare { 300 } else { 20 })).await;
        let mut s = Session::connect(&addr, KEY, &ConnectOptions::default()).await?;
        let t = Instant::now();
        s.call(WorkerInfo, None).await?;
        let first = t.elapsed();
        let t = Instant::now();
        s.call(WorkerInfo, None).await?;
        let second = t.elapsed();
        s.close().await?;
        if i > 0 {
            gaps.push((first.saturating_sub(second)).as_secs_f64());
        }
    }
    server.shutdown().await?;
    median(gaps).context("no sessions")
}

/// Median loopback TCP round trip of one byte.
async fn tcp_rtt() -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let echo = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() {
            s.write_all(&b).await?;
        }
        anyhow::Ok(())
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut rtts = Vec::new();
    let mut b = [7u8; 1];
    for _ in 0..2000 {
        let t = Instant::now();
        c.write_all(&b).await?;
        c.read_exact(&mut b).await?;
        rtts.push(t.elapsed().as_secs_f64());
    }
    drop(c);
    echo.await??;
    median(rtts).context("no round trips")
}

/// Touched memory the process holds while it lives.
fn ballast(bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    for page in v.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(v)
}

async fn build_kernel(program: &WorkerProgram, dir: &Path) -> anyhow::Result<PathBuf> {
    let builder = LocalBuilder::new(program.clone(), LocalBuilderConfig::default().out_dir(dir))?;
    let built = builder.build(vec![BuilderInput::new("busywait_200us", KERNEL)]).collect_ordered();
    let mut built = built.await;
    builder.shutdown().await;
    let b = built.pop().context("no build result")?;
    Ok(b.result.map_err(|e| anyhow::anyhow!("busywait_200us: {e}"))?.artifact_path)
}

async fn run(opts: Opts) -> anyhow::Result<Value> {
    let started = Instant::now();
    let load_before = loadavg();
    let tmp = tempfile::tempdir()?;
    let program = WorkerProgram::current_exe()?;
    let artifact = build_kernel(&program, tmp.path()).await?;
    let n = if opts.quick { 16 } else { 64 };
    let sessions = if opts.quick { 3 } else { 7 };

    let limit = tcp_rtt().await?;
    let modes: [(&str, usize, bool); 4] = [
        ("local", 0, false),
        ("rpc_1_server", 1, true),
        ("rpc_2_servers", 2, true),
        ("rpc_1_server_no_spare", 1, false),
    ];
    if let Some(only) = &opts.only
        && !modes.iter().any(|m| m.0 == only)
    {
        bail!(
            "--only {only:?}: not one of local, rpc_1_server, rpc_2_servers, rpc_1_server_no_spare"
        );
    }
    let mut overheads: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut cpus: Vec<Vec<[f64; 2]>> = vec![Vec::new(); modes.len()];
    let mut all: Vec<Vec<Measurement>> = modes.iter().map(|_| Vec::new()).collect();
    for run in 0..opts.runs {
        for (i, &(name, servers, spare)) in modes.iter().enumerate() {
            if opts.only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            eprintln!("runner_bench: run {} of {}: {name}", run + 1, opts.runs);
            let out = if servers == 0 {
                local_run(&program, &artifact, n).await
            } else {
                rpc_run(&program, &artifact, n, servers, spare).await
            }
            .with_context(|| name.to_owned())?;
            overheads[i].push(out.overhead_s);
            cpus[i].push(out.cpu_s);
            all[i].extend(out.measurements);
        }
    }
    let mut overhead = Map::new();
    let mut robust = Map::new();
    let mut stage = Map::new();
    let mut runs = Map::new();
    let mut cpu = Map::new();
    for (i, &(name, ..)) in modes.iter().enumerate() {
        let pick = |k: usize| median(cpus[i].iter().map(|c| c[k]).collect());
        cpu.insert(name.into(), json!({ "process": pick(0), "workers": pick(1) }));
        overhead.insert(name.into(), json!(median(overheads[i].clone())));
        robust.insert(name.into(), json!(per_measurement_median(&all[i])));
        runs.insert(name.into(), json!(overheads[i]));
        stage.insert(name.into(), stages(&all[i]));
    }

    let mut out = Map::new();
    let sizes: &[(&str, usize)] = match (opts.ballast, opts.quick) {
        _ if opts.only.is_some() => &[],
        (false, _) => &[("6m", 0)],
        // CI runs --quick: no 4 GiB there.
        (true, true) => &[("6m", 0), ("1g", 1 << 30)],
        (true, false) => &[("6m", 0), ("1g", 1 << 30), ("4g", 4 << 30)],
    };
    for &(label, bytes) in sizes {
        eprintln!("runner_bench: worker start with {label} of touched memory");
        let held = ballast(bytes);
        let cold = worker_start(&program, false, sessions).await?;
        let warm = worker_start(&program, true, sessions).await?;
        drop(held);
        out.insert(format!("worker_start_s_parent_{label}"), json!(cold));
        out.insert(format!("lease_worker_start_s_parent_{label}"), json!(warm));
    }
    let goals = json!({
        "local": 0.2e-3, "rpc_1_server": 1e-3, "rpc_2_servers": 0.6e-3,
        "alloc_argument": 0.3e-3, "lease_worker_start": 0.3e-3,
    });
    let ratio = |name: &str, goal: &str| {
        let o = overhead.get(name).and_then(Value::as_f64)?;
        Some(o / goals.get(goal)?.as_f64()?)
    };
    out.insert(
        "ratio_to_goal".into(),
        json!({
            "local": ratio("local", "local"),
            "rpc_1_server": ratio("rpc_1_server", "rpc_1_server"),
            "rpc_2_servers": ratio("rpc_2_servers", "rpc_2_servers"),
        }),
    );
    out.insert("overhead_per_measurement_s".into(), Value::Object(overhead));
    out.insert("overhead_runs_s".into(), Value::Object(runs));
    out.insert("overhead_median_per_measurement_s".into(), Value::Object(robust));
    out.insert("stages_s".into(), Value::Object(stage));
    out.insert("cpu_per_measurement_s".into(), Value::Object(cpu));
    out.insert("goals_s".into(), goals);
    out.insert("limit_tcp_rtt_s".into(), json!(limit));
    out.insert("candidates_per_run".into(), json!(n));
    out.insert("runs".into(), json!(opts.runs));
    out.insert("quick".into(), json!(opts.quick));
    out.insert("load".into(), json!({ "before": load_before, "after": loadavg() }));
    out.insert("total_s".into(), json!(started.elapsed().as_secs_f64()));
    Ok(Value::Object(out))
}
