//! `tune_matmul`: tunes a float32 C matmul end to end, in rounds.
//!
//! A probe kernel run on the device reports what its CPU supports (AVX2,
//! FMA, AVX-512F), whether OpenBLAS is there, and its CPUs. The search
//! space (`space.rs`) is a blocked GEMM: cache blocks MC/KC/NC in any of
//! six loop orders, packing of A and/or B panels, an MR x NR register-
//! blocked micro-kernel in AVX-512 or AVX2/FMA intrinsics or portable GCC
//! vector C, k-loop unrolling, POSIX threads. Each round proposes a batch
//! (evolutionary: mutation and crossover of the best so far, ranked by a
//! ridge-regression cost model, plus random exploration, seeded), builds it
//! with `LocalBuilder` on the CPUs that do not measure *while the previous
//! batch is measured* with `RpcRunner`, checks every output against the
//! naive kernel's, and feeds the costs back. The fastest `--finalists` and
//! OpenBLAS's `cblas_sgemm` with one thread (loaded with `dlopen` by a
//! shim with our kernel ABI) are then timed together, interleaved; then
//! OpenBLAS with every thread and the multi-threaded variants of the best,
//! interleaved on a second, unpinned device server. The naive kernel and
//! three broken on purpose (compile error, SIGSEGV, wrong result) are in
//! the first round; the broken ones are rejected, not ranked.
//!
//! Prints a ranked table (`median ± noise`), the best (or the set tied
//! within noise), `best vs OpenBLAS (1 thread)` and `(all cores)`, the
//! speedup over naive; writes a JSON-lines log and a convergence plot.
//!
//! By default the tracker and the device server run in this process (the
//! server's session workers, like the builder's workers, are this program
//! re-executed; they time on the last CPU, builds and this process stay
//! on the others); `--tracker HOST:PORT --key KEY` measures on real servers.
//!
//! ```sh
//! cargo run --release --example tune_matmul
//! cargo run --release --example tune_matmul -- --size 512x512x512 --out /tmp/mm
//! ```

#[path = "tune_matmul/candidates.rs"]
mod candidates;
#[path = "tune_matmul/gemm_c.rs"]
mod gemm_c;
#[path = "tune_matmul/model.rs"]
mod model;
#[path = "tune_matmul/openblas.rs"]
mod openblas;
#[path = "tune_matmul/outcome.rs"]
mod outcome;
#[path = "tune_matmul/report.rs"]
mod report;
#[path = "tune_matmul/rounds.rs"]
mod rounds;
#[path = "tune_matmul/search.rs"]
mod search;
#[path = "tune_matmul/space.rs"]
mod space;
#[path = "tune_matmul/summary.rs"]
mod summary;
#[path = "tune_matmul/tuner.rs"]
mod tuner;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use popen_pool::{OutputMode, WorkerProgram};
use rpc_runner::measure::{
    CpuPlan, LocalBuilder, LocalBuilderConfig, RpcConfig, RpcRunner, pin_this_process,
};
use rpc_runner::tracker::{Tracker, TrackerConfig, TrackerHandle};
use rpc_runner::{DeviceServer, ServerConfig, ServerHandle};

use crate::candidates::{Kind, Size};
use crate::outcome::Status;
use crate::rounds::{DEFAULT_FINALISTS, MAX_FINALISTS};

/// Candidates the search proposes by default.
const DEFAULT_TRIALS: usize = 80;

/// Candidates per round by default.
const DEFAULT_BATCH: usize = 16;

