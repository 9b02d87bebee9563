//! Task types and helpers shared by the popen-pool integration tests.
#![allow(dead_code)]

use std::time::Duration;

use popen_pool::{Registry, Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

macro_rules! task {
    ($ty:ident, $name:literal, $out:ty, |$self_:ident, $ctx:ident| $body:expr) => {
        impl Task for $ty {
            const NAME: &'static str = $name;
            type Output = $out;
            fn run($self_, $ctx: &mut WorkerContext) -> Result<$out, TaskFailure> {
                $body
            }
        }
    };
}

/// A value of a few shapes (postcard is not self-describing, so no `serde_json::Value`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Int(i64),
    Text(String),
    List(Vec<i64>),
}

/// Returns its value.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct Identity(pub(crate) Val);
task!(Identity, "identity", Val, |self, _ctx| Ok(self.0));

/// Allocates and keeps (leaks) this many MiB, touching every page; returns the pid.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Hog(pub(crate) usize);
task!(Hog, "hog", u32, |self, _ctx| {
    let block = vec![1u8; self.0 << 20];
    std::hint::black_box(&block);
    std::mem::forget(block);
    Ok(std::process::id())
});

/// The worker's working directory.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Cwd;
task!(Cwd, "cwd", String, |self, _ctx| Ok(std::env::current_dir()?.display().to_string()));

/// Returns its integer.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Int(pub(crate) i64);
task!(Int, "int", i64, |self, _ctx| Ok(self.0));

/// Sleeps, then returns the number of milliseconds slept.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Sleep(pub(crate) u64);
task!(Sleep, "sleep", u64, |self, _ctx| {
    std::thread::sleep(Duration::from_millis(self.0));
    Ok(self.0)
});

/// Exits the worker process with a code.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct ExitSelf(pub(crate) i32);
task!(ExitSelf, "exit_self", (), |self, _ctx| std::process::exit(self.0));

/// Aborts the worker process (SIGABRT).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Abort;
task!(Abort, "abort", (), |self, _ctx| std::process::abort());

/// Dereferences a null pointer (SIGSEGV).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Segfault;
task!(Segfault, "segfault", (), |self, _ctx| {
    // SAFETY: not safe at all; the point is to crash the worker with SIGSEGV.
    unsafe {
        let p: *mut u8 = std::ptr::null_mut();
        std::ptr::write_volatile(p, 1);
    }
    Ok(())
});

/// Panics with a message.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Panic(pub(crate) String);
task!(Panic, "panic", (), |self, _ctx| panic!("{}", self.0));

/// Returns a task error.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Fail(pub(crate) String);
task!(Fail, "fail", (), |self, _ctx| Err(TaskFailure::new("custom", self.0)));

/// Prints to stdout and stderr, then returns its value.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Noisy(pub(crate) i64);
task!(Noisy, "noisy", i64, |self, _ctx| {
    use std::io::Write;
    let mut out = std::io::stdout();
    for _ in 0..100 {
        writeln!(out, "noise \0\0\0\x05 {} garbage that looks like a frame header", self.0).ok();
    }
    out.flush().ok();
    eprintln!("noise on stderr");
    Ok(self.0)
});

/// The worker's pid.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Pid;
task!(Pid, "pid", u32, |self, _ctx| Ok(std::process::id()));

/// Makes the cgroups `nested/deeper` below its own worker's cgroup, which
/// is `wN` below the pool's dir given; returns the deepest one's path (as a
/// task that runs a pool of its own would).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct NestCgroups {
    pub(crate) pool_dir: String,
}
task!(NestCgroups, "nest_cgroups", String, |self, _ctx| {
    let me = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = me.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default();
    let worker = own.trim().rsplit('/').next().unwrap_or_default().to_owned();
    let deepest = std::path::Path::new(&self.pool_dir).join(worker).join("nested/deeper");
    std::fs::create_dir_all(&deepest)?;
    Ok(deepest.display().to_string())
});

/// Starts `sleep 1000` as a child of the worker, returns its pid, then sleeps.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct SpawnSleeper {
    /// How long the task itself sleeps after spawning, in ms.
    pub(crate) then_sleep_ms: u64,
}
task!(SpawnSleeper, "spawn_sleeper", u32, |self, _ctx| {
    let child = std::process::Command::new("sleep").arg("1000").spawn()?;
    let pid = child.id();
    std::fs::write(std::env::var("SLEEPER_PID_FILE").unwrap_or_default(), pid.to_string()).ok();
    std::mem::forget(child);
    std::thread::sleep(Duration::from_millis(self.then_sleep_ms));
    Ok(pid)
});

/// Starts `sleep 1000` the way a daemon does: through `sh -c '... &'` (the
/// shell exits, so `sleep` is orphaned: a double fork), in a new session
/// (`setsid`) or a new process group (`setpgid`), so it is outside the
/// worker's process group. Writes the daemon's pid to `$SLEEPER_PID_FILE`,
/// sleeps `then_sleep_ms`, returns the pid.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Daemonize {
    pub(crate) setsid: bool,
    pub(crate) then_sleep_ms: u64,
}
task!(Daemonize, "daemonize", u32, |self, _ctx| {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"]);
    if self.setsid {
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    } else {
        cmd.process_group(0);
    }
    let out = cmd.stderr(std::process::Stdio::null()).output()?;
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| TaskFailure::msg(format!("no pid from sh: {e}")))?;
    if let Ok(file) = std::env::var("SLEEPER_PID_FILE") {
        let tmp = format!("{file}.tmp");
        std::fs::write(&tmp, pid.to_string()).ok();
        std::fs::rename(&tmp, &file).ok();
    }
    std::thread::sleep(Duration::from_millis(self.then_sleep_ms));
    Ok(pid)
});

