//! Measurement-fidelity benchmark: prints one JSON line comparing our
//! measurements (`ours`) with TVM's protocol run by our evaluator
//! (`tvm_mode`) and with a bare C driver (`harness_free`).
//!
//! `cargo run --release -p rpc-runner --example measure_bench [-- --quick] [--passes N] [--realtime]`
//! (`--realtime`: `ours` times under `SCHED_FIFO` where permitted)
//!
//! One fixed kernel set (busy-waits of 50 µs, 500 µs and 5 ms, and 8+ matmul
//! candidates: clearly different ones and a near-equal set) is built once
//! with `LocalBuilder` (`-O3 -march=native`); then every mode measures it in
//! `N` quiet passes (default 3; `--quick`: 2 passes, 192³, fewer kernels),
//! round-robin over modes, and once more while a memory-bound "hog" streams
//! over 256 MiB on the CPUs other than the measuring one (the last online
//! CPU). See `docs/measure.md`, "Fidelity benchmark", for every key.
//!
//! - `tvm_mode`: `EvaluatorConfig { number: 3, repeat: 10, min_repeat_ms: 10 }`,
//!   one session per candidate, session worker not pinned;
//! - `ours`: `measure_ours`: pinned to the measuring CPU,
//!   `EvaluatorConfig::adaptive()`, all kernels in one session interleaved
//!   (`Runner::run_interleaved`);
//! - `harness_free`: the C driver (`procs.rs`), a new process per pass,
//!   pinned to the measuring CPU, TVM's number/repeat protocol.
//!
//! Every pass of `ours` and `tvm_mode` starts a new tracker, device server
//! and session workers. The hog and the driver are children held by guards
//! that kill and reap them on every exit path; scratch files live in a
//! `tempfile` directory.

#[path = "measure_bench/figures.rs"]
mod figures;
#[path = "measure_bench/kernels.rs"]
mod kernels;
#[path = "measure_bench/procs.rs"]
mod procs;
#[path = "measure_bench/stats.rs"]
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use popen_pool::WorkerProgram;
use rpc_runner::measure::{
    ArgInfo, Backend, BuilderInput, DType, EvaluatorConfig, LocalBuilder, LocalBuilderConfig,
    RpcConfig, RpcRunner, Runner as _, RunnerInput, RunnerResult, write_kernel_header,
};
use rpc_runner::tracker::{Tracker, TrackerConfig};
use rpc_runner::{DeviceServer, ServerConfig};
use serde_json::{Map, Value, json};

use crate::figures::{Pass, Runs};
use crate::kernels::Kernel;
use crate::procs::Programs;

const KEY: &str = "measure-bench";
/// Seed of every mode's random inputs.
const SEED: u64 = 1;
/// TVM's protocol, shared by all three modes until `ours` goes adaptive.
const NUMBER: u32 = 3;
const REPEAT: u32 = 10;
const MIN_REPEAT_MS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ours,
    Tvm,
    Free,
    /// TVM's own RPCTimeEvaluator on TVM's Python RPC server.
    TvmServer,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Ours => "ours",
            Mode::Tvm => "tvm_mode",
            Mode::Free => "harness_free",
            Mode::TvmServer => "tvm_server",
        }
    }
}

#[derive(Debug)]
struct Opts {
    quick: bool,
    passes: usize,
    realtime: bool,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut opts = Opts { quick: false, passes: 0, realtime: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--realtime" => opts.realtime = true,
            "--passes" => {
                let n = args.next().context("--passes needs a number")?;
                opts.passes = n.parse().with_context(|| format!("--passes {n:?}"))?;
                if !(2..=20).contains(&opts.passes) {
                    bail!("--passes must be in 2..=20");
                }
            }
            _ => bail!(
                "unknown argument {a:?} (usage: measure_bench [--quick] [--passes N] [--realtime])"
            ),
        }
    }
    if opts.passes == 0 {
        opts.passes = if opts.quick { 2 } else { 3 };
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
            .block_on(async {
                // On SIGINT / SIGTERM the run is dropped: its guards kill and
                // reap the hog and the driver, its temp dir is removed.
                tokio::select! {
                    r = run(opts) => r,
                    s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
                }
            })
    });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("measure_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM, with its name (never, if the
/// handlers cannot be installed).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// The 1-minute load average.
fn loadavg() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(Value::Null, |l| json!(l))
}

