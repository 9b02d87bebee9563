//! The time evaluator's configuration (TVM's `EvaluatorConfig`, plus the
//! adaptive stop rule and real-time priority); the timing loop itself runs
//! in the session worker (`kernel/timing.rs`, `kernel/adaptive.rs`).

use serde::{Deserialize, Serialize};

/// How a kernel is timed, with TVM's fields and defaults.
///
/// `EvaluatorConfig::default()` is TVM's evaluator (a fixed `repeat`), so a
/// tuner ported from TVM gets the costs it expects;
/// [`EvaluatorConfig::adaptive`] is the recommended rule (time batches until
/// the relative noise is low enough, say when it is not). Build one with
/// struct-update syntax:
/// `EvaluatorConfig { repeat: 3, ..EvaluatorConfig::default() }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorConfig {
    /// Calls per batch (TVM default 3); with an adaptive rule, the start of
    /// the calibration.
    pub number: u32,
    /// Batches; one cost per batch (TVM default 1). Ignored by an adaptive rule.
    pub repeat: u32,
    /// A batch shorter than this is retried with more calls (TVM default 100).
    pub min_repeat_ms: u64,
    /// Flush every argument but the first from the CPU caches before each batch.
    pub enable_cpu_cache_flush: bool,
    /// Sleep between batches, in ms (TVM's `cooldown_interval_ms`; default 0).
    pub cooldown_ms: u64,
    /// When to stop timing batches: `None` is TVM's fixed `repeat`.
    pub adaptive: Option<AdaptiveStop>,
    /// Time under `SCHED_FIFO` (priority 1) where the OS permits it (see
    /// docs/measure.md, "Real-time priority", for the safety bound). A
    /// refusal is a warning in the measurement's environment, not an error.
    pub realtime: bool,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        EvaluatorConfig {
            number: 3,
            repeat: 1,
            min_repeat_ms: 100,
            enable_cpu_cache_flush: false,
            cooldown_ms: 0,
            adaptive: None,
            realtime: false,
        }
    }
}

impl EvaluatorConfig {
    /// The recommended configuration: batches of at least 5 ms (`number`
    /// calibrated from 1 with TVM's rule, calibration batches discarded),
    /// then batches until the relative noise is at most 0.5%
    /// ([`AdaptiveStop::default`]).
    pub fn adaptive() -> Self {
        EvaluatorConfig {
            number: 1,
            repeat: 1,
            min_repeat_ms: 5,
            adaptive: Some(AdaptiveStop::default()),
            ..EvaluatorConfig::default()
        }
    }

    /// With this stop rule.
    #[must_use]
    pub fn with_adaptive(mut self, stop: AdaptiveStop) -> Self {
        self.adaptive = Some(stop);
        self
    }

    /// The relative noise a measurement of this configuration counts as
    /// stable under: the adaptive target, else
    /// [`Stats::DEFAULT_THRESHOLD`](crate::measure::Stats::DEFAULT_THRESHOLD).
    pub fn noise_threshold(&self) -> f64 {
        match &self.adaptive {
            Some(stop) => stop.target_rel_noise,
            None => crate::measure::Stats::DEFAULT_THRESHOLD,
        }
    }
}

/// The adaptive stop rule (nvbench's `stdrel` is the model): keep timing
/// batches until the relative noise (MAD / median of the batch costs) is at
/// most `target_rel_noise` with at least `min_batches` costs, or a budget is
/// spent (`max_batches` costs, or `max_time_ms` of timed batches); a
/// measurement whose budget ends first is not stable
/// ([`Stats::stable`](crate::measure::Stats::stable) is false).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveStop {
    /// The relative noise to reach (default 0.005 = 0.5%).
    pub target_rel_noise: f64,
    /// Fewest batches (default 10; at least 3).
    pub min_batches: u32,
    /// Most batches (default 100; at most 100,000).
    pub max_batches: u32,
    /// Most time spent in timed batches of one kernel, in ms (default 1,000).
    pub max_time_ms: u64,
}

impl Default for AdaptiveStop {
    fn default() -> Self {
        AdaptiveStop {
            target_rel_noise: 0.005,
            min_batches: 10,
            max_batches: 100,
            max_time_ms: 1000,
        }
    }
}

/// The most batches an adaptive rule may ask for.
pub(crate) const MAX_ADAPTIVE_BATCHES: u32 = 100_000;
