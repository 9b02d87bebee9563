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

// ---------------------------------------------------------------------------
// The script and the log, shared by the launcher, its children and the test.

/// How a fake worker opens the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeting {
    /// A correct Hello.
    Hello,
    /// A Hello with a protocol version the parent does not speak.
    WrongVersion,
    /// A `Done` frame instead of a Hello.
    NotHello,
    /// Closes its channel before saying anything, exiting with code 3.
    CloseFirst,
    /// Says nothing, ever.
    Silent,
}

/// How the next launches behave; tests may change it between calls.
#[derive(Debug)]
struct Script {
    greeting: Greeting,
    fail_launch: bool,
    launch_delay: Option<Duration>,
    rss: Option<u64>,
    /// `shutdown` waits out the whole grace period, then kills, like a worker
    /// slow to exit.
    stubborn_exit: bool,
    /// Largest frame `send` accepts (mirrors the real codec).
    max_frame: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: Greeting::Hello,
            fail_launch: false,
            launch_delay: None,
            rss: None,
            stubborn_exit: false,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

#[derive(Debug, Default)]
struct FakeLog {
    script: Script,
    /// Calls of `launch`, counted when they begin.
    launch_attempts: usize,
    /// Children launched, in order.
    pids: Vec<u32>,
    /// (pid, task name) of each `Run` a child accepted.
    sent: Vec<(u32, String)>,
    kills: Vec<u32>,
    reaps: Vec<u32>,
    /// Children asked to exit (`shutdown` called).
    shutdowns: Vec<u32>,
    /// Children that exited when asked (`shutdown` returned without a kill).
    exits: Vec<u32>,
    drops: Vec<u32>,
}

impl FakeLog {
    /// The task names child `pid` was sent, in order.
    fn sent_to(&self, pid: u32) -> Vec<&str> {
        self.sent.iter().filter(|(p, _)| *p == pid).map(|(_, n)| n.as_str()).collect()
    }

