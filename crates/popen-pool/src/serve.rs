//! The worker side: the loop a worker process runs.

use std::cell::RefCell;
use std::io::{BufWriter, Write};
use std::panic;
use std::path::Path;

use crate::codec::{CodecError, write_frame};
use crate::controls::{Controls, ENV_CONTROLS};
use crate::protocol::{FromWorker, PROTOCOL_VERSION};
use crate::serve_loop::End;
use crate::startup::{self, Started};
use crate::task::Registry;
use crate::unix;

/// Set in a worker's environment to the parent's pid.
pub(crate) const ENV_MARKER: &str = "POPEN_POOL_WORKER_PARENT";
/// Set in a worker's environment to the maximum frame size.
pub(crate) const ENV_MAX_FRAME: &str = "POPEN_POOL_MAX_FRAME";
/// Set in a worker's environment when its real stdout is at fd 4.
pub(crate) const ENV_STDOUT: &str = "POPEN_POOL_STDOUT_FD";
/// Set in a worker's environment to its cgroup directory, if it has one.
pub(crate) const ENV_CGROUP: &str = "POPEN_POOL_CGROUP";

/// True when this process was started by a popen-pool parent as a worker.
///
/// The parent's pid must match too, so a task that starts the same program
/// again (a grandchild) does not mistake itself for a worker.
pub fn is_worker() -> bool {
    std::env::var(ENV_MARKER).is_ok_and(|v| v.parse::<i32>().ok() == Some(unix::parent_pid()))
}

/// If this process is a worker, serves `registry` and exits; otherwise returns
/// at once. Call it first thing in `main` of a program that re-executes itself
/// as a worker ([`WorkerProgram::current_exe`](crate::WorkerProgram::current_exe)).
///
/// # Examples
///
/// ```no_run
/// # use popen_pool::{Registry, serve_if_worker};
/// fn main() {
///     serve_if_worker(Registry::new() /* .register::<MyTask>() */);
///     // ... the normal program, which builds a pool of itself ...
/// }
/// ```
pub fn serve_if_worker(registry: Registry) {
    if is_worker() {
        serve(registry);
    }
    if orphaned_worker() {
        // Started as a worker by a parent that died before this process got
        // here (e.g. it exited while the start was in progress): there is
        // nobody to serve, and running the program's own `main` instead
        // would be a stray copy of the parent program.
        unix::exit_now(111);
    }
}

/// True if this process carries the worker marker of a parent that is no
/// longer alive. (A process a *task* started inherits the marker too, but
/// its pool parent is alive while the task runs, and a worker's whole tree
/// is killed when that parent dies.)
fn orphaned_worker() -> bool {
    let Some(parent) = std::env::var(ENV_MARKER).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return false;
    };
    parent > 0 && !unix::process_alive(parent)
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Serves `registry` on the channel set up by the parent and exits the process
/// when the parent says so or goes away. The `main` of a dedicated worker binary
/// ([`WorkerProgram::binary`](crate::WorkerProgram::binary)) calls it.
///
/// Run outside a popen-pool parent, it prints an explanation and exits with code 2.
pub fn serve(registry: Registry) -> ! {
    if !is_worker() {
        eprintln!(
            "popen-pool: this program is a worker and must be started by a popen-pool parent"
        );
        std::process::exit(2);
    }
    // Started as a zygote: this returns only in each worker it forks.
    crate::zygote::run_if_zygote(registry.before_fork_hook());
    let code = match serve_channel(&registry) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("popen-pool worker {}: {e}", std::process::id());
            3
        }
    };
    std::process::exit(code);
}

/// Kills every process of this worker's task, and (with `me`) the worker:
/// its cgroup if it has one, else its process tree and group.
pub(crate) fn contain(cgroup: Option<&Path>, me: bool) {
    if me {
        if let Some(dir) = cgroup {
            let _ = crate::cgroup::kill(dir);
        }
    }
    unix::kill_tree(std::process::id(), true);
    if me {
        unix::kill_group(unix::own_group() as u32);
        unix::exit_now(137);
    }
}

fn serve_channel(registry: &Registry) -> Result<(), CodecError> {
    let Started { channel, cgroup, max } = startup::start()?;
    let mut writer = BufWriter::new(&channel);

    panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_owned(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "non-string panic payload".to_owned()),
        };
        let msg = match info.location() {
            Some(loc) => format!("{msg} (at {}:{})", loc.file(), loc.line()),
            None => msg,
        };
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
    }));

    let mut scratch = Vec::new();
    // Process controls, applied by the worker itself (no `pre_exec` in the
    // parent, so spawning needs no real fork); after the channel is set up,
    // so a tight RLIMIT_NOFILE cannot break it, and before any task runs.
    let controls = match std::env::var(ENV_CONTROLS) {
        Ok(s) => Controls::decode(&s),
        Err(_) => Ok(Controls { core_dumps: true, ..Controls::default() }),
    };
    if let Err(message) = controls.and_then(|c| c.apply()) {
        let refused = FromWorker::Refused { version: PROTOCOL_VERSION, message };
        write_frame(&mut writer, &refused, &mut scratch, max)?;
        writer.flush()?;
        unix::exit_now(4);
    }
    let hello = FromWorker::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        tasks: registry.names().into_iter().map(str::to_owned).collect(),
    };
    write_frame(&mut writer, &hello, &mut scratch, max)?;
    writer.flush()?;
    drop(writer);

    let last_panic = || LAST_PANIC.with(|p| p.borrow_mut().take());
    match crate::serve_loop::run_tasks(channel, registry, max, &last_panic, &|| {
        // This worker is a child subreaper: reap what the task left behind
        // and has exited (orphans re-parented to us included).
        unix::reap_exited_children();
    })? {
        // The parent closed the channel: it is gone or killing us.
        End::Eof => contain(cgroup.as_deref(), true),
        End::Exit => {
            // Take the task's leftovers down before leaving them orphaned.
            if cgroup.is_none() {
                contain(None, false);
            }
        }
    }
    Ok(())
}