/// The online CPUs (`/sys/devices/system/cpu/online`, e.g. `0-1,4`).
fn online_cpus() -> anyhow::Result<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .context("cannot read the online CPUs")?;
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
        cpus.extend(lo..=hi.min(lo + 4096));
    }
    if cpus.is_empty() {
        bail!("no online CPU in {text:?}");
    }
    Ok(cpus)
}

async fn run(opts: Opts) -> anyhow::Result<Value> {
    let started = Instant::now();
    let load_before = loadavg();
    let cpus = online_cpus()?;
    let measure_cpu = *cpus.last().context("no CPU")?;
    let others: Vec<usize> = cpus.iter().copied().filter(|&c| c != measure_cpu).collect();
    let tmp = tempfile::tempdir()?;
    let program = WorkerProgram::current_exe()?;

    // Build the kernel set once.
    let kernels = kernels::kernel_set(opts.quick);
    let build_dir = tmp.path().join("build");
    let builder = LocalBuilder::new(
        program.clone(),
        LocalBuilderConfig::default()
            .out_dir(&build_dir)
            .add_flags(["-march=native"])
            .tvm_export(TVM_FUNCTION),
    )?;
    let inputs =
        kernels.iter().map(|k| BuilderInput::new(&k.name, k.source.clone())).collect::<Vec<_>>();
    let built = builder.build(inputs).collect_ordered().await;
    builder.shutdown().await;
    let mut paths = Vec::new();
    for (k, b) in kernels.iter().zip(built) {
        paths.push(b.result.map_err(|e| anyhow::anyhow!("{}: {e}", k.name))?.artifact_path);
    }
    let include = tmp.path().join("include");
    write_kernel_header(&include)?;
    let programs = Programs::compile(tmp.path(), &include)?;
    eprintln!(
        "measure_bench: {} kernels built; measuring on CPU {measure_cpu} of {}",
        kernels.len(),
        cpus.len()
    );

    let python = procs::tvm_python();
    let mut modes = vec![Mode::Ours, Mode::Tvm, Mode::Free];
    match &python {
        Some(_) => modes.push(Mode::TvmServer),
        None => eprintln!(
            "measure_bench: no TVM (TVM_PYTHON unset, no bench/.venv): tvm_server skipped"
        ),
    }
    let ctx = Ctx {
        python,
        program,
        kernels: &kernels,
        paths: &paths,
        measure_cpu,
        realtime: opts.realtime,
        programs,
        tmp: tmp.path(),
    };
    let mut quiet: Vec<Vec<Pass>> = vec![Vec::new(); modes.len()];
    for pass in 0..opts.passes {
        for (i, &mode) in modes.iter().enumerate() {
            eprintln!("measure_bench: pass {} of {}: {}", pass + 1, opts.passes, mode.key());
            quiet[i].push(ctx.pass(mode).await.with_context(|| mode.key())?);
        }
    }
    let hog = ctx.programs.start_hog(&others)?;
    eprintln!("measure_bench: hog {} on CPUs {others:?}", hog.pid());
    let mut loaded = Vec::new();
    for &mode in &modes {
        eprintln!("measure_bench: loaded pass: {}", mode.key());
        loaded.push(ctx.pass(mode).await.with_context(|| format!("{} (loaded)", mode.key()))?);
    }
    drop(hog);
    let load_after = loadavg();

    let mut out = Map::new();
    let mut figs = Vec::new();
    for ((&mode, quiet), loaded) in modes.iter().zip(quiet).zip(loaded) {
        let f = figures::figures(&kernels, &Runs { quiet, loaded });
        out.insert(mode.key().into(), Value::Object(f.clone()));
        figs.push(f);
    }
    out.insert(
        "ratios".into(),
        json!({
            "ours/tvm_mode": figures::ratios(&figs[0], &figs[1]),
            "ours/harness_free": figures::ratios(&figs[0], &figs[2]),
            "ours/tvm_server": figs.get(3).map(|f| figures::ratios(&figs[0], f)),
        }),
    );
    out.insert("load".into(), json!({ "before": load_before, "after": load_after }));
    out.insert("cpus".into(), json!(cpus.len()));
    out.insert("measure_cpu".into(), json!(measure_cpu));
    out.insert("quick".into(), json!(opts.quick));
    out.insert("realtime".into(), json!(opts.realtime));
    out.insert("passes".into(), json!(opts.passes));
    out.insert("kernels".into(), json!(kernels.iter().map(|k| &k.name).collect::<Vec<_>>()));
    out.insert("total_s".into(), json!(started.elapsed().as_secs_f64()));
    Ok(Value::Object(out))
}

