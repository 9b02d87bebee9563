//! The tuning rounds: probe the device, then propose a batch, build it
//! while the previous batch is measured, measure, feed the search; then
//! the final round (the fastest single-threaded candidates and OpenBLAS
//! with one thread, interleaved) and the all-cores round (OpenBLAS with
//! every thread and the multi-threaded candidates, unpinned, interleaved).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use popen_pool::{OutputMode, WorkerProgram};
use rpc_runner::measure::{
    ArgInfo, BuilderInput, DType, LocalBuilder, Measurement, RpcConfig, RpcRunner, RunError,
    Runner as _, RunnerInput, pin_this_process,
};
use rpc_runner::{DeviceServer, ServerConfig};

use crate::candidates::{Candidate, Kind, Size};
use crate::openblas::{self, Device, PROBE_LEN};
use crate::outcome::{self, Outcome, Status};
use crate::report::Trial;
use crate::rounds;
use crate::search::Search;
use crate::space::{Gemm, THREADS};

/// What a run needs.
pub(crate) struct Setup<'a> {
    pub(crate) size: Size,
    pub(crate) seed: u64,
    /// Candidates proposed by the search (the fixed ones and OpenBLAS extra).
    pub(crate) trials: usize,
    pub(crate) batch: usize,
    /// No new round starts after this long.
    pub(crate) time_budget: Duration,
    pub(crate) finalists: usize,
    pub(crate) openblas_lib: String,
    pub(crate) builder: &'a LocalBuilder,
    /// Builds the first batch (nothing is measured meanwhile: every CPU).
    pub(crate) first_builder: &'a LocalBuilder,
    pub(crate) screen: &'a RpcRunner,
    pub(crate) last: &'a RpcRunner,
    /// With the embedded tracker: how to start the unpinned server.
    pub(crate) all_cores: Option<AllCores>,
}

/// The embedded tracker, to register an unpinned device server with.
pub(crate) struct AllCores {
    pub(crate) tracker_port: u16,
    pub(crate) key: String,
    pub(crate) program: WorkerProgram,
    /// Every online CPU (this process is unpinned to them meanwhile).
    pub(crate) cpus: Vec<usize>,
}

/// What the rounds found.
pub(crate) struct Tuned {
    pub(crate) trials: Vec<Trial>,
    pub(crate) device: Option<Device>,
    /// Why the naive kernel gives no reference, if it does not.
    pub(crate) naive_problem: Option<String>,
    pub(crate) notes: Vec<String>,
    pub(crate) phases: Vec<String>,
    pub(crate) rounds: usize,
}

/// A build's result: the artifact and its build time, or the failure.
type Built = (usize, Result<(PathBuf, f64), Outcome>);

/// Every candidate so far, by index.
#[derive(Default)]
struct Book {
    candidates: Vec<Candidate>,
    round: Vec<usize>,
    all_cores: Vec<bool>,
    artifacts: Vec<Option<PathBuf>>,
    build_secs: Vec<Option<f64>>,
    outcomes: Vec<Option<Outcome>>,
}

impl Book {
    fn add(&mut self, c: Candidate, round: usize, all_cores: bool) -> usize {
        self.candidates.push(c);
        self.round.push(round);
        self.all_cores.push(all_cores);
        self.artifacts.push(None);
        self.build_secs.push(None);
        self.outcomes.push(None);
        self.candidates.len() - 1
    }

    fn input(&self, i: usize, size: Size, lib: &str) -> (usize, BuilderInput) {
        let c = &self.candidates[i];
        (i, BuilderInput::new(&c.name, c.source(size, lib)).with_flags(c.extra_flags()))
    }

    fn built(&mut self, results: Vec<Built>) {
        for (i, r) in results {
            match r {
                Ok((path, secs)) => {
                    self.artifacts[i] = Some(path);
                    self.build_secs[i] = Some(secs);
                }
                Err(o) => self.outcomes[i] = Some(o),
            }
        }
    }

