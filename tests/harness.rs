//! End-to-end through the root package: the re-exported pool runs this test
//! binary's own task type in real worker processes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tuning_harness::popen_pool::{
    PoolError, PopenPool, Registry, Task, TaskFailure, WorkerContext,
};

#[derive(Serialize, Deserialize)]
struct Collatz(u64);

impl Task for Collatz {
    const NAME: &'static str = "collatz";
    type Output = u32;
    fn run(self, _ctx: &mut WorkerContext) -> Result<u32, TaskFailure> {
        let (mut n, mut steps) = (self.0, 0);
        if n == 0 {
            return Err(TaskFailure::new("domain", "collatz(0) never ends"));
        }
        while n != 1 {
            n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
            steps += 1;
        }
        Ok(steps)
    }
}

tuning_harness::popen_pool::test_support!(Registry::new().register::<Collatz>());

#[tokio::test]
async fn the_reexported_pool_runs_tasks_in_workers() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(2)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(pool.submit(Collatz(27)).await, Ok(111));
    assert_eq!(
        pool.submit(Collatz(0)).await,
        Err(PoolError::Task { kind: "domain".into(), message: "collatz(0) never ends".into() })
    );
    pool.shutdown().await;
}