/// What every pass needs.
struct Ctx<'a> {
    /// TVM's Python, for `tvm_server`.
    python: Option<PathBuf>,
    program: WorkerProgram,
    kernels: &'a [Kernel],
    paths: &'a [PathBuf],
    measure_cpu: usize,
    realtime: bool,
    programs: Programs,
    tmp: &'a Path,
}

impl Ctx<'_> {
    /// One pass of `mode` over the whole kernel set.
    async fn pass(&self, mode: Mode) -> anyhow::Result<Pass> {
        let start = Instant::now();
        if mode == Mode::Free {
            let kernels: Vec<(&Kernel, &Path)> =
                self.kernels.iter().zip(self.paths.iter().map(PathBuf::as_path)).collect();
            let costs = tokio::task::block_in_place(|| {
                self.programs.run_driver(
                    self.tmp,
                    Some(self.measure_cpu),
                    MIN_REPEAT_MS,
                    REPEAT,
                    SEED,
                    &kernels,
                )
            })?;
            return Ok(Pass::flagged_by_stats(costs, start.elapsed().as_secs_f64()));
        }
        let inputs: Vec<RunnerInput> = self
            .kernels
            .iter()
            .zip(self.paths)
            .map(|(k, path)| {
                let args = k.shapes.iter().map(|s| ArgInfo::tensor(DType::F32, s.clone()));
                RunnerInput::new(path, args.collect())
            })
            .collect();

        // A new tracker, device server and session workers per pass.
        let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default()).await?;
        if mode == Mode::TvmServer {
            let results = self.measure_on_tvm(&tracker, inputs).await;
            tracker.shutdown().await?;
            let mut costs = Vec::new();
            let mut overheads = Vec::new();
            for (r, k) in results?.into_iter().zip(self.kernels) {
                let m = r.map_err(|e| anyhow::anyhow!("{}: {e}", k.name))?;
                overheads.push(overhead(&m));
                costs.push(m.run_secs);
            }
            let mut pass = Pass::flagged_by_stats(costs, start.elapsed().as_secs_f64());
            pass.overhead_secs = stats::median(&overheads);
            return Ok(pass);
        }
        let mut cfg =
            ServerConfig::new(KEY, self.program.clone()).tracker(tracker.addr().to_string());
        if mode == Mode::Ours {
            cfg = cfg.worker_cpu_affinity([self.measure_cpu]);
        } else {
            cfg = cfg.no_worker_cpu_affinity();
        }
        let server = DeviceServer::start("127.0.0.1:0", cfg).await;
        let results = match server {
            Ok(server) => {
                let rpc = RpcConfig::new("127.0.0.1", tracker.addr().port(), KEY)
                    .lease_timeout(Duration::from_secs(60));
                let results = match server.wait_for(Duration::from_secs(10), |s| s.registered).await
                {
                    Err(st) => Err(anyhow::anyhow!("the server did not register: {st:?}")),
                    Ok(_) if mode == Mode::Ours => measure_ours(rpc, inputs, self.realtime).await,
                    Ok(_) => measure_tvm(rpc, inputs).await,
                };
                let stopped = server.shutdown().await;
                results.and_then(|r| stopped.map(|()| r).map_err(Into::into))
            }
            Err(e) => Err(e.into()),
        };
        tracker.shutdown().await?;
        let mut costs = Vec::new();
        let mut flagged = Vec::new();
        let mut overheads = Vec::new();
        let mut threshold = rpc_runner::measure::Stats::DEFAULT_THRESHOLD;
        for (k, r) in self.kernels.iter().zip(results?) {
            let m = r.map_err(|e| anyhow::anyhow!("{}: {e}", k.name))?;
            flagged.push(!m.is_stable());
            threshold = m.noise_threshold;
            overheads.push(overhead(&m));
            costs.push(m.run_secs);
        }
        Ok(Pass {
            costs,
            flagged,
            wall_secs: start.elapsed().as_secs_f64(),
            threshold,
            overhead_secs: stats::median(&overheads),
        })
    }
}

