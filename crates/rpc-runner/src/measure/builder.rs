//! [`LocalBuilder`]: compiles candidate kernels in a `popen_pool::PopenPool`,
//! with a per-build time limit, and classifies each failure (the counterpart
//! of TVM's meta-schedule `LocalBuilder` and its `MeasureErrorNo` codes).
//!
//! The parent validates each [`BuilderInput`], resolves it into a
//! [`BuildPlan`] (compiler, flags, source and artifact paths under the
//! builder's output directory) and hands a build task made from the plan to a
//! worker process. The default task, [`CompileC`], writes the source and runs
//! the C compiler; any task type whose output is [`BuildTaskOutput`] can take
//! its place ([`LocalBuilder::with_task`]).
//!
//! Failures are told apart, never panicked on:
//! - [`BuildError::Compile`]: the compiler ran and failed; its stderr and exit status;
//! - [`BuildError::Timeout`]: the build ran past the limit; the worker's whole
//!   process group (the compiler and its `cc1`/`as`/`ld` children too) was killed;
//! - [`BuildError::Crash`]: the build task did not finish normally (its worker
//!   died, it panicked) or no worker could be started;
//! - [`BuildError::Io`]: the source could not be written or the compiler not started;
//! - [`BuildError::InvalidInput`]: rejected by the parent before anything ran.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, Stream};
use popen_pool::{ExitInfo, PoolError, PopenPool, Task, TaskFailure, TaskHandle, WorkerContext};
use serde::{Deserialize, Serialize};

/// The longest candidate name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// At most this much compiler stderr is kept (the end is cut, with a note).
const MAX_STDERR_BYTES: usize = 64 * 1024;

/// One candidate to build.
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::BuilderInput;
///
/// let input = BuilderInput::new("matmul_t32", "int32_t entry(void) { return 0; }")
///     .with_flags(["-DTILE=32"]);
/// assert_eq!(input.extra_flags, ["-DTILE=32"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderInput {
    /// The candidate's id; names the files `<out_dir>/<name>.c` and
    /// `<out_dir>/<name>.so`. At most [`MAX_NAME_LEN`] bytes of ASCII letters,
    /// digits, `_`, `-` and `.`, not starting with `.` (so no path separators
    /// and no `..`), and unique within a batch.
    pub name: String,
    /// The C source.
    pub source: String,
    /// Flags added after the builder's own flags for this candidate only
    /// (`-DTILE=32`, `-funroll-loops`...).
    pub extra_flags: Vec<String>,
}

impl BuilderInput {
    /// An input without extra flags.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        BuilderInput { name: name.into(), source: source.into(), extra_flags: Vec::new() }
    }

    /// Appends extra compiler flags for this input.
    #[must_use]
    pub fn with_flags<I, S>(mut self, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_flags.extend(flags.into_iter().map(Into::into));
        self
    }
}

/// A built artifact: what a build task returns on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOutput {
    /// The shared library, as an absolute path.
    pub artifact_path: PathBuf,
    /// How long the build took inside the worker (queueing excluded), in seconds.
    pub build_secs: f64,
}

impl BuildOutput {
    /// An output at `artifact_path` for a build that began at `started`.
    pub fn since(artifact_path: impl Into<PathBuf>, started: Instant) -> Self {
        BuildOutput {
            artifact_path: artifact_path.into(),
            build_secs: started.elapsed().as_secs_f64(),
        }
    }
}

/// How a build failed inside the worker; the error half of [`BuildTaskOutput`].
///
/// It travels from the worker to the parent, so it holds text, not error values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum BuildFailure {
    /// The compiler ran and failed.
    #[error("compilation failed ({}): {stderr}", StatusText(*status))]
    Compile {
        /// The compiler's stderr (lossily decoded, at most 64 KiB kept). When the
        /// compiler was killed by a signal, a last line says which.
        stderr: String,
        /// The compiler's exit code; `None` if a signal ended it.
        status: Option<i32>,
    },
    /// The source could not be written, the compiler could not be started,
    /// or it reported success without writing the artifact.
    #[error("{message}")]
    Io {
        /// What failed, with the path and the OS error.
        message: String,
    },
}

