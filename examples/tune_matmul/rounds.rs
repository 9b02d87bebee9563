//! The two measuring rounds: screening (every built candidate on its own,
//! with a cheap adaptive rule) and the final round (the fastest few
//! re-measured together, interleaved, under the recommended adaptive rule).

use std::path::PathBuf;
use std::time::Duration;

use rpc_runner::measure::{ArgInfo, EvaluatorConfig, RpcRunner, Runner as _, RunnerInput};

use crate::outcome::{self, Outcome};

/// Finalists by default.
pub(crate) const DEFAULT_FINALISTS: usize = 8;

/// Most finalists (`--finalists`): the final round is one session.
pub(crate) const MAX_FINALISTS: usize = 64;

/// Screening: 8 batches of at least 5 ms each, every batch counted.
///
/// Not the adaptive rule: that one discards a batch whose thread lost more
/// than 0.5% of it to other tasks and, on a machine busy enough that every
/// batch is disturbed, ends at its time budget with no cost at all (seen
/// with other builds running). Screening only ranks; the final round
/// decides, under the adaptive rule.
pub(crate) fn screening_evaluator() -> EvaluatorConfig {
    let mut cfg = EvaluatorConfig::adaptive();
    cfg.adaptive = None;
    cfg.repeat = 8;
    cfg.min_repeat_ms = 5;
    cfg
}

/// The all-cores round: 30 batches of at least 10 ms each, interleaved,
/// every batch counted: a multi-threaded kernel's calling thread waits for
/// its other threads, which the adaptive rule would take for preemption.
pub(crate) fn all_cores_evaluator() -> EvaluatorConfig {
    let mut cfg = EvaluatorConfig::adaptive();
    cfg.adaptive = None;
    cfg.repeat = 30;
    cfg.min_repeat_ms = 10;
    cfg
}

/// The final round: the recommended rule (0.5% relative noise over at
/// least 10 batches, at most 100 batches or 1 s of timed batches each).
pub(crate) fn final_evaluator() -> EvaluatorConfig {
    EvaluatorConfig::adaptive()
}

/// The rounds in one line (for the report's header).
pub(crate) fn describe(finalists: usize) -> String {
    let rule = |cfg: &EvaluatorConfig| match cfg.adaptive {
        Some(stop) => format!(
            "batches of >= {} ms until {:.1}% noise ({}-{} batches, <= {} ms)",
            cfg.min_repeat_ms,
            stop.target_rel_noise * 100.0,
            stop.min_batches,
            stop.max_batches,
            stop.max_time_ms
        ),
        None => format!("{} batches of >= {} ms", cfg.repeat, cfg.min_repeat_ms),
    };
    let screen = format!("screening: each candidate on its own, {}", rule(&screening_evaluator()));
    if finalists == 0 {
        return format!("{screen}; no final round");
    }
    format!(
        "{screen}; final round: the fastest {finalists} in one session, interleaved, {}",
        rule(&final_evaluator())
    )
}

/// The final round's session timeout: it bounds the whole interleaved set,
/// so it grows with the number of finalists (4 s each: calibration, the 1 s
/// budget, upload and load, with room for a loaded machine), at least 60 s.
pub(crate) fn final_session_timeout(finalists: usize) -> Duration {
    let per = Duration::from_secs(4);
    per.saturating_mul(u32::try_from(finalists).unwrap_or(u32::MAX)).max(Duration::from_secs(60))
}

/// Re-measures the finalists in one interleaved session, checks their
/// outputs against `reference` again, and replaces their screening outcomes
/// (a finalist that fails here keeps that failure).
///
/// Cancel safety: dropping the future cancels the set (its stream is
/// dropped) and leaves `outcomes` as they were: they are replaced only
/// once every result is in.
pub(crate) async fn final_round(
    runner: &RpcRunner,
    finalists: &[usize],
    artifacts: &[Option<PathBuf>],
    args_info: &[ArgInfo],
    reference: Option<&[f64]>,
    outcomes: &mut [Option<Outcome>],
) {
    let mut order = Vec::new();
    let mut inputs = Vec::new();
    for &i in finalists {
        if let Some(path) = &artifacts[i] {
            inputs.push(RunnerInput::new(path, args_info.to_vec()).read_args([2]));
            order.push(i);
        }
    }
    let results = runner.run_interleaved(inputs).collect_ordered().await;
    for (i, result) in order.into_iter().zip(results) {
        let Some(screen) = outcomes[i].take() else { continue };
        let last = match result {
            Ok(m) => outcome::check(m, reference),
            Err(e) => Outcome::run_failed(&e),
        };
        outcomes[i] = Some(last.into_finalist(&screen));
    }
}
