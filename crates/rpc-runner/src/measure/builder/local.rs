//! The parent side: [`LocalBuilder`] validates inputs, resolves them into
//! [`BuildPlan`]s and runs their build tasks in a process pool.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt as _;
use popen_pool::{PoolError, PopenPool, TaskHandle};
use tokio_util::sync::CancellationToken;

use super::config::LocalBuilderConfig;
use super::error::{BuildError, BuilderResult};
use super::plan::{BuildOutput, BuildPlan, BuildTask, BuildTaskOutput, BuilderInput, CompileC};
use crate::measure::batch::Batch;
use crate::measure::cause::Cause;

/// The stream of a batch of builds: `(index, result)` in completion order.
pub type BuildStream = Batch<BuilderResult>;

type MakeTask<T> = Box<dyn Fn(BuildPlan) -> T + Send + Sync>;

/// Compiles candidates in a pool of worker processes, each build under a
/// time limit, and reports per input an artifact or a classified
/// [`BuildError`]. Cheap to clone (an `Arc` inside); clones share the pool.
///
/// `T` is the build task type, [`CompileC`] unless another is plugged in with
/// [`with_task`](Self::with_task). The worker program must register it
/// ([`tasks::registry`](crate::tasks::registry) registers [`CompileC`]).
///
/// Builds come back as a [`BuildStream`], like a runner's measurements:
/// **dropping the stream (or a [`build_one`](Self::build_one) future)
/// cancels the builds it owns**: queued ones are removed, running ones have
/// their worker killed (and replaced).
///
/// # Examples
///
/// ```no_run
/// use futures::StreamExt as _;
/// use popen_pool::WorkerProgram;
/// use rpc_runner::measure::{BuilderInput, LocalBuilder, LocalBuilderConfig};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// // `main` starts with `popen_pool::serve_if_worker(rpc_runner::tasks::registry())`.
/// let builder = LocalBuilder::new(
///     WorkerProgram::current_exe()?,
///     LocalBuilderConfig::default().out_dir("builds"),
/// )?;
/// let inputs = vec![
///     BuilderInput::new("naive", "int entry(void) { return 0; }"),
///     BuilderInput::new("broken", "int entry(void) { return }"),
/// ];
/// // As they finish, with their index...
/// let mut builds = builder.build(inputs.clone());
/// while let Some((i, r)) = builds.next().await {
///     match r.result {
///         Ok(out) => println!("{i} {}: {} in {:.2} s", r.input_name, out.artifact_path.display(), out.build_secs),
///         Err(e) => println!("{i} {}: {e}", r.input_name),
///     }
/// }
/// // ...or all of them, in input order.
/// let results = builder.build(inputs).collect_ordered().await;
/// assert!(results[1].result.as_ref().unwrap_err().stderr().is_some());
/// builder.shutdown().await;
/// # Ok(()) }
/// ```
pub struct LocalBuilder<T = CompileC> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    /// `None` once [`LocalBuilder::shutdown`] took it.
    pool: Mutex<Option<PopenPool>>,
    cfg: LocalBuilderConfig,
    out_dir: PathBuf,
    make_task: MakeTask<T>,
    /// The private output directory, when none was configured; removed with
    /// the last clone.
    _temp_dir: Option<tempfile::TempDir>,
}

impl<T> Clone for LocalBuilder<T> {
    fn clone(&self) -> Self {
        LocalBuilder { inner: Arc::clone(&self.inner) }
    }
}

