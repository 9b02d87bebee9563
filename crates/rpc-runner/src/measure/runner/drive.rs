//! Running inputs through a [`Pipeline`]: one measurement ([`measure`]) and
//! a batch of them on spawned tasks ([`Core::start`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::RunStream;
use super::pipeline::{Pipeline, StageContext};
use super::result::{RunError, RunnerInput, RunnerResult, StageTimes};
use crate::measure::batch::Batch;

/// What both runners share: the pipeline, its context, and the slots that
/// bound the measurements in flight.
#[derive(Debug)]
pub(crate) struct Core<P> {
    pub(crate) pipeline: P,
    pub(crate) ctx: StageContext,
    pub(crate) slots: Semaphore,
}

impl<P: Pipeline> Core<P> {
    /// Spawns one task per input; the batch cancels them when dropped.
    pub(crate) fn start(
        self: &Arc<Self>,
        inputs: Vec<RunnerInput>,
        cancel: &CancellationToken,
    ) -> RunStream {
        let cancel = cancel.child_token();
        let futures = inputs.into_iter().map(|input| {
            let core = Arc::clone(self);
            let token = cancel.clone();
            let handle = tokio::spawn(async move { measure(&core, input, token).await });
            handle.map(|r| r.unwrap_or_else(|e| Err(join_error(&e)))).boxed()
        });
        Batch::new(futures.collect::<Vec<_>>(), cancel)
    }
}

/// The error of a measurement task that did not finish: cancelled (the
/// runtime shut down) or a panicking stage.
pub(crate) fn join_error(e: &tokio::task::JoinError) -> RunError {
    if e.is_cancelled() {
        RunError::Cancelled
    } else {
        RunError::Other { message: format!("a pipeline stage panicked: {e}") }
    }
}

/// Awaits `fut`, bounded by `limit` when there is one.
pub(crate) async fn bounded<T>(
    limit: Option<Duration>,
    fut: impl Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, fut).await,
        None => Ok(fut.await),
    }
}

/// Measures one input: waits for a slot, leases a device (bounded by
/// `lease_timeout`), runs the stages (bounded by `session_timeout`) and
/// always runs `cleanup` once a device was leased.
async fn measure<P: Pipeline>(
    core: &Core<P>,
    input: RunnerInput,
    cancel: CancellationToken,
) -> RunnerResult {
    let (pipeline, ctx) = (&core.pipeline, &core.ctx);
    let _slot = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(RunError::Cancelled),
        permit = core.slots.acquire() => permit.map_err(|_| RunError::Cancelled)?,
    };
    let leasing = Instant::now();
    let ahead = super::deferred::read_ahead(ctx, &input.artifact_path);
    let lease_limit = ctx.rpc.lease_timeout;
    let mut dev = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(RunError::Cancelled),
        r = bounded(lease_limit, pipeline.create_session(ctx)) => match r {
            Ok(dev) => dev?,
            Err(_) => return Err(RunError::LeaseTimeout { limit: lease_limit.unwrap_or_default() }),
        },
    };
    dev.set_read_ahead(ahead);
    let mut times = StageTimes { lease_wait: leasing.elapsed(), ..StageTimes::default() };
    let limit = ctx.rpc.session_timeout;
    let result = {
        let stages = async {
            let t = Instant::now();
            let remote = pipeline.upload_module(ctx, &mut dev, &input).await?;
            times.upload = t.elapsed();
            let t = Instant::now();
            pipeline.load_module(ctx, &mut dev, &remote, &input).await?;
            times.load = t.elapsed();
            let t = Instant::now();
            pipeline.alloc_argument(ctx, &mut dev, &input).await?;
            times.alloc = t.elapsed();
            let t = Instant::now();
            let m = pipeline.run_evaluator(ctx, &mut dev, &input).await?;
            times.evaluate = t.elapsed();
            if let Some(steps) = dev.take_step_times() {
                // Deferred steps ran in the evaluator's call: the upload's
                // time until it was answered, the worker's own load and
                // alloc times; the rest stays with the evaluator.
                times.upload += steps.upload;
                times.load += steps.load;
                times.alloc += steps.alloc;
                let moved = steps.upload + steps.load + steps.alloc;
                times.evaluate = times.evaluate.saturating_sub(moved);
            }
            Ok(m)
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(RunError::Cancelled),
            r = tokio::time::timeout(limit, stages) => r.unwrap_or(Err(RunError::Timeout { limit })),
        }
    };
    let server = dev.server().to_owned();
    let t = Instant::now();
    pipeline.cleanup(ctx, dev).await;
    times.cleanup = t.elapsed();
    result.map(|mut m| {
        m.server = server;
        m.stages = times;
        m
    })
}
