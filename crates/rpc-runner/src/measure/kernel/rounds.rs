//! The adaptive and interleaved timing loop: calibrate each candidate, then
//! time batches in rounds, each round in a shuffled order, until each
//! candidate's stop rule is met.

use super::fill::SplitMix64;
use super::timing::next_number;
use super::*;
use crate::measure::evaluator::{AdaptiveStop, MAX_ADAPTIVE_BATCHES};
use crate::measure::stats::Stats;

/// Why timing a kernel stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StopReason {
    /// TVM's rule: `repeat` batches per argument set were timed.
    #[default]
    Repeat,
    /// The adaptive rule's target noise was reached.
    Converged,
    /// The adaptive rule's `max_batches` was reached first (not stable).
    BatchBudget,
    /// The adaptive rule's `max_time_ms` was spent first (not stable).
    TimeBudget,
}

/// How many batches a candidate gets.
#[derive(Debug, Clone, Copy)]
pub(super) enum Rule {
    /// Exactly this many.
    Count(u32),
    /// Until the noise target or a budget.
    Adaptive(AdaptiveStop),
}

impl Rule {
    pub(super) fn of(cfg: &EvaluatorConfig, sets: usize) -> Result<Rule, KernelError> {
        let Some(stop) = cfg.adaptive else {
            let sets = u32::try_from(sets).unwrap_or(u32::MAX);
            return Ok(Rule::Count(cfg.repeat.saturating_mul(sets)));
        };
        let bad = |m: String| Err(KernelError::BadConfig(m));
        if !(stop.target_rel_noise.is_finite() && stop.target_rel_noise > 0.0) {
            return bad(format!("target_rel_noise {} must be above 0", stop.target_rel_noise));
        }
        if stop.min_batches < Stats::MIN_STABLE_N as u32 {
            return bad(format!("min_batches {} must be at least 3", stop.min_batches));
        }
        if stop.max_batches < stop.min_batches || stop.max_batches > MAX_ADAPTIVE_BATCHES {
            return bad(format!(
                "max_batches {} must be between min_batches ({}) and {MAX_ADAPTIVE_BATCHES}",
                stop.max_batches, stop.min_batches
            ));
        }
        if stop.max_time_ms == 0 {
            return bad("max_time_ms must be at least 1".into());
        }
        Ok(Rule::Adaptive(stop))
    }

    fn capacity(self) -> usize {
        let n = match self {
            Rule::Count(n) => n,
            Rule::Adaptive(s) => s.max_batches,
        };
        n.min(PREALLOC) as usize
    }

    fn done(self, costs: &[f64], timed: Duration) -> Option<StopReason> {
        match self {
            Rule::Count(n) => (costs.len() >= n as usize).then_some(StopReason::Repeat),
            Rule::Adaptive(s) => {
                let n = costs.len();
                if n >= s.min_batches as usize
                    && Stats::from_costs(costs, s.target_rel_noise).is_some_and(|st| st.stable)
                {
                    Some(StopReason::Converged)
                } else if n >= s.max_batches as usize {
                    Some(StopReason::BatchBudget)
                } else if timed >= Duration::from_millis(s.max_time_ms) {
                    Some(StopReason::TimeBudget)
                } else {
                    None
                }
            }
        }
    }
}

/// One candidate's costs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RoundsOut {
    pub(super) costs: Vec<f64>,
    pub(super) number: u32,
    pub(super) stop: StopReason,
    /// Batches discarded and timed again because the thread was preempted.
    pub(super) preempted: u32,
    /// Preempted batches counted anyway (the retry budget was spent).
    pub(super) preempted_counted: u32,
}

/// How long one batch took: on the wall clock, and on the timed thread's
/// CPU clock when it could be read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BatchTime {
    pub(super) wall: Duration,
    pub(super) cpu: Option<Duration>,
    /// Context switches during the batch, when they could be read: the
    /// timed thread's voluntary ones and the process's involuntary ones.
    pub(super) switches: Option<(i64, i64)>,
}

