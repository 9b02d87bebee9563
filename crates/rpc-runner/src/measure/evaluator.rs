//! The time evaluator's configuration (TVM's `EvaluatorConfig`); the timing
//! loop itself runs in the session worker (`kernel.rs`).

use serde::{Deserialize, Serialize};

/// How a kernel is timed, with TVM's fields and defaults.
///
/// Build one with struct-update syntax:
/// `EvaluatorConfig { repeat: 3, ..EvaluatorConfig::default() }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluatorConfig {
    /// Calls per batch (TVM default 3).
    pub number: u32,
    /// Batches; one cost per batch (TVM default 1).
    pub repeat: u32,
    /// A batch shorter than this is retried with more calls (TVM default 100).
    pub min_repeat_ms: u64,
    /// Flush every argument but the first from the CPU caches before each batch.
    pub enable_cpu_cache_flush: bool,
    /// Sleep between batches, in ms (TVM's `cooldown_interval_ms`; default 0).
    pub cooldown_ms: u64,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        EvaluatorConfig {
            number: 3,
            repeat: 1,
            min_repeat_ms: 100,
            enable_cpu_cache_flush: false,
            cooldown_ms: 0,
        }
    }
}
