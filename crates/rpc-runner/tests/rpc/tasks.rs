//! Task types the test binary's session workers serve (beside rpc-runner's own).

use std::time::Duration;

use popen_pool::{Registry, Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

/// Returns its bytes.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Echo(#[serde(with = "serde_bytes")] pub(crate) Vec<u8>);

impl Task for Echo {
    const NAME: &'static str = "test.echo";
    type Output = serde_bytes::ByteBuf;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        Ok(serde_bytes::ByteBuf::from(self.0))
    }
}

/// Sleeps, then returns the ms slept.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct SleepMs(pub(crate) u64);

impl Task for SleepMs {
    const NAME: &'static str = "test.sleep_ms";
    type Output = u64;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        std::thread::sleep(Duration::from_millis(self.0));
        Ok(self.0)
    }
}

/// Crashes the session's worker with SIGSEGV, as a bad kernel would.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Segfault;

impl Task for Segfault {
    const NAME: &'static str = "test.segfault";
    type Output = ();
    fn run(self, _ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        // SAFETY: deliberately unsound; the point is a SIGSEGV in the worker.
        unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u8>(), 1) };
        Ok(())
    }
}

/// Counts calls in the worker's context: proves state lives across calls.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Count;

impl Task for Count {
    const NAME: &'static str = "test.count";
    type Output = u64;
    fn run(self, ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        let n = ctx.get_or_default::<u64>();
        *n += 1;
        Ok(*n)
    }
}

/// Reads a file relative to the worker's cwd (the session dir).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct ReadFile(pub(crate) String);

impl Task for ReadFile {
    const NAME: &'static str = "test.read_file";
    type Output = serde_bytes::ByteBuf;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        Ok(serde_bytes::ByteBuf::from(std::fs::read(&self.0)?))
    }
}

/// Whether each path exists (a zombie's `/proc/PID` does: only a reaped
/// process is gone).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct PathsExist(pub(crate) Vec<String>);

impl Task for PathsExist {
    const NAME: &'static str = "test.paths_exist";
    type Output = Vec<bool>;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        Ok(self.0.iter().map(|p| std::path::Path::new(p).exists()).collect())
    }
}

/// A build task that "builds" by copying a prebuilt shared library to the
/// plan's artifact path (the source is ignored): proves `LocalBuilder` runs a
/// plugged-in task type.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct CopyPrebuilt {
    pub(crate) from: std::path::PathBuf,
    pub(crate) plan: rpc_runner::measure::BuildPlan,
}

impl Task for CopyPrebuilt {
    const NAME: &'static str = "test.copy_prebuilt";
    type Output = rpc_runner::measure::BuildTaskOutput;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        use rpc_runner::measure::{BuildFailure, BuildOutput};
        let started = std::time::Instant::now();
        Ok(match std::fs::copy(&self.from, &self.plan.artifact_path) {
            Ok(_) => Ok(BuildOutput::since(self.plan.artifact_path, started)),
            Err(e) => Err(BuildFailure::io(format_args!("cannot copy {}", self.from.display()), e)),
        })
    }
}

/// A build task that aborts its worker when the candidate's name starts with
/// `crash`, and compiles normally otherwise.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct CrashOrCompile(pub(crate) rpc_runner::measure::BuildPlan);

impl Task for CrashOrCompile {
    const NAME: &'static str = "test.crash_or_compile";
    type Output = rpc_runner::measure::BuildTaskOutput;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        if self.0.name.starts_with("crash") {
            std::process::abort();
        }
        Ok(self.0.compile())
    }
}

/// Returns `len` bytes, each `byte` (a large output from a small task).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Fill {
    pub(crate) len: usize,
    pub(crate) byte: u8,
}

impl Task for Fill {
    const NAME: &'static str = "test.fill";
    type Output = serde_bytes::ByteBuf;
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        Ok(serde_bytes::ByteBuf::from(vec![self.byte; self.len]))
    }
}

/// The worker's `Cpus_allowed_list` from `/proc/self/status`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct CpusAllowed;

impl Task for CpusAllowed {
    const NAME: &'static str = "test.cpus_allowed";
    type Output = String;
    fn run(self, _ctx: &mut WorkerContext) -> Result<String, TaskFailure> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap_or("");
        Ok(line.trim_start_matches("Cpus_allowed_list:").trim().to_owned())
    }
}

/// Touches `bytes` of memory and holds them for a moment.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Hog(pub(crate) usize);

impl Task for Hog {
    const NAME: &'static str = "test.hog";
    type Output = u64;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        let v = vec![1u8; self.0];
        std::thread::sleep(Duration::from_millis(300));
        Ok(v.iter().map(|&b| u64::from(b)).sum())
    }
}

/// Touches `bytes` of memory and keeps it in the worker until it exits
/// (whose exit then takes a while: it frees that memory).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct HoldMemory(pub(crate) usize);

impl Task for HoldMemory {
    const NAME: &'static str = "test.hold_memory";
    type Output = ();
    fn run(self, ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        ctx.get_or_default::<Vec<Vec<u8>>>().push(vec![1u8; self.0]);
        Ok(())
    }
}

/// rpc-runner's session tasks plus the test tasks.
pub(crate) fn registry() -> Registry {
    rpc_runner::tasks::registry()
        .register::<Echo>()
        .register::<SleepMs>()
        .register::<Segfault>()
        .register::<Count>()
        .register::<ReadFile>()
        .register::<PathsExist>()
        .register::<CopyPrebuilt>()
        .register::<CrashOrCompile>()
        .register::<Fill>()
        .register::<CpusAllowed>()
        .register::<Hog>()
        .register::<HoldMemory>()
}