/// Forks (no exec): the child keeps the channel open and sleeps; then the
/// worker aborts. Writes the child's pid to `$SLEEPER_PID_FILE` first.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct ForkThenAbort;
task!(ForkThenAbort, "fork_then_abort", (), |self, _ctx| {
    // SAFETY: the child only sleeps and exits (async-signal-safe calls).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain syscalls in the forked child.
        unsafe {
            libc::sleep(600);
            libc::_exit(0);
        }
    }
    if let Ok(file) = std::env::var("SLEEPER_PID_FILE") {
        let tmp = format!("{file}.tmp");
        std::fs::write(&tmp, pid.to_string()).ok();
        std::fs::rename(&tmp, &file).ok();
    }
    std::process::abort();
});

/// Writes its bytes to fd 3 (where the channel was when the worker
/// started), then returns their number.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct WriteFd3(pub(crate) Vec<u8>);
task!(WriteFd3, "write_fd3", usize, |self, _ctx| {
    // SAFETY: a write from a valid buffer; the fd may be anything.
    unsafe { libc::write(3, self.0.as_ptr().cast(), self.0.len()) };
    Ok(self.0.len())
});

/// Initializer: stores a value in the worker context and counts init runs.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Init(pub(crate) String);

/// What `Init` stores.
#[derive(Debug, Default)]
pub(crate) struct InitState {
    pub(crate) value: String,
    pub(crate) pid: u32,
}
task!(Init, "init", (), |self, ctx| {
    ctx.insert(InitState { value: self.0, pid: std::process::id() });
    Ok(())
});

/// Reads what the initializer stored: (value, pid of the init, tasks run before).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct ReadInit;
task!(ReadInit, "read_init", Option<(String, u32, u64)>, |self, ctx| {
    let run = ctx.tasks_run();
    Ok(ctx.get::<InitState>().map(|s| (s.value.clone(), s.pid, run)))
});

/// Returns `len` bytes of a pattern.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct MakeBytes(pub(crate) usize);
task!(MakeBytes, "make_bytes", serde_bytes::ByteBuf, |self, _ctx| {
    Ok(serde_bytes::ByteBuf::from((0..self.0).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
});

/// Returns the bytes' length and a checksum.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Checksum(#[serde(with = "serde_bytes")] pub(crate) Vec<u8>);
task!(Checksum, "checksum", (usize, u64), |self, _ctx| {
    Ok((self.0.len(), self.0.iter().map(|&b| u64::from(b)).sum()))
});

/// A task type the worker program does not register.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Unregistered;
task!(Unregistered, "unregistered", (), |self, _ctx| Ok(()));

/// Every task type the test worker serves.
/// A field of `/proc/self/status` as the task sees it (e.g. `Cpus_allowed_list`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct StatusField(pub(crate) String);
task!(StatusField, "status_field", String, |self, _ctx| {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let prefix = format!("{}:", self.0);
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| TaskFailure::msg(format!("no {} in /proc/self/status", self.0)))
});

/// What the task sees of its limits: nice of its thread, and the (soft)
/// RLIMIT_NOFILE, RLIMIT_CORE, RLIMIT_AS and RLIMIT_CPU (`u64::MAX`: unlimited).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct Limits;
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeenLimits {
    pub(crate) nice: i64,
    pub(crate) nofile: u64,
    pub(crate) core: u64,
    pub(crate) address_space: u64,
    pub(crate) cpu: u64,
}
task!(Limits, "limits", SeenLimits, |self, _ctx| {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = |r| getrlimit(r).map(|(s, _)| s).map_err(|e| TaskFailure::msg(e.to_string()));
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    // Fields from the state (field 3) on: nice is field 19.
    let nice = rest.split_whitespace().nth(16).and_then(|n| n.parse().ok()).unwrap_or(99);
    Ok(SeenLimits {
        nice,
        nofile: soft(Resource::RLIMIT_NOFILE)?,
        core: soft(Resource::RLIMIT_CORE)?,
        address_space: soft(Resource::RLIMIT_AS)?,
        cpu: soft(Resource::RLIMIT_CPU)?,
    })
});

/// Allocates this many MiB (touching every page), then holds it for this
/// many milliseconds; returns the pid.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub(crate) struct HogAndHold(pub(crate) usize, pub(crate) u64);
task!(HogAndHold, "hog_and_hold", u32, |self, _ctx| {
    let block = vec![1u8; self.0 << 20];
    std::hint::black_box(&block);
    std::thread::sleep(Duration::from_millis(self.1));
    drop(block);
    Ok(std::process::id())
});

pub(crate) fn registry() -> Registry {
    Registry::new()
        .register::<Identity>()
        .register::<Int>()
        .register::<Hog>()
        .register::<Cwd>()
        .register::<Sleep>()
        .register::<ExitSelf>()
        .register::<Abort>()
        .register::<Segfault>()
        .register::<Panic>()
        .register::<Fail>()
        .register::<Noisy>()
        .register::<Pid>()
        .register::<SpawnSleeper>()
        .register::<Daemonize>()
        .register::<ForkThenAbort>()
        .register::<WriteFd3>()
        .register::<Init>()
        .register::<ReadInit>()
        .register::<MakeBytes>()
        .register::<Checksum>()
        .register::<StatusField>()
        .register::<Limits>()
        .register::<HogAndHold>()
        .register::<NestCgroups>()
}

/// True while a process with this pid exists (zombies included).
pub(crate) fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Pids of this process's direct children (zombies included).
pub(crate) fn child_pids() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which is in parentheses).
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let ppid: u32 = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == me {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// Number of open fds of this process.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Waits (polling /proc, bounded) until `pid` is gone; true if it went.
pub(crate) async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while pid_exists(pid) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}
