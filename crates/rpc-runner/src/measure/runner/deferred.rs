//! Deferred steps: the default `load_module` and `alloc_argument` stages
//! queue their tasks on the [`DeviceSession`], and the next call sends them
//! with it as one [`MeasureKernel`], so a default measurement makes one
//! round trip to its worker for load, allocation, timing and read-back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use popen_pool::{PoolError, Task};

use super::pipeline::{Device, DeviceSession, StageContext};
use super::result::{Measurement, Output, RunError, RunnerInput};
use crate::measure::kernel::{
    AllocArgs, LoadKernel, MeasureKernel, MeasuredKernel, ReadArg, TimeKernel,
};

/// Most bytes of read-back arguments one fused call carries; the rest are
/// read with one call each (each bounded by the frame limit as before).
const MAX_FUSED_READ: usize = 1 << 20;

/// The steps waiting for the next call, and what the last fused call said.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The kernel to load, its artifact and where it was uploaded (for the
    /// error's name).
    load: Option<(LoadKernel, PathBuf, String)>,
    alloc: Option<AllocArgs>,
    /// The worker's own times of the last fused load and alloc.
    times: Option<(Duration, Duration)>,
    /// The worker does not know `MeasureKernel` (another program's):
    /// steps are sent one by one.
    unfused: bool,
}

impl DeviceSession {
    /// Queues loading `load` for the next call (`artifact` and `remote`
    /// name it in a load error).
    pub(crate) fn defer_load(&mut self, load: LoadKernel, artifact: &Path, remote: &str) {
        self.pending.load = Some((load, artifact.to_path_buf(), remote.to_owned()));
    }

    /// Queues allocating `alloc` for the next call, after any queued load.
    pub(crate) fn defer_alloc(&mut self, alloc: AllocArgs) {
        self.pending.alloc = Some(alloc);
    }

    /// Runs now the steps the default [`load_module`](super::Pipeline::load_module)
    /// and [`alloc_argument`](super::Pipeline::alloc_argument) stages
    /// deferred (they only queue their tasks, so that the default
    /// [`run_evaluator`](super::Pipeline::run_evaluator) sends load,
    /// allocation, timing and read-back as one call). [`call`](Self::call)
    /// does this first; call it yourself before using
    /// [`session`](Self::session) for calls of your own. Nothing to do
    /// returns at once.
    ///
    /// # Errors
    ///
    /// A deferred step's, as its stage would have returned it (a load
    /// error names the artifact).
    ///
    /// # Cancel safety
    ///
    /// As [`call`](Self::call).
    pub async fn flush(&mut self) -> Result<(), RunError> {
        if self.pending.load.is_none() && self.pending.alloc.is_none() {
            return Ok(());
        }
        self.run_steps(None, Vec::new()).await.map(drop)
    }

    /// The worker's own times of the load and alloc steps of the last
    /// fused call, once.
    pub(crate) fn take_step_times(&mut self) -> Option<(Duration, Duration)> {
        self.pending.times.take()
    }

    /// The default evaluator stage: the deferred steps, timing and the
    /// read-back in one call where the worker allows.
    pub(crate) async fn measure(
        &mut self,
        ctx: &StageContext,
        input: &RunnerInput,
    ) -> Result<Measurement, RunError> {
        let mut reads = Vec::with_capacity(input.read_args.len());
        for &index in &input.read_args {
            let Some(info) = usize::try_from(index).ok().and_then(|i| input.args_info.get(i))
            else {
                return Err(RunError::Other { message: format!("no argument {index}") });
            };
            reads.push((index, info.clone()));
        }
        // A prefix of the reads rides along; the rest are read one by one.
        let mut budget = MAX_FUSED_READ;
        let fused = reads
            .iter()
            .take_while(|(_, info)| match budget.checked_sub(info.nbytes()) {
                Some(left) => {
                    budget = left;
                    true
                }
                None => false,
            })
            .count();
        let asked = reads[..fused].iter().map(|&(index, _)| ReadArg { set: 0, index }).collect();
        let time = TimeKernel { config: ctx.evaluator.clone() };
        let out = self.run_steps(Some(time), asked).await?;
        let Some(timing) = out.timing else {
            return Err(RunError::Other { message: "the worker returned no timing".into() });
        };
        let mut outputs = Vec::with_capacity(reads.len());
        for ((index, info), bytes) in reads.iter().zip(out.outputs) {
            outputs.push(Output::new(*index, info.clone(), bytes.into_vec()));
        }
        for (index, info) in reads.into_iter().skip(outputs.len()) {
            let bytes = self.call_now(ReadArg { set: 0, index }).await?;
            outputs.push(Output::new(index, info, bytes.into_vec()));
        }
        Ok(Measurement::from_timing(timing, &ctx.evaluator).with_outputs(outputs))
    }

    /// Sends the deferred steps, then `time` and `read`, as one
    /// `MeasureKernel`, or one by one to a worker that does not know it.
    async fn run_steps(
        &mut self,
        time: Option<TimeKernel>,
        read: Vec<ReadArg>,
    ) -> Result<MeasuredKernel, RunError> {
        let load = self.pending.load.take();
        let name = load.as_ref().map(|(_, artifact, remote)| (artifact.clone(), remote.clone()));
        let task = MeasureKernel {
            load: load.map(|(l, ..)| l),
            alloc: self.pending.alloc.take(),
            time,
            read,
        };
        let named = |e: RunError| match &name {
            Some((artifact, remote)) => e.naming_artifact(artifact, remote),
            None => e,
        };
        if !self.pending.unfused && !matches!(self.inner, Device::Tvm(_)) {
            match self.call_now(task.clone()).await {
                Err(e) if unknown_task(&e) => self.pending.unfused = true,
                Err(e) => return Err(named(e)),
                Ok(out) => {
                    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
                    self.pending.times = Some((secs(out.load_s), secs(out.alloc_s)));
                    return Ok(out);
                }
            }
        }
        let mut out = MeasuredKernel::default();
        if let Some(load) = task.load {
            let t = Instant::now();
            self.call_now(load).await.map_err(named)?;
            out.load_s = t.elapsed().as_secs_f64();
        }
        if let Some(alloc) = task.alloc {
            let t = Instant::now();
            self.call_now(alloc).await?;
            out.alloc_s = t.elapsed().as_secs_f64();
        }
        if let Some(time) = task.time {
            out.timing = Some(self.call_now(time).await?);
        }
        for read in task.read {
            out.outputs.push(self.call_now(read).await?);
        }
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
        self.pending.times = Some((secs(out.load_s), secs(out.alloc_s)));
        Ok(out)
    }
}

/// The worker does not know `MeasureKernel` (nothing ran).
fn unknown_task(e: &RunError) -> bool {
    let pool = match e {
        RunError::Worker { source } => source.get(),
        _ => None,
    };
    matches!(pool, Some(PoolError::UnknownTask { name, .. }) if name == MeasureKernel::NAME)
}
