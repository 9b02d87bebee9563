//! A process-lifetime thread that forks every worker.
//!
//! Linux delivers PR_SET_PDEATHSIG when the *thread* that forked the child
//! exits, not the process. Tokio's blocking threads come and go, and a test's
//! runtime thread ends with the test, so forking from them could kill healthy
//! workers. All forks therefore happen on this one thread, which lives as long
//! as the process; the child is still registered with the caller's runtime
//! (for reaping) by entering its handle.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

struct Request {
    cmd: Command,
    handle: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

fn spawner() -> io::Result<&'static mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(tx);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new().name("popen-pool-spawner".into()).spawn(move || {
        for mut req in rx {
            if req.reply.is_closed() {
                continue; // the caller gave up: start nothing it cannot reap
            }
            let _guard = req.handle.enter();
            // This thread must outlive every worker (PDEATHSIG): never let a
            // panic in a spawn take it down.
            let spawned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| req.cmd.spawn()))
                    .unwrap_or_else(|_| Err(io::Error::other("spawning the worker panicked")));
            let _ = req.reply.send(spawned);
        }
    })?;
    // A racing caller may have installed its own sender; its thread serves it.
    Ok(SPAWNER.get_or_init(|| tx))
}

/// Spawns `cmd` on the spawner thread, registered with the current runtime.
pub(crate) async fn spawn(cmd: Command) -> io::Result<Child> {
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(Request { cmd, handle: Handle::current(), reply })
        .map_err(|_| io::Error::other("the popen-pool spawner thread is gone"))?;
    rx.await.map_err(|_| io::Error::other("the popen-pool spawner thread dropped a request"))?
}
