//! A dedicated worker binary: its `main` only serves task types.
//!
//! Parents start it with `WorkerProgram::binary(path)`; run by hand it explains
//! that it must be started by a popen-pool parent and exits with code 2. The
//! task types here are what the parent serializes: in a real project they
//! live in a crate shared by the parent and the worker.

use popen_pool::{Registry, Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

/// Squares a number.
#[derive(Serialize, Deserialize)]
struct Square(u64);

impl Task for Square {
    const NAME: &'static str = "square";
    type Output = u64;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        self.0
            .checked_mul(self.0)
            .ok_or_else(|| TaskFailure::new("overflow", "square overflows u64"))
    }
}

/// Names the program that serves it.
#[derive(Serialize, Deserialize)]
struct WhoAmI;

impl Task for WhoAmI {
    const NAME: &'static str = "whoami";
    type Output = String;
    fn run(self, _ctx: &mut WorkerContext) -> Result<String, TaskFailure> {
        let exe = std::env::current_exe()?;
        Ok(exe.file_name().unwrap_or_default().to_string_lossy().into_owned())
    }
}

/// Where the worker runs: its directory, parent pid, process group and the
/// value of one environment variable (for the zygote tests).
#[derive(Serialize, Deserialize)]
struct WhereAmI(String);

impl Task for WhereAmI {
    const NAME: &'static str = "whereami";
    type Output = (String, u32, u32, Option<String>);
    fn run(self, _ctx: &mut WorkerContext) -> Result<Self::Output, TaskFailure> {
        let dir = std::env::current_dir()?.display().to_string();
        Ok((dir, std::os::unix::process::parent_id(), process_group(), std::env::var(&self.0).ok()))
    }
}

fn process_group() -> u32 {
    // SAFETY: getpgrp has no preconditions.
    (unsafe { libc::getpgrp() }) as u32
}

/// Dies of SIGABRT.
#[derive(Serialize, Deserialize)]
struct Abort;

impl Task for Abort {
    const NAME: &'static str = "abort";
    type Output = ();
    fn run(self, _ctx: &mut WorkerContext) -> Result<(), TaskFailure> {
        std::process::abort()
    }
}

/// How many forks this process prepared for ([`prepare_fork`], which a
/// zygote runs before each fork): what a forked worker inherited.
static FORKS_PREPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn prepare_fork() {
    FORKS_PREPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if std::env::var_os("DEDICATED_WORKER_HOOK_PANICS").is_some() {
        panic!("a failing before-fork hook");
    }
}

/// The forks prepared before this worker was forked (0 in a spawned one).
#[derive(Serialize, Deserialize)]
struct ForksPrepared;

impl Task for ForksPrepared {
    const NAME: &'static str = "forks_prepared";
    type Output = u64;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u64, TaskFailure> {
        Ok(FORKS_PREPARED.load(std::sync::atomic::Ordering::Relaxed))
    }
}

fn main() {
    // For the zygote tests: a program that starts a thread before serving
    // (which a zygote must refuse to fork from).
    if std::env::var_os("DEDICATED_WORKER_THREAD_FIRST").is_some() {
        std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(3600)));
    }
    popen_pool::serve(
        Registry::new()
            .register::<Square>()
            .register::<WhoAmI>()
            .register::<WhereAmI>()
            .register::<Abort>()
            .register::<ForksPrepared>()
            .before_fork(prepare_fork),
    );
}
