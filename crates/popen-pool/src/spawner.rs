//! A process-lifetime thread that spawns every worker.
//!
//! Where pidfds are missing, a worker sets PR_SET_PDEATHSIG on itself, which
//! Linux delivers when the *thread* that spawned it exits, not the process.
//! Tokio's blocking threads come and go, and a test's runtime thread ends
//! with the test, so spawning from them could kill healthy workers. All
//! spawns (`posix_spawn`, see `process`) therefore happen on this one thread,
//! which lives as long as the process.
//!
//! Order on this thread, for each request: spawn; drop the spec (it owns the
//! child's end of the channel); reply. If the caller is gone by then, nobody
//! can reap the child: this thread kills and reaps it itself, and only then
//! drops `after` (for instance the worker's cgroup, which can be removed only
//! once its process is gone).

use std::any::Any;
use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::process::{self, Spawned, Spec};

/// Something kept alive until the spawner is done with a request.
pub(crate) type Keep = Box<dyn Any + Send>;

struct Request {
    spec: Spec,
    reply: oneshot::Sender<io::Result<Spawned>>,
    after: Option<Keep>,
}

/// How long the spawner waits for a child it killed to exit (SIGKILL takes
/// microseconds unless the process is stuck in the kernel).
const REAP_LIMIT: Duration = Duration::from_secs(5);

fn serve(rx: mpsc::Receiver<Request>) {
    for req in rx {
        let Request { spec, reply, after } = req;
        if reply.is_closed() {
            continue; // the caller gave up: start nothing it cannot reap
        }
        // This thread must outlive every worker (PDEATHSIG): never let a
        // panic in a spawn take it down. `spawn` consumes the spec, so
        // nothing of it still holds an fd once the caller has its answer.
        let spawned =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| process::spawn(spec)))
                .unwrap_or_else(|_| Err(io::Error::other("spawning the worker panicked")));
        if let Err(Ok(mut child)) = reply.send(spawned) {
            child.process.kill_and_reap_blocking(REAP_LIMIT);
        }
        drop(after);
    }
}

fn spawner() -> io::Result<&'static mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(tx);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new().name("popen-pool-spawner".into()).spawn(move || serve(rx))?;
    // A racing caller may have installed its own sender; its thread serves it.
    Ok(SPAWNER.get_or_init(|| tx))
}

/// Spawns `spec` on the spawner thread. `after` is dropped on that thread
/// once the request is done with (after the child is reaped, if the caller
/// went away).
///
/// Cancel safety: dropping the future before the reply makes the spawner
/// kill and reap the child itself (or not start it at all).
pub(crate) async fn spawn(spec: Spec, after: Option<Keep>) -> io::Result<Spawned> {
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(Request { spec, reply, after })
        .map_err(|_| io::Error::other("the popen-pool spawner thread is gone"))?;
    rx.await.map_err(|_| io::Error::other("the popen-pool spawner thread dropped a request"))?
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::process::Stdio;

    /// Sets its flag when dropped, slowly, so that a reply sent before the
    /// drop is seen first.
    struct SlowFlag(Arc<AtomicBool>);

    impl Drop for SlowFlag {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(50));
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn the_command_is_dropped_before_the_reply() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = SlowFlag(Arc::clone(&dropped));
        let spec = Spec {
            program: c"true".to_owned(),
            args: vec![c"true".to_owned()],
            env: Vec::new(),
            cwd: None,
            stdout: Stdio::Null,
            stderr: Stdio::Null,
            fds: Vec::new(),
            hold: Some(Box::new(flag)),
            cgroup: None,
            zygote: None,
        };
        let mut child = spawn(spec, None).await.unwrap();
        assert!(
            dropped.load(Ordering::SeqCst),
            "the spawner replied while it still held the command (and its fds)"
        );
        assert!(child.process.wait(None).await.unwrap().success());
    }
}