    /// The screening cost the search ranks by: the fastest batch (other
    /// tasks only ever add time; screening counts every batch).
    fn cost(&self, i: usize) -> Option<f64> {
        let o = self.outcomes[i].as_ref()?;
        if !o.status.ranked() {
            return None;
        }
        o.run_secs.iter().copied().filter(|s| *s > 0.0).min_by(f64::total_cmp)
    }

    fn gemm(&self, i: usize) -> Option<Gemm> {
        match self.candidates[i].kind {
            Kind::Gemm(g) => Some(g),
            _ => None,
        }
    }
}

fn matrix_args(size: Size) -> Vec<ArgInfo> {
    vec![
        ArgInfo::tensor(DType::F32, [size.m as i64, size.k as i64]),
        ArgInfo::tensor(DType::F32, [size.k as i64, size.n as i64]),
        ArgInfo::tensor(DType::F32, [size.m as i64, size.n as i64]),
    ]
}

/// Builds `inputs`; a failed build becomes its outcome.
async fn build(builder: &LocalBuilder, inputs: Vec<(usize, BuilderInput)>) -> Vec<Built> {
    let (ids, inputs): (Vec<usize>, Vec<BuilderInput>) = inputs.into_iter().unzip();
    let mut out = Vec::with_capacity(ids.len());
    let mut builds = builder.build(inputs);
    while let Some((j, built)) = builds.next().await {
        out.push((
            ids[j],
            built
                .result
                .map(|o| (o.artifact_path, o.build_secs))
                .map_err(|e| Outcome::build_failed(&e)),
        ));
    }
    out
}

/// Measures `inputs` one by one with `runner`, ticking `bar`.
async fn measure(
    runner: &RpcRunner,
    inputs: Vec<(usize, RunnerInput)>,
    bar: &ProgressBar,
) -> Vec<(usize, Result<Measurement, RunError>)> {
    let (ids, inputs): (Vec<usize>, Vec<RunnerInput>) = inputs.into_iter().unzip();
    let mut out = Vec::with_capacity(ids.len());
    let mut results = runner.run(inputs);
    while let Some((j, result)) = results.next().await {
        bar.inc(1);
        out.push((ids[j], result));
    }
    out
}