impl<T> fmt::Debug for LocalBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBuilder")
            .field("task", &std::any::type_name::<T>())
            .field("cfg", &self.inner.cfg)
            .field("out_dir", &self.inner.out_dir)
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
        let out_dir_err =
            |path: PathBuf| move |e| BuildError::OutDir { path, source: Cause::new(e) };
        let (out_dir, temp_dir) = match &cfg.out_dir {
            Some(dir) => {
                // Absolute: a worker program may run in another directory.
                let abs = std::fs::create_dir_all(dir)
                    .and_then(|()| std::path::absolute(dir))
                    .map_err(out_dir_err(dir.clone()))?;
                (abs, None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("tuning-harness-build-")
                    .tempdir()
                    .map_err(out_dir_err(std::env::temp_dir()))?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        // The kernel ABI header and the TVM-FFI header (which includes it),
        // on every build's include path.
        let include = out_dir.join("include");
        crate::measure::write_tvm_ffi_header(&include).map_err(out_dir_err(include.clone()))?;
        let mut pool =
            PopenPool::builder(program).max_workers(cfg.max_workers).timeout(cfg.timeout);
        if let Some(cpus) = &cfg.cpus {
            pool = pool.cpu_affinity(cpus.iter().copied());
        }
        if let Some(bytes) = cfg.memory_limit {
            pool = pool.memory_limit(bytes);
        }
        let pool = pool.build().map_err(BuildError::pool)?;
        Ok(LocalBuilder {
            inner: Arc::new(Inner {
                pool: Mutex::new(Some(pool)),
                cfg,
                out_dir,
                make_task: Box::new(make_task),
                _temp_dir: temp_dir,
            }),
        })
    }

    /// Starts building every input (up to `max_workers` at a time); the
    /// stream yields each result when ready, with its index in `inputs`
    /// ([`collect_ordered`](Batch::collect_ordered) for all of them in input
    /// order). Inputs with invalid or repeated names fail with
    /// [`BuildError::InvalidInput`] without running.
    ///
    /// Dropping the stream cancels the builds not yet finished (their
    /// workers are killed and replaced).
    pub fn build(&self, inputs: Vec<BuilderInput>) -> BuildStream {
        self.build_with_cancel(inputs, &CancellationToken::new())
    }

    /// As [`build`](Self::build); cancelling `cancel` cancels every
    /// unfinished build of the batch ([`BuildError::Cancelled`]).
    pub fn build_with_cancel(
        &self,
        inputs: Vec<BuilderInput>,
        cancel: &CancellationToken,
    ) -> BuildStream {
        let cancel = cancel.child_token();
        let mut seen = HashSet::with_capacity(inputs.len());
        let futures: Vec<_> = inputs
            .into_iter()
            .map(|input| {
                let duplicate = !seen.insert(input.name.clone());
                let rejected = duplicate.then_some("the name is used twice in this batch");
                self.start(input, rejected, cancel.clone()).boxed()
            })
            .collect();
        Batch::new(futures, cancel)
    }

    /// Builds one input. The build is queued when this is called; dropping
    /// the future cancels it.
    pub fn build_one(
        &self,
        input: BuilderInput,
    ) -> impl Future<Output = BuilderResult> + Send + 'static {
        self.start(input, None, CancellationToken::new())
    }

    /// The directory that receives sources and artifacts (absolute).
    pub fn out_dir(&self) -> &Path {
        &self.inner.out_dir
    }

    /// The builder's settings.
    pub fn config(&self) -> &LocalBuilderConfig {
        &self.inner.cfg
    }

    /// Counters of the underlying pool (builds completed, timeouts,
    /// crashes...); zeros after [`shutdown`](Self::shutdown).
    pub fn stats(&self) -> popen_pool::PoolStats {
        self.with_pool(|p| p.map(PopenPool::stats).unwrap_or_default())
    }

    /// Finishes the queued and running builds, then stops the workers; later
    /// builds (of any clone) fail with [`BuildError::Pool`]. A private output
    /// directory is removed when the last clone is dropped.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the pool, which kills its workers.
    pub async fn shutdown(self) {
        let pool = self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(pool) = pool {
            pool.shutdown().await;
        }
    }

    /// Stops now: queued and running builds fail with [`BuildError::Pool`]
    /// (pool shut down) and the workers are killed.
    ///
    /// # Cancel safety
    ///
    /// As `PopenPool::kill`: the kill completes in the background.
    pub async fn kill(&self) {
        let pool = self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(pool) = pool {
            pool.kill().await;
        }
    }

    fn with_pool<R>(&self, f: impl FnOnce(Option<&PopenPool>) -> R) -> R {
        f(self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner).as_ref())
    }

    /// Validates `input` and queues its task now; the future awaits it.
    fn start(
        &self,
        input: BuilderInput,
        rejected: Option<&str>,
        cancel: CancellationToken,
    ) -> impl Future<Output = BuilderResult> + Send + 'static {
        let name = input.name.clone();
        let checked = super::plan::check_name(&name).and_then(|()| match rejected {
            Some(reason) => Err(reason.to_owned()),
            None => Ok(()),
        });
        let pending = match checked {
            Err(reason) => Err(BuildError::InvalidInput { name: name.clone(), reason }),
            Ok(()) => {
                let plan = self.plan(input);
                let leftovers = (plan.artifact_path.clone(), plan.scratch_dir());
                let task = (self.inner.make_task)(plan);
                match self.with_pool(|p| p.map(|p| p.submit(task))) {
                    Some(handle) => Ok((Pending(Some(handle)), leftovers)),
                    None => Err(BuildError::pool(PoolError::Shutdown)),
                }
            }
        };
        async move {
            let result = match pending {
                Err(e) => Err(e),
                Ok((mut pending, (artifact, scratch))) => {
                    let result = tokio::select! {
                        biased;
                        r = pending.wait() => r,
                        () = cancel.cancelled() => Err(BuildError::Cancelled),
                    };
                    // Kills the build if it was cancelled.
                    drop(pending);
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
        let cfg = &self.inner.cfg;
        let mut flags = cfg.flags.clone();
        flags.push(format!("-I{}", self.inner.out_dir.join("include").display()));
        flags.extend(input.extra_flags);
        BuildPlan {
            source_path: self.inner.out_dir.join(format!("{}.c", input.name)),
            artifact_path: self.inner.out_dir.join(format!("{}.so", input.name)),
            name: input.name,
            source: input.source,
            compiler: cfg.compiler.clone(),
            flags,
            tvm_export: cfg.tvm_export.clone(),
        }
    }
}

/// A queued build; aborts it if dropped before it finishes.
struct Pending(Option<TaskHandle<BuildTaskOutput>>);

impl Pending {
    async fn wait(&mut self) -> Result<BuildOutput, BuildError> {
        let Some(handle) = self.0.as_mut() else {
            return Err(BuildError::Cancelled);
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