impl Ctx<'_> {
    /// `tvm_server`: a new TVM Python RPC server registered with `tracker`,
    /// every kernel through `RpcRunner` with `Backend::Tvm` (TVM's own
    /// RPCTimeEvaluator, TVM's protocol), the server's process group killed
    /// afterwards.
    async fn measure_on_tvm(
        &self,
        tracker: &rpc_runner::tracker::TrackerHandle,
        inputs: Vec<RunnerInput>,
    ) -> anyhow::Result<Vec<RunnerResult>> {
        let python = self.python.as_deref().context("no TVM python")?;
        let taddr = tracker.addr().to_string();
        let _server = procs::TvmServer::start(python, &taddr, KEY)?;
        // TVM's server imports tvm (~1-2 s) before it registers.
        let mut client = rpc_runner::TrackerClient::connect(&taddr).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let summary = client.summary().await?;
            if summary.server_info.iter().any(|i| i.device_key() == KEY) {
                break;
            }
            if Instant::now() > deadline {
                bail!("TVM's rpc_server did not register within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rpc = RpcConfig::new("127.0.0.1", tracker.addr().port(), KEY)
            .lease_timeout(Duration::from_secs(60))
            .backend(Backend::Tvm { function: TVM_FUNCTION.into() });
        let runner = RpcRunner::builder(rpc).evaluator(tvm_evaluator()).seed(SEED).build().await?;
        Ok(runner.run(inputs).collect_ordered().await)
    }
}

/// Time a measurement spent outside its evaluator: lease, upload, load,
/// alloc, cleanup.
fn overhead(m: &rpc_runner::measure::Measurement) -> f64 {
    let t = m.stages;
    (t.lease_wait + t.upload + t.load + t.alloc + t.cleanup).as_secs_f64()
}

/// The name the kernels export for TVM's runtime (`__tvm_ffi_kernel`).
const TVM_FUNCTION: &str = "kernel";

/// TVM's time evaluator protocol (`number` 3, `repeat` 10, `min_repeat_ms` 10).
fn tvm_evaluator() -> EvaluatorConfig {
    EvaluatorConfig {
        number: NUMBER,
        repeat: REPEAT,
        min_repeat_ms: MIN_REPEAT_MS,
        ..EvaluatorConfig::default()
    }
}

/// `tvm_mode`: each candidate in its own session, in input order.
async fn measure_tvm(
    rpc: RpcConfig,
    inputs: Vec<RunnerInput>,
) -> anyhow::Result<Vec<RunnerResult>> {
    let runner = RpcRunner::builder(rpc).evaluator(tvm_evaluator()).seed(SEED).build().await?;
    Ok(runner.run(inputs).collect_ordered().await)
}

/// `ours`: our measurement as a tuner would use it: pinned (by the caller's
/// `ServerConfig`), the adaptive stop rule, every kernel in one session,
/// interleaved.
async fn measure_ours(
    rpc: RpcConfig,
    inputs: Vec<RunnerInput>,
    realtime: bool,
) -> anyhow::Result<Vec<RunnerResult>> {
    let cfg = EvaluatorConfig { realtime, ..EvaluatorConfig::adaptive() };
    let runner = RpcRunner::builder(rpc).evaluator(cfg).seed(SEED).build().await?;
    Ok(runner.run_interleaved(inputs).collect_ordered().await)
}