impl BuildFailure {
    /// An [`Io`](BuildFailure::Io) failure: `what` failed with `err`.
    pub fn io(what: impl fmt::Display, err: impl fmt::Display) -> Self {
        BuildFailure::Io { message: format!("{what}: {err}") }
    }
}

/// What every build task returns to the parent.
pub type BuildTaskOutput = Result<BuildOutput, BuildFailure>;

/// A task type that [`LocalBuilder`] can run: any [`Task`] whose output is
/// [`BuildTaskOutput`] (implemented for all of them). Its type must be
/// registered in the worker program the builder runs.
pub trait BuildTask: Task<Output = BuildTaskOutput> {}

impl<T: Task<Output = BuildTaskOutput>> BuildTask for T {}

/// One input resolved by the builder: everything a build task needs.
///
/// A custom build task gets the plan from [`LocalBuilder::with_task`]'s
/// constructor; it may change it (add a flag, swap the compiler) and call
/// [`BuildPlan::compile`], or do something else entirely, as long as it
/// returns a [`BuildOutput`] or a [`BuildFailure`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BuildPlan {
    /// The input's (validated) name.
    pub name: String,
    /// The C source.
    pub source: String,
    /// The compiler program.
    pub compiler: String,
    /// The builder's flags followed by the input's extra flags.
    pub flags: Vec<String>,
    /// Where the source is written: `<out_dir>/<name>.c` (absolute).
    pub source_path: PathBuf,
    /// Where the shared library goes: `<out_dir>/<name>.so` (absolute).
    pub artifact_path: PathBuf,
}

impl BuildPlan {
    /// Runs the plan in this process: writes the source to `source_path`,
    /// removes a stale artifact, then runs
    /// `compiler flags... -o artifact_path source_path` with stdin closed and
    /// stdout and stderr captured (stdout is discarded). This is what
    /// [`CompileC`] does in a worker.
    ///
    /// # Errors
    ///
    /// [`BuildFailure::Compile`] if the compiler fails; [`BuildFailure::Io`]
    /// if the source cannot be written, the compiler cannot be started, or it
    /// succeeds without writing the artifact.
    pub fn compile(&self) -> BuildTaskOutput {
        let started = Instant::now();
        // The compiler's own temp files go to a scratch dir next to the
        // artifact: a compiler killed on timeout cannot clean them up, the
        // builder removes the scratch dir instead.
        let scratch = self.scratch_dir();
        std::fs::create_dir_all(&scratch).map_err(|e| {
            BuildFailure::io(format_args!("cannot create {}", scratch.display()), e)
        })?;
        let result = self.compile_in(&scratch, started);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// Where the compiler's temp files go while this plan is compiled
    /// (`TMPDIR`); removed afterwards, also after a timeout.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = self.artifact_path.parent().unwrap_or(Path::new("."));
        dir.join(format!(".tmp-{}", self.name))
    }

    fn compile_in(&self, scratch: &Path, started: Instant) -> BuildTaskOutput {
        if let Some(dir) = self.source_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                BuildFailure::io(format_args!("cannot create {}", dir.display()), e)
            })?;
        }
        std::fs::write(&self.source_path, &self.source).map_err(|e| {
            BuildFailure::io(format_args!("cannot write {}", self.source_path.display()), e)
        })?;
        match std::fs::remove_file(&self.artifact_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BuildFailure::io(
                    format_args!("cannot remove the old {}", self.artifact_path.display()),
                    e,
                ));
            }
            _ => {}
        }
        let output = Command::new(&self.compiler)
            .args(&self.flags)
            .arg("-o")
            .arg(&self.artifact_path)
            .arg(&self.source_path)
            .env("TMPDIR", scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                BuildFailure::io(format_args!("cannot run the compiler {:?}", self.compiler), e)
            })?;
        if !output.status.success() {
            use std::os::unix::process::ExitStatusExt;
            let mut stderr = truncated_text(&output.stderr, MAX_STDERR_BYTES);
            if let Some(sig) = output.status.signal() {
                if !stderr.is_empty() && !stderr.ends_with('\n') {
                    stderr.push('\n');
                }
                stderr.push_str(&format!("(the compiler was terminated by signal {sig})"));
            }
            return Err(BuildFailure::Compile { stderr, status: output.status.code() });
        }
        if !self.artifact_path.is_file() {
            return Err(BuildFailure::Io {
                message: format!(
                    "the compiler {:?} succeeded but wrote no {}",
                    self.compiler,
                    self.artifact_path.display()
                ),
            });
        }
        Ok(BuildOutput::since(&self.artifact_path, started))
    }
}

