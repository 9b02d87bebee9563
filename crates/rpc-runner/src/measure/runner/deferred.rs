//! Deferred steps: the default `upload_module`, `load_module` and
//! `alloc_argument` stages queue their work on the [`DeviceSession`], and
//! the next call sends it with the call: the upload right ahead of one
//! [`MeasureKernel`] with the load, allocation, timing and read-back: the
//! client waits for its server once for all five steps, not five times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use popen_pool::{PoolError, Task};

use super::config::Backend;
use super::pipeline::{Device, DeviceSession, StageContext};
use super::result::{Measurement, Output, RunError, RunnerInput};
use crate::measure::cause::Cause;
use crate::measure::kernel::{
    AllocArgs, LoadKernel, MeasureKernel, MeasuredKernel, ReadArg, TimeKernel,
};
use crate::session::{ReadAhead, Session, SessionError, UploadOrCall};

/// Most bytes of read-back arguments one fused call carries; the rest are
/// read with one call each (each bounded by the frame limit as before).
const MAX_FUSED_READ: usize = 1 << 20;

/// How long deferred steps took: the upload until the server answered it,
/// the load and the allocation in the worker.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StepTimes {
    pub(crate) upload: Duration,
    pub(crate) load: Duration,
    pub(crate) alloc: Duration,
}

/// The steps waiting for the next call, and what the last fused call said.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The artifact to upload and where (RPC sessions only).
    upload: Option<(PathBuf, String)>,
    /// The kernel to load, its artifact and where it was uploaded (for the
    /// error's name).
    load: Option<(LoadKernel, PathBuf, String)>,
    alloc: Option<AllocArgs>,
    /// The times of the steps the last call ran for earlier stages.
    times: Option<StepTimes>,
    /// The worker does not know `MeasureKernel` (another program's):
    /// steps are sent one by one.
    unfused: bool,
    /// The measurement's artifact, being read since before the lease (see
    /// [`read_ahead`]); the fused upload of that artifact sends it.
    ahead: Option<(PathBuf, ReadAhead)>,
}

/// Starts reading `artifact` on a blocking thread for a measurement on one
/// of our own RPC servers, whose default stages upload it right ahead of
/// the measurement's call: the read then overlaps the lease instead of
/// following it (~100 µs on the critical path here). `None` on a local
/// runner or TVM's servers, which do not upload it that way. The file is
/// read once, when the measurement starts; a read nobody uses finishes on
/// its own and is dropped.
pub(crate) fn read_ahead(ctx: &StageContext, artifact: &Path) -> Option<(PathBuf, ReadAhead)> {
    let ours = ctx.local.is_none() && !matches!(ctx.rpc.backend, Backend::Tvm { .. });
    ours.then(|| (artifact.to_path_buf(), crate::session::read_ahead(artifact)))
}

impl DeviceSession {
    /// Gives the session the read started by [`read_ahead`].
    pub(crate) fn set_read_ahead(&mut self, ahead: Option<(PathBuf, ReadAhead)>) {
        self.pending.ahead = ahead;
    }

