//! What happened to each candidate: the status classification, the result
//! check against the reference, and the costs.

use rpc_runner::measure::{
    BuildError, Environment, Measurement, RunError, StageTimes, Stats, StopReason,
};

use crate::candidates::{Expect, Size};

/// Relative tolerance of the result check (float32 sums in another order).
pub(crate) const RTOL: f64 = 1e-3;

/// How a candidate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Built, ran and computed the right answer.
    Ok,
    /// Ran, but the reference to check it against is missing.
    Unverified,
    /// The compiler rejected it.
    CompileError,
    /// The build ran past its time limit.
    BuildTimeout,
    /// The build's worker died or the build task failed.
    BuildCrashed,
    /// Any other build failure (I/O, the builder itself).
    BuildError,
    /// The library could not be loaded or lacks the entry.
    LoadError,
    /// The kernel returned nonzero.
    KernelError,
    /// The kernel crashed its worker (SIGSEGV...).
    Crashed,
    /// The measurement ran past the session timeout.
    Timeout,
    /// The output differs from the reference.
    WrongResult,
    /// No device could be leased, or the server went away.
    SessionError,
    /// Anything else.
    Error,
}

impl Status {
    /// The name in the tuning log.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unverified => "unverified",
            Status::CompileError => "compile_error",
            Status::BuildTimeout => "build_timeout",
            Status::BuildCrashed => "build_crashed",
            Status::BuildError => "build_error",
            Status::LoadError => "load_error",
            Status::KernelError => "kernel_error",
            Status::Crashed => "crashed",
            Status::Timeout => "timeout",
            Status::WrongResult => "wrong_result",
            Status::SessionError => "session_error",
            Status::Error => "error",
        }
    }

    /// The label in the result table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unverified => "unverified",
            Status::CompileError => "compile error",
            Status::BuildTimeout => "build timeout",
            Status::BuildCrashed => "build crashed",
            Status::BuildError => "build error",
            Status::LoadError => "load error",
            Status::KernelError => "kernel error",
            Status::Crashed => "crashed",
            Status::Timeout => "timeout",
            Status::WrongResult => "wrong result",
            Status::SessionError => "session error",
            Status::Error => "error",
        }
    }

    /// Ranked in the table and the plot (it has a trustworthy cost).
    pub(crate) fn ranked(self) -> bool {
        matches!(self, Status::Ok | Status::Unverified)
    }

    /// Whether this is how a candidate with expectation `e` should end.
    pub(crate) fn meets(self, e: Expect) -> bool {
        match e {
            Expect::Ok => self == Status::Ok,
            Expect::CompileError => self == Status::CompileError,
            Expect::Crash => self == Status::Crashed,
            Expect::WrongResult => self == Status::WrongResult,
        }
    }

    pub(crate) fn from_build(e: &BuildError) -> Self {
        match e {
            BuildError::Compile { .. } => Status::CompileError,
            BuildError::Timeout { .. } => Status::BuildTimeout,
            BuildError::Crash { .. } => Status::BuildCrashed,
            _ => Status::BuildError,
        }
    }

    pub(crate) fn from_run(e: &RunError) -> Self {
        match e {
            RunError::Load { .. } | RunError::Upload { .. } => Status::LoadError,
            RunError::KernelError { .. } => Status::KernelError,
            RunError::KernelCrash { .. } => Status::Crashed,
            RunError::Timeout { .. } => Status::Timeout,
            RunError::Session { .. }
            | RunError::ServerLost { .. }
            | RunError::LeaseTimeout { .. }
            | RunError::Rpc { .. } => Status::SessionError,
            _ => Status::Error,
        }
    }
}

/// The outcome of one candidate.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) status: Status,
    /// Why it failed (compiler stderr, crash, the check's verdict).
    pub(crate) error: Option<String>,
    /// One cost per timed batch, in seconds (empty unless it ran).
    pub(crate) run_secs: Vec<f64>,
    /// Largest relative error against the reference, when checked.
    pub(crate) max_rel_err: Option<f64>,
    /// The server that measured it and how long each stage took, if it ran.
    pub(crate) measured: Option<(String, StageTimes)>,
    /// How trustworthy the costs are, if it ran.
    pub(crate) fidelity: Option<Fidelity>,
    /// Re-measured in the final round (interleaved with the other finalists).
    pub(crate) finalist: bool,
    /// A finalist's median cost in the screening round, in seconds.
    pub(crate) screen_median: Option<f64>,
}

/// What the measurement says about its own trustworthiness.
#[derive(Debug, Clone)]
pub(crate) struct Fidelity {
    /// Statistics of the costs, `stable` against the round's noise target.
    pub(crate) stats: Option<Stats>,
    /// Why timing stopped.
    pub(crate) stop: StopReason,
    /// Timed interleaved with other candidates.
    pub(crate) interleaved: bool,
    /// Where and how it was timed (its `warnings` are the environment's).
    pub(crate) env: Environment,
    /// The environment's warnings plus "unstable: ..." (`Measurement::warnings`).
    pub(crate) warnings: Vec<String>,
}