/// The default build task: compiles a [`BuildPlan`]'s C source into a shared
/// library with [`BuildPlan::compile`].
///
/// Registered as `"rpc_runner.compile_c"` in
/// [`worker::registry`](crate::worker::registry); a worker program that serves
/// a [`LocalBuilder`] must register it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileC {
    /// What to compile, and where.
    pub plan: BuildPlan,
}

impl CompileC {
    /// The task for `plan`.
    pub fn new(plan: BuildPlan) -> Self {
        CompileC { plan }
    }
}

impl Task for CompileC {
    const NAME: &'static str = "rpc_runner.compile_c";
    type Output = BuildTaskOutput;
    fn run(self, _ctx: &mut WorkerContext) -> Result<BuildTaskOutput, TaskFailure> {
        Ok(self.plan.compile())
    }
}

/// Everything that can go wrong with one build (or with starting a builder).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The input was rejected before anything ran (bad or duplicate name).
    #[error("invalid build input {name:?}: {reason}")]
    InvalidInput {
        /// The input's name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The compiler ran and failed (TVM: `COMPILE_HOST`).
    #[error("compilation failed ({}): {stderr}", StatusText(*status))]
    Compile {
        /// The compiler's stderr, with the error lines (at most 64 KiB).
        stderr: String,
        /// The compiler's exit code; `None` if a signal ended it.
        status: Option<i32>,
    },
    /// The build ran past its time limit (TVM: `BUILD_TIMEOUT`); its worker's
    /// whole process group, compiler included, was killed.
    #[error("build timed out after {limit:?}")]
    Timeout {
        /// The limit that was exceeded.
        limit: Duration,
    },
    /// The build task did not finish normally: its worker process died
    /// (abort, signal, exit), it panicked or returned a task error, or no
    /// worker could be started or spoken to.
    #[error("builder crashed: {message}")]
    Crash {
        /// What happened.
        message: String,
        /// How the worker process ended, when it died.
        exit: Option<ExitInfo>,
    },
    /// The worker could not write the source, start the compiler, or find
    /// the artifact the compiler claimed to write.
    #[error("build i/o error: {message}")]
    Io {
        /// What failed, with the path and the OS error.
        message: String,
    },
    /// The builder's configuration is invalid.
    #[error("invalid builder configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The output directory could not be created.
    #[error("cannot create the output directory {}: {source}", path.display())]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process pool refused or lost the task for a reason that is not the
    /// build's: it was shut down, the task was cancelled, or the worker
    /// program does not register the build task type.
    #[error("builder pool error: {source}")]
    Pool {
        /// The pool's error.
        #[source]
        source: PoolError,
    },
}

impl From<BuildFailure> for BuildError {
    fn from(failure: BuildFailure) -> Self {
        match failure {
            BuildFailure::Compile { stderr, status } => BuildError::Compile { stderr, status },
            BuildFailure::Io { message } => BuildError::Io { message },
        }
    }
}

impl From<PoolError> for BuildError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::Timeout { limit } => BuildError::Timeout { limit },
            PoolError::WorkerDied { exit } => BuildError::Crash {
                message: format!("build worker died ({exit})"),
                exit: Some(exit),
            },
            PoolError::Task { kind, message } => BuildError::Crash {
                message: format!("build task failed ({kind}): {message}"),
                exit: None,
            },
            e @ (PoolError::Spawn { .. }
            | PoolError::Initializer { .. }
            | PoolError::Protocol { .. }
            | PoolError::FrameTooLarge { .. }) => {
                BuildError::Crash { message: e.to_string(), exit: None }
            }
            source => BuildError::Pool { source },
        }
    }
}