/// Tunes a float32 C matmul C = A * B end to end: builds candidate kernels in
/// a process pool, measures them through an RPC tracker and device server,
/// and reports the fastest correct one.
#[derive(Debug, Parser)]
#[command(name = "tune_matmul", version)]
struct Args {
    /// Measure on the servers of this tracker instead of an embedded tracker
    /// and device server (kernels are still built locally).
    #[arg(long, value_name = "HOST:PORT")]
    tracker: Option<String>,
    /// Device key to lease.
    #[arg(long, default_value = "cpu", env = "TVM_TRACKER_KEY")]
    key: String,
    /// Token of servers that require one.
    #[arg(long)]
    token: Option<String>,
    /// Candidates the search proposes (at least 1; the naive, the three
    /// broken-on-purpose ones, OpenBLAS and the multi-threaded variants
    /// come on top).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TRIALS,
          value_parser = |s: &str| parse_count(s, 4096))]
    trials: usize,
    /// Candidates per round.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH,
          value_parser = |s: &str| parse_count(s, 512))]
    batch: usize,
    /// No new round starts after this many seconds (the final and the
    /// all-cores rounds still run).
    #[arg(long, value_name = "SECS", default_value_t = 40.0, value_parser = parse_secs)]
    time_budget: f64,
    /// Problem size: C[M][N] = A[M][K] * B[K][N], as MxNxK or M,N,K.
    #[arg(long, value_name = "MxNxK", default_value = "256x256x256", value_parser = parse_size)]
    size: Size,
    /// The OpenBLAS library the device loads (dlopen name or path).
    #[arg(long, value_name = "LIB", default_value = "libopenblas.so.0", value_parser = parse_lib)]
    openblas_lib: String,
    /// Output directory [default: target/tune_matmul/<timestamp>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Seed of the candidate sampling and of the random inputs (every
    /// candidate gets the same inputs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Extra compiler flags of every candidate, the naive one included
    /// [default: "-march=native" with the embedded server, none with --tracker].
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    cflags: Option<String>,
    /// Candidates re-measured in the final round: the fastest K of the
    /// screening, timed together in one session, interleaved, until their
    /// noise is at most 0.5% (0: screening only).
    #[arg(long, value_name = "K", default_value_t = DEFAULT_FINALISTS, value_parser = parse_finalists)]
    finalists: usize,
}

