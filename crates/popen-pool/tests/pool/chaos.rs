//! Chaos: thousands of tasks of every outcome on a small pool, each getting
//! exactly its own outcome, and nothing left behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use popen_pool::{ExitInfo, PoolError, PopenPool, TaskHandle};
use serde::de::DeserializeOwned;

use crate::common::*;
use crate::hygiene::{settle, warm_up};
use crate::test_worker_program;

/// The time limit of the `Timeout` case (a `Sleep` far longer than it).
pub(crate) const TIMEOUT_LIMIT: Duration = Duration::from_millis(100);

/// One task with a known outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Case {
    /// `Identity`: returns the value.
    Value(Val),
    /// `Panic`: a task error of kind "panic" with the message.
    Panic(String),
    /// `Fail`: a task error of kind "custom".
    Fail(String),
    /// `ExitSelf`: the worker dies with the code.
    Exit(i32),
    /// `Abort`: the worker dies of SIGABRT.
    Abort,
    /// `Segfault`: the worker dies of SIGSEGV.
    Segfault,
    /// A long `Sleep` under [`TIMEOUT_LIMIT`].
    Timeout,
}

/// What a case's handle gave, with the value (if any) type-erased.
pub(crate) type Got = Result<Option<Val>, PoolError>;

fn erase<O: DeserializeOwned + Send + 'static>(h: TaskHandle<O>) -> BoxFuture<'static, Got> {
    Box::pin(async move { h.await.map(|_| None) })
}

impl Case {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Case::Value(_) => "value",
            Case::Panic(_) => "panic",
            Case::Fail(_) => "fail",
            Case::Exit(_) => "exit",
            Case::Abort => "abort",
            Case::Segfault => "segfault",
            Case::Timeout => "timeout",
        }
    }

    /// Submits the case's task (with [`TIMEOUT_LIMIT`] for `Timeout`, the
    /// pool's default limit otherwise).
    pub(crate) fn submit(&self, pool: &PopenPool) -> BoxFuture<'static, Got> {
        match self.clone() {
            Case::Value(v) => {
                let h = pool.submit(Identity(v));
                Box::pin(async move { h.await.map(Some) })
            }
            Case::Panic(m) => erase(pool.submit(Panic(m))),
            Case::Fail(m) => erase(pool.submit(Fail(m))),
            Case::Exit(code) => erase(pool.submit(ExitSelf(code))),
            Case::Abort => erase(pool.submit(Abort)),
            Case::Segfault => erase(pool.submit(Segfault)),
            Case::Timeout => erase(pool.submit_with_timeout(Sleep(600_000), Some(TIMEOUT_LIMIT))),
        }
    }

    /// Checks that `got` is exactly this case's outcome.
    pub(crate) fn check(&self, got: &Got) -> Result<(), String> {
        let ok = match (self, got) {
            (Case::Value(v), Ok(Some(g))) => v == g,
            (Case::Panic(m), Err(PoolError::Task { kind, message })) => {
                // The worker appends the panic's location: "msg (at file:line)".
                kind == "panic" && message.starts_with(&format!("{m} (at "))
            }
            (Case::Fail(m), Err(PoolError::Task { kind, message })) => {
                kind == "custom" && message == m
            }
            (Case::Exit(code), Err(PoolError::WorkerDied { exit })) => {
                *exit == ExitInfo::Code(*code)
            }
            (Case::Abort, Err(PoolError::WorkerDied { exit })) => *exit == ExitInfo::Signal(6),
            (Case::Segfault, Err(PoolError::WorkerDied { exit })) => *exit == ExitInfo::Signal(11),
            (Case::Timeout, Err(PoolError::Timeout { limit })) => *limit == TIMEOUT_LIMIT,
            _ => false,
        };
        if ok { Ok(()) } else { Err(format!("got {got:?}")) }
    }
}

/// A 64-bit linear congruential generator (Knuth's MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 =
            self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The `i`th case of the chaos mix, per mille: 15 timeouts, 20 segfaults,
/// 20 aborts, 30 exits, 80 panics, 80 failures, the rest values.
fn chaos_case(i: usize, rng: &mut Lcg) -> Case {
    match rng.below(1000) {
        0..15 => Case::Timeout,
        15..35 => Case::Segfault,
        35..55 => Case::Abort,
        55..85 => Case::Exit(rng.below(126) as i32),
        85..165 => Case::Panic(format!("chaos panic {i}")),
        165..245 => Case::Fail(format!("chaos failure {i}")),
        _ => match rng.below(3) {
            0 => Case::Value(Val::Int(rng.next() as i64 - (1 << 30))),
            1 => {
                Case::Value(Val::Text(format!("chaos {i} {}", "x".repeat(rng.below(64) as usize))))
            }
            _ => Case::Value(Val::List((0..rng.below(16) as i64).map(|k| k * i as i64).collect())),
        },
    }
}

#[tokio::test]
async fn chaos_of_2000_tasks_on_two_workers() {
    const TASKS: usize = 2000;
    let baseline = warm_up().await;

    let mut rng = Lcg(0x5eed_c4a0_5eed_c4a0);
    let cases: Vec<Case> = (0..TASKS).map(|i| chaos_case(i, &mut rng)).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &cases {
        *counts.entry(c.kind()).or_default() += 1;
    }
    let count = |k: &str| counts.get(k).copied().unwrap_or(0) as u64;

    let start = Instant::now();
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(2)
        // Only the `Timeout` cases should ever need a limit; this one is a backstop.
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let results = futures::future::join_all(cases.iter().map(|c| c.submit(&pool))).await;
    let run_time = start.elapsed();

    let wrong: Vec<String> = cases
        .iter()
        .zip(&results)
        .enumerate()
        .filter_map(|(i, (case, got))| {
            case.check(got).err().map(|why| format!("#{i} {case:?}: {why}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {TASKS} tasks got the wrong outcome: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );

    let stats = pool.stats();
    let crashes = count("exit") + count("abort") + count("segfault");
    assert_eq!(stats.completed, count("value"), "{stats:?}");
    assert_eq!(stats.failed, count("panic") + count("fail"), "{stats:?}");
    assert_eq!(stats.crashes, crashes, "{stats:?}");
    assert_eq!(stats.timeouts, count("timeout"), "{stats:?}");
    assert_eq!((stats.queued, stats.running, stats.cancelled), (0, 0, 0), "{stats:?}");
    // Two to start and one per lost worker, of which the last one per slot
    // may still be starting.
    let lost = crashes + count("timeout");
    assert!((lost..=2 + lost).contains(&stats.spawned), "{stats:?}");

    settle(&pool).await;
    pool.shutdown().await;
    baseline.assert_clean("the chaos pool's shutdown").await;
    eprintln!(
        "chaos: {TASKS} tasks {counts:?}; ran in {run_time:?}, {:?} with shutdown; {} processes spawned",
        start.elapsed(),
        stats.spawned
    );
}