    /// Children neither killed, reaped, exited nor dropped.
    fn alive(&self) -> Vec<u32> {
        let ended = [&self.kills, &self.reaps, &self.exits, &self.drops];
        self.pids.iter().copied().filter(|p| !ended.iter().any(|e| e.contains(p))).collect()
    }
}

fn lock(log: &Mutex<FakeLog>) -> MutexGuard<'_, FakeLog> {
    // Never panic again in a Drop after a failed assertion.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// The fake child and launcher.

#[derive(Debug)]
enum Reply {
    Now(BytesMut),
    At(Instant, BytesMut),
    Error(PoolError),
    Close,
}

#[derive(Debug)]
struct FakeChild {
    pid: u32,
    log: Arc<Mutex<FakeLog>>,
    replies: VecDeque<Reply>,
    /// What `reap` reports once the channel closed.
    exit: ExitInfo,
}

impl FakeChild {
    /// Queues the worker's answer to task `id`.
    fn answer(&mut self, id: u64, name: &str, payload: &[u8]) {
        let done = |outcome| Reply::Now(frame(&FromWorker::Done { id, outcome }));
        let reply = match name {
            "echo" | "init" => done(Outcome::Ok(payload)),
            "slow" => {
                let ms: u64 = postcard::from_bytes(payload).expect("a Slow task");
                let at = Instant::now() + Duration::from_millis(ms);
                Reply::At(at, frame(&FromWorker::Done { id, outcome: Outcome::Ok(payload) }))
            }
            "hang" => return,
            "die" => {
                self.exit = ExitInfo::Signal(11);
                Reply::Close
            }
            "fail" | "init_fail" => done(Outcome::Failed {
                kind: if name == "fail" { "custom" } else { "init" }.into(),
                message: format!("{name} went wrong"),
            }),
            "panic" => done(Outcome::Panicked { message: "boom".into() }),
            "garbage" => Reply::Now(BytesMut::from(&[0xff, 0xff, 0xff][..])),
            "too_big" => done(Outcome::TooLarge { len: 1 << 30, max: 1 << 28 }),
            "oversized" => Reply::Error(PoolError::FrameTooLarge { len: 1 << 30, max: 1 << 28 }),
            "wrong_id" => Reply::Now(frame(&FromWorker::Done {
                id: id + 1000,
                outcome: Outcome::Ok(payload),
            })),
            other => done(Outcome::UnknownTask { name: other.into() }),
        };
        self.replies.push_back(reply);
    }
}

impl Child for FakeChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn send(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError> {
        let max = lock(&self.log).script.max_frame;
        let len = postcard::to_stdvec(msg).expect("messages serialize").len();
        if len > max {
            return Err(PoolError::FrameTooLarge { len, max });
        }
        if let ToWorker::Run { id, name, payload } = *msg {
            lock(&self.log).sent.push((self.pid, name.to_owned()));
            self.answer(id, name, payload);
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<BytesMut>, PoolError> {
        let Some(next) = self.replies.front() else {
            return std::future::pending().await;
        };
        if let Reply::At(at, _) = next {
            // Cancel-safe: the reply stays queued until its time has come.
            tokio::time::sleep_until(*at).await;
        }
        match self.replies.pop_front().expect("a reply is queued") {
            Reply::Now(bytes) | Reply::At(_, bytes) => Ok(Some(bytes)),
            Reply::Error(e) => Err(e),
            Reply::Close => Ok(None),
        }
    }

    async fn kill(&mut self) -> ExitInfo {
        lock(&self.log).kills.push(self.pid);
        self.replies.clear();
        ExitInfo::Signal(9)
    }

    async fn reap(&mut self) -> ExitInfo {
        lock(&self.log).reaps.push(self.pid);
        self.exit
    }

    async fn shutdown(&mut self, grace: Duration) -> ExitInfo {
        let stubborn = {
            let mut log = lock(&self.log);
            log.shutdowns.push(self.pid);
            log.script.stubborn_exit
        };
        if stubborn {
            sleep(grace).await;
            lock(&self.log).kills.push(self.pid);
            return ExitInfo::Signal(9);
        }
        lock(&self.log).exits.push(self.pid);
        ExitInfo::Code(0)
    }

    fn rss_bytes(&self) -> Option<u64> {
        lock(&self.log).script.rss
    }
}

impl Drop for FakeChild {
    fn drop(&mut self) {
        lock(&self.log).drops.push(self.pid);
    }
}

#[derive(Debug)]
struct FakeLauncher {
    log: Arc<Mutex<FakeLog>>,
}

impl Launcher for FakeLauncher {
    type Child = FakeChild;

    async fn launch(&self) -> Result<FakeChild, PoolError> {
        let delay = {
            let mut log = lock(&self.log);
            log.launch_attempts += 1;
            log.script.launch_delay
        };
        if let Some(delay) = delay {
            sleep(delay).await;
        }
        let mut log = lock(&self.log);
        if log.script.fail_launch {
            return Err(PoolError::spawn("fake: cannot start /bin/worker"));
        }
        let pid = P1 + log.pids.len() as u32;
        log.pids.push(pid);
        let hello = |version| FromWorker::Hello { version, pid, tasks: known() };
        let (first, exit) = match log.script.greeting {
            Greeting::Hello => (Some(Reply::Now(frame(&hello(PROTOCOL_VERSION)))), None),
            Greeting::WrongVersion => (Some(Reply::Now(frame(&hello(99)))), None),
            Greeting::NotHello => {
                let done = FromWorker::Done { id: 0, outcome: Outcome::Ok(b"") };
                (Some(Reply::Now(frame(&done))), None)
            }
            Greeting::CloseFirst => (Some(Reply::Close), Some(ExitInfo::Code(3))),
            Greeting::Silent => (None, None),
        };
        Ok(FakeChild {
            pid,
            log: Arc::clone(&self.log),
            replies: first.into_iter().collect(),
            exit: exit.unwrap_or(ExitInfo::Code(0)),
        })
    }
}

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

// ---------------------------------------------------------------------------
// Results.

#[tokio::test(start_paused = true)]
async fn success_returns_the_payload_and_reuses_the_child() {
    let mut h = Harness::new(options(true));
    for i in 0..3u8 {
        let task = erased(Echo(vec![i; 5]));
        let out = h.run(&task).await.expect("echo succeeds");
        assert_eq!(out, task.payload);
        assert_eq!(postcard::from_bytes::<Vec<u8>>(&out).unwrap(), vec![i; 5]);
    }
    let stats = h.stats();
    assert_eq!((stats.completed, stats.spawned, stats.failed), (3, 1, 0));
    assert_eq!(h.core.pid(), Some(P1));
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (1, &[P1][..]));
    assert_eq!(log.sent_to(P1), ["echo"; 3]);
    assert_eq!(log.alive(), [P1]);
}

#[tokio::test(start_paused = true)]
async fn task_error_and_panic_keep_the_child() {
    let mut h = Harness::new(options(true));
    let err = h.run_err(&erased(Fail(()))).await;
    assert_eq!(err, PoolError::Task { kind: "custom".into(), message: "fail went wrong".into() });
    let err = h.run_err(&erased(Panic(()))).await;
    assert_eq!(err, PoolError::Task { kind: "panic".into(), message: "boom".into() });
    h.run(&erased(Echo(vec![1]))).await.expect("the same child still serves");

    let stats = h.stats();
    assert_eq!((stats.failed, stats.completed, stats.crashes), (2, 1, 0));
    let log = h.log();
    assert_eq!(log.pids, [P1]);
    assert_eq!(log.sent_to(P1), ["fail", "panic", "echo"]);
    assert!(log.kills.is_empty());
}

#[tokio::test(start_paused = true)]
async fn output_too_large_for_the_worker_keeps_the_child() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(TooBig(()))).await;
    assert_eq!(err, PoolError::FrameTooLarge { len: 1 << 30, max: 1 << 28 });
    assert_eq!(h.stats().failed, 1);
    assert_eq!(h.core.pid(), Some(P1));
    assert!(h.log().kills.is_empty());
}

