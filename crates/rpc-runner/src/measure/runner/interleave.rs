//! [`Runner::run_interleaved`](super::Runner::run_interleaved): a set of
//! inputs measured in one session, their batches interleaved.

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;

use super::RunStream;
use super::drive::{Core, bounded, join_error};
use super::pipeline::{DeviceSession, Pipeline, StageContext};
use super::result::{Measurement, Output, RunError, RunnerInput, RunnerResult, StageTimes};
use crate::measure::batch::Batch;
use crate::measure::kernel::{
    AddCandidate, AllocArgs, CandidateTiming, LoadKernel, ReadCandidateArg, TimeCandidates,
    failure_kind,
};

impl<P: Pipeline> Core<P> {
    /// One task measures every input in one session; each item of the
    /// stream waits for it.
    pub(crate) fn start_interleaved(
        self: &Arc<Self>,
        inputs: Vec<RunnerInput>,
        cancel: &CancellationToken,
    ) -> RunStream {
        let cancel = cancel.child_token();
        let n = inputs.len();
        if n == 0 {
            return Batch::new(Vec::new(), cancel);
        }
        let core = Arc::clone(self);
        let token = cancel.clone();
        let all = tokio::spawn(async move { measure_set(&core, inputs, token).await })
            .map(move |r| Arc::new(r.unwrap_or_else(|e| vec![Err(join_error(&e)); n])))
            .shared();
        let items = (0..n).map(|i| {
            let all = all.clone();
            async move { all.await.get(i).cloned().unwrap_or(Err(RunError::Cancelled)) }.boxed()
        });
        Batch::new(items.collect::<Vec<_>>(), cancel)
    }
}

/// Per input: its result once known, and its stage times.
struct SetState {
    results: Vec<Option<RunnerResult>>,
    times: Vec<StageTimes>,
    /// `(input, candidate index in the worker)` of the inputs added.
    added: Vec<(usize, u32)>,
}

async fn measure_set<P: Pipeline>(
    core: &Core<P>,
    inputs: Vec<RunnerInput>,
    cancel: CancellationToken,
) -> Vec<RunnerResult> {
    let (pipeline, ctx) = (&core.pipeline, &core.ctx);
    let n = inputs.len();
    let all = |e: RunError| (0..n).map(|_| Err(e.clone())).collect::<Vec<_>>();
    if matches!(ctx.rpc.backend, super::config::Backend::Tvm { .. }) {
        return all(RunError::Other {
            message:
                "interleaving needs our device server: TVM's RPC servers time one kernel at a time"
                    .into(),
        });
    }
    let _slot = tokio::select! {
        biased;
        () = cancel.cancelled() => return all(RunError::Cancelled),
        permit = core.slots.acquire() => match permit {
            Ok(p) => p,
            Err(_) => return all(RunError::Cancelled),
        },
    };
    let leasing = Instant::now();
    let lease_limit = ctx.rpc.lease_timeout;
    let mut dev = tokio::select! {
        biased;
        () = cancel.cancelled() => return all(RunError::Cancelled),
        r = bounded(lease_limit, pipeline.create_session(ctx)) => match r {
            Ok(Ok(dev)) => dev,
            Ok(Err(e)) => return all(e),
            Err(_) => return all(RunError::LeaseTimeout { limit: lease_limit.unwrap_or_default() }),
        },
    };
    let lease_wait = leasing.elapsed();
    let mut st = SetState {
        results: (0..n).map(|_| None).collect(),
        times: vec![StageTimes { lease_wait, ..StageTimes::default() }; n],
        added: Vec::new(),
    };
    let limit = ctx.rpc.session_timeout;
    let unresolved = {
        let stages = stages(ctx, &mut dev, &inputs, &mut st);
        tokio::select! {
            biased;
            () = cancel.cancelled() => Some(RunError::Cancelled),
            r = tokio::time::timeout(limit, stages) => r.err().map(|_| RunError::Timeout { limit }),
        }
    };
    let server = dev.server().to_owned();
    let t = Instant::now();
    pipeline.cleanup(ctx, dev).await;
    let cleanup = t.elapsed();
    let fallback = unresolved.unwrap_or(RunError::Other { message: "not measured".into() });
    st.results
        .into_iter()
        .zip(st.times)
        .map(|(r, times)| {
            r.unwrap_or_else(|| Err(fallback.clone())).map(|mut m| {
                m.server.clone_from(&server);
                m.stages = StageTimes { cleanup, ..times };
                m
            })
        })
        .collect()
}