    /// Makes the artifact available as `remote` (see
    /// [`upload`](DeviceSession::upload)); on an RPC session the upload is
    /// queued for the next call, which sends it right ahead of itself.
    pub(crate) async fn defer_upload(
        &mut self,
        artifact: &Path,
        remote: &str,
    ) -> Result<String, RunError> {
        if !matches!(self.inner, Device::Rpc(_)) {
            return self.upload(artifact, remote).await;
        }
        self.pending.upload = Some((artifact.to_path_buf(), remote.to_owned()));
        Ok(remote.to_owned())
    }

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
        let p = &self.pending;
        if p.upload.is_none() && p.load.is_none() && p.alloc.is_none() {
            return Ok(());
        }
        self.run_steps(None, Vec::new()).await.map(drop)
    }

    /// The times of the deferred steps the last call ran, once.
    pub(crate) fn take_step_times(&mut self) -> Option<StepTimes> {
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

    /// Sends the deferred steps, then `time` and `read`: the upload right
    /// ahead of one `MeasureKernel`, or one by one to a worker that does not
    /// know it.
    async fn run_steps(
        &mut self,
        time: Option<TimeKernel>,
        read: Vec<ReadArg>,
    ) -> Result<MeasuredKernel, RunError> {
        let mut upload = self.pending.upload.take();
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
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
        let mut times = StepTimes::default();
        let nothing_to_call = task.load.is_none()
            && task.alloc.is_none()
            && task.time.is_none()
            && task.read.is_empty();
        if nothing_to_call {
            if upload.is_some() {
                self.upload_now(upload, &mut times).await?;
                self.pending.times = Some(times);
            }
            return Ok(MeasuredKernel::default());
        }
        if !self.pending.unfused && !matches!(self.inner, Device::Tvm(_)) {
            let fused = match (upload.take(), &mut self.inner) {
                (Some((artifact, remote)), Device::Rpc(sess)) => {
                    let ahead =
                        self.pending.ahead.take().filter(|(p, _)| *p == artifact).map(|(_, r)| r);
                    let (up, out) =
                        upload_and_call(sess, (&artifact, ahead), &remote, &task, self.limit)
                            .await?;
                    times.upload = up;
                    out
                }
                (upload, _) => {
                    self.upload_now(upload, &mut times).await?;
                    self.call_now(task.clone()).await
                }
            };
            match fused {
                Err(e) if unknown_task(&e) => self.pending.unfused = true,
                Err(e) => return Err(named(e)),
                Ok(out) => {
                    (times.load, times.alloc) = (secs(out.load_s), secs(out.alloc_s));
                    self.pending.times = Some(times);
                    return Ok(out);
                }
            }
        }
        self.upload_now(upload, &mut times).await?;
        let mut out = MeasuredKernel::default();
        if let Some(load) = task.load {
            let t = Instant::now();
            self.call_now(load).await.map_err(named)?;
            times.load = t.elapsed();
        }
        if let Some(alloc) = task.alloc {
            let t = Instant::now();
            self.call_now(alloc).await?;
            times.alloc = t.elapsed();
        }
        if let Some(time) = task.time {
            out.timing = Some(self.call_now(time).await?);
        }
        for read in task.read {
            out.outputs.push(self.call_now(read).await?);
        }
        (out.load_s, out.alloc_s) = (times.load.as_secs_f64(), times.alloc.as_secs_f64());
        self.pending.times = Some(times);
        Ok(out)
    }

    /// Uploads a deferred artifact now, if there is one, noting how long it
    /// took in `times`.
    async fn upload_now(
        &mut self,
        upload: Option<(PathBuf, String)>,
        times: &mut StepTimes,
    ) -> Result<(), RunError> {
        if let Some((artifact, remote)) = upload {
            let t = Instant::now();
            self.upload(&artifact, &remote).await?;
            times.upload = t.elapsed();
        }
        Ok(())
    }
}

/// Uploads `artifact` and sends `task` right behind it; an upload error is
/// the upload stage's, the rest the call's (`Err` inside `Ok`, so a
/// worker without the task can be told).
async fn upload_and_call(
    sess: &mut Session,
    (artifact, ahead): (&Path, Option<ReadAhead>),
    remote: &str,
    task: &MeasureKernel,
    limit: Duration,
) -> Result<(Duration, Result<MeasuredKernel, RunError>), RunError> {
    let payload = postcard::to_stdvec(task)
        .map_err(|e| RunError::Other { message: format!("cannot encode the measurement: {e}") })?;
    let answer = sess
        .upload_and_call_raw(artifact, ahead, remote, MeasureKernel::NAME, &payload, None)
        .await;
    let (up, out) = match answer {
        Ok(ok) => ok,
        Err(UploadOrCall::Upload(e)) => {
            return Err(RunError::Upload {
                artifact: artifact.to_path_buf(),
                source: Cause::new(e),
            });
        }
        Err(UploadOrCall::Call(up, e)) => return Ok((up, Err(RunError::from_session(e, limit)))),
    };
    let decoded = postcard::from_bytes(&out).map_err(|e| {
        let message = format!("undecodable output of {}: {e}", MeasureKernel::NAME);
        RunError::from_session(SessionError::protocol(message), limit)
    });
    Ok((up, decoded))
}

/// The worker does not know `MeasureKernel` (nothing ran).
fn unknown_task(e: &RunError) -> bool {
    let pool = match e {
        RunError::Worker { source } => source.get(),
        _ => None,
    };
    matches!(pool, Some(PoolError::UnknownTask { name, .. }) if name == MeasureKernel::NAME)
}
