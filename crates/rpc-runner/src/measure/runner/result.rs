//! What goes into a measurement and what comes out: [`RunnerInput`],
//! [`Measurement`] (with [`StageTimes`] and typed [`Output`]s) and
//! [`RunError`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use popen_pool::PoolError;
use serde::{Deserialize, Serialize};

use super::super::args::{ArgInfo, DType};
use super::super::cause::Cause;
use super::super::kernel::{Environment, StopReason, Timing, failure_kind};
use crate::session::SessionError;

/// One kernel to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerInput {
    /// The built shared library.
    pub artifact_path: PathBuf,
    /// The device type (`"cpu"`); informational.
    pub device_type: String,
    /// The kernel's arguments (TVM's JSON form when serialized).
    pub args_info: Vec<ArgInfo>,
    /// Arguments of the first set to read back after timing (e.g. outputs to
    /// check), by index.
    pub read_args: Vec<u32>,
}

impl RunnerInput {
    /// A CPU kernel with these arguments.
    pub fn new(artifact_path: impl Into<PathBuf>, args_info: Vec<ArgInfo>) -> Self {
        RunnerInput {
            artifact_path: artifact_path.into(),
            device_type: "cpu".into(),
            args_info,
            read_args: Vec::new(),
        }
    }

    /// Also read back these arguments after timing.
    #[must_use]
    pub fn read_args(mut self, indices: impl Into<Vec<u32>>) -> Self {
        self.read_args = indices.into();
        self
    }
}

/// How long each stage of one measurement took.
///
/// With the default [`Pipeline`](crate::measure::Pipeline) stages, the
/// upload, load and alloc run in the evaluator's one call to the worker:
/// `upload` is then the time until the server answered the upload, `load`
/// and `alloc` the worker's own time for those steps, and `evaluate` the
/// rest of that call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StageTimes {
    /// Waiting for a free device and opening its session.
    pub lease_wait: Duration,
    /// Uploading the artifact.
    pub upload: Duration,
    /// Loading the kernel.
    pub load: Duration,
    /// Allocating and filling the arguments.
    pub alloc: Duration,
    /// The time evaluator and reading back the outputs.
    pub evaluate: Duration,
    /// Closing the session.
    pub cleanup: Duration,
}

/// An argument read back after timing (see [`RunnerInput::read_args`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Output {
    /// The argument's index.
    pub index: u32,
    /// Its element type and shape.
    pub info: ArgInfo,
    /// Its bytes (native byte order, row-major).
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl Output {
    /// An output of argument `index`.
    pub fn new(index: u32, info: ArgInfo, bytes: Vec<u8>) -> Self {
        Output { index, info, bytes }
    }
}

/// A Rust type that a tensor's elements can be read as
/// ([`Measurement::output_as`]).
pub trait Element: Copy + Sized {
    /// The matching element type.
    const DTYPE: DType;
    /// Decodes one element from its native-endian bytes (`DTYPE.bytes()` long).
    fn from_ne_slice(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn from_ne_slice(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_ne_bytes(a)
            }
        }
    )*};
}
element!(f32 => F32, f64 => F64, i8 => I8, i16 => I16, i32 => I32, i64 => I64, u8 => U8);

/// Why [`Measurement::output_as`] could not decode an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// There is no output at this position.
    #[error("no output {position} (the measurement has {count})")]
    Missing {
        /// The position asked for.
        position: usize,
        /// How many outputs there are.
        count: usize,
    },
    /// The output's element type is another one.
    #[error("output {position} holds {stored}, not {requested}")]
    WrongType {
        /// The position asked for.
        position: usize,
        /// Its element type.
        stored: DType,
        /// The type asked for.
        requested: DType,
    },
    /// The output's size does not match its shape.
    #[error("output {position} has {len} bytes, not the {expected} its shape needs")]
    BadLength {
        /// The position asked for.
        position: usize,
        /// Its length in bytes.
        len: usize,
        /// What its shape needs.
        expected: usize,
    },
}