fn parse_size(s: &str) -> Result<Size, String> {
    let dims = s
        .split([',', 'x'])
        .map(|d| d.trim().parse::<usize>().map_err(|e| format!("{d:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    match dims.as_slice() {
        &[m, n, k] if m > 0 && n > 0 && k > 0 => {
            let elems = [m * k, k * n, m * n];
            if elems.iter().any(|&e| e > 1 << 28) {
                return Err("a matrix larger than 2^28 elements".into());
            }
            Ok(Size { m, n, k })
        }
        [_, _, _] => Err("dimensions must be positive".into()),
        _ => Err("expected three dimensions MxNxK (e.g. 256x256x256)".into()),
    }
}

/// A count in `1..=max`.
fn parse_count(s: &str, max: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n}: expected 1 to {max}")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// Seconds, positive and at most a day.
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        Ok(x) => Err(format!("{x}: expected more than 0 and at most 86400 seconds")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// A library name that goes into a C string literal as is.
fn parse_lib(s: &str) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-+/".contains(c);
    if s.is_empty() || s.len() > 256 || !s.chars().all(plain) {
        return Err("expected 1-256 characters of A-Z a-z 0-9 . _ - + /".into());
    }
    Ok(s.to_owned())
}

fn parse_finalists(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k) if k <= MAX_FINALISTS => Ok(k),
        Ok(k) => {
            Err(format!("{k} finalists: at most {MAX_FINALISTS} (one session times them all)"))
        }
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn main() -> ExitCode {
    // Session workers and builder workers are this program, re-executed.
    popen_pool::serve_if_worker(rpc_runner::tasks::registry());
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The embedded tracker and device server, when no `--tracker` was given.
struct Embedded {
    tracker: TrackerHandle,
    server: ServerHandle,
}

impl Embedded {
    async fn start(key: &str, program: WorkerProgram) -> anyhow::Result<Self> {
        let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default())
            .await
            .context("cannot start the embedded tracker")?;
        // Kernels that print must not scribble over the progress bars.
        let cfg = ServerConfig::new(key, program)
            .tracker(tracker.addr().to_string())
            .worker_output(OutputMode::Tracing);
        let server = DeviceServer::start("127.0.0.1:0", cfg)
            .await
            .context("cannot start the embedded device server")?;
        if let Err(st) = server.wait_for(Duration::from_secs(10), |s| s.registered).await {
            bail!("the embedded device server did not register with the tracker: {st:?}");
        }
        Ok(Embedded { tracker, server })
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        let server = self.server.shutdown().await.context("device server");
        let tracker = self.tracker.shutdown().await.context("tracker");
        server.and(tracker)
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let out_dir = match &args.out {
        Some(dir) => dir.clone(),
        None => default_out_dir(),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create the output directory {}", out_dir.display()))?;

    // The builder's and the server's workers: this program, re-executed.
    let program = WorkerProgram::current_exe().context("cannot find this program's path")?;
    let (embedded, host, port) = match &args.tracker {
        Some(addr) => {
            let (host, port) = parse_addr(addr)?;
            (None, host, port)
        }
        None => {
            let e = Embedded::start(&args.key, program.clone()).await?;
            let port = e.tracker.addr().port();
            (Some(e), "127.0.0.1".to_owned(), port)
        }
    };
    let cflags: Vec<String> = match &args.cflags {
        Some(flags) => flags.split_whitespace().map(str::to_owned).collect(),
        None if embedded.is_some() => vec!["-march=native".to_owned()],
        None => Vec::new(),
    };
    // With the embedded server, the session workers time on the last CPU;
    // this process (tracker, server, runtime) and the builds, which overlap
    // the measurements, stay on the others. Remote servers pin their own.
    let plan = embedded.as_ref().map(|_| CpuPlan::detect());
    let mut build_cfg =
        LocalBuilderConfig::default().out_dir(out_dir.join("build")).add_flags(cflags.clone());
    // The first batch builds before anything is measured: on every CPU.
    let first_cfg = build_cfg.clone();
    let pin_note = match &plan {
        None => "remote servers: each pins its own session workers; builds use every CPU here"
            .to_owned(),
        Some(plan) if plan.others.is_empty() => {
            "one CPU: the timed kernels share it with the builds, the tracker and the server"
                .to_owned()
        }
        Some(plan) => {
            build_cfg = build_cfg.cpu_affinity(plan.others.clone()).max_workers(plan.others.len());
            match pin_this_process(&plan.others) {
                Ok(()) => format!(
                    "pinned: timing on CPU {:?} (session workers); builds, tracker, server and \
                     this process on {:?}",
                    plan.measure, plan.others
                ),
                Err(e) => format!(
                    "pinned: timing on CPU {:?}; builds on {:?}; note: cannot pin this process \
                     to {:?}: {e}",
                    plan.measure, plan.others, plan.others
                ),
            }
        }
    };
    let mut rpc = RpcConfig::new(host, port, args.key.clone());
    if let Some(token) = &args.token {
        rpc = rpc.token(token);
    }
    // Fails clearly if the tracker is unreachable or has no server for the key.
    let screen = RpcRunner::builder(rpc.clone())
        .evaluator(rounds::screening_evaluator())
        .seed(args.seed)
        .build()
        .await;
    let final_rpc = rpc.session_timeout(rounds::final_session_timeout(args.finalists + 1));
    let last = RpcRunner::builder(final_rpc)
        .evaluator(rounds::final_evaluator())
        .seed(args.seed)
        .build()
        .await;
    let all_cores = match (&embedded, &plan) {
        (Some(e), Some(plan)) => {
            let mut cpus: Vec<usize> = plan.measure.iter().chain(&plan.others).copied().collect();
            cpus.sort_unstable();
            Some(tuner::AllCores {
                tracker_port: e.tracker.addr().port(),
                key: args.key.clone(),
                program: program.clone(),
                cpus,
            })
        }
        _ => None,
    };
    let builders =
        (LocalBuilder::new(program.clone(), first_cfg), LocalBuilder::new(program, build_cfg));
    let result = match (builders, screen, last) {
        ((Ok(first), Ok(builder)), Ok(screen), Ok(last)) => {
            let runners = Runners { screen, last };
            let builders = [&first, &builder];
            let result =
                tune(&args, &cflags, builders, &runners, all_cores, pin_note, &out_dir).await;
            first.shutdown().await;
            builder.shutdown().await;
            result
        }
        ((first, builder), screen, last) => {
            let mut errors = Vec::new();
            for b in [first, builder] {
                match b {
                    Ok(b) => b.shutdown().await,
                    Err(e) => {
                        errors.push(anyhow::Error::from(e).context("cannot start the builder"))
                    }
                }
            }
            for r in [screen, last] {
                if let Err(e) = r {
                    errors.push(anyhow::Error::from(e).context("cannot start the runner"));
                }
            }
            Err(errors.pop().unwrap_or_else(|| anyhow::anyhow!("cannot start")))
        }
    };

    // Everything stops, whatever happened.
    let stopped = match embedded {
        Some(e) => e.shutdown().await,
        None => Ok(()),
    };
    let summary = result?;
    stopped.context("shutting down")?;
    println!("{summary}");
    println!("total time: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The runners of the two rounds, and the CPU plan of the embedded server.
struct Runners {
    /// Screening: every candidate on its own, a cheap adaptive rule.
    screen: RpcRunner,
    /// The final round: the finalists interleaved, the recommended rule.
    last: RpcRunner,
}

/// Tunes, reports; returns the closing summary.
async fn tune(
    args: &Args,
    cflags: &[String],
    [first_builder, builder]: [&LocalBuilder; 2],
    runners: &Runners,
    all_cores: Option<tuner::AllCores>,
    pin_note: String,
    out_dir: &Path,
) -> anyhow::Result<String> {
    let size = args.size;
    let setup = tuner::Setup {
        size,
        seed: args.seed,
        trials: args.trials,
        batch: args.batch,
        time_budget: Duration::from_secs_f64(args.time_budget),
        finalists: args.finalists,
        openblas_lib: args.openblas_lib.clone(),
        builder,
        first_builder,
        screen: &runners.screen,
        last: &runners.last,
        all_cores,
    };
    let tuned = tuner::tune(&setup).await?;
    let trials = &tuned.trials;

    // Report.
    let naive_trial =
        trials.iter().find(|t| t.candidate.kind == Kind::Naive).context("no naive")?;
    let naive_median =
        naive_trial.outcome.status.ranked().then(|| naive_trial.outcome.median()).flatten();
    let log_path = out_dir.join("tuning_log.jsonl");
    report::write_log(&log_path, trials, size)?;
    let plot_path = out_dir.join("convergence.png");
    let mut lines = Vec::new();
    for t in trials {
        if let (Kind::OpenBlas { threads }, true) = (t.candidate.kind, t.outcome.status.ranked()) {
            if let Some(g) = t.gflops(size) {
                lines.push((format!("OpenBLAS, {threads} thread(s)"), g));
            }
        }
    }
    if let Some(g) = naive_trial.gflops(size).filter(|_| naive_median.is_some()) {
        lines.push(("naive".to_owned(), g));
    }
    report::plot(&plot_path, trials, size, &lines, tuned.rounds)?;

    println!(
        "tune_matmul: C[{m}][{n}] = A[{m}][{k}] * B[{k}][{n}], float32, {count} candidates in {r} \
         rounds, seed {seed}, flags: {flags}",
        m = size.m,
        n = size.n,
        k = size.k,
        count = trials.len(),
        r = tuned.rounds,
        seed = args.seed,
        flags = builder.config().flags.join(" "),
    );
    if !cflags.is_empty() && args.cflags.is_none() {
        println!("(the kernels are compiled for this machine: --cflags \"\" for portable code)");
    }
    let missing = match &tuned.device {
        Some(d) => {
            println!("{} (reported by a probe kernel run on the device)", d.describe());
            if let Some(core) = &d.openblas_core {
                let env = std::env::var("OPENBLAS_CORETYPE").ok();
                println!(
                    "OpenBLAS uses its {core} kernels on the device ({})",
                    match env {
                        Some(v) => format!(
                            "OPENBLAS_CORETYPE={v} is set here and the device workers inherit it: \
                             unset it for OpenBLAS's own choice"
                        ),
                        None => "its own choice; OPENBLAS_CORETYPE=<core> overrides it".to_owned(),
                    }
                );
            }
            (!d.openblas).then(|| {
                format!(
                    "{} is not installed on the device (install it: apt-get install libopenblas0)",
                    args.openblas_lib
                )
            })
        }
        None => Some("the device probe failed".to_owned()),
    };
    if let Some(why) = &missing {
        println!("OpenBLAS: not measured: {why}");
    }
    println!("{pin_note}");
    for note in &tuned.notes {
        println!("{note}");
    }
    println!("{}", rounds::describe(args.finalists));
    println!();
    print!("{}", report::table(trials, size, naive_median));
    print!(
        "{}",
        report::legend(
            rounds::screening_evaluator().noise_threshold(),
            rounds::final_evaluator().noise_threshold(),
            trials.iter().any(|t| t.outcome.status.ranked() && t.outcome.unstable()),
        )
    );
    println!();

    let mut summary = String::new();
    for t in trials {
        if !t.outcome.status.meets(t.candidate.expect)
            && t.candidate.expect != candidates::Expect::Ok
        {
            summary.push_str(&format!(
                "note: {} was expected to end as {:?} but ended as {}\n",
                t.candidate.name,
                t.candidate.expect,
                t.outcome.status.label()
            ));
        }
    }
    for note in summary::notes(trials) {
        summary.push_str(&note);
        summary.push('\n');
    }
    let ok = trials.iter().filter(|t| t.outcome.status == Status::Ok).count();
    summary.push_str(&format!("{ok} of {} candidates ok\n", trials.len()));
    let naive_problem = tuned.naive_problem.as_deref();
    summary.push_str(&summary::best(trials, size, naive_median, naive_problem));
    summary.push_str(&summary::openblas(trials, size, missing.as_deref()));
    summary.push_str(&format!("time: {}\n", tuned.phases.join(", ")));
    summary.push_str(&format!(
        "tuning log: {}\nconvergence plot: {}\noutput directory: {}",
        log_path.display(),
        plot_path.display(),
        out_dir.display()
    ));
    if let Some(problem) = naive_problem {
        bail!("{summary}\n{problem}: the other results could not be verified");
    }
    Ok(summary)
}

fn parse_addr(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) =
        addr.rsplit_once(':').with_context(|| format!("--tracker {addr:?}: expected HOST:PORT"))?;
    let port = port.parse().with_context(|| format!("--tracker {addr:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("--tracker {addr:?}: expected HOST:PORT");
    }
    Ok((host.to_owned(), port))
}

/// `target/tune_matmul/<UTC timestamp>`, in the target directory this
/// example was built in.
fn default_out_dir() -> PathBuf {
    // .../target/<profile>/examples/tune_matmul
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let examples = exe.parent()?;
            (examples.file_name()? == "examples")
                .then(|| examples.parent()?.parent().map(Path::to_path_buf))?
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    let base = target.join("tune_matmul").join(timestamp());
    let mut dir = base.clone();
    let mut n = 1;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    dir
}

/// The current UTC time as `YYYYMMDD-HHMMSS`.
fn timestamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
