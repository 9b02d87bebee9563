//! Process controls: workers pinned to one CPU, and a memory ceiling that
//! stops a task allocating without bound while the pool serves on.
//!
//! `cargo run -p popen-pool --example process_controls`

use std::time::Duration;

use popen_pool::{PoolError, PopenPool, Registry, Task, TaskFailure, WorkerContext, WorkerProgram};
use serde::{Deserialize, Serialize};

/// The CPUs the task may run on, as the kernel reports them.
#[derive(Serialize, Deserialize)]
struct AllowedCpus;

impl Task for AllowedCpus {
    const NAME: &'static str = "allowed_cpus";
    type Output = String;
    fn run(self, _ctx: &mut WorkerContext) -> Result<String, TaskFailure> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"));
        Ok(list.unwrap_or("?").trim().to_owned())
    }
}

/// Allocates 16 MiB at a time, touching every page, up to `max_mib`.
#[derive(Serialize, Deserialize)]
struct Grow {
    max_mib: usize,
}

impl Task for Grow {
    const NAME: &'static str = "grow";
    type Output = usize;
    fn run(self, _ctx: &mut WorkerContext) -> Result<usize, TaskFailure> {
        let mut blocks = Vec::new();
        for _ in 0..self.max_mib / 16 {
            blocks.push(vec![1u8; 16 << 20]);
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(blocks.len() * 16)
    }
}

fn main() -> Result<(), PoolError> {
    // Before any runtime: a worker serves and exits here.
    popen_pool::serve_if_worker(Registry::new().register::<AllowedCpus>().register::<Grow>());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let pool = PopenPool::builder(WorkerProgram::current_exe()?)
            .max_workers(1)
            .cpu_affinity([0])
            .memory_limit(256 << 20)
            .build()?;
        println!("worker runs on CPUs {}", pool.submit(AllowedCpus).await?);
        match pool.submit(Grow { max_mib: 4096 }).await {
            Err(e @ PoolError::MemoryLimit { .. }) => println!("unbounded task: {e}"),
            other => println!("unbounded task: unexpected {other:?}"),
        }
        println!("then: grew {} MiB under the ceiling", pool.submit(Grow { max_mib: 64 }).await?);
        println!("stats: {:?}", pool.stats());
        pool.shutdown().await;
        Ok(())
    })
}