/// What a successful measurement produced, where and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Measurement {
    /// One cost per batch, in seconds (`repeat * alloc_repeat` values).
    pub run_secs: Vec<f64>,
    /// The arguments named in `read_args`, in that order.
    pub outputs: Vec<Output>,
    /// The server that measured it (`host:port` of an RPC server,
    /// `"local"` for a [`LocalRunner`](super::LocalRunner)).
    pub server: String,
    /// How long each stage took.
    pub stages: StageTimes,
    /// Where and under what conditions the kernel was timed (pinned CPUs,
    /// governor, turbo, neighbour load) and warnings about it.
    #[serde(default)]
    pub env: Environment,
    /// Why timing stopped (the adaptive rule's budget ends first: not stable).
    #[serde(default)]
    pub stop: StopReason,
    /// Batches discarded and timed again because the timed thread was
    /// preempted during them ([`Timing::preempted`](crate::measure::Timing::preempted)).
    #[serde(default)]
    pub preempted: u32,
    /// The relative noise under which [`stats`](Measurement::stats) calls
    /// the costs stable: the adaptive rule's target, else
    /// [`Stats::DEFAULT_THRESHOLD`](crate::measure::Stats::DEFAULT_THRESHOLD).
    #[serde(default = "default_threshold")]
    pub noise_threshold: f64,
    /// The batches were timed interleaved with other candidates
    /// ([`Runner::run_interleaved`](super::Runner::run_interleaved)).
    #[serde(default)]
    pub interleaved: bool,
}

fn default_threshold() -> f64 {
    crate::measure::Stats::DEFAULT_THRESHOLD
}

impl Measurement {
    /// A measurement of these costs (no outputs, no server or times yet:
    /// the runner fills those in).
    pub fn new(run_secs: Vec<f64>) -> Self {
        Measurement {
            run_secs,
            outputs: Vec::new(),
            server: String::new(),
            stages: StageTimes::default(),
            env: Environment::default(),
            stop: StopReason::Repeat,
            preempted: 0,
            noise_threshold: default_threshold(),
            interleaved: false,
        }
    }

    /// A measurement of what [`TimeKernel`](crate::measure::TimeKernel)
    /// returned under `config` (its costs, environment and stop reason;
    /// stable against the config's [`noise_threshold`](crate::measure::EvaluatorConfig::noise_threshold)).
    pub fn from_timing(timing: Timing, config: &crate::measure::EvaluatorConfig) -> Self {
        let mut m = Measurement::new(timing.costs);
        m.env = timing.env;
        m.stop = timing.stop;
        m.preempted = timing.preempted;
        m.noise_threshold = config.noise_threshold();
        m
    }

    /// Whether the costs can be trusted to their noise: the statistics are
    /// stable (see [`stats`](Measurement::stats)); `false` without costs.
    pub fn is_stable(&self) -> bool {
        self.stats().is_some_and(|s| s.stable)
    }

    /// Everything that makes this measurement suspect: the environment's
    /// warnings, plus one when the costs are not stable.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.env.warnings.clone();
        match self.stats() {
            Some(s) if !s.stable => w.push(format!(
                "unstable: relative noise {:.2}% over {} batches exceeds {:.2}%{}",
                s.rel_noise * 100.0,
                s.n,
                self.noise_threshold * 100.0,
                match self.stop {
                    StopReason::BatchBudget => " (batch budget spent)",
                    StopReason::TimeBudget => " (time budget spent)",
                    _ => "",
                }
            )),
            Some(_) => {}
            None => w.push("no finite cost".into()),
        }
        w
    }

    /// Statistics of [`run_secs`](Measurement::run_secs), `stable` against
    /// [`noise_threshold`](Measurement::noise_threshold) (by default
    /// [`Stats::DEFAULT_THRESHOLD`](crate::measure::Stats::DEFAULT_THRESHOLD),
    /// 1% relative noise; the adaptive rule's target when it was used);
    /// `None` if there is no finite cost.
    ///
    /// ```
    /// use rpc_runner::measure::{Measurement, Verdict};
    /// let a = Measurement::new(vec![1.00e-3, 1.01e-3, 0.99e-3, 1.00e-3]);
    /// let b = Measurement::new(vec![1.30e-3, 1.31e-3, 1.29e-3, 1.30e-3]);
    /// let (sa, sb) = (a.stats().unwrap(), b.stats().unwrap());
    /// assert!(sa.stable);
    /// assert_eq!(sa.compare(&sb), Verdict::Faster);
    /// ```
    pub fn stats(&self) -> Option<crate::measure::Stats> {
        self.stats_with(self.noise_threshold)
    }

    /// As [`stats`](Measurement::stats), `stable` against `threshold`.
    pub fn stats_with(&self, threshold: f64) -> Option<crate::measure::Stats> {
        crate::measure::Stats::from_costs(&self.run_secs, threshold)
    }

    /// With these outputs.
    #[must_use]
    pub fn with_outputs(mut self, outputs: Vec<Output>) -> Self {
        self.outputs = outputs;
        self
    }

    /// The median cost in seconds (`None` without costs).
    pub fn median_secs(&self) -> Option<f64> {
        let mut v = self.run_secs.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    /// The output at `position` (in `read_args` order) decoded as `T`.
    ///
    /// # Examples
    ///
    /// ```
    /// use rpc_runner::measure::{ArgInfo, DType, Measurement, Output};
    ///
    /// let bytes = [1.5f32, -2.0].iter().flat_map(|x| x.to_ne_bytes()).collect();
    /// let m = Measurement::new(vec![1e-3])
    ///     .with_outputs(vec![Output::new(2, ArgInfo::tensor(DType::F32, [2]), bytes)]);
    /// assert_eq!(m.output_as::<f32>(0).unwrap(), [1.5, -2.0]);
    /// assert!(m.output_as::<i32>(0).is_err()); // float32, not int32
    /// assert!(m.output_as::<f32>(1).is_err()); // only one output
    /// ```
    ///
    /// # Errors
    ///
    /// [`OutputError`] if there is no such output, it holds another element
    /// type, or its size does not match its shape.
    pub fn output_as<T: Element>(&self, position: usize) -> Result<Vec<T>, OutputError> {
        let out = self
            .outputs
            .get(position)
            .ok_or(OutputError::Missing { position, count: self.outputs.len() })?;
        if out.info.dtype != T::DTYPE {
            return Err(OutputError::WrongType {
                position,
                stored: out.info.dtype,
                requested: T::DTYPE,
            });
        }
        let expected = out.info.nbytes();
        if out.bytes.len() != expected {
            return Err(OutputError::BadLength { position, len: out.bytes.len(), expected });
        }
        Ok(out.bytes.chunks_exact(T::DTYPE.bytes()).map(T::from_ne_slice).collect())
    }
}

