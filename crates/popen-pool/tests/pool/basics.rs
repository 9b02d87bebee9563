//! The behaviours of TVM's own popen-pool tests, and the API around them.

use std::time::{Duration, Instant};

use futures::StreamExt;
use popen_pool::{ExitInfo, PoolError, PopenPool, PopenWorker};
use serde_json::json;

use crate::common::*;
use crate::test_worker_program;

const SIGKILL: i32 = 9;
const SIGABRT: i32 = 6;
const SIGSEGV: i32 = 11;

#[tokio::test]
async fn worker_timeout_then_crash_then_normal_tasks() {
    let mut w = PopenWorker::builder(test_worker_program()).build().unwrap();
    let err = w.run_with_timeout(Sleep(100_000), Some(Duration::from_millis(10))).await.unwrap_err();
    assert_eq!(err, PoolError::Timeout { limit: Duration::from_millis(10) });
    let err = w.run(ExitSelf(3)).await.unwrap_err();
    assert_eq!(err, PoolError::WorkerDied { exit: ExitInfo::Code(3) });
    assert_eq!(err.to_string(), "worker died (exit code 3)");
    for i in 0..5 {
        assert_eq!(w.run(Int(i)).await.unwrap(), i);
    }
    let stats = w.stats();
    assert_eq!((stats.timeouts, stats.crashes, stats.completed), (1, 1, 5));
    w.shutdown().await;
}
