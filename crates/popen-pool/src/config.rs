//! What program a worker runs, and the options shared by workers and pools.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::DEFAULT_MAX_FRAME;
use crate::controls::Controls;
use crate::error::PoolError;
use crate::task::ErasedTask;

/// The program a worker process runs.
///
/// Three ways to get one, all served by the same worker loop:
/// - [`WorkerProgram::current_exe`]: re-execute this program; its `main` calls
///   [`serve_if_worker`](crate::serve_if_worker) first thing.
/// - [`WorkerProgram::binary`]: a dedicated binary whose `main` calls
///   [`serve`](crate::serve).
/// - [`WorkerProgram::test_entry`], usually through
///   [`test_support!`](crate::test_support): re-run the current test binary,
///   so a `#[tokio::test]` suite serves its own task types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerProgram {
    pub(crate) path: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) current_dir: Option<PathBuf>,
    /// Re-runs a libtest binary: hide the banner libtest prints before the
    /// worker entry runs ("running 1 test").
    pub(crate) libtest: bool,
}

impl WorkerProgram {
    /// The running executable, re-executed as a worker.
    ///
    /// # Errors
    ///
    /// [`PoolError::Spawn`] if the path of the running executable is unknown.
    pub fn current_exe() -> Result<Self, PoolError> {
        let path = std::env::current_exe()
            .map_err(|e| PoolError::spawn(format!("cannot find the current executable: {e}")))?;
        Ok(Self::binary(path))
    }

    /// A dedicated worker binary at `path`.
    pub fn binary(path: impl Into<PathBuf>) -> Self {
        WorkerProgram {
            path: path.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            libtest: false,
        }
    }

    /// The current test binary, re-run so that only the test function
    /// `module_path::fn_name` executes; that function calls
    /// [`serve_if_worker`](crate::serve_if_worker). `module_path` is what
    /// `module_path!()` gives inside the test's module.
    ///
    /// The banner libtest prints before it runs the entry (`running 1 test`)
    /// does not reach the worker's stdout: the worker starts with stdout on
    /// `/dev/null` and gets the real one (inherited, or the tracing pipe) when
    /// it starts serving, so only the tasks' own output is seen.
    ///
    /// # Errors
    ///
    /// [`PoolError::Spawn`] if the path of the running executable is unknown.
    pub fn test_entry(module_path: &str, fn_name: &str) -> Result<Self, PoolError> {
        // Test names leave out the crate name, the first segment of the path.
        let name = match module_path.split_once("::") {
            Some((_, rest)) => format!("{rest}::{fn_name}"),
            None => fn_name.to_owned(),
        };
        let mut program = Self::current_exe()?.args([
            name.as_str(),
            "--exact",
            "--nocapture",
            "--quiet",
            "--test-threads=1",
        ]);
        program.libtest = true;
        Ok(program)
    }

    /// Appends command-line arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the worker.
    #[must_use]
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets the worker's working directory (default: the parent's).
    #[must_use]
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// The program's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where a worker's stdout or stderr goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputMode {
    /// Shared with the parent (the default).
    #[default]
    Inherit,
    /// Discarded.
    Null,
    /// Read line by line and emitted as `tracing` events (target
    /// `popen_pool::worker`, level INFO for stdout and WARN for stderr).
    Tracing,
}

/// Options of one worker; a pool applies them to each of its workers.
#[derive(Debug, Clone)]
pub(crate) struct WorkerOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) initializer: Option<Result<ErasedTask, PoolError>>,
    pub(crate) maximum_process_uses: Option<u32>,
    pub(crate) max_rss_bytes: Option<u64>,
    pub(crate) warm_spare: bool,
    pub(crate) max_frame_bytes: usize,
    pub(crate) stdout: OutputMode,
    pub(crate) stderr: OutputMode,
    pub(crate) kill_grace: Duration,
    pub(crate) start_timeout: Duration,
    pub(crate) cgroups: bool,
    pub(crate) controls: Controls,
    pub(crate) memory_limit: Option<u64>,
    pub(crate) zygote: Option<crate::zygote::Zygote>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            timeout: None,
            initializer: None,
            maximum_process_uses: None,
            max_rss_bytes: None,
            warm_spare: true,
            max_frame_bytes: DEFAULT_MAX_FRAME,
            stdout: OutputMode::Inherit,
            stderr: OutputMode::Inherit,
            kill_grace: Duration::from_secs(2),
            start_timeout: Duration::from_secs(30),
            cgroups: true,
            controls: Controls::default(),
            memory_limit: None,
            zygote: None,
        }
    }
}