/// Runs the probe kernel on the device.
async fn probe(setup: &Setup<'_>) -> anyhow::Result<Device> {
    let built = setup
        .first_builder
        .build_one(BuilderInput::new("device_probe", openblas::probe_source(&setup.openblas_lib)))
        .await;
    let path = built.result.map_err(|e| anyhow::anyhow!("{e}"))?.artifact_path;
    let input = RunnerInput::new(path, vec![ArgInfo::tensor(DType::I32, [PROBE_LEN as i64])])
        .read_args([0]);
    let mut results = setup.screen.run(vec![input]).collect_ordered().await;
    let m = results.pop().context("no probe result")??;
    let out = m.output_as::<i32>(0)?;
    Device::from_probe(&out).context("a malformed probe result")
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>10} [{elapsed_precise}] {bar:32.cyan/blue} {pos:>3}/{len:3} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// The rounds. Cancel safety: not cancel-safe as a whole (dropping it
/// drops its builds and measurements, which stop them; the unpinned server
/// is then dropped without a clean shutdown).
pub(crate) async fn tune(setup: &Setup<'_>) -> anyhow::Result<Tuned> {
    let started = Instant::now();
    let size = setup.size;
    let lib = setup.openblas_lib.as_str();
    let bars = MultiProgress::new();
    let mut notes = Vec::new();
    let mut phases = Vec::new();

    // 0. What the device runs.
    let device = match probe(setup).await {
        Ok(d) => Some(d),
        Err(e) => {
            notes.push(format!("note: the device probe failed ({e:#}): portable kernels only"));
            None
        }
    };
    let isas = device.as_ref().map_or_else(|| vec![crate::space::Isa::Portable], Device::isas);
    let openblas = device.as_ref().is_some_and(|d| d.openblas);
    let cpus = device.as_ref().map_or(1, |d| d.cpus);
    let mut search = Search::new(setup.seed, &isas, size.m, size.n, size.k);

    // 1. The first batch: the fixed candidates, OpenBLAS, the first proposals.
    let mut book = Book::default();
    for c in crate::candidates::fixed() {
        book.add(c, 0, false);
    }
    let naive = 0;
    let mut ob_1t = None;
    let mut ob_all = None;
    if openblas {
        ob_1t = Some(book.add(Candidate::new(Kind::OpenBlas { threads: 1 }), 0, false));
        if cpus > 1 && setup.all_cores.is_some() {
            let c = Candidate::new(Kind::OpenBlas { threads: cpus });
            ob_all = Some(book.add(c, 0, true));
        }
    }
    let mut proposed = 0;
    let first = search.propose(setup.batch.min(setup.trials).max(1));
    proposed += first.len();
    for g in first {
        book.add(Candidate::new(Kind::Gemm(g)), 0, false);
    }
    let phase = Instant::now();
    let inputs = (0..book.candidates.len()).map(|i| book.input(i, size, lib)).collect();
    book.built(build(setup.first_builder, inputs).await);
    phases.push(format!("first build {:.1} s", phase.elapsed().as_secs_f64()));

    // 2. Rounds: measure round r while round r + 1 builds.
    let args_info = matrix_args(size);
    let mut reference: Option<Vec<f64>> = None;
    let mut naive_problem = None;
    let mut pending: Vec<usize> = (0..book.candidates.len()).collect();
    if let Some(i) = ob_all {
        pending.retain(|&j| j != i);
    }
    let mut round = 0;
    let phase = Instant::now();
    loop {
        let more = proposed < setup.trials && started.elapsed() < setup.time_budget;
        let mut next = Vec::new();
        if more {
            let batch = search.propose(setup.batch.min(setup.trials - proposed));
            proposed += batch.len();
            for g in batch {
                next.push(book.add(Candidate::new(Kind::Gemm(g)), round + 1, false));
            }
        }
        let builds: Vec<(usize, BuilderInput)> =
            next.iter().map(|&i| book.input(i, size, lib)).collect();
        let runs: Vec<(usize, RunnerInput)> = pending
            .iter()
            .filter_map(|&i| {
                let path = book.artifacts[i].as_ref()?;
                // The naive kernel's A and B come back too, to check it on the host.
                let read: &[u32] = if i == naive { &[0, 1, 2] } else { &[2] };
                Some((i, RunnerInput::new(path, args_info.clone()).read_args(read)))
            })
            .collect();
        let bar = bars.add(ProgressBar::new(runs.len() as u64).with_style(style()));
        bar.set_prefix(format!("round {round}"));
        bar.set_message(format!("{} measuring, {} building", runs.len(), builds.len()));
        bar.tick();
        let (built, mut measured) =
            tokio::join!(build(setup.builder, builds), measure(setup.screen, runs, &bar));
        bar.finish_with_message(format!("done, {:.1} s", bar.elapsed().as_secs_f64()));
        book.built(built);
        // The naive kernel first: it is the reference of the others.
        measured.sort_by_key(|&(i, _)| i != naive);
        for (i, m) in measured {
            let o = match m {
                Err(e) => Outcome::run_failed(&e),
                Ok(m) if i == naive => {
                    let (r, o) = outcome::check_naive(size, m).await?;
                    reference = r;
                    o
                }
                Ok(m) => outcome::check(m, reference.as_deref()),
            };
            book.outcomes[i] = Some(o);
        }
        if round == 0 {
            naive_problem = match &book.outcomes[naive] {
                None => Some("the naive kernel did not build".to_owned()),
                Some(o) if o.status != Status::Ok => {
                    Some(format!("the naive kernel failed: {}", o.status.label()))
                }
                Some(_) => None,
            };
        }
        let fed: Vec<(Gemm, Option<f64>)> = pending
            .iter()
            .filter_map(|&i| {
                let g = book.gemm(i)?;
                Some((g, book.cost(i).map(|s| size.flops() / s / 1e9)))
            })
            .collect();
        search.observe(fed);
        round += 1;
        if next.is_empty() {
            break;
        }
        pending = next;
    }
    phases.push(format!("{round} rounds {:.1} s", phase.elapsed().as_secs_f64()));

    // 3. The final round (the multi-threaded variants build meanwhile).
    let mut ranked: Vec<(usize, f64)> = (0..book.candidates.len())
        .filter(|&i| book.gemm(i).is_some_and(|g| g.threads == 1))
        .filter_map(|i| book.cost(i).map(|m| (i, m)))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut finalists: Vec<usize> = ranked.iter().take(setup.finalists).map(|&(i, _)| i).collect();
    let ran = |i: usize| book.outcomes[i].as_ref().is_some_and(|o| o.status.ranked());
    if let Some(i) = ob_1t.filter(|&i| ran(i) && !finalists.is_empty()) {
        finalists.push(i);
    }
    let threads = THREADS.iter().copied().filter(|&t| t > 1 && t <= cpus).max();
    let mut mt = Vec::new();
    if let (Some(t), Some(_)) = (threads, &setup.all_cores) {
        for &(i, _) in ranked.iter().take(3) {
            let g = Gemm { threads: t, ..book.gemm(i).context("a gemm")? };
            mt.push(book.add(Candidate::new(Kind::Gemm(g)), round, true));
        }
    }
    // The fastest single-threaded one runs on all cores too (the same
    // library): a multi-threaded variant has to beat it to be worth it.
    if let (Some(&(i, _)), false) = (ranked.first(), mt.is_empty()) {
        let c = &book.candidates[i];
        let twin = Candidate { name: format!("{}_all_cores", c.name), ..c.clone() };
        let j = book.add(twin, book.round[i], true);
        book.artifacts[j] = book.artifacts[i].clone();
        book.build_secs[j] = book.build_secs[i];
        mt.push(j);
    }
    let bar = bars.add(ProgressBar::new(finalists.len() as u64).with_style(style()));
    bar.set_prefix("final");
    bar.set_message(format!("{} interleaved in one session", finalists.len()));
    bar.enable_steady_tick(Duration::from_millis(200));
    let phase = Instant::now();
    let builds: Vec<(usize, BuilderInput)> = mt
        .iter()
        .filter(|&&i| book.artifacts[i].is_none())
        .map(|&i| book.input(i, size, lib))
        .collect();
    let Book { artifacts, outcomes, .. } = &mut book;
    let (built, ()) = tokio::join!(
        build(setup.builder, builds),
        rounds::final_round(
            setup.last,
            &finalists,
            artifacts,
            &args_info,
            reference.as_deref(),
            outcomes
        )
    );
    book.built(built);
    bar.set_position(finalists.len() as u64);
    bar.finish_with_message(format!("done, {:.1} s", phase.elapsed().as_secs_f64()));
    phases.push(format!("final round {:.1} s", phase.elapsed().as_secs_f64()));

    // 4. All cores: OpenBLAS with every thread and the multi-threaded
    //    candidates, on an unpinned server, nothing building.
    let set: Vec<usize> = ob_all.into_iter().chain(mt.iter().copied()).collect();
    match (&setup.all_cores, set.is_empty()) {
        (Some(ac), false) => {
            let bar = bars.add(ProgressBar::new(set.len() as u64).with_style(style()));
            bar.set_prefix("all cores");
            bar.set_message(format!("{} interleaved, unpinned", set.len()));
            bar.enable_steady_tick(Duration::from_millis(200));
            let phase = Instant::now();
            let note = all_cores_round(setup, ac, &set, &mut book, reference.as_deref()).await;
            notes.push(note);
            bar.finish_with_message(format!("done, {:.1} s", phase.elapsed().as_secs_f64()));
            phases.push(format!("all cores {:.1} s", phase.elapsed().as_secs_f64()));
        }
        (None, _) => notes.push(
            "all cores: not measured (needs the embedded server; remote servers pin their workers)"
                .to_owned(),
        ),
        (Some(_), true) => notes.push(format!(
            "all cores: not measured ({} CPU(s) on the device, OpenBLAS {})",
            cpus,
            if openblas { "found" } else { "missing" }
        )),
    }
    bars.clear()?;

    let trials = book
        .candidates
        .into_iter()
        .zip(book.outcomes)
        .enumerate()
        .map(|(trial, (candidate, outcome))| Trial {
            trial,
            round: book.round[trial],
            all_cores: book.all_cores[trial],
            build_secs: book.build_secs[trial],
            candidate,
            outcome: outcome.unwrap_or_else(|| Outcome::failed(Status::Error, "not run")),
        })
        .collect();
    Ok(Tuned { trials, device, naive_problem, notes, phases, rounds: round })
}

