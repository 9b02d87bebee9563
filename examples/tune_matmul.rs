//! `tune_matmul`: tunes a float32 C matmul end to end.
//!
//! Generates candidate kernels (the naive i-j-k loops, cache-tiled variants
//! over loop orders, tile sizes and unrolling, register-blocked and packed
//! variants, and three that are broken on purpose), compiles them with
//! `LocalBuilder` in a process pool, measures them with `RpcRunner` through
//! a tracker and a device server, checks every output against the naive
//! kernel's, and prints a ranked table and the speedup over naive. It writes
//! a JSON-lines tuning log and a convergence plot.
//!
//! Measuring has two rounds: screening times every candidate on its own
//! under a cheap adaptive rule; the fastest `--finalists` (8) are then timed
//! again together in one session, their batches interleaved, under
//! `EvaluatorConfig::adaptive()`. Costs are `median ± relative noise`; the
//! best is named only if it beats every other finalist beyond noise, else
//! the finalists tied with the fastest are listed.
//!
//! By default the tracker and the device server run in this process (the
//! server's session workers, like the builder's workers, are this program
//! re-executed; they time on the last CPU, and this process moves to the
//! others once the builds are done); `--tracker HOST:PORT --key KEY`
//! measures on real servers.
//!
//! ```sh
//! cargo run --release --example tune_matmul
//! cargo run --release --example tune_matmul -- --size 512,512,512 --trials 40 --out /tmp/mm
//! ```

#[path = "tune_matmul/candidates.rs"]
mod candidates;
#[path = "tune_matmul/outcome.rs"]
mod outcome;
#[path = "tune_matmul/report.rs"]
mod report;
#[path = "tune_matmul/rounds.rs"]
mod rounds;
#[path = "tune_matmul/summary.rs"]
mod summary;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use popen_pool::{OutputMode, WorkerProgram};
use rpc_runner::measure::{
    ArgInfo, BuilderInput, CpuPlan, DType, LocalBuilder, LocalBuilderConfig, Measurement,
    RpcConfig, RpcRunner, RunError, Runner, RunnerInput, pin_this_process,
};
use rpc_runner::tracker::{Tracker, TrackerConfig, TrackerHandle};
use rpc_runner::{DeviceServer, ServerConfig, ServerHandle};

use crate::candidates::{Kind, Size};
use crate::outcome::{Outcome, Status};
use crate::report::Trial;
use crate::rounds::{DEFAULT_FINALISTS, MAX_FINALISTS};

/// Candidates measured by default: 18-33 s on a 2-core machine (load 1.3-2.8).
const DEFAULT_TRIALS: usize = 96;

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
    /// Candidates to measure, the naive and the three broken-on-purpose ones
    /// included (those four always are, plus at least one tuned candidate).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TRIALS)]
    trials: usize,
    /// Problem size: C[M][N] = A[M][K] * B[K][N].
    #[arg(long, value_name = "M,N,K", default_value = "256,256,256", value_parser = parse_size)]
    size: Size,
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
        .split(',')
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
        _ => Err("expected three dimensions M,N,K (e.g. 256,256,256)".into()),
    }
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
    let size = args.size;
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
    let build_cfg =
        LocalBuilderConfig::default().out_dir(out_dir.join("build")).add_flags(cflags.clone());
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
    let final_rpc = rpc.session_timeout(rounds::final_session_timeout(args.finalists));
    let last = RpcRunner::builder(final_rpc)
        .evaluator(rounds::final_evaluator())
        .seed(args.seed)
        .build()
        .await;
    // With the embedded server, this process (tracker, server, runtime)
    // moves off the measuring CPU once the builds are done; remote servers
    // pin their own workers.
    let plan = embedded.as_ref().map(|_| CpuPlan::detect());
    let result = match (LocalBuilder::new(program, build_cfg), screen, last) {
        (Ok(builder), Ok(screen), Ok(last)) => {
            let runners = Runners { screen, last, plan };
            let result = tune(&args, size, &cflags, &builder, &runners, &out_dir).await;
            builder.shutdown().await;
            result
        }
        (Err(e), _, _) => Err(e).context("cannot start the builder"),
        (_, Err(e), _) | (_, _, Err(e)) => Err(e).context("cannot start the runner"),
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
    /// `Some` with the embedded server: this process is pinned to `others`.
    plan: Option<CpuPlan>,
}

