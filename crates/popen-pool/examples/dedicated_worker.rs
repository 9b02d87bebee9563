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

fn main() {
    popen_pool::serve(Registry::new().register::<Square>().register::<WhoAmI>());
}