/// The outcome of one [`BuilderInput`].
#[derive(Debug)]
pub struct BuilderResult {
    /// The input's name.
    pub input_name: String,
    /// The artifact, or why there is none.
    pub result: Result<BuildOutput, BuildError>,
}

impl BuilderResult {
    /// The artifact's path, if the build succeeded.
    pub fn artifact_path(&self) -> Option<&Path> {
        self.result.as_ref().ok().map(|o| o.artifact_path.as_path())
    }
}

/// A [`LocalBuilder`]'s settings.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rpc_runner::measure::LocalBuilderConfig;
///
/// let cfg = LocalBuilderConfig::default()
///     .max_workers(4)
///     .timeout(Duration::from_secs(10))
///     .out_dir("/tmp/my-tuning-run/builds");
/// assert_eq!(cfg.flags, ["-O3", "-shared", "-fPIC"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalBuilderConfig {
    /// Worker processes compiling at once (default: the available parallelism).
    pub max_workers: usize,
    /// Time limit of each build, from the moment a worker takes it (default 30 s).
    pub timeout: Duration,
    /// The compiler program (default: `$CC`, or `cc`). If `$CC` holds several
    /// words (`ccache gcc`), the first is the program and the others are
    /// put in front of [`flags`](Self::flags).
    pub compiler: String,
    /// Flags of every build (default `-O3 -shared -fPIC`; add `-march=native`
    /// to tune for the building machine).
    pub flags: Vec<String>,
    /// Where sources and artifacts go (created if missing). `None` (the
    /// default): a fresh private temp dir that lives as long as the builder
    /// and is removed with it; set a directory to keep the artifacts.
    pub out_dir: Option<PathBuf>,
}

impl Default for LocalBuilderConfig {
    fn default() -> Self {
        let mut flags: Vec<String> = Vec::new();
        let compiler = match std::env::var("CC") {
            Ok(cc) if !cc.trim().is_empty() => {
                let mut words = cc.split_whitespace().map(str::to_owned);
                let program = words.next().unwrap_or_default();
                flags.extend(words);
                program
            }
            _ => "cc".to_owned(),
        };
        flags.extend(["-O3", "-shared", "-fPIC"].map(String::from));
        LocalBuilderConfig {
            max_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeout: Duration::from_secs(30),
            compiler,
            flags,
            out_dir: None,
        }
    }
}

impl LocalBuilderConfig {
    /// Sets [`max_workers`](Self::max_workers).
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Sets [`compiler`](Self::compiler).
    #[must_use]
    pub fn compiler(mut self, program: impl Into<String>) -> Self {
        self.compiler = program.into();
        self
    }

    /// Replaces [`flags`](Self::flags).
    #[must_use]
    pub fn flags<I, S>(mut self, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`out_dir`](Self::out_dir).
    #[must_use]
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        let bad = |message: &str| Err(BuildError::Config { message: message.to_owned() });
        if self.max_workers == 0 {
            return bad("max_workers must be >= 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout must be > 0");
        }
        if self.compiler.trim().is_empty() {
            return bad("compiler must not be empty");
        }
        Ok(())
    }
}

type MakeTask<T> = Box<dyn Fn(BuildPlan) -> T + Send + Sync>;