impl BatchTime {
    /// Whether other work took the CPU from the kernel for more than
    /// [`PREEMPTED_SHARE`] of the batch. The timed thread's CPU clock says
    /// so for a kernel that runs on that thread; one that waits of its own
    /// accord (a multi-threaded kernel waiting for its threads) is off its
    /// CPU by design, so for it only an involuntary switch of one of the
    /// process's threads counts.
    fn disturbed(&self) -> bool {
        match (self.cpu, self.switches) {
            (_, Some((voluntary, involuntary))) if voluntary > 0 => involuntary > 0,
            (Some(cpu), _) => cpu.as_secs_f64() < self.wall.as_secs_f64() * (1.0 - PREEMPTED_SHARE),
            (None, _) => false,
        }
    }
}

impl From<Duration> for BatchTime {
    fn from(wall: Duration) -> Self {
        BatchTime { wall, cpu: None, switches: None }
    }
}

/// Under the adaptive rule, a batch whose thread was off its CPU for more
/// than this share of the batch (other tasks ran) is discarded and timed
/// again, at most `max_batches` times per candidate; then disturbed
/// batches count like the others.
pub(super) const PREEMPTED_SHARE: f64 = 0.005;

/// What the loop pauses for between batches under `SCHED_FIFO`, so other
/// work on the CPU gets to run.
pub(super) const REALTIME_YIELD: Duration = Duration::from_micros(100);

/// Times `sets.len()` candidates (candidate `c` has `sets[c]` argument
/// sets) through `batch(candidate, set, number) -> elapsed` (a
/// [`BatchTime`], or a bare wall time).
///
/// Per candidate: one warm-up call per set, then `number` calibrated on set
/// 0 with TVM's rule until a batch reaches `min_repeat_ms` (these batches
/// are discarded). Then rounds: each round visits every unfinished
/// candidate once, in an order shuffled by `order_seed`, timing one batch
/// on its next set (sets in turn), after one untimed call when another
/// kernel or set ran last (unless the cache flush is on). A candidate whose
/// call fails is dropped with its error; the others go on.
pub(super) fn run_rounds<B: Into<BatchTime>>(
    cfg: &EvaluatorConfig,
    sets: &[usize],
    order_seed: u64,
    mut batch: impl FnMut(usize, usize, u32) -> Result<B, i32>,
    mut flush: impl FnMut(usize, usize),
    mut pause: impl FnMut(Duration),
) -> Result<Vec<Result<RoundsOut, KernelError>>, KernelError> {
    super::timing::check_config(cfg)?;
    let rules = sets.iter().map(|&s| Rule::of(cfg, s)).collect::<Result<Vec<_>, _>>()?;
    let min = Duration::from_millis(cfg.min_repeat_ms);
    let mut out: Vec<Result<RoundsOut, KernelError>> = Vec::with_capacity(sets.len());
    let mut timed = vec![Duration::ZERO; sets.len()];
    for (c, &nsets) in sets.iter().enumerate() {
        out.push(calibrate(cfg, c, nsets, min, &mut batch, &mut flush).map(|number| RoundsOut {
            costs: Vec::with_capacity(rules[c].capacity()),
            number,
            stop: StopReason::Repeat,
            preempted: 0,
            preempted_counted: 0,
        }));
    }
    let mut active: Vec<usize> = (0..sets.len()).filter(|&c| out[c].is_ok()).collect();
    let mut rng = SplitMix64(order_seed);
    let mut first = true;
    let mut last: Option<(usize, usize)> = None;
    while !active.is_empty() {
        // Fisher-Yates with the seeded stream.
        for i in (1..active.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            active.swap(i, j);
        }
        let mut finished = Vec::new();
        for &c in &active {
            if !first {
                if cfg.cooldown_ms > 0 {
                    pause(Duration::from_millis(cfg.cooldown_ms));
                }
                if cfg.realtime {
                    pause(REALTIME_YIELD);
                }
            }
            first = false;
            let Ok(state) = &mut out[c] else { continue };
            let set = (state.costs.len() + state.preempted as usize) % sets[c].max(1);
            if cfg.enable_cpu_cache_flush {
                flush(c, set);
            } else if last != Some((c, set)) {
                // Another kernel or set ran last: one untimed call brings
                // this one's code and data back into the caches, as if it
                // were measured alone.
                if let Err(rc) = batch(c, set, 1) {
                    out[c] = Err(KernelError::Kernel(rc));
                    finished.push(c);
                    continue;
                }
            }
            last = Some((c, set));
            let Ok(state) = &mut out[c] else { continue };
            match batch(c, set, state.number).map(Into::into) {
                Ok(time) => {
                    let elapsed = time.wall;
                    timed[c] += elapsed;
                    if let (Rule::Adaptive(stop), true) = (rules[c], time.disturbed()) {
                        // Timed again while the retry and time budgets
                        // last; once either is spent the batch counts (so a
                        // candidate never ends without costs).
                        let in_time = timed[c] < Duration::from_millis(stop.max_time_ms);
                        if state.preempted < stop.max_batches && in_time {
                            state.preempted += 1;
                            continue;
                        }
                        state.preempted_counted += 1;
                    }
                    state.costs.push(elapsed.as_secs_f64() / f64::from(state.number));
                    if let Some(stop) = rules[c].done(&state.costs, timed[c]) {
                        state.stop = stop;
                        finished.push(c);
                    }
                }
                Err(rc) => {
                    out[c] = Err(KernelError::Kernel(rc));
                    finished.push(c);
                }
            }
        }
        active.retain(|c| !finished.contains(c));
    }
    Ok(out)
}

