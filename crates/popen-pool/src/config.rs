//! What program a worker runs, and the options shared by workers and pools.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::DEFAULT_MAX_FRAME;
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
        WorkerProgram { path: path.into(), args: Vec::new(), env: Vec::new(), current_dir: None }
    }

    /// The current test binary, re-run so that only the test function
    /// `module_path::fn_name` executes; that function calls
    /// [`serve_if_worker`](crate::serve_if_worker). `module_path` is what
    /// `module_path!()` gives inside the test's module.
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
        Ok(Self::current_exe()?.args([
            name.as_str(),
            "--exact",
            "--nocapture",
            "--quiet",
            "--test-threads=1",
        ]))
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
        Ok(())
    }
}

/// Setters shared by [`WorkerBuilder`](crate::WorkerBuilder) and
/// [`PoolBuilder`](crate::PoolBuilder); both keep a `WorkerOptions` in `opts`.
macro_rules! worker_option_setters {
    () => {
        /// Default time limit of each task, counted in the parent from when
        /// the task is handed to a ready worker. `None` (the default): no limit.
        #[must_use]
        pub fn timeout(mut self, limit: Option<std::time::Duration>) -> Self {
            self.opts.timeout = limit;
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
        /// `None` (the default): never.
        #[must_use]
        pub fn maximum_process_uses(mut self, uses: Option<u32>) -> Self {
            self.opts.maximum_process_uses = uses;
            self
        }

        /// Replace a worker process once its resident memory exceeds this many
        /// bytes after a task. `None` (the default): never.
        #[must_use]
        pub fn max_rss_bytes(mut self, bytes: Option<u64>) -> Self {
            self.opts.max_rss_bytes = bytes;
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

        /// How long a new worker may take to start and handshake (default 30 s).
        #[must_use]
        pub fn start_timeout(mut self, limit: std::time::Duration) -> Self {
            self.opts.start_timeout = limit;
            self
        }
    };
}
pub(crate) use worker_option_setters;