/// Compiles candidates in a pool of worker processes, each build under a
/// time limit, and reports per input an artifact or a classified
/// [`BuildError`].
///
/// `T` is the build task type, [`CompileC`] unless another is plugged in with
/// [`with_task`](Self::with_task). The worker program must register it
/// ([`worker::registry`](crate::worker::registry) registers [`CompileC`]).
///
/// # Examples
///
/// ```no_run
/// use popen_pool::WorkerProgram;
/// use rpc_runner::measure::{BuilderInput, LocalBuilder, LocalBuilderConfig};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// // `main` starts with `popen_pool::serve_if_worker(rpc_runner::worker::registry())`.
/// let builder = LocalBuilder::new(
///     WorkerProgram::current_exe()?,
///     LocalBuilderConfig::default().out_dir("builds"),
/// )?;
/// let inputs = vec![
///     BuilderInput::new("naive", "int entry(void) { return 0; }"),
///     BuilderInput::new("broken", "int entry(void) { return }"),
/// ];
/// for r in builder.build(inputs).await {
///     match r.result {
///         Ok(out) => println!("{}: {} in {:.2} s", r.input_name, out.artifact_path.display(), out.build_secs),
///         Err(e) => println!("{}: {e}", r.input_name),
///     }
/// }
/// builder.shutdown().await;
/// # Ok(()) }
/// ```
pub struct LocalBuilder<T = CompileC> {
    pool: PopenPool,
    cfg: LocalBuilderConfig,
    out_dir: PathBuf,
    make_task: MakeTask<T>,
    /// The private output directory, when none was configured; removed on drop.
    _temp_dir: Option<tempfile::TempDir>,
}

impl<T> fmt::Debug for LocalBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBuilder")
            .field("task", &std::any::type_name::<T>())
            .field("cfg", &self.cfg)
            .field("out_dir", &self.out_dir)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl LocalBuilder<CompileC> {
    /// A builder that compiles with [`CompileC`] in workers running `program`.
    /// Must be called within a tokio runtime; the workers start at once.
    ///
    /// # Errors
    ///
    /// [`BuildError::Config`] for invalid settings, [`BuildError::OutDir`] if
    /// the output directory cannot be created, [`BuildError::Pool`] if the
    /// pool cannot be built (no tokio runtime).
    pub fn new(
        program: popen_pool::WorkerProgram,
        cfg: LocalBuilderConfig,
    ) -> Result<Self, BuildError> {
        Self::with_task(program, cfg, CompileC::new)
    }
}