/// Warm-up calls and TVM's growth of `number` for one candidate.
fn calibrate<B: Into<BatchTime>>(
    cfg: &EvaluatorConfig,
    c: usize,
    nsets: usize,
    min: Duration,
    batch: &mut impl FnMut(usize, usize, u32) -> Result<B, i32>,
    flush: &mut impl FnMut(usize, usize),
) -> Result<u32, KernelError> {
    if nsets == 0 {
        return Err(KernelError::NoArgs);
    }
    for set in 0..nsets {
        batch(c, set, 1).map_err(KernelError::Kernel)?;
    }
    let mut number = cfg.number.max(1);
    let mut zero_batches = 0;
    loop {
        if cfg.enable_cpu_cache_flush {
            flush(c, 0);
        }
        let elapsed = batch(c, 0, number).map_err(KernelError::Kernel)?.into().wall;
        if elapsed >= min {
            return Ok(number);
        }
        if elapsed.is_zero() {
            zero_batches += 1;
            if zero_batches >= MAX_ZERO_TIME_BATCHES {
                return Err(KernelError::ZeroTime(zero_batches, number));
            }
        } else {
            zero_batches = 0;
        }
        number = next_number(number, elapsed, cfg.min_repeat_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(target: f64, min: u32, max: u32, time_ms: u64) -> EvaluatorConfig {
        EvaluatorConfig {
            number: 1,
            min_repeat_ms: 1,
            adaptive: Some(AdaptiveStop {
                target_rel_noise: target,
                min_batches: min,
                max_batches: max,
                max_time_ms: time_ms,
            }),
            ..EvaluatorConfig::default()
        }
    }

    #[test]
    fn a_quiet_kernel_converges_at_min_batches() {
        let cfg = adaptive(0.01, 5, 50, 10_000);
        // 10 µs per call, exactly: calibrate to >= 1 ms, then no noise.
        let out = run_rounds(
            &cfg,
            &[1],
            1,
            |_, _, n| Ok(Duration::from_micros(10 * u64::from(n))),
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!(o.stop, StopReason::Converged);
        assert_eq!(o.costs.len(), 5);
        assert!(o.number >= 100, "{}", o.number);
        assert!(o.costs.iter().all(|&c| (c - 10e-6).abs() < 1e-12));
    }

    #[test]
    fn a_noisy_kernel_runs_out_of_budget_and_says_which() {
        let cfg = adaptive(0.001, 5, 20, 10_000);
        let mut i = 0u64;
        // Alternates 10 and 12 µs per call: 10% noise never reaches 0.1%.
        let out = run_rounds(
            &cfg,
            &[2],
            1,
            |_, _, n| {
                // Count the timed batches only (not the untimed single calls).
                i += u64::from(n > 1);
                Ok(Duration::from_micros((10 + 2 * (i % 2)) * u64::from(n)))
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!((o.stop, o.costs.len()), (StopReason::BatchBudget, 20));
        let st = Stats::from_costs(&o.costs, 0.001).unwrap();
        assert!(!st.stable);
        // A time budget of 5 ms with >= 1 ms batches ends after ~5 batches.
        let cfg = adaptive(0.001, 3, 1000, 5);
        let mut j = 0u64;
        let out = run_rounds(
            &cfg,
            &[1],
            1,
            |_, _, n| {
                j += 1;
                Ok(Duration::from_micros((10 + 3 * (j % 2)) * u64::from(n)))
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!(o.stop, StopReason::TimeBudget, "{o:?}");
        assert!(o.costs.len() <= 6, "{}", o.costs.len());
    }

    #[test]
    fn rounds_interleave_in_shuffled_orders_and_rotate_sets() {
        let cfg = EvaluatorConfig { number: 2, repeat: 4, min_repeat_ms: 0, ..Default::default() };
        let mut timed: Vec<(usize, usize)> = Vec::new();
        let mut warm: Vec<(usize, usize)> = Vec::new();
        let mut calls = 0;
        let out = run_rounds(
            &cfg,
            &[1, 2, 1],
            7,
            |c, s, n| {
                calls += 1;
                // After the warm-ups (4) and calibrations (3): timed batches
                // of 2 calls, and untimed single calls between kernels.
                if calls > 4 + 3 {
                    if n == 2 { timed.push((c, s)) } else { warm.push((c, s)) }
                }
                Ok(Duration::from_micros(5))
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        // Each timed batch whose kernel or set differs from the last one is
        // preceded by one untimed call of it.
        assert!(!warm.is_empty() && warm.len() <= timed.len(), "{warm:?}");
        // Count rule: repeat * sets batches each.
        let lens: Vec<usize> = out.iter().map(|o| o.as_ref().unwrap().costs.len()).collect();
        assert_eq!(lens, vec![4, 8, 4]);
        // Every one of the first 4 rounds visits all three candidates.
        for round in timed[..12].chunks(3) {
            let mut cs: Vec<usize> = round.iter().map(|&(c, _)| c).collect();
            cs.sort_unstable();
            assert_eq!(cs, vec![0, 1, 2], "{timed:?}");
        }
        let orders: std::collections::HashSet<Vec<usize>> =
            timed[..12].chunks(3).map(|r| r.iter().map(|&(c, _)| c).collect()).collect();
        assert!(orders.len() > 1, "the order is shuffled: {timed:?}");
        // Candidate 1 alternates its two sets.
        let sets1: Vec<usize> = timed.iter().filter(|&&(c, _)| c == 1).map(|&(_, s)| s).collect();
        assert_eq!(&sets1[..4], &[0, 1, 0, 1]);
    }

    #[test]
    fn a_failing_candidate_is_dropped_and_the_others_go_on() {
        let cfg = EvaluatorConfig { number: 1, repeat: 3, min_repeat_ms: 0, ..Default::default() };
        let mut batches_of_1 = 0;
        let out = run_rounds(
            &cfg,
            &[1, 1],
            3,
            |c, _, _| {
                if c == 1 {
                    batches_of_1 += 1;
                    if batches_of_1 == 3 {
                        return Err(-7);
                    }
                }
                Ok(Duration::from_micros(5))
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap().costs.len(), 3);
        assert_eq!(out[1], Err(KernelError::Kernel(-7)));
    }

    #[test]
    fn every_batch_preempted_until_the_time_budget_still_gives_costs() {
        // Each batch reads 1 ms and lost half of it; the time budget (5 ms)
        // ends before the retry budget (50): the candidate stops on time
        // with the disturbed batches counted, never with no costs.
        let cfg = adaptive(0.01, 5, 50, 5);
        let out = run_rounds(
            &cfg,
            &[1],
            1,
            |_, _, n| {
                let wall = Duration::from_micros(1000 * u64::from(n));
                Ok(BatchTime { wall, cpu: Some(wall / 2), switches: None })
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!(o.stop, StopReason::TimeBudget, "{o:?}");
        assert!(!o.costs.is_empty(), "{o:?}");
        assert_eq!(o.preempted_counted as usize, o.costs.len(), "{o:?}");
    }

    #[test]
    fn a_kernel_waiting_for_its_threads_is_preempted_only_by_involuntary_switches() {
        let quiet =
            |wall: Duration| BatchTime { wall, cpu: Some(wall / 10), switches: Some((4, 0)) };
        assert!(
            !quiet(Duration::from_millis(5)).disturbed(),
            "waiting on its threads is not preemption"
        );
        let preempted = BatchTime { switches: Some((4, 1)), ..quiet(Duration::from_millis(5)) };
        assert!(preempted.disturbed());
        // A kernel on the timed thread alone: its CPU clock decides.
        let lost = |cpu_share: f64| {
            let wall = Duration::from_millis(5);
            BatchTime { wall, cpu: Some(wall.mul_f64(cpu_share)), switches: Some((0, 0)) }
        };
        assert!(lost(0.9).disturbed());
        assert!(!lost(1.0).disturbed());
        // No clock and no counters: nothing to go on.
        assert!(!BatchTime::from(Duration::from_millis(5)).disturbed());
    }

    #[test]
    fn preempted_batches_are_timed_again_within_a_budget() {
        let cfg = adaptive(0.01, 5, 8, 10_000);
        let mut i = 0u32;
        // Every third batch lost 10% of its time to another task (and reads 10% longer).
        let out = run_rounds(
            &cfg,
            &[1],
            1,
            |_, _, n| {
                i += 1;
                let wall = Duration::from_micros(10 * u64::from(n));
                if i % 3 == 0 {
                    Ok(BatchTime { wall: wall * 11 / 10, cpu: Some(wall), switches: None })
                } else {
                    Ok(BatchTime { wall, cpu: Some(wall), switches: None })
                }
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!(o.stop, StopReason::Converged);
        assert!(o.preempted >= 1, "{o:?}");
        assert!(o.costs.iter().all(|&c| (c - 10e-6).abs() < 1e-12), "only clean batches: {o:?}");
        // A kernel that is always off its CPU (it sleeps) is timed anyway
        // once the retry budget is spent.
        let out = run_rounds(
            &cfg,
            &[1],
            1,
            |_, _, n| {
                let wall = Duration::from_micros(10 * u64::from(n));
                Ok(BatchTime { wall, cpu: Some(wall / 2), switches: None })
            },
            |_, _| {},
            |_| {},
        )
        .unwrap();
        let o = out[0].as_ref().unwrap();
        assert_eq!((o.preempted, o.costs.len(), o.stop), (8, 5, StopReason::Converged), "{o:?}");
        assert_eq!(o.preempted_counted, 5);
    }

    #[test]
    fn bad_adaptive_configs_are_refused() {
        for cfg in [
            adaptive(0.0, 5, 10, 1),
            adaptive(f64::NAN, 5, 10, 1),
            adaptive(0.01, 2, 10, 1),
            adaptive(0.01, 5, 4, 1),
            adaptive(0.01, 5, MAX_ADAPTIVE_BATCHES + 1, 1),
            adaptive(0.01, 5, 10, 0),
        ] {
            let err = run_rounds(&cfg, &[1], 0, |_, _, _| Ok(Duration::ZERO), |_, _| {}, |_| {})
                .unwrap_err();
            assert_eq!(err.kind(), "bad_config", "{err}");
        }
    }
}