/// Why a measurement failed, classified like TVM's `MeasureErrorNo`.
///
/// Causes are kept as typed sources ([`Cause`]); the `Display` of a variant
/// is its own message only, so print chains (`{:#}` with `anyhow`) to see
/// the cause. Serializes with the causes as text.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RunError {
    /// The tracker could not be reached or lease a device.
    #[error("cannot get a session from the tracker at {addr}")]
    Session {
        /// The tracker's address.
        addr: String,
        /// What went wrong.
        #[source]
        source: Cause<SessionError>,
    },
    /// The tracker lists no server for the key (when building a runner).
    #[error("the tracker at {addr} has no server with key {key:?}")]
    NoServer {
        /// The tracker's address.
        addr: String,
        /// The device key.
        key: String,
    },
    /// No device became free within the lease timeout.
    #[error("no device became free within {limit:?}")]
    LeaseTimeout {
        /// The lease timeout.
        limit: Duration,
    },
    /// The artifact could not be uploaded.
    #[error("cannot upload {}", artifact.display())]
    Upload {
        /// The artifact.
        artifact: PathBuf,
        /// Why.
        #[source]
        source: Cause<SessionError>,
    },
    /// The artifact is not a loadable shared library, or lacks the entry.
    #[error("cannot load the kernel {} ({kind}): {message}", artifact.display())]
    Load {
        /// [`failure_kind::LOAD_ERROR`] or [`failure_kind::MISSING_SYMBOL`].
        kind: String,
        /// The artifact (the local path, not where the session stored it).
        artifact: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The kernel returned a nonzero code.
    #[error("{message}")]
    KernelError {
        /// e.g. `kernel returned error 3`.
        message: String,
    },
    /// The kernel crashed its worker (e.g. `worker died (SIGSEGV)`).
    #[error("kernel crashed: {message}")]
    KernelCrash {
        /// How the worker died.
        message: String,
    },
    /// The measurement ran past its limit (the session timeout).
    #[error("measurement timed out after {limit:?}")]
    Timeout {
        /// The limit.
        limit: Duration,
    },
    /// The device server went away mid-measurement.
    #[error("device server lost")]
    ServerLost {
        /// How the connection ended.
        #[source]
        source: Cause<SessionError>,
    },
    /// The measurement was cancelled (its token, or its stream dropped).
    #[error("measurement cancelled")]
    Cancelled,
    /// The session failed otherwise (protocol error, over-limit frame...).
    #[error("session error")]
    Rpc {
        /// The session's error.
        #[source]
        source: Cause<SessionError>,
    },
    /// The measurement's worker failed otherwise (bad arguments, allocation...).
    #[error("measurement task failed")]
    Worker {
        /// The worker's error.
        #[source]
        source: Cause<PoolError>,
    },
    /// A session with a TVM RPC server failed (see [`TvmError`](crate::tvm::TvmError)).
    #[error("TVM RPC session error")]
    Tvm {
        /// What went wrong.
        #[source]
        source: Cause<crate::tvm::TvmError>,
    },
    /// Anything else (raised by a custom pipeline stage, a panicked stage...).
    #[error("measurement failed: {message}")]
    Other {
        /// What happened.
        message: String,
    },
}

