//! Several kernels in one worker, timed interleaved: [`AddCandidate`],
//! [`TimeCandidates`], [`ReadCandidateArg`].

use super::buffers::ArgSet;
use super::timing::time_subjects;
use super::*;

/// The candidates added to this worker, in order.
#[derive(Default)]
pub(super) struct Candidates {
    pub(super) list: Vec<(LoadedKernel, ArgSets)>,
}

/// Most candidates one worker holds (each keeps a library and its buffers).
pub const MAX_CANDIDATES: usize = 4096;

/// Loads a kernel and allocates its argument sets as the next candidate of
/// this worker (task `rpc_runner.add_candidate`); returns its index.
///
/// The same loading and allocation as [`LoadKernel`] + [`AllocArgs`], kept
/// apart from them (a worker may hold both a single kernel and candidates).
/// A failed load or allocation adds nothing.
///
/// # Errors
///
/// As [`LoadKernel`] and [`AllocArgs`]; [`failure_kind::BAD_ARGS`] past
/// [`MAX_CANDIDATES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddCandidate {
    /// The kernel: its library and entry.
    pub kernel: LoadKernel,
    /// Its arguments (as [`AllocArgs`]: `alloc_repeat` sets, seeded).
    pub args: AllocArgs,
}

impl Task for AddCandidate {
    const NAME: &'static str = "rpc_runner.add_candidate";
    type Output = u32;
    fn run(self, ctx: &mut WorkerContext) -> Result<u32, TaskFailure> {
        let len = ctx.get::<Candidates>().map_or(0, |c| c.list.len());
        if len >= MAX_CANDIDATES {
            return Err(KernelError::BadArgs(format!(
                "this worker already holds {MAX_CANDIDATES} candidates"
            ))
            .into_failure());
        }
        let kernel = LoadedKernel::open(&self.kernel.path, &self.kernel.entry)
            .map_err(KernelError::into_failure)?;
        let sets = ArgSets::new(&self.args.args, self.args.alloc_repeat, self.args.seed)
            .map_err(KernelError::into_failure)?;
        if ctx.get::<Candidates>().is_none() {
            ctx.insert(Candidates::default());
        }
        let list = &mut ctx
            .get_mut::<Candidates>()
            .ok_or(KernelError::NoKernel)
            .map_err(KernelError::into_failure)?
            .list;
        list.push((kernel, sets));
        Ok(u32::try_from(len).unwrap_or(u32::MAX))
    }
}

/// One candidate's result of [`TimeCandidates`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CandidateTiming {
    /// Its costs, as if timed alone by [`TimeKernel`].
    Timed(Timing),
    /// Its kernel failed (the others were timed on).
    Failed {
        /// A [`failure_kind`].
        kind: String,
        /// What happened.
        message: String,
    },
}

/// Times every candidate of this worker interleaved (task
/// `rpc_runner.time_candidates`): one result per candidate, in order.
///
/// Each candidate is warmed up and calibrated on its own, then batches are
/// timed in rounds: every round times one batch of each unfinished
/// candidate, in an order shuffled by `order_seed` (a new order each
/// round), so drift (frequency, temperature, a neighbour) hits all of them
/// alike. Each candidate stops by the config's rule on its own costs (TVM's
/// `repeat` per argument set, or the adaptive rule); a candidate's sets are
/// used in turn. A kernel that returns nonzero is
/// [`CandidateTiming::Failed`] and the others go on; one that crashes
/// kills the worker and all the candidates with it.
///
/// # Errors
///
/// [`failure_kind::NO_KERNEL`] (no candidate added),
/// [`failure_kind::BAD_CONFIG`], [`failure_kind::TIMER_ERROR`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeCandidates {
    /// How to time.
    pub config: EvaluatorConfig,
    /// Seed of the round orders.
    pub order_seed: u64,
    /// Time only these candidates (by index; `None`: all). The result has
    /// one entry per timed candidate, in this order.
    pub only: Option<Vec<u32>>,
}

impl Task for TimeCandidates {
    const NAME: &'static str = "rpc_runner.time_candidates";
    type Output = Vec<CandidateTiming>;
    fn run(self, ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        let list = &mut ctx
            .get_mut::<Candidates>()
            .filter(|c| !c.list.is_empty())
            .ok_or(KernelError::NoKernel)
            .map_err(KernelError::into_failure)?
            .list;
        if let Some(only) = &self.only {
            if let Some(&bad) = only.iter().find(|&&c| c as usize >= list.len()) {
                let err =
                    KernelError::OutOfRange { what: "candidate", index: bad, len: list.len() };
                return Err(err.into_failure());
            }
        }
        let mut subjects: Vec<(EntryFn, &mut ArgSets)> = list
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| {
                self.only.as_ref().is_none_or(|only| only.iter().any(|&c| c as usize == *i))
            })
            .map(|(_, (k, sets))| (k.entry, sets))
            .collect();
        let (out, env) = time_subjects(&self.config, &mut subjects, self.order_seed)
            .map_err(KernelError::into_failure)?;
        Ok(out
            .into_iter()
            .map(|r| match r {
                Ok(o) => CandidateTiming::Timed(Timing::of(o, env.clone())),
                Err(e) => {
                    CandidateTiming::Failed { kind: e.kind().to_owned(), message: e.to_string() }
                }
            })
            .collect())
    }
}

/// Returns the bytes of one argument of one set of one candidate (task
/// `rpc_runner.read_candidate_arg`).
///
/// # Errors
///
/// [`failure_kind::NO_ARGS`] (no candidates), [`failure_kind::OUT_OF_RANGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadCandidateArg {
    /// The candidate, as [`AddCandidate`] returned it.
    pub candidate: u32,
    /// The argument set, `0..alloc_repeat`.
    pub set: u32,
    /// The argument.
    pub index: u32,
}

impl Task for ReadCandidateArg {
    const NAME: &'static str = "rpc_runner.read_candidate_arg";
    type Output = serde_bytes::ByteBuf;
    fn run(self, ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        let list = &ctx
            .get::<Candidates>()
            .ok_or(KernelError::NoArgs)
            .map_err(KernelError::into_failure)?
            .list;
        let (_, sets) = list.get(self.candidate as usize).ok_or_else(|| {
            KernelError::OutOfRange { what: "candidate", index: self.candidate, len: list.len() }
                .into_failure()
        })?;
        read_from(&sets.sets, self.set, self.index).map_err(KernelError::into_failure)
    }
}

/// Argument `index` of set `set`.
pub(super) fn read_from(
    sets: &[ArgSet],
    set: u32,
    index: u32,
) -> Result<serde_bytes::ByteBuf, KernelError> {
    let s = sets.get(set as usize).ok_or(KernelError::OutOfRange {
        what: "argument set",
        index: set,
        len: sets.len(),
    })?;
    let buf = s.bufs.get(index as usize).ok_or(KernelError::OutOfRange {
        what: "argument",
        index,
        len: s.bufs.len(),
    })?;
    Ok(serde_bytes::ByteBuf::from(buf.as_slice().to_vec()))
}
