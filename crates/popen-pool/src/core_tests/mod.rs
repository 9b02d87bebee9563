//! Unit tests of [`WorkerCore`] with a fake, in-memory worker: no processes.
//!
//! [`FakeLauncher`] starts [`FakeChild`]ren that greet with a `Hello` frame and
//! answer each `Run` according to the task's name (see [`FakeChild::answer`]).
//! One shared [`FakeLog`] holds the [`Script`] (how launches behave) and
//! records what the core did to each child, by pid (1001, 1002, ...).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use super::{CoreShared, Counters, PoolStats, WorkerCore};
use crate::child::{Child, Launcher};
use crate::codec::DEFAULT_MAX_FRAME;
use crate::config::WorkerOptions;
use crate::error::{ExitInfo, PoolError, TaskFailure};
use crate::protocol::{FromWorker, Outcome, PROTOCOL_VERSION, ToWorker};
use crate::task::{ErasedTask, Task, WorkerContext};

// ---------------------------------------------------------------------------
// Task types: the fake worker decides what to do from the task's name.

macro_rules! fake_tasks {
    ($($(#[$doc:meta])* $ty:ident($arg:ty) = $name:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Serialize, Deserialize)]
        struct $ty($arg);

        impl Task for $ty {
            const NAME: &'static str = $name;
            type Output = $arg;
            fn run(self, _ctx: &mut WorkerContext) -> Result<$arg, TaskFailure> {
                Ok(self.0)
            }
        }
    )*};
}

fake_tasks! {
    /// Answers `Ok` with its own payload.
    Echo(Vec<u8>) = "echo";
    /// Answers like `Echo`, after `.0` milliseconds.
    Slow(u64) = "slow";
    /// Never answers.
    Hang(()) = "hang";
    /// The worker closes its channel; it was killed by SIGSEGV.
    Die(()) = "die";
    /// Answers `Failed` of kind "custom".
    Fail(()) = "fail";
    /// Answers `Panicked`.
    Panic(()) = "panic";
    /// Answers with a frame that is not a `FromWorker`.
    Garbage(()) = "garbage";
    /// Answers `Done` for another task id.
    WrongId(()) = "wrong_id";
    /// The worker reports that its output exceeds the frame limit.
    TooBig(()) = "too_big";
    /// The worker sends a frame over the limit: `recv` fails.
    Oversized(()) = "oversized";
    /// Listed in the Hello, but the worker answers `UnknownTask`.
    Stale(()) = "stale";
    /// An initializer that succeeds.
    Init(()) = "init";
    /// An initializer that answers `Failed` of kind "init".
    InitFail(()) = "init_fail";
    /// Not listed in the Hello.
    Missing(()) = "missing";
}

/// The task names every fake worker announces in its Hello.
const KNOWN: &str =
    "echo slow hang die fail panic garbage wrong_id too_big oversized stale init init_fail";

fn known() -> Vec<String> {
    KNOWN.split(' ').map(String::from).collect()
}

/// Pids of the first, second and third child launched.
const P1: u32 = 1001;
const P2: u32 = 1002;
const P3: u32 = 1003;

fn erased<T: Task>(task: T) -> ErasedTask {
    ErasedTask::new(&task).expect("test tasks serialize")
}

fn frame(msg: &FromWorker<'_>) -> BytesMut {
    BytesMut::from(&postcard::to_stdvec(msg).expect("messages serialize")[..])
}

mod fake;
use fake::*;

mod initializer;
mod losing;
mod pipelined;
mod recycling;
mod regressions;
mod results;
mod starting;
mod stopping;

// ---------------------------------------------------------------------------
// Harness.

struct Harness {
    core: WorkerCore<FakeLauncher>,
    log: Arc<Mutex<FakeLog>>,
    counters: Arc<Counters>,
}

impl Harness {
    fn new(opts: WorkerOptions) -> Self {
        let script = Script { max_frame: opts.max_frame_bytes, ..Script::default() };
        let log = Arc::new(Mutex::new(FakeLog { script, ..FakeLog::default() }));
        let counters = Arc::new(Counters::default());
        let launcher = FakeLauncher { log: Arc::clone(&log) };
        let shared = Arc::new(CoreShared::new(launcher, Arc::new(opts), Arc::clone(&counters)));
        Harness { core: WorkerCore::new(shared), log, counters }
    }

    fn scripted(opts: WorkerOptions, edit: impl FnOnce(&mut Script)) -> Self {
        let h = Harness::new(opts);
        edit(&mut h.log().script);
        h
    }

    fn log(&self) -> MutexGuard<'_, FakeLog> {
        lock(&self.log)
    }

    fn stats(&self) -> PoolStats {
        self.counters.snapshot()
    }

    /// Runs a task with no limit and no cancellation.
    async fn run(&mut self, task: &ErasedTask) -> Result<Bytes, PoolError> {
        within(self.core.run(task, None, None)).await
    }

    /// Runs a task expected to fail and returns its error.
    async fn run_err(&mut self, task: &ErasedTask) -> PoolError {
        self.run(task).await.expect_err("the task should fail")
    }
}

fn options(warm_spare: bool) -> WorkerOptions {
    WorkerOptions { warm_spare, ..WorkerOptions::default() }
}

/// Fails (rather than hangs) if the core never finishes: with the clock
/// paused, an hour of virtual time passes at once.
async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), fut).await.expect("the core hung")
}

/// Lets spawned background work (spare starts, retiring shutdowns) run.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[track_caller]
fn assert_spawn_error(err: &PoolError, needles: &[&str]) {
    let PoolError::Spawn { message } = err else { panic!("expected a Spawn error, got {err:?}") };
    for needle in needles {
        assert!(message.contains(needle), "{message:?} does not mention {needle:?}");
    }
}