impl RunError {
    /// Classifies a session error raised by a stage; `limit` is the session
    /// timeout.
    pub fn from_session(e: SessionError, limit: Duration) -> Self {
        match e {
            SessionError::Task(p) => Self::from_pool(p),
            SessionError::SessionTimeout { limit } => RunError::Timeout { limit },
            SessionError::Timeout { .. } => RunError::Timeout { limit },
            e @ (SessionError::ConnectionLost { .. } | SessionError::ServerShutdown) => {
                RunError::ServerLost { source: Cause::new(e) }
            }
            e => RunError::Rpc { source: Cause::new(e) },
        }
    }

    /// Classifies a worker error raised by a kernel task.
    pub fn from_pool(e: PoolError) -> Self {
        match e {
            PoolError::Task { kind, message }
                if kind == failure_kind::LOAD_ERROR || kind == failure_kind::MISSING_SYMBOL =>
            {
                RunError::Load { kind, artifact: PathBuf::new(), message }
            }
            PoolError::Task { kind, message } if kind == failure_kind::KERNEL_ERROR => {
                RunError::KernelError { message }
            }
            PoolError::WorkerDied { exit } => {
                RunError::KernelCrash { message: format!("worker died ({exit})") }
            }
            PoolError::Timeout { limit } => RunError::Timeout { limit },
            e => RunError::Worker { source: Cause::new(e) },
        }
    }

    /// A [`Load`](RunError::Load) error names `artifact` instead of `remote`,
    /// where the session stored it; other errors are unchanged.
    pub(crate) fn naming_artifact(self, artifact: &Path, remote: &str) -> Self {
        match self {
            RunError::Load { kind, message, .. } => {
                let shown = artifact.display().to_string();
                let message =
                    if remote.is_empty() { message } else { message.replace(remote, &shown) };
                RunError::Load { kind, artifact: artifact.to_path_buf(), message }
            }
            e => e,
        }
    }
}

/// The outcome of measuring one input.
pub type RunnerResult = Result<Measurement, RunError>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn results_and_inputs_round_trip_through_json() {
        let input =
            RunnerInput::new("a.so", vec![ArgInfo::tensor(DType::F32, [2, 3])]).read_args([0]);
        let json = serde_json::to_value(&input).unwrap();
        assert_eq!(json["args_info"], serde_json::json!([["TENSOR", "float32", [2, 3]]]));
        assert_eq!(serde_json::from_value::<RunnerInput>(json).unwrap(), input);

        let mut m = Measurement::new(vec![1e-3, 2e-3]).with_outputs(vec![Output::new(
            0,
            ArgInfo::tensor(DType::U8, [2]),
            vec![1, 2],
        )]);
        m.server = "127.0.0.1:9000".into();
        m.stages.evaluate = Duration::from_millis(5);
        let back: Measurement = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.output_as::<u8>(0).unwrap(), [1, 2]);
    }

    #[test]
    fn run_errors_keep_a_typed_cause_and_serialize_it_as_text() {
        let e = RunError::from_session(SessionError::ServerShutdown, Duration::from_secs(1));
        let RunError::ServerLost { source } = &e else { panic!("{e:?}") };
        assert!(matches!(source.get(), Some(SessionError::ServerShutdown)));
        assert!(e.source().is_some());
        let back: RunError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.source().map(ToString::to_string), e.source().map(ToString::to_string));

        let load = RunError::from_pool(PoolError::Task {
            kind: failure_kind::LOAD_ERROR.into(),
            message: "kernel.so: invalid ELF header".into(),
        })
        .naming_artifact(Path::new("/builds/mm.so"), "kernel.so");
        assert_eq!(
            load.to_string(),
            "cannot load the kernel /builds/mm.so (load_error): /builds/mm.so: invalid ELF header"
        );
        assert_eq!(serde_json::from_str::<RunError>("\"Cancelled\"").unwrap(), RunError::Cancelled);
    }
}