#[tokio::test(start_paused = true)]
async fn unknown_task_is_refused_without_sending_and_keeps_the_child() {
    let mut h = Harness::new(options(true));
    let err = h.run_err(&erased(Missing(()))).await;
    assert_eq!(err, PoolError::UnknownTask { name: "missing".into(), known: known() });
    assert!(h.log().sent.is_empty(), "nothing reaches the worker");
    assert_eq!(h.core.pid(), Some(P1));

    // A worker that announced a task but does not serve it: same error, child kept.
    let err = h.run_err(&erased(Stale(()))).await;
    assert_eq!(err, PoolError::UnknownTask { name: "stale".into(), known: known() });
    h.run(&erased(Echo(vec![]))).await.expect("the same child still serves");
    let log = h.log();
    assert_eq!(log.pids, [P1]);
    assert_eq!(log.sent_to(P1), ["stale", "echo"]);
}

// ---------------------------------------------------------------------------
// Losing the child: timeout, crash, protocol errors, cancellation, drop.

#[tokio::test(start_paused = true)]
async fn timeout_kills_the_child_and_the_next_task_gets_a_new_one() {
    let mut h = Harness::new(options(false));
    let limit = ms(50);
    let start = Instant::now();
    let err = within(h.core.run(&erased(Hang(())), Some(limit), None)).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit });
    assert!((limit..limit + ms(2)).contains(&start.elapsed()), "{:?}", start.elapsed());
    assert_eq!(h.stats().timeouts, 1);
    assert_eq!(h.core.pid(), None);
    settle().await;
    {
        let log = h.log();
        assert_eq!(log.kills, [P1]);
        assert!(log.alive().is_empty());
        assert_eq!(log.pids, [P1], "no warm spare: nothing starts before the next task");
    }

    h.run(&erased(Echo(vec![7]))).await.expect("a fresh child serves");
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.log().sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn timeout_with_warm_spare_relaunches_right_after_the_kill() {
    let mut h = Harness::new(options(true));
    let limit = ms(50);
    let err = within(h.core.run(&erased(Hang(())), Some(limit), None)).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit });
    settle().await;
    assert_eq!(h.log().kills, [P1]);
    assert_eq!(h.log().pids, [P1, P2], "the replacement starts before the next task");

    h.run(&erased(Echo(vec![7]))).await.expect("the spare serves");
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (2, &[P1, P2][..]));
    assert_eq!(log.sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn crash_reports_the_signal_and_the_next_task_gets_a_new_child() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(Die(()))).await;
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Signal(11) });
    assert_eq!(h.stats().crashes, 1);
    assert_eq!(h.core.pid(), None);
    assert_eq!(h.log().reaps, [P1]);

    h.run(&erased(Echo(vec![]))).await.expect("a fresh child serves");
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.core.pid(), Some(P2));
}