/// Upload and add every input, time them all, read their outputs.
async fn stages(
    ctx: &StageContext,
    dev: &mut DeviceSession,
    inputs: &[RunnerInput],
    st: &mut SetState,
) {
    let mut remote = vec![String::new(); inputs.len()];
    for (i, input) in inputs.iter().enumerate() {
        let t = Instant::now();
        match dev.upload(&input.artifact_path, &format!("candidate-{i}.so")).await {
            Ok(path) => remote[i] = path,
            Err(e) => {
                st.results[i] = Some(Err(e));
                continue;
            }
        }
        st.times[i].upload = t.elapsed();
        let t = Instant::now();
        let crashed = add(ctx, dev, inputs, &remote, i, st).await;
        st.times[i].load = t.elapsed();
        if crashed {
            // The worker and the candidates in it are gone: add them again.
            readd(ctx, dev, inputs, &remote, st).await;
        }
    }
    if st.added.is_empty() {
        return;
    }
    let t = Instant::now();
    let config = ctx.evaluator.clone();
    let timed =
        dev.call(TimeCandidates { config: config.clone(), order_seed: ctx.seed, only: None }).await;
    match timed {
        Ok(timings) => {
            let added = std::mem::take(&mut st.added);
            for (&(i, c), timing) in added.iter().zip(timings) {
                let r = finish(ctx, dev, &inputs[i], c, timing, true).await;
                st.results[i] = Some(r);
            }
            st.added = added;
        }
        Err(RunError::KernelCrash { .. }) => {
            // Which one crashed is unknown: each again on its own.
            alone(ctx, dev, inputs, &remote, st).await;
        }
        Err(e) => {
            for &(i, _) in &st.added {
                st.results[i] = Some(Err(e.clone()));
            }
        }
    }
    let evaluate = t.elapsed();
    for &(i, _) in &st.added {
        st.times[i].evaluate = evaluate;
    }
}

/// Adds input `i` as a candidate; true if that crashed the worker.
async fn add(
    ctx: &StageContext,
    dev: &mut DeviceSession,
    inputs: &[RunnerInput],
    remote: &[String],
    i: usize,
    st: &mut SetState,
) -> bool {
    let task = AddCandidate {
        kernel: LoadKernel { path: remote[i].clone(), entry: ctx.entry.clone() },
        args: AllocArgs {
            args: inputs[i].args_info.clone(),
            alloc_repeat: ctx.alloc_repeat,
            seed: ctx.seed,
        },
    };
    match dev.call(task).await {
        Ok(c) => {
            st.added.push((i, c));
            false
        }
        Err(e) => {
            let crashed = matches!(e, RunError::KernelCrash { .. });
            st.results[i] = Some(Err(e.naming_artifact(&inputs[i].artifact_path, &remote[i])));
            crashed
        }
    }
}

/// Adds every input of `st.added` again (to a fresh worker).
async fn readd(
    ctx: &StageContext,
    dev: &mut DeviceSession,
    inputs: &[RunnerInput],
    remote: &[String],
    st: &mut SetState,
) {
    let again: Vec<usize> = st.added.drain(..).map(|(i, _)| i).collect();
    for i in again {
        // A kernel that loaded before loads again; a crash now is its own.
        add(ctx, dev, inputs, remote, i, st).await;
    }
}

/// After a crash while timing interleaved: every candidate timed on its
/// own, so the crash falls on the kernel that causes it.
async fn alone(
    ctx: &StageContext,
    dev: &mut DeviceSession,
    inputs: &[RunnerInput],
    remote: &[String],
    st: &mut SetState,
) {
    let mut pending: Vec<usize> = st.added.iter().map(|&(i, _)| i).collect();
    readd(ctx, dev, inputs, remote, st).await;
    let config = ctx.evaluator.clone();
    while let Some(i) = pending.first().copied() {
        pending.remove(0);
        let Some(&(_, c)) = st.added.iter().find(|&&(j, _)| j == i) else { continue };
        let only = Some(vec![c]);
        match dev.call(TimeCandidates { config: config.clone(), order_seed: ctx.seed, only }).await
        {
            Ok(mut timings) => {
                let Some(timing) = timings.pop() else { continue };
                let r = finish(ctx, dev, &inputs[i], c, timing, false).await;
                st.results[i] = Some(r);
            }
            Err(e) => {
                let crashed = matches!(e, RunError::KernelCrash { .. });
                st.results[i] = Some(Err(e));
                if crashed {
                    st.added.retain(|&(j, _)| pending.contains(&j));
                    readd(ctx, dev, inputs, remote, st).await;
                }
            }
        }
    }
}

/// A candidate's measurement: its timing and the outputs it asked for.
async fn finish(
    ctx: &StageContext,
    dev: &mut DeviceSession,
    input: &RunnerInput,
    candidate: u32,
    timing: CandidateTiming,
    interleaved: bool,
) -> RunnerResult {
    let timing = match timing {
        CandidateTiming::Timed(t) => t,
        CandidateTiming::Failed { kind, message } if kind == failure_kind::KERNEL_ERROR => {
            return Err(RunError::KernelError { message });
        }
        CandidateTiming::Failed { kind, message } => {
            return Err(RunError::Other { message: format!("{kind}: {message}") });
        }
    };
    let mut outputs = Vec::with_capacity(input.read_args.len());
    for &index in &input.read_args {
        let bytes = dev.call(ReadCandidateArg { candidate, set: 0, index }).await?;
        let Some(info) = usize::try_from(index).ok().and_then(|i| input.args_info.get(i)) else {
            return Err(RunError::Other { message: format!("no argument {index}") });
        };
        outputs.push(Output::new(index, info.clone(), bytes.into_vec()));
    }
    let mut m = Measurement::from_timing(timing, &ctx.evaluator).with_outputs(outputs);
    m.interleaved = interleaved;
    if !interleaved {
        m.env
            .warnings
            .push("timed on its own: another candidate crashed the interleaved worker".into());
    }
    Ok(m)
}
