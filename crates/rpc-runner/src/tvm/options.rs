//! How a [`TvmSession`](super::TvmSession) is opened and bounded
//! ([`TvmOptions`]), and the settings of TVM's time evaluator
//! ([`TimeEvaluatorConfig`]).

use std::time::Duration;

#[cfg(doc)]
use super::{TvmError, TvmSession};

/// How a [`TvmSession`] is opened and bounded.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TvmOptions {
    /// Ask the server to end the session after this long (sent in the
    /// handshake as `-timeout=`; TVM's server then reports
    /// [`TvmError::SessionTimeout`] and kills the session's process).
    pub session_timeout: Option<Duration>,
    /// Limit of the TCP connect, handshake and `kInitServer` (default 10 s);
    /// also of [`TvmSession::close`]'s wait for the server to finish.
    pub connect_timeout: Duration,
    /// Limit of each call's wait for its reply (default 10 min).
    pub call_timeout: Duration,
    /// Largest packet accepted from the server (default 1 GiB).
    pub max_packet_bytes: u64,
}

impl Default for TvmOptions {
    fn default() -> Self {
        TvmOptions {
            session_timeout: None,
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(600),
            max_packet_bytes: 1 << 30,
        }
    }
}

impl TvmOptions {
    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, limit: Option<Duration>) -> Self {
        self.session_timeout = limit;
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// Sets the per-call timeout.
    #[must_use]
    pub fn call_timeout(mut self, limit: Duration) -> Self {
        self.call_timeout = limit;
        self
    }

    /// Sets the largest packet accepted.
    #[must_use]
    pub fn max_packet_bytes(mut self, limit: u64) -> Self {
        self.max_packet_bytes = limit;
        self
    }
}

/// The settings of `runtime.RPCTimeEvaluator` (TVM 0.27's 12 arguments
/// after the module, name and device), with TVM's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimeEvaluatorConfig {
    /// Runs per measurement (averaged).
    pub number: i32,
    /// Measurements (one float64 cost each).
    pub repeat: i32,
    /// Minimum duration of one measurement; `number` grows to reach it.
    pub min_repeat_ms: i32,
    /// How many zero-time measurements are retried.
    pub limit_zero_time_iterations: i32,
    /// Pause between groups of repeats.
    pub cooldown_interval_ms: i32,
    /// Repeats per cooldown group.
    pub repeats_to_cooldown: i32,
    /// Bytes of cache flushed before each repeat (TVM's
    /// `cache_flush_bytes`; 0 = none).
    pub cache_flush_bytes: i32,
    /// Name of a global preprocessing function, or empty.
    pub f_preproc: String,
}

impl Default for TimeEvaluatorConfig {
    fn default() -> Self {
        TimeEvaluatorConfig {
            number: 10,
            repeat: 1,
            min_repeat_ms: 0,
            limit_zero_time_iterations: 100,
            cooldown_interval_ms: 0,
            repeats_to_cooldown: 1,
            cache_flush_bytes: 0,
            f_preproc: String::new(),
        }
    }
}

impl TimeEvaluatorConfig {
    /// `number` runs per measurement, `repeat` measurements, each at least
    /// `min_repeat_ms` long.
    pub fn new(number: i32, repeat: i32, min_repeat_ms: i32) -> Self {
        TimeEvaluatorConfig { number, repeat, min_repeat_ms, ..TimeEvaluatorConfig::default() }
    }
}