impl Fidelity {
    fn of(m: &Measurement) -> Self {
        Fidelity {
            stats: m.stats(),
            stop: m.stop,
            interleaved: m.interleaved,
            env: m.env.clone(),
            warnings: m.warnings(),
        }
    }

    /// The costs are stable (false without statistics).
    pub(crate) fn stable(&self) -> bool {
        self.stats.is_some_and(|s| s.stable)
    }
}

impl Outcome {
    /// A failed build: its one-line error, or the compiler's whole stderr.
    pub(crate) fn build_failed(e: &BuildError) -> Self {
        let error = e.stderr().map_or_else(|| chain(e), str::to_owned);
        Self::failed(Status::from_build(e), error)
    }

    /// A failed measurement, with the error's causes.
    pub(crate) fn run_failed(e: &RunError) -> Self {
        Self::failed(Status::from_run(e), chain(e))
    }

    pub(crate) fn failed(status: Status, error: impl Into<String>) -> Self {
        Outcome {
            status,
            error: Some(error.into()),
            run_secs: Vec::new(),
            max_rel_err: None,
            measured: None,
            fidelity: None,
            finalist: false,
            screen_median: None,
        }
    }

    /// A candidate that ran and was checked (or not).
    pub(crate) fn ran(
        status: Status,
        error: Option<String>,
        m: Measurement,
        max_rel_err: Option<f64>,
    ) -> Self {
        let fidelity = Some(Fidelity::of(&m));
        let measured = Some((m.server, m.stages));
        Outcome {
            status,
            error,
            run_secs: m.run_secs,
            max_rel_err,
            measured,
            fidelity,
            finalist: false,
            screen_median: None,
        }
    }

    /// This outcome as a finalist's: `screen` is its screening outcome.
    pub(crate) fn into_finalist(mut self, screen: &Outcome) -> Self {
        self.finalist = true;
        self.screen_median = screen.median();
        self
    }

    /// The statistics of the costs, if it ran.
    pub(crate) fn stats(&self) -> Option<Stats> {
        self.fidelity.as_ref().and_then(|f| f.stats)
    }

    /// Ran and its costs are not stable (noise above the round's target).
    pub(crate) fn unstable(&self) -> bool {
        self.fidelity.as_ref().is_some_and(|f| !f.stable())
    }

    /// Median cost in seconds.
    pub(crate) fn median(&self) -> Option<f64> {
        median(&self.run_secs)
    }
}

/// Checks the naive kernel's C against a float64 product of its A and B on
/// the host; returns its C (the reference of every other candidate) if right.
pub(crate) async fn check_naive(
    size: Size,
    m: Measurement,
) -> anyhow::Result<(Option<Vec<f64>>, Outcome)> {
    let [a, b, c] = [0, 1, 2].map(|i| m.output_as::<f32>(i));
    let (a, b, c) = (a?, b?, c?);
    let (err, c) = tokio::task::spawn_blocking(move || {
        let host = host_matmul(&a, &b, size.m, size.n, size.k);
        (max_rel_err(&c, &host), c)
    })
    .await?;
    let ok = err <= RTOL;
    let outcome = match ok {
        true => Outcome::ran(Status::Ok, None, m, Some(err)),
        false => {
            let why = format!("max rel err {err:.2e} against the host's float64 product");
            Outcome::ran(Status::WrongResult, Some(why), m, Some(err))
        }
    };
    Ok((ok.then(|| c.into_iter().map(f64::from).collect()), outcome))
}

/// Checks a candidate's C against the reference.
pub(crate) fn check(m: Measurement, reference: Option<&[f64]>) -> Outcome {
    let Some(reference) = reference else {
        return Outcome::ran(Status::Unverified, None, m, None);
    };
    let err = match m.output_as::<f32>(0) {
        Ok(c) => max_rel_err(&c, reference),
        Err(e) => return Outcome::failed(Status::Error, e.to_string()),
    };
    if err <= RTOL {
        Outcome::ran(Status::Ok, None, m, Some(err))
    } else {
        let why = format!("max rel err {err:.2e} against the naive kernel (tolerance {RTOL:.0e})");
        Outcome::ran(Status::WrongResult, Some(why), m, Some(err))
    }
}

pub(crate) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

/// An error and its causes on one line: `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// `A * B` in float64 on the host, `a` of `m x k`, `b` of `k x n`, row-major.
pub(crate) fn host_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let x = f64::from(a[i * k + p]);
            for (cj, &bj) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *cj += x * f64::from(bj);
            }
        }
    }
    c
}

/// Largest elementwise relative error of `got` against `want` (infinite for
/// NaN or a length mismatch).
pub(crate) fn max_rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let e = (f64::from(g) - w).abs() / w.abs().max(f64::from(f32::MIN_POSITIVE));
            if e.is_nan() { f64::INFINITY } else { e }
        })
        .fold(0.0, f64::max)
}