impl<T: BuildTask> LocalBuilder<T> {
    /// A builder whose builds run the task `make_task` makes from each
    /// input's [`BuildPlan`]; `T` must be registered in `program`.
    ///
    /// # Examples
    ///
    /// Append a define to every build, then compile as usual:
    ///
    /// ```no_run
    /// # use popen_pool::WorkerProgram;
    /// # use rpc_runner::measure::{CompileC, LocalBuilder, LocalBuilderConfig};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let builder = LocalBuilder::with_task(
    ///     WorkerProgram::current_exe()?,
    ///     LocalBuilderConfig::default(),
    ///     |mut plan| {
    ///         plan.flags.push("-DTUNING=1".into());
    ///         CompileC::new(plan)
    ///     },
    /// )?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`LocalBuilder::new`].
    pub fn with_task(
        program: popen_pool::WorkerProgram,
        cfg: LocalBuilderConfig,
        make_task: impl Fn(BuildPlan) -> T + Send + Sync + 'static,
    ) -> Result<Self, BuildError> {
        cfg.validate()?;
        let (out_dir, temp_dir) = match &cfg.out_dir {
            Some(dir) => {
                // Absolute: a worker program may run in another directory.
                let abs = std::fs::create_dir_all(dir)
                    .and_then(|()| std::path::absolute(dir))
                    .map_err(|source| BuildError::OutDir { path: dir.clone(), source })?;
                (abs, None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("tuning-harness-build-")
                    .tempdir()
                    .map_err(|source| BuildError::OutDir { path: std::env::temp_dir(), source })?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let pool = PopenPool::builder(program)
            .max_workers(cfg.max_workers)
            .timeout(cfg.timeout)
            .build()
            .map_err(|source| BuildError::Pool { source })?;
        Ok(LocalBuilder { pool, cfg, out_dir, make_task: Box::new(make_task), _temp_dir: temp_dir })
    }

    /// Builds every input concurrently (up to `max_workers` at a time) and
    /// returns one result per input, in input order. Inputs with invalid or
    /// repeated names fail with [`BuildError::InvalidInput`] without running.
    ///
    /// Dropping the future cancels the builds not yet finished (their
    /// workers are killed and replaced).
    pub async fn build(&self, inputs: Vec<BuilderInput>) -> Vec<BuilderResult> {
        futures::future::join_all(self.start_batch(inputs)).await
    }

    /// Like [`build`](Self::build), but yields each result as soon as it is
    /// ready (completion order) with its index in `inputs`: for progress bars.
    pub fn build_stream(
        &self,
        inputs: Vec<BuilderInput>,
    ) -> impl Stream<Item = (usize, BuilderResult)> + Send + 'static {
        self.start_batch(inputs)
            .into_iter()
            .enumerate()
            .map(|(i, fut)| async move { (i, fut.await) })
            .collect::<FuturesUnordered<_>>()
    }

    /// Builds one input. The build is queued when this is called; dropping
    /// the future cancels it.
    pub fn build_one(
        &self,
        input: BuilderInput,
    ) -> impl Future<Output = BuilderResult> + Send + 'static {
        self.start(input, None)
    }

    /// The directory that receives sources and artifacts (absolute).
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// The builder's settings.
    pub fn config(&self) -> &LocalBuilderConfig {
        &self.cfg
    }

    /// Counters of the underlying pool (builds completed, timeouts, crashes...).
    pub fn stats(&self) -> popen_pool::PoolStats {
        self.pool.stats()
    }

    /// Finishes the queued and running builds, then stops the workers. A
    /// private output directory is removed afterwards.
    pub async fn shutdown(self) {
        self.pool.shutdown().await;
    }

    /// Stops now: queued and running builds fail with [`BuildError::Pool`]
    /// (pool shut down) and the workers are killed.
    pub async fn kill(&self) {
        self.pool.kill().await;
    }

    fn start_batch(
        &self,
        inputs: Vec<BuilderInput>,
    ) -> Vec<impl Future<Output = BuilderResult> + Send + 'static> {
        let mut seen = HashSet::with_capacity(inputs.len());
        inputs
            .into_iter()
            .map(|input| {
                let duplicate = !seen.insert(input.name.clone());
                self.start(input, duplicate.then_some("the name is used twice in this batch"))
            })
            .collect()
    }

    /// Validates `input` and queues its task now; the future awaits it.
    fn start(
        &self,
        input: BuilderInput,
        rejected: Option<&str>,
    ) -> impl Future<Output = BuilderResult> + Send + 'static {
        let name = input.name.clone();
        let checked = check_name(&name).and_then(|()| match rejected {
            Some(reason) => Err(reason.to_owned()),
            None => Ok(()),
        });
        let pending = match checked {
            Err(reason) => Err(BuildError::InvalidInput { name: name.clone(), reason }),
            Ok(()) => {
                let plan = self.plan(input);
                let leftovers = (plan.artifact_path.clone(), plan.scratch_dir());
                Ok((Pending(Some(self.pool.submit((self.make_task)(plan)))), leftovers))
            }
        };
        async move {
            let result = match pending {
                Err(e) => Err(e),
                Ok((mut pending, (artifact, scratch))) => {
                    let result = pending.wait().await;
                    if result.is_err() {
                        // No stale or half-written artifact under a failed build's
                        // name, and no temp files of a compiler killed on timeout.
                        let _ = tokio::fs::remove_file(&artifact).await;
                        let _ = tokio::fs::remove_dir_all(&scratch).await;
                    }
                    result
                }
            };
            BuilderResult { input_name: name, result }
        }
    }

    fn plan(&self, input: BuilderInput) -> BuildPlan {
        let mut flags = self.cfg.flags.clone();
        flags.extend(input.extra_flags);
        BuildPlan {
            source_path: self.out_dir.join(format!("{}.c", input.name)),
            artifact_path: self.out_dir.join(format!("{}.so", input.name)),
            name: input.name,
            source: input.source,
            compiler: self.cfg.compiler.clone(),
            flags,
        }
    }
}

/// A queued build; aborts it if dropped before it finishes.
struct Pending(Option<TaskHandle<BuildTaskOutput>>);

