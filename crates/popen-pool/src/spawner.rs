//! A process-lifetime thread that forks every worker.
//!
//! Where pidfds are missing, workers get PR_SET_PDEATHSIG, which Linux
//! delivers when the *thread* that forked the child exits, not the process. Tokio's blocking threads come and go, and a test's
//! runtime thread ends with the test, so forking from them could kill healthy
//! workers. All forks therefore happen on this one thread, which lives as long
//! as the process; the child is still registered with the caller's runtime
//! (for reaping) by entering its handle.
//!
//! Order on this thread, for each request: fork+exec; drop the command (it
//! owns the child's end of the channel); reply. If the caller is gone by then, nobody can reap
//! the child: this thread kills and reaps it itself, and only then drops
//! `after` (for instance the worker's cgroup, which can be removed only once
//! its process is gone).

use std::any::Any;
use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Something kept alive until the spawner is done with a request.
pub(crate) type Keep = Box<dyn Any + Send>;

struct Request {
    cmd: Command,
    handle: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
    after: Option<Keep>,
}

/// How long the spawner waits for a child it killed to exit (SIGKILL takes
/// microseconds unless the process is stuck in the kernel).
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// Kills `child` and reaps it without a runtime (`try_wait` is a plain
/// `waitpid(WNOHANG)`), within `limit`. True if it was reaped.
pub(crate) fn kill_and_reap_blocking(child: &mut Child, limit: Duration) -> bool {
    let _ = child.start_kill();
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
        }
    }
}

fn serve(rx: mpsc::Receiver<Request>) {
    for req in rx {
        let Request { mut cmd, handle, reply, after } = req;
        if reply.is_closed() {
            continue; // the caller gave up: start nothing it cannot reap
        }
        let _guard = handle.enter();
        // This thread must outlive every worker (PDEATHSIG): never let a
        // panic in a spawn take it down.
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
            .unwrap_or_else(|_| Err(io::Error::other("spawning the worker panicked")));
        // Before replying: once the caller has its answer, nothing of this
        // spawn may still hold an fd.
        drop(cmd);
        if let Err(Ok(mut child)) = reply.send(spawned) {
            kill_and_reap_blocking(&mut child, REAP_LIMIT);
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

/// Spawns `cmd` on the spawner thread, registered with the current runtime.
/// `after` is dropped on that thread once the request is done with (after
/// the child is reaped, if the caller went away).
///
/// Cancel safety: dropping the future before the reply makes the spawner
/// kill and reap the child itself (or not start it at all).
pub(crate) async fn spawn(cmd: Command, after: Option<Keep>) -> io::Result<Child> {
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(Request { cmd, handle: Handle::current(), reply, after })
        .map_err(|_| io::Error::other("the popen-pool spawner thread is gone"))?;
    rx.await.map_err(|_| io::Error::other("the popen-pool spawner thread dropped a request"))?
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

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
        let mut cmd = Command::new("true");
        // SAFETY: the closure does nothing in the child.
        unsafe {
            cmd.pre_exec(move || {
                let _ = &flag;
                Ok(())
            });
        }
        let mut child = spawn(cmd, None).await.unwrap();
        assert!(
            dropped.load(Ordering::SeqCst),
            "the spawner replied while it still held the command (and its fds)"
        );
        child.wait().await.unwrap();
    }
}
