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
            let _guard = req.handle.enter();
            let _ = req.reply.send(req.cmd.spawn());
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
