//! A tokio process-pool executor: tasks run in isolated worker processes with
//! hard timeouts, crash detection and recycling.
//!
//! The Rust counterpart of Apache TVM's `PopenWorker` / `PopenPoolExecutor`:
//!
//! - A [`Task`] is a serde type with a unique name, an output type and a `run`
//!   that executes in the worker. A worker program serves a [`Registry`] of
//!   task types; code reaches the worker by name, never as a closure.
//! - [`PopenWorker`] drives one worker process, one task at a time;
//!   [`PopenPool`] runs `max_workers` of them behind a queue, sending a
//!   worker a few short tasks ahead of the one it runs (each task's deadline
//!   still starts when it starts; see docs/popen-pool.md, "Dispatch").
//! - The parent owns every deadline. On expiry it kills the worker and every
//!   process of its task (its cgroup, or its process tree and group; see
//!   [`Containment`]), reaps it, fails that task with [`PoolError::Timeout`]
//!   and starts a replacement.
//! - Each outcome is precise: a value, [`PoolError::Task`] (an error or a caught
//!   panic; the worker keeps serving), [`PoolError::WorkerDied`] (exit code or
//!   signal), timeout, cancelled, shut down, spawn failed, protocol error.
//!
//! # Worker programs
//!
//! A worker process runs [`serve`] on a registry. Three ways to provide one:
//!
//! 1. The current executable, re-executed: call [`serve_if_worker`] first thing
//!    in `main` and use [`WorkerProgram::current_exe`].
//! 2. A dedicated binary whose `main` calls [`serve`]: [`WorkerProgram::binary`].
//! 3. In a test suite, [`test_support!`] adds a hidden test that serves the
//!    registry when the test binary is re-run as a worker, and a
//!    `test_worker_program()` function that re-runs it:
//!
//! ```no_run
//! use popen_pool::{PopenPool, Registry, Task, TaskFailure, WorkerContext};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add(i64, i64);
//!
//! impl Task for Add {
//!     const NAME: &'static str = "add";
//!     type Output = i64;
//!     fn run(self, _ctx: &mut WorkerContext) -> Result<i64, TaskFailure> {
//!         Ok(self.0 + self.1)
//!     }
//! }
//!
//! popen_pool::test_support!(Registry::new().register::<Add>());
//!
//! #[tokio::test]
//! async fn adds_in_a_worker() {
//!     let pool = PopenPool::builder(test_worker_program()).max_workers(2).build().unwrap();
//!     assert_eq!(pool.submit(Add(2, 3)).await.unwrap(), 5);
//!     pool.shutdown().await;
//! }
//! # fn main() {}
//! ```
//!
//! # Process hygiene
//!
//! Every worker leads its own process group, is a child subreaper, and (on
//! Linux with a writable cgroup2 hierarchy) runs in a cgroup of its own that
//! is killed as a whole; see [`Containment`] and [`PopenPool::containment`].
//! It talks over a private socketpair (fd 3 at exec, moved to a higher
//! close-on-exec fd at once, so neither a task printing to stdout nor one
//! writing to fd 3 can corrupt frames). A guard thread in the worker watches
//! the parent through a pidfd: a killed parent leaves neither workers nor
//! their tasks' processes behind. Workers are reaped; nothing is left as a
//! zombie, and no fd is leaked into workers or left open. docs/popen-pool.md
//! states exactly what is guaranteed with and without cgroups.
//!
//! # Layout
//!
//! - `task.rs`: [`Task`], [`WorkerContext`], [`Registry`], [`ErasedTask`].
//! - `config.rs`: [`WorkerProgram`], [`OutputMode`], shared builder options;
//!   `controls.rs`: process controls the worker applies to itself (affinity,
//!   nice, rlimits).
//! - `protocol.rs` and `codec.rs`: messages and length-delimited postcard frames.
//! - `serve.rs`: the worker-side loop ([`serve`], [`serve_if_worker`]).
//! - `child.rs`: the child-process trait and the real process; `unix.rs`:
//!   process groups, subreaper, pidfds, group and tree kills; `cgroup.rs`:
//!   per-worker cgroups ([`Containment`]); `spawner.rs`: the spawner thread.
//! - `sererr.rs`: keeps the text of custom serializer errors.
//! - `core.rs`: the per-worker state machine (deadline, crash, memory
//!   ceiling, recycle, spare), unit-tested in `core_tests/` with the fake
//!   child of `core_tests/fake.rs`, one file per section; `stats.rs`: its
//!   counters and [`PoolStats`].
//! - `worker.rs`: [`PopenWorker`]; `pool.rs`: [`PopenPool`], [`TaskHandle`].
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod cgroup;
mod child;
mod clone3;
mod codec;
mod config;
mod controls;
mod core;
mod error;
mod launch;
mod pool;
mod process;
mod protocol;
mod queue;
mod sererr;
mod serve;
mod serve_loop;
mod spawner;
mod startup;
mod stats;
mod task;
mod unix;
mod worker;
mod zygote;

pub use cgroup::Containment;
pub use codec::DEFAULT_MAX_FRAME;
pub use config::{OutputMode, WorkerProgram};
pub use core::PoolStats;
pub use error::{ExitInfo, PoolError, TaskFailure, error_chain};
pub use pool::{PoolBuilder, PopenPool, TaskHandle};
pub use serve::{is_worker, serve, serve_if_worker};
pub use task::{ErasedTask, Registry, Task, WorkerContext};
pub use worker::{PopenWorker, WorkerBuilder};
pub use zygote::Zygote;

/// Serves a registry from the current test binary, for `#[test]` and
/// `#[tokio::test]` suites.
///
/// Expands, in the module where it is invoked, to:
/// - a `#[test] fn __popen_pool_worker_entry()` that serves `$registry` when
///   this test binary was re-run as a worker (and does nothing otherwise);
/// - `fn test_worker_program() -> WorkerProgram`, which re-runs the current
///   test binary filtered to exactly that test.
///
/// See the [crate docs](crate#worker-programs) for an example.
#[macro_export]
macro_rules! test_support {
    ($registry:expr) => {
        #[test]
        fn __popen_pool_worker_entry() {
            $crate::serve_if_worker($registry);
        }

        /// The current test binary, re-run as a popen-pool worker (its
        /// libtest banner hidden). Reachable from every module of the test
        /// crate (`crate::test_worker_program()` where invoked at the root).
        #[allow(dead_code)]
        pub(crate) fn test_worker_program() -> $crate::WorkerProgram {
            $crate::WorkerProgram::test_entry(module_path!(), "__popen_pool_worker_entry")
                .expect("the current test executable can be found")
        }
    };
}