impl Pending {
    async fn wait(&mut self) -> Result<BuildOutput, BuildError> {
        let Some(handle) = self.0.as_mut() else {
            return Err(BuildError::Pool { source: PoolError::Cancelled });
        };
        let outcome = handle.await;
        self.0 = None;
        match outcome {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(failure)) => Err(failure.into()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// Checks a candidate name: it becomes a file name under the output directory.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} bytes"));
    }
    if name.contains(['/', '\\']) {
        return Err("the name contains a path separator".into());
    }
    if name.starts_with('.') {
        return Err("the name starts with '.' (no '.', '..' or hidden files)".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.".contains(*c))) {
        return Err(format!(
            "the name contains {c:?}; only ASCII letters, digits, '_', '-' and '.' are allowed"
        ));
    }
    Ok(())
}

/// Lossily decodes `bytes`, keeping at most `max` bytes and saying how many were cut.
fn truncated_text(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut text = String::from_utf8_lossy(&bytes[..max]).into_owned();
    text.push_str(&format!("\n[... {} more bytes of compiler output cut]", bytes.len() - max));
    text
}

/// Displays an exit status: `exit code 1`, or `killed by a signal`.
struct StatusText(Option<i32>);

impl fmt::Display for StatusText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, "exit code {code}"),
            None => f.write_str("killed by a signal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_plain_file_names_pass() {
        for name in ["a", "matmul_t32_i4-u2", "v1.2", "X", &"n".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn names_that_could_escape_or_confuse_are_rejected() {
        let long = "n".repeat(MAX_NAME_LEN + 1);
        for name in
            ["", ".", "..", "../x", "a/b", "/abs", "a\\b", ".hidden", "sp ace", "nul\0", "é", &long]
        {
            assert!(check_name(name).is_err(), "{name:?} passed");
        }
    }

    #[test]
    fn defaults_follow_tvm() {
        let cfg = LocalBuilderConfig::default();
        assert_eq!(cfg.timeout, Duration::from_secs(30));
        assert!(cfg.flags.ends_with(&["-O3".into(), "-shared".into(), "-fPIC".into()]));
        assert!(!cfg.flags.iter().any(|f| f == "-march=native"));
        assert!(cfg.max_workers >= 1);
        assert_eq!(cfg.out_dir, None);
        assert_eq!(cfg.validate().map_err(|e| e.to_string()), Ok(()));
        assert!(cfg.clone().max_workers(0).validate().is_err());
        assert!(cfg.clone().timeout(Duration::ZERO).validate().is_err());
        assert!(cfg.compiler(" ").validate().is_err());
    }

    #[test]
    fn long_compiler_output_is_cut_with_a_note() {
        let text = truncated_text(&[b'x'; 100], 10);
        assert!(text.starts_with("xxxxxxxxxx\n[... 90 more bytes"), "{text}");
        assert_eq!(truncated_text(b"short", 10), "short");
    }

    #[test]
    fn failures_are_classified() {
        let crash: BuildError = PoolError::WorkerDied { exit: ExitInfo::Signal(6) }.into();
        assert!(matches!(crash, BuildError::Crash { exit: Some(ExitInfo::Signal(6)), .. }));
        let timeout: BuildError = PoolError::Timeout { limit: Duration::from_secs(1) }.into();
        assert!(
            matches!(timeout, BuildError::Timeout { limit } if limit == Duration::from_secs(1))
        );
        let panic: BuildError =
            PoolError::Task { kind: "panic".into(), message: "boom".into() }.into();
        assert!(
            matches!(panic, BuildError::Crash { exit: None, ref message } if message.contains("boom"))
        );
        let shut: BuildError = PoolError::Shutdown.into();
        assert!(matches!(shut, BuildError::Pool { source: PoolError::Shutdown }));
        let compile: BuildError =
            BuildFailure::Compile { stderr: "x.c:3: error".into(), status: Some(1) }.into();
        assert_eq!(compile.to_string(), "compilation failed (exit code 1): x.c:3: error");
    }
}