impl WorkerOptions {
    pub(crate) fn validate(&self) -> Result<(), PoolError> {
        if let Some(Err(e)) = &self.initializer {
            return Err(e.clone());
        }
        if self.maximum_process_uses == Some(0) {
            return Err(PoolError::Config { message: "maximum_process_uses must be >= 1".into() });
        }
        if self.max_frame_bytes < 64 || self.max_frame_bytes > u32::MAX as usize {
            return Err(PoolError::Config {
                message: format!(
                    "max_frame_bytes must be in 64..=4 GiB, got {}",
                    self.max_frame_bytes
                ),
            });
        }
        if self.memory_limit == Some(0) {
            return Err(PoolError::Config { message: "memory_limit must be >= 1 byte".into() });
        }
        self.controls.validate()
    }

    /// Checks what needs the program too: a zygote must be one of it.
    pub(crate) fn validate_for(&self, program: &WorkerProgram) -> Result<(), PoolError> {
        self.validate()?;
        match &self.zygote {
            Some(z) if !z.serves(program) => Err(PoolError::Config {
                message: format!(
                    "the zygote does not serve worker program {} (its path, arguments and \
                     environment must be the ones the zygote was made for)",
                    program.path.display()
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Setters shared by [`WorkerBuilder`](crate::WorkerBuilder) and
/// [`PoolBuilder`](crate::PoolBuilder); both keep a `WorkerOptions` in `opts`.
macro_rules! worker_option_setters {
    () => {
        /// Default time limit of each task, counted in the parent from when
        /// the task is handed to a ready worker. Default: no limit (see
        /// [`no_timeout`](Self::no_timeout)).
        #[must_use]
        pub fn timeout(mut self, limit: std::time::Duration) -> Self {
            self.opts.timeout = Some(limit);
            self
        }

        /// No default time limit (the default).
        #[must_use]
        pub fn no_timeout(mut self) -> Self {
            self.opts.timeout = None;
            self
        }

        /// A task run first in every fresh worker process (not counted as a
        /// use); state it stores in the [`WorkerContext`](crate::WorkerContext)
        /// is visible to later tasks.
        #[must_use]
        pub fn initializer<T: $crate::Task>(mut self, task: T) -> Self {
            self.opts.initializer = Some($crate::ErasedTask::new(&task));
            self
        }

        /// Replace a worker process after it has run this many tasks.
        /// Default: never (see [`no_maximum_process_uses`](Self::no_maximum_process_uses)).
        #[must_use]
        pub fn maximum_process_uses(mut self, uses: u32) -> Self {
            self.opts.maximum_process_uses = Some(uses);
            self
        }

        /// Never replace a worker process for its number of uses (the default).
        #[must_use]
        pub fn no_maximum_process_uses(mut self) -> Self {
            self.opts.maximum_process_uses = None;
            self
        }

        /// Replace a worker process once its resident memory exceeds this many
        /// bytes after a task (the task itself completes; to stop a task that
        /// crosses a limit while it runs, see [`memory_limit`](Self::memory_limit)).
        /// Default: never (see [`no_max_rss_bytes`](Self::no_max_rss_bytes)).
        #[must_use]
        pub fn max_rss_bytes(mut self, bytes: u64) -> Self {
            self.opts.max_rss_bytes = Some(bytes);
            self
        }

        /// Never replace a worker process for its memory use (the default).
        #[must_use]
        pub fn no_max_rss_bytes(mut self) -> Self {
            self.opts.max_rss_bytes = None;
            self
        }

        /// A memory ceiling of each worker process, enforced while a task
        /// runs: a task that takes its worker past `bytes` fails with
        /// [`PoolError::MemoryLimit`](crate::PoolError::MemoryLimit), the
        /// worker and its task's processes are killed and a fresh worker
        /// takes its place (the pool serves on).
        ///
        /// Enforced by the kernel through the worker's cgroup (`memory.max`,
        /// covering every process of the task) where the pool has per-worker
        /// cgroups with the memory controller; elsewhere by a watchdog in the
        /// parent that samples the worker process's resident memory every
        /// 10 ms while a task runs and once when it ends (the worker process
        /// only, not processes its task starts). See docs/popen-pool.md.
        /// Default: none (see [`no_memory_limit`](Self::no_memory_limit)).
        #[must_use]
        pub fn memory_limit(mut self, bytes: u64) -> Self {
            self.opts.memory_limit = Some(bytes);
            self
        }

        /// No memory ceiling (the default).
        #[must_use]
        pub fn no_memory_limit(mut self) -> Self {
            self.opts.memory_limit = None;
            self
        }

        /// Pins each worker process (all its threads, and every process its
        /// tasks start) to these CPUs, set by the worker itself right after
        /// exec. Linux only; a CPU that does not exist or is outside the
        /// parent's own cpuset makes the spawn fail with
        /// [`PoolError::Spawn`](crate::PoolError::Spawn). Default: the
        /// parent's affinity (see [`no_cpu_affinity`](Self::no_cpu_affinity)).
        ///
        /// ```no_run
        /// # async fn demo() -> Result<(), popen_pool::PoolError> {
        /// use popen_pool::{PopenPool, WorkerProgram};
        /// // Builds on CPUs 0 and 1, each worker at most 2 GiB while a task runs.
        /// let pool = PopenPool::builder(WorkerProgram::current_exe()?)
        ///     .max_workers(2)
        ///     .cpu_affinity([0, 1])
        ///     .memory_limit(2 << 30)
        ///     .build()?;
        /// # pool.shutdown().await; Ok(()) }
        /// ```
        #[must_use]
        pub fn cpu_affinity(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
            let mut cpus: Vec<usize> = cpus.into_iter().collect();
            cpus.sort_unstable();
            cpus.dedup();
            self.opts.controls.cpus = Some(cpus);
            self
        }

        /// Workers inherit the parent's CPU affinity (the default).
        #[must_use]
        pub fn no_cpu_affinity(mut self) -> Self {
            self.opts.controls.cpus = None;
            self
        }

        /// The nice level (-20..=19) of each worker process, set by the
        /// worker on each of its threads right after exec (lowering it below
        /// the parent's needs `CAP_SYS_NICE`, else the spawn fails). Default:
        /// inherited (see [`no_nice`](Self::no_nice)).
        #[must_use]
        pub fn nice(mut self, level: i32) -> Self {
            self.opts.controls.nice = Some(level);
            self
        }

        /// Workers inherit the parent's nice level (the default).
        #[must_use]
        pub fn no_nice(mut self) -> Self {
            self.opts.controls.nice = None;
            self
        }

        /// `RLIMIT_AS` (soft and hard) of each worker process, in bytes: an
        /// allocation past it fails inside the task (Rust aborts the worker,
        /// which the task sees as [`PoolError::WorkerDied`](crate::PoolError::WorkerDied)).
        /// Default: inherited (see [`no_rlimit_address_space`](Self::no_rlimit_address_space)).
        #[must_use]
        pub fn rlimit_address_space(mut self, bytes: u64) -> Self {
            self.opts.controls.address_space = Some(bytes);
            self
        }

        /// Workers inherit the parent's `RLIMIT_AS` (the default).
        #[must_use]
        pub fn no_rlimit_address_space(mut self) -> Self {
            self.opts.controls.address_space = None;
            self
        }

        /// `RLIMIT_CPU` (soft and hard) of each worker process, rounded up to
        /// whole seconds. It counts the process's CPU time over its whole
        /// life, across tasks (combine with `maximum_process_uses(1)` for a
        /// per-task budget); past it the kernel kills the worker. Default:
        /// inherited (see [`no_rlimit_cpu_time`](Self::no_rlimit_cpu_time)).
        #[must_use]
        pub fn rlimit_cpu_time(mut self, limit: std::time::Duration) -> Self {
            self.opts.controls.cpu_time = Some(crate::controls::Controls::cpu_seconds(limit));
            self
        }

        /// Workers inherit the parent's `RLIMIT_CPU` (the default).
        #[must_use]
        pub fn no_rlimit_cpu_time(mut self) -> Self {
            self.opts.controls.cpu_time = None;
            self
        }

        /// `RLIMIT_NOFILE` (soft and hard) of each worker process. Default:
        /// inherited (see [`no_rlimit_open_files`](Self::no_rlimit_open_files)).
        #[must_use]
        pub fn rlimit_open_files(mut self, n: u64) -> Self {
            self.opts.controls.open_files = Some(n);
            self
        }

        /// Workers inherit the parent's `RLIMIT_NOFILE` (the default).
        #[must_use]
        pub fn no_rlimit_open_files(mut self) -> Self {
            self.opts.controls.open_files = None;
            self
        }

        /// Allow core dumps of crashing workers (default: off, `RLIMIT_CORE`
        /// 0, so crash tests and crashing kernels leave no cores behind; on:
        /// inherited from the parent).
        #[must_use]
        pub fn core_dumps(mut self, on: bool) -> Self {
            self.opts.controls.core_dumps = on;
            self
        }

        /// Start a replacement process as soon as one is known to be needed
        /// (before the last allowed use, right after a kill or crash), so the
        /// next task does not wait for a spawn. Default: on.
        #[must_use]
        pub fn warm_spare(mut self, on: bool) -> Self {
            self.opts.warm_spare = on;
            self
        }

        /// Largest frame either side may send (default 256 MiB).
        #[must_use]
        pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
            self.opts.max_frame_bytes = bytes;
            self
        }

        /// Where the worker's stdout goes (default: inherited).
        #[must_use]
        pub fn stdout(mut self, mode: $crate::OutputMode) -> Self {
            self.opts.stdout = mode;
            self
        }

        /// Where the worker's stderr goes (default: inherited).
        #[must_use]
        pub fn stderr(mut self, mode: $crate::OutputMode) -> Self {
            self.opts.stderr = mode;
            self
        }

        /// How long a graceful stop waits for a worker before SIGKILL (default 2 s).
        #[must_use]
        pub fn kill_grace(mut self, grace: std::time::Duration) -> Self {
            self.opts.kill_grace = grace;
            self
        }

        /// Contain each worker in its own cgroup v2 where a writable cgroup2
        /// hierarchy is available (Linux; default: on). Off, or where none
        /// is, workers are contained by process group and process tree; see
        /// `containment()` on the pool or worker for what is in effect.
        #[must_use]
        pub fn cgroups(mut self, on: bool) -> Self {
            self.opts.cgroups = on;
            self
        }

        /// Fork each new worker process from `zygote` (a fork server of the
        /// same program, see [`Zygote`](crate::Zygote)) instead of spawning
        /// and exec'ing it: no exec, dynamic loading or CPU probes per
        /// worker (a session worker's start went from 2.0 to 1.2 ms on the
        /// 2-core test VM, `runner_bench --no-zygote` for the A/B); the
        /// same worker otherwise (a child of this process, in its own
        /// cgroup and process group, same controls and handshake). Two
        /// differences: the worker's environment is this process's as it
        /// was when the zygote started, plus the program's variables; and
        /// its memory starts as a copy of the zygote's. Whenever the zygote
        /// cannot fork a worker, that worker is spawned as without one.
        /// Default: none.
        #[must_use]
        pub fn zygote(mut self, zygote: &$crate::Zygote) -> Self {
            self.opts.zygote = Some(zygote.clone());
            self
        }

        /// How long a new worker may take to start and handshake (default 30 s).
        #[must_use]
        pub fn start_timeout(mut self, limit: std::time::Duration) -> Self {
            self.opts.start_timeout = limit;
            self
        }
    };
}
pub(crate) use worker_option_setters;