#[tokio::test(start_paused = true)]
async fn protocol_errors_kill_the_child() {
    let mut h = Harness::new(options(false));
    let cases = [
        (erased(Garbage(())), "undecodable frame"),
        (erased(WrongId(())), "expected the result of task"),
    ];
    for (n, (task, needle)) in (1..).zip(cases) {
        let err = h.run_err(&task).await;
        let PoolError::Protocol { message } = &err else { panic!("{}: got {err:?}", task.name) };
        assert!(message.contains(needle), "{message:?}");
        assert_eq!(h.stats().crashes, n);
        assert_eq!(h.core.pid(), None);
    }
    let log = h.log();
    assert_eq!(log.kills, [P1, P2]);
    assert!(log.alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_running_task_kills_the_child() {
    let mut h = Harness::new(options(false));
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let hang = erased(Hang(()));
    let (res, ()) = tokio::join!(within(h.core.run(&hang, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert_eq!(start.elapsed(), ms(10));
    assert_eq!(h.stats().cancelled, 1);
    assert_eq!(h.core.pid(), None);
    assert_eq!(h.log().kills, [P1]);
}

#[tokio::test(start_paused = true)]
async fn cancelling_while_a_slow_launch_waits_returns_promptly() {
    let mut h =
        Harness::scripted(options(false), |s| s.launch_delay = Some(Duration::from_secs(10)));
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let echo = erased(Echo(vec![]));
    let (res, ()) = tokio::join!(within(h.core.run(&echo, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert_eq!(start.elapsed(), ms(10));
    assert_eq!(h.stats().cancelled, 1);
    assert!(h.log().sent.is_empty());

    // The launch kept going; the next task uses it rather than starting another.
    h.run(&echo).await.expect("the started child serves");
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.pids[..]), (1, &[P1][..]));
}

#[tokio::test(start_paused = true)]
async fn dropping_run_mid_task_leaves_no_child() {
    let mut h = Harness::new(options(false));
    let res = tokio::time::timeout(ms(10), h.core.run(&erased(Hang(())), None, None)).await;
    assert!(res.is_err(), "the hanging task was still running");
    {
        let log = h.log();
        assert_eq!(log.sent_to(P1), ["hang"]);
        assert_eq!(log.drops, [P1], "the child went down with the future");
        assert!(log.alive().is_empty());
    }
    assert_eq!(h.core.pid(), None);
    h.run(&erased(Echo(vec![]))).await.expect("a fresh child serves");
    assert_eq!(h.core.pid(), Some(P2));
}

// ---------------------------------------------------------------------------
// Recycling and warm spares.

#[tokio::test(start_paused = true)]
async fn maximum_process_uses_recycles_gracefully() {
    let mut h = Harness::new(WorkerOptions { maximum_process_uses: Some(2), ..options(false) });
    let echo = erased(Echo(vec![1]));
    h.run(&echo).await.unwrap();
    h.run(&echo).await.unwrap();
    assert_eq!(h.core.pid(), None, "retired after its second use");
    assert_eq!(h.stats().recycled, 1);
    settle().await;
    assert_eq!(h.log().shutdowns, [P1]);
    assert!(h.log().kills.is_empty(), "a graceful shutdown, not a kill");
    assert_eq!(h.log().pids, [P1]);

    h.run(&echo).await.unwrap();
    let log = h.log();
    assert_eq!(log.pids, [P1, P2]);
    assert_eq!((log.sent_to(P1).len(), log.sent_to(P2).len()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn warm_spare_starts_during_the_last_use() {
    let mut h = Harness::new(WorkerOptions { maximum_process_uses: Some(2), ..options(true) });
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().launch_attempts, 1, "no spare before the last use");

    let log = Arc::clone(&h.log);
    let peek = async move {
        sleep(ms(10)).await;
        lock(&log).pids.clone()
    };
    let slow = erased(Slow(100));
    let (res, during) = tokio::join!(within(h.core.run(&slow, None, None)), peek);
    res.expect("slow succeeds");
    assert_eq!(during, [P1, P2], "the spare started while the last use ran");
    assert_eq!(h.stats().recycled, 1);

    h.run(&erased(Echo(vec![]))).await.unwrap();
    let log = h.log();
    assert_eq!((log.launch_attempts, &log.shutdowns[..]), (2, &[P1][..]));
    assert_eq!(log.sent_to(P2), ["echo"]);
}

#[tokio::test(start_paused = true)]
async fn resident_memory_over_the_limit_recycles() {
    let mut h =
        Harness::scripted(WorkerOptions { max_rss_bytes: Some(1 << 20), ..options(false) }, |s| {
            s.rss = Some(1 << 21)
        });
    h.run(&erased(Echo(vec![]))).await.unwrap();
    assert_eq!((h.core.pid(), h.stats().recycled), (None, 1));
    settle().await;
    assert_eq!(h.log().shutdowns, [P1]);

    h.log().script.rss = Some(1 << 19);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    assert_eq!((h.core.pid(), h.stats().recycled), (Some(P2), 1));
}

// ---------------------------------------------------------------------------
// Initializer.

#[tokio::test(start_paused = true)]
async fn initializer_runs_once_per_child_and_is_not_a_use() {
    let opts = WorkerOptions {
        initializer: Some(ErasedTask::new(&Init(()))),
        maximum_process_uses: Some(2),
        ..options(false)
    };
    let mut h = Harness::new(opts);
    for _ in 0..3 {
        h.run(&erased(Echo(vec![]))).await.unwrap();
    }
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["init", "echo", "echo"]);
    assert_eq!(log.sent_to(P2), ["init", "echo"]);
    drop(log);
    assert_eq!(h.stats().completed, 3, "the initializer is not a completed task");
}

#[tokio::test(start_paused = true)]
async fn initializer_with_one_use_per_child_still_runs_each_task() {
    let opts = WorkerOptions {
        initializer: Some(ErasedTask::new(&Init(()))),
        maximum_process_uses: Some(1),
        ..options(true)
    };
    let mut h = Harness::new(opts);
    for _ in 0..3 {
        h.run(&erased(Echo(vec![]))).await.unwrap();
    }
    let log = h.log();
    for pid in [P1, P2, P3] {
        assert_eq!(log.sent_to(pid), ["init", "echo"], "child {pid}");
    }
}

#[tokio::test(start_paused = true)]
async fn failing_initializer_is_an_initializer_error() {
    let opts =
        WorkerOptions { initializer: Some(ErasedTask::new(&InitFail(()))), ..options(false) };
    let mut h = Harness::new(opts);
    let err = h.run_err(&erased(Echo(vec![]))).await;
    let source = PoolError::Task { kind: "init".into(), message: "init_fail went wrong".into() };
    assert_eq!(err, PoolError::Initializer { source: Box::new(source) });
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["init_fail"], "the task itself never ran");
    assert_eq!(log.kills, [P1]);
}

// ---------------------------------------------------------------------------
// Starting: handshake problems and oversized payloads.

#[tokio::test(start_paused = true)]
async fn handshake_problems_are_spawn_errors() {
    let speaks = format!("this parent speaks {PROTOCOL_VERSION}");
    let cases: [(Greeting, &[&str]); 3] = [
        (Greeting::WrongVersion, &["protocol version 99", &speaks]),
        (Greeting::NotHello, &["did not start with a handshake"]),
        (Greeting::CloseFirst, &["before its handshake", "exit code 3", "serve_if_worker"]),
    ];
    for (greeting, needles) in cases {
        let mut h = Harness::scripted(options(false), |s| s.greeting = greeting);
        let err = h.run_err(&erased(Echo(vec![]))).await;
        assert_spawn_error(&err, needles);
        assert_eq!(h.core.pid(), None, "{greeting:?}");
        let log = h.log();
        // A child that closed its channel is reaped; one that talked nonsense, killed.
        let ended = if greeting == Greeting::CloseFirst { &log.reaps } else { &log.kills };
        assert_eq!(ended, &[P1], "{greeting:?}");
        assert!(log.sent.is_empty(), "{greeting:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn launch_failure_is_a_spawn_error() {
    let mut h = Harness::scripted(options(false), |s| s.fail_launch = true);
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["fake: cannot start /bin/worker"]);
    assert!(h.log().pids.is_empty());

    // The next task tries again.
    h.log().script.fail_launch = false;
    h.run(&erased(Echo(vec![]))).await.expect("the second launch works");
    assert_eq!(h.log().launch_attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn start_timeout_is_a_spawn_error() {
    let opts = WorkerOptions { start_timeout: Duration::from_secs(1), ..options(false) };
    let mut h = Harness::scripted(opts.clone(), |s| s.greeting = Greeting::Silent);
    let start = Instant::now();
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["handshake", "within 1s"]);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(h.log().kills, [P1]);
    assert!(h.log().alive().is_empty());

    // The initializer runs within the same start timeout.
    let opts = WorkerOptions { initializer: Some(ErasedTask::new(&Hang(()))), ..opts };
    let mut h = Harness::new(opts);
    let start = Instant::now();
    let err = h.run_err(&erased(Echo(vec![]))).await;
    assert_spawn_error(&err, &["initializer", "within 1s"]);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(h.log().sent_to(P1), ["hang"]);
    assert!(h.log().alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn oversized_payload_is_refused_without_launching() {
    let mut h = Harness::new(WorkerOptions { max_frame_bytes: 64, ..options(false) });
    let task = erased(Echo(vec![0; 100]));
    let err = h.run_err(&task).await;
    assert_eq!(err, PoolError::FrameTooLarge { len: task.payload.len(), max: 64 });
    assert_eq!(h.log().launch_attempts, 0);

    // A payload that fits but whose frame does not: refused by the encoder,
    // before anything was written, so the child is kept.
    let err = h.run_err(&erased(Echo(vec![0; 60]))).await;
    assert!(matches!(err, PoolError::FrameTooLarge { max: 64, .. }), "{err:?}");
    assert_eq!(h.core.pid(), Some(P1));
    let log = h.log();
    assert!(log.sent.is_empty() && log.kills.is_empty());
}

// ---------------------------------------------------------------------------
// Stopping the core.

/// A core with a live child P1 and a started spare P2.
async fn live_and_spare() -> Harness {
    let mut h = Harness::new(options(false));
    assert_eq!(within(h.core.ensure_started()).await, Ok(P1));
    h.core.start_spare();
    settle().await;
    assert_eq!(h.log().pids, [P1, P2]);
    h
}

#[tokio::test(start_paused = true)]
async fn kill_kills_the_live_child_and_the_spare() {
    let mut h = live_and_spare().await;
    within(h.core.kill()).await;
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.kills, [P1, P2]);
    assert!(log.alive().is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_the_live_child_gracefully_and_the_spare() {
    let mut h = live_and_spare().await;
    within(h.core.shutdown()).await;
    assert_eq!(h.core.pid(), None);
    let log = h.log();
    assert_eq!(log.shutdowns, [P1]);
    assert!(log.alive().is_empty(), "alive: {:?}", log.alive());
}

#[tokio::test(start_paused = true)]
async fn kill_leaves_no_spare_that_was_still_launching() {
    let mut h = Harness::new(options(false));
    within(h.core.ensure_started()).await.unwrap();
    h.log().script.launch_delay = Some(Duration::from_secs(5));
    h.core.start_spare();
    settle().await;
    assert_eq!(h.log().launch_attempts, 2);
    within(h.core.kill()).await;
    // Whatever the spare had started is gone when kill returns, and stays gone.
    let alive = h.log().alive();
    assert!(alive.is_empty(), "alive: {alive:?}");
    sleep(Duration::from_secs(10)).await;
    let log = h.log();
    assert!(log.alive().is_empty(), "alive: {:?}", log.alive());
    assert!(log.sent.is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_core_leaves_no_child() {
    let Harness { core, log, .. } = live_and_spare().await;
    drop(core);
    settle().await;
    {
        let log = lock(&log);
        assert_eq!(log.drops, [P1, P2]);
        assert!(log.alive().is_empty());
    }

    // A spare still launching is abandoned.
    let mut h = Harness::new(options(false));
    within(h.core.ensure_started()).await.unwrap();
    h.log().script.launch_delay = Some(Duration::from_secs(5));
    h.core.start_spare();
    settle().await;
    let Harness { core, log, .. } = h;
    drop(core);
    sleep(Duration::from_secs(10)).await;
    let log = lock(&log);
    assert_eq!((log.launch_attempts, &log.pids[..]), (2, &[P1][..]));
    assert!(log.alive().is_empty());
}

// ---------------------------------------------------------------------------
// Regressions: bugs these tests found in core.rs (all fixed).

#[tokio::test(start_paused = true)]
async fn oversized_reply_kills_the_child_and_counts_as_a_crash() {
    let mut h = Harness::new(options(false));
    let err = h.run_err(&erased(Oversized(()))).await;
    match &err {
        PoolError::Protocol { message } => {
            assert!(message.contains("over the maximum"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(h.log().kills, [P1]);
    assert_eq!(h.core.pid(), None);
    let stats = h.stats();
    assert_eq!((stats.crashes, stats.failed), (1, 0), "the worker did not survive");
}

#[tokio::test(start_paused = true)]
async fn cancelling_while_a_retiring_worker_exits_returns_promptly() {
    let grace = Duration::from_secs(2);
    let opts = WorkerOptions { maximum_process_uses: Some(1), kill_grace: grace, ..options(true) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().pids, [P1, P2]);
    assert_eq!(h.log().shutdowns, [P1]);

    // P1 takes the whole grace period to exit; the spare P2 is ready.
    let token = CancellationToken::new();
    let start = Instant::now();
    let cancel_soon = async {
        sleep(ms(10)).await;
        token.cancel();
    };
    let hang = erased(Hang(()));
    let (res, ()) = tokio::join!(within(h.core.run(&hang, None, Some(&token))), cancel_soon);
    assert_eq!(res, Err(PoolError::Cancelled));
    assert!(start.elapsed() < grace, "cancelled after {:?}", start.elapsed());
    let log = h.log();
    assert!(log.sent_to(P2).is_empty(), "a cancelled task was sent to {P2}");
    assert!(!log.kills.contains(&P2), "the spare was killed for a cancelled task");
}

#[tokio::test(start_paused = true)]
async fn kill_kills_a_retiring_worker_now() {
    let grace = Duration::from_secs(2);
    let opts = WorkerOptions { maximum_process_uses: Some(1), kill_grace: grace, ..options(false) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    assert_eq!(h.log().shutdowns, [P1], "P1 retires, slowly");

    let start = Instant::now();
    within(h.core.kill()).await;
    assert!(h.log().alive().is_empty());
    assert!(start.elapsed() < grace, "kill() took {:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn no_worker_outlives_kill_after_a_run_dropped_during_retirement() {
    let opts = WorkerOptions { maximum_process_uses: Some(1), ..options(false) };
    let mut h = Harness::scripted(opts, |s| s.stubborn_exit = true);
    h.run(&erased(Echo(vec![]))).await.unwrap();
    settle().await;
    let echo = erased(Echo(vec![]));
    let res = tokio::time::timeout(ms(10), h.core.run(&echo, None, None)).await;
    assert!(res.is_err(), "the run was still waiting for P1 to exit");

    within(h.core.kill()).await;
    let alive = h.log().alive();
    assert!(alive.is_empty(), "alive after kill(): {alive:?}");
}