/// Builds, measures, checks and reports; returns the closing summary.
async fn tune(
    args: &Args,
    size: Size,
    cflags: &[String],
    builder: &LocalBuilder,
    runners: &Runners,
    out_dir: &Path,
) -> anyhow::Result<String> {
    let candidates = candidates::generate(size, args.trials, args.seed);
    let n = candidates.len();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{elapsed_precise}] {bar:32.cyan/blue} {pos:>3}/{len:3} {wide_msg}",
    )?
    .progress_chars("=> ");
    let build_bar = bars.add(ProgressBar::new(n as u64).with_style(style.clone()));
    build_bar.set_prefix("building");
    let measure_bar = bars.add(ProgressBar::new(n as u64).with_style(style.clone()));
    measure_bar.set_prefix("screening");
    let final_bar = bars.add(ProgressBar::new(args.finalists as u64).with_style(style));
    final_bar.set_prefix("final");
    build_bar.tick();
    measure_bar.tick();
    final_bar.tick();

    let mut phases = Vec::new();
    let phase = Instant::now();
    // 1. Build everything (the two cores compile; nothing is timed meanwhile).
    let inputs: Vec<BuilderInput> = candidates
        .iter()
        .map(|c| BuilderInput::new(&c.name, c.source(size)).with_flags(c.extra_flags()))
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    let mut artifacts: Vec<Option<PathBuf>> = vec![None; n];
    let mut builds = builder.build(inputs);
    while let Some((i, built)) = builds.next().await {
        match built.result {
            Ok(out) => artifacts[i] = Some(out.artifact_path),
            Err(e) => outcomes[i] = Some(Outcome::build_failed(&e)),
        }
        build_bar.set_message(candidates[i].name.clone());
        build_bar.inc(1);
    }
    build_bar.finish_with_message("done");
    phases.push(format!("build {:.1} s", phase.elapsed().as_secs_f64()));

    // Nothing is timed while building; now keep this process (the tracker,
    // the server, the runtime) off the CPU the session workers time on.
    let mut pin_note = None;
    if runners.plan.is_none() {
        pin_note = Some("remote servers: each pins its own session workers".to_owned());
    }
    if let Some(plan) = &runners.plan {
        pin_note = Some(match pin_this_process(&plan.others) {
            Ok(()) => format!(
                "timing on CPU {:?} (session workers); tracker, server and this process on {:?}",
                plan.measure, plan.others
            ),
            Err(_) if plan.others.is_empty() => {
                "one CPU: the timed kernels share it with the tracker and the server".to_owned()
            }
            Err(e) => format!("note: cannot pin this process to CPUs {:?}: {e}", plan.others),
        });
    }

    // 2. Screening: what was built, in candidate order, one device at a time
    //    per server, each on its own; every candidate gets the same random
    //    inputs (same seed).
    let args_info = vec![
        ArgInfo::tensor(DType::F32, [size.m as i64, size.k as i64]),
        ArgInfo::tensor(DType::F32, [size.k as i64, size.n as i64]),
        ArgInfo::tensor(DType::F32, [size.m as i64, size.n as i64]),
    ];
    let mut order = Vec::new();
    let mut inputs = Vec::new();
    for (i, path) in artifacts.iter().enumerate() {
        match path {
            Some(path) => {
                // The naive kernel's A and B come back too, to check it on the host.
                let read: &[u32] =
                    if candidates[i].kind == Kind::Naive { &[0, 1, 2] } else { &[2] };
                inputs.push(RunnerInput::new(path, args_info.clone()).read_args(read));
                order.push(i);
            }
            None => measure_bar.inc(1),
        }
    }
    measure_bar.reset_elapsed();
    let phase = Instant::now();
    let mut measured: Vec<Option<Result<Measurement, RunError>>> = vec![None; n];
    let mut results = runners.screen.run(inputs);
    while let Some((j, result)) = results.next().await {
        let i = order[j];
        measure_bar.set_message(candidates[i].name.clone());
        measure_bar.inc(1);
        measured[i] = Some(result);
    }
    measure_bar.finish_with_message("done");
    phases.push(format!("screening {:.1} s", phase.elapsed().as_secs_f64()));

    // 3. Check every output against the naive kernel's (itself checked on the host).
    let naive =
        candidates.iter().position(|c| c.kind == Kind::Naive).context("no naive candidate")?;
    let (reference, naive_problem) = match measured[naive].take() {
        Some(Ok(m)) => {
            let (reference, outcome) = outcome::check_naive(size, m).await?;
            outcomes[naive] = Some(outcome);
            (reference, None)
        }
        Some(Err(e)) => {
            let problem = format!("the naive kernel failed: {e}");
            outcomes[naive] = Some(Outcome::run_failed(&e));
            (None, Some(problem))
        }
        None => (None, Some("the naive kernel did not build".to_owned())),
    };
    let naive_problem = naive_problem.or_else(|| {
        reference.is_none().then(|| "the naive kernel computed a wrong result".to_owned())
    });
    for (i, m) in measured.into_iter().enumerate() {
        let Some(m) = m else { continue };
        outcomes[i] = Some(match m {
            Err(e) => Outcome::run_failed(&e),
            Ok(m) => outcome::check(m, reference.as_deref()),
        });
    }

    // 4. The final round: the fastest few, interleaved in one session, under
    //    the recommended adaptive rule; their outputs are checked again.
    let finalists = rounds::finalists(&outcomes, args.finalists);
    final_bar.set_length(finalists.len() as u64);
    final_bar.set_message(format!("{} candidates interleaved in one session", finalists.len()));
    final_bar.reset_elapsed();
    let phase = Instant::now();
    final_bar.enable_steady_tick(Duration::from_millis(200));
    rounds::final_round(
        &runners.last,
        &finalists,
        &artifacts,
        &args_info,
        reference.as_deref(),
        &mut outcomes,
    )
    .await;
    final_bar.set_position(finalists.len() as u64);
    final_bar.finish_with_message("done");
    phases.push(format!("final round {:.1} s", phase.elapsed().as_secs_f64()));
    bars.clear()?;

    let trials: Vec<Trial> = candidates
        .into_iter()
        .zip(outcomes)
        .enumerate()
        .map(|(trial, (candidate, outcome))| Trial {
            trial,
            candidate,
            outcome: outcome.unwrap_or_else(|| Outcome::failed(Status::Error, "not run")),
        })
        .collect();

    // 5. Report.
    let naive_trial = &trials[naive];
    let naive_median =
        naive_trial.outcome.status.ranked().then(|| naive_trial.outcome.median()).flatten();
    let log_path = out_dir.join("tuning_log.jsonl");
    report::write_log(&log_path, &trials, size)?;
    let plot_path = out_dir.join("convergence.png");
    report::plot(
        &plot_path,
        &trials,
        size,
        naive_trial.gflops(size).filter(|_| naive_median.is_some()),
    )?;

    println!(
        "tune_matmul: C[{m}][{n}] = A[{m}][{k}] * B[{k}][{n}], float32, {count} candidates, \
         seed {seed}, flags: {flags}",
        m = size.m,
        n = size.n,
        k = size.k,
        count = trials.len(),
        seed = args.seed,
        flags = builder.config().flags.join(" "),
    );
    if !cflags.is_empty() && args.cflags.is_none() {
        println!("(the kernels are compiled for this machine: --cflags \"\" for portable code)");
    }
    if let Some(note) = pin_note {
        println!("{note}");
    }
    println!("{}", rounds::describe(finalists.len()));
    println!();
    print!("{}", report::table(&trials, size, naive_median));
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
    for t in &trials {
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
    for note in summary::notes(&trials) {
        summary.push_str(&note);
        summary.push('\n');
    }
    let ok = trials.iter().filter(|t| t.outcome.status == Status::Ok).count();
    summary.push_str(&format!("{ok} of {} candidates ok\n", trials.len()));
    summary.push_str(&summary::best(&trials, size, naive_median, naive_problem.as_deref()));
    summary.push_str(&format!("time: {}\n", phases.join(", ")));
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
