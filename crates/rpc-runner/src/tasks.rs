//! The registry of task types every `rpc-runner` session worker serves.
//!
//! A device server runs each session's work in a worker process; the
//! `rpc-runner` binary re-executes itself as that worker and serves
//! [`registry`]. Programs that embed a server extend it with their own task
//! types (`registry().register::<MyTask>()`) and call
//! `popen_pool::serve_if_worker` with it at the top of `main`.

use popen_pool::{Registry, Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

/// Diagnostics: where and as whom the session's worker runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WorkerInfo;

/// What [`WorkerInfo`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfoOutput {
    /// The worker's pid.
    pub pid: u32,
    /// The worker's working directory: the session's temp dir.
    pub cwd: String,
    /// Tasks run by this worker process before this one.
    pub tasks_run: u64,
}

impl Task for WorkerInfo {
    const NAME: &'static str = "rpc_runner.worker_info";
    type Output = WorkerInfoOutput;
    fn run(self, ctx: &mut WorkerContext) -> Result<WorkerInfoOutput, TaskFailure> {
        Ok(WorkerInfoOutput {
            pid: std::process::id(),
            cwd: std::env::current_dir()?.display().to_string(),
            tasks_run: ctx.tasks_run(),
        })
    }
}

/// The task types of an `rpc-runner` session worker, plus the default build
/// task [`CompileC`](crate::measure::CompileC) so that a program serving this
/// registry can also run a [`LocalBuilder`](crate::measure::LocalBuilder).
/// Its `before_fork` hook refreshes, in a zygote, the machine facts a
/// measurement records (online CPUs, governors, turbo; at most once a
/// second), so forked session workers do not read them on the critical
/// path of their first measurement.
pub fn registry() -> Registry {
    Registry::new()
        .before_fork(crate::measure::warm_for_fork)
        .register::<WorkerInfo>()
        .register::<crate::measure::CompileC>()
        .register::<crate::measure::LoadKernel>()
        .register::<crate::measure::AllocArgs>()
        .register::<crate::measure::TimeKernel>()
        .register::<crate::measure::ReadArg>()
        .register::<crate::measure::MeasureKernel>()
        .register::<crate::measure::AddCandidate>()
        .register::<crate::measure::TimeCandidates>()
        .register::<crate::measure::ReadCandidateArg>()
}
