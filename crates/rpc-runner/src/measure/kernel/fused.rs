//! [`MeasureKernel`]: load, allocate, time and read back in one task, so
//! a measurement is one round trip to its worker instead of three or more.

use std::time::Instant;

use popen_pool::{Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

use super::{AllocArgs, LoadKernel, ReadArg, TimeKernel, Timing};

/// The steps of a measurement in one task (task `rpc_runner.measure_kernel`):
/// [`LoadKernel`], [`AllocArgs`], [`TimeKernel`] and [`ReadArg`]s, each run
/// exactly as its own task would run it, in that order, skipping the absent
/// ones. The default [`Pipeline`](crate::measure::Pipeline) sends one of
/// these per measurement.
///
/// The first step that fails ends the task with that step's failure (same
/// [`failure_kind`](super::failure_kind) and message as the step's own
/// task), so the caller cannot tell a fused failure from a separate one;
/// the steps before it have taken effect (a loaded kernel stays loaded).
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::{LoadKernel, MeasureKernel};
///
/// let task = MeasureKernel::default().load(LoadKernel::new("kernel.so"));
/// assert!(task.load.is_some() && task.time.is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MeasureKernel {
    /// Loads this kernel first.
    pub load: Option<LoadKernel>,
    /// Then allocates these arguments.
    pub alloc: Option<AllocArgs>,
    /// Then times the kernel.
    pub time: Option<TimeKernel>,
    /// Then reads these arguments back.
    pub read: Vec<ReadArg>,
}

impl MeasureKernel {
    /// Loads `load` first.
    #[must_use]
    pub fn load(mut self, load: LoadKernel) -> Self {
        self.load = Some(load);
        self
    }

    /// Allocates `alloc` after the load.
    #[must_use]
    pub fn alloc(mut self, alloc: AllocArgs) -> Self {
        self.alloc = Some(alloc);
        self
    }

    /// Times with `time` after the allocation.
    #[must_use]
    pub fn time(mut self, time: TimeKernel) -> Self {
        self.time = Some(time);
        self
    }

    /// Reads `read` back after timing.
    #[must_use]
    pub fn read(mut self, read: impl IntoIterator<Item = ReadArg>) -> Self {
        self.read = read.into_iter().collect();
        self
    }
}

/// What [`MeasureKernel`] returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MeasuredKernel {
    /// The timing, when the task timed.
    pub timing: Option<Timing>,
    /// The bytes of each [`MeasureKernel::read`] argument, in order.
    pub outputs: Vec<serde_bytes::ByteBuf>,
    /// How long the load step took in the worker, in seconds (0 if none).
    pub load_s: f64,
    /// How long the allocation step took in the worker, in seconds (0 if none).
    pub alloc_s: f64,
}

impl Task for MeasureKernel {
    const NAME: &'static str = "rpc_runner.measure_kernel";
    type Output = MeasuredKernel;
    fn run(self, ctx: &mut WorkerContext) -> Result<MeasuredKernel, TaskFailure> {
        let mut out = MeasuredKernel::default();
        if let Some(load) = self.load {
            let t = Instant::now();
            load.run(ctx)?;
            out.load_s = t.elapsed().as_secs_f64();
        }
        if let Some(alloc) = self.alloc {
            let t = Instant::now();
            alloc.run(ctx)?;
            out.alloc_s = t.elapsed().as_secs_f64();
        }
        if let Some(time) = self.time {
            out.timing = Some(time.run(ctx)?);
        }
        out.outputs.reserve(self.read.len());
        for read in self.read {
            out.outputs.push(read.run(ctx)?);
        }
        Ok(out)
    }
}