/// Times `set` interleaved in one session on a device server whose
/// workers are not pinned (this process unpinned to every CPU meanwhile);
/// returns what was pinned, as a line for the report.
async fn all_cores_round(
    setup: &Setup<'_>,
    ac: &AllCores,
    set: &[usize],
    book: &mut Book,
    reference: Option<&[f64]>,
) -> String {
    let fail = |book: &mut Book, why: String| {
        for &i in set {
            book.outcomes[i] = Some(Outcome::failed(Status::SessionError, why.clone()));
        }
        format!("all cores: not measured: {why}")
    };
    // The unpinned workers inherit this process's affinity.
    if let Err(e) = pin_this_process(&ac.cpus) {
        return fail(book, format!("cannot unpin this process to CPUs {:?}: {e}", ac.cpus));
    }
    let key = format!("{}-all-cores", ac.key);
    let cfg = ServerConfig::new(&key, ac.program.clone())
        .tracker(format!("127.0.0.1:{}", ac.tracker_port))
        .worker_output(OutputMode::Tracing)
        .no_worker_cpu_affinity();
    let server = match DeviceServer::start("127.0.0.1:0", cfg).await {
        Ok(s) => s,
        Err(e) => return fail(book, format!("cannot start the unpinned server: {e}")),
    };
    let note = match server.wait_for(Duration::from_secs(10), |s| s.registered).await {
        Err(_) => fail(book, "the unpinned server did not register".to_owned()),
        Ok(_) => {
            let rpc = RpcConfig::new("127.0.0.1", ac.tracker_port, key)
                .session_timeout(rounds::final_session_timeout(set.len()));
            match RpcRunner::builder(rpc)
                .evaluator(rounds::all_cores_evaluator())
                .seed(setup.seed)
                .build()
                .await
            {
                Err(e) => fail(book, format!("cannot start its runner: {e}")),
                Ok(runner) => {
                    let args_info = matrix_args(setup.size);
                    let mut order = Vec::new();
                    let mut inputs = Vec::new();
                    for &i in set {
                        if let Some(path) = &book.artifacts[i] {
                            inputs.push(RunnerInput::new(path, args_info.clone()).read_args([2]));
                            order.push(i);
                        }
                    }
                    let results = runner.run_interleaved(inputs).collect_ordered().await;
                    for (i, r) in order.into_iter().zip(results) {
                        book.outcomes[i] = Some(match r {
                            Ok(m) => outcome::check(m, reference),
                            Err(e) => Outcome::run_failed(&e),
                        });
                    }
                    format!(
                        "all cores: OpenBLAS with every thread and the multi-threaded candidates \
                         interleaved on a second server whose workers are not pinned (CPUs {:?}, \
                         nothing building)",
                        ac.cpus
                    )
                }
            }
        }
    };
    match server.shutdown().await {
        Ok(()) => note,
        Err(e) => format!("{note}; the unpinned server did not shut down cleanly: {e}"),
    }
}
