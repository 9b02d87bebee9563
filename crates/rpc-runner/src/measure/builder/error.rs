//! [`BuildError`] and [`BuilderResult`]: how one build ended.

use std::path::{Path, PathBuf};
use std::time::Duration;

use popen_pool::{ExitInfo, PoolError};
use serde::{Deserialize, Serialize};

use super::plan::{BuildFailure, BuildOutput, ErrorLine, StatusText};
use crate::measure::cause::Cause;

/// Everything that can go wrong with one build (or with starting a builder).
///
/// Causes are typed sources ([`Cause`]); each variant's `Display` is one
/// line (a compile error's shows the compiler's first error line; the whole
/// stderr is [`stderr`](BuildError::stderr)). Serializes with the causes as
/// text.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
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
    #[error("compilation failed ({}){}", StatusText(*status), ErrorLine(stderr))]
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
        /// What happened (`build worker died (SIGABRT)`...).
        message: String,
        /// How the worker process ended, when it died.
        #[serde(default)]
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
    #[error("cannot create the output directory {}", path.display())]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Cause<std::io::Error>,
    },
    /// The build was cancelled (its token, or its stream dropped); its
    /// worker was killed if it had started.
    #[error("build cancelled")]
    Cancelled,
    /// The process pool refused or lost the task for a reason that is not the
    /// build's: it was shut down, or the worker program does not register
    /// the build task type.
    #[error("builder pool error")]
    Pool {
        /// The pool's error.
        #[source]
        source: Cause<PoolError>,
    },
}

impl BuildError {
    /// The compiler's whole stderr, for a [`Compile`](BuildError::Compile) error.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            BuildError::Compile { stderr, .. } => Some(stderr),
            _ => None,
        }
    }

    pub(crate) fn pool(source: PoolError) -> Self {
        BuildError::Pool { source: Cause::new(source) }
    }
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
            PoolError::Cancelled => BuildError::Cancelled,
            e @ PoolError::MemoryLimit { .. } => {
                BuildError::Crash { message: format!("build killed: {e}"), exit: None }
            }
            e @ (PoolError::Spawn { .. }
            | PoolError::Initializer { .. }
            | PoolError::Protocol { .. }
            | PoolError::FrameTooLarge { .. }) => {
                BuildError::Crash { message: e.to_string(), exit: None }
            }
            source => BuildError::pool(source),
        }
    }
}

/// The outcome of one [`BuilderInput`](super::BuilderInput).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(
            matches!(&shut, BuildError::Pool { source } if matches!(source.get(), Some(PoolError::Shutdown)))
        );
        let cancelled: BuildError = PoolError::Cancelled.into();
        assert_eq!(cancelled, BuildError::Cancelled);
        let compile: BuildError =
            BuildFailure::Compile { stderr: "x.c:3: error: no\nmore\n".into(), status: Some(1) }
                .into();
        assert_eq!(compile.to_string(), "compilation failed (exit code 1): x.c:3: error: no");
        assert_eq!(compile.stderr(), Some("x.c:3: error: no\nmore\n"));
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = BuilderResult {
            input_name: "bad".into(),
            result: Err(BuildFailure::Compile { stderr: "e".into(), status: Some(1) }.into()),
        };
        let back: BuilderResult =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let crash: BuildError = PoolError::WorkerDied { exit: ExitInfo::Signal(11) }.into();
        let back: BuildError =
            serde_json::from_str(&serde_json::to_string(&crash).unwrap()).unwrap();
        assert_eq!(back, crash, "the exit status survives");
    }
}
