//! The one error enum of the pool, and the exit description of a dead worker.

use std::fmt;
use std::time::Duration;

/// How a worker process ended (serializes as itself: `{"Code": 3}`,
/// `{"Signal": 9}`, `"Unknown"` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ExitInfo {
    /// The process exited with this code.
    Code(i32),
    /// The process was terminated by this signal number.
    Signal(i32),
    /// The exit status could not be determined (it was reaped elsewhere).
    Unknown,
}

impl ExitInfo {
    /// Builds an [`ExitInfo`] from a standard exit status.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitInfo::Code(code),
            (None, Some(sig)) => ExitInfo::Signal(sig),
            _ => ExitInfo::Unknown,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitInfo::Code(code) => write!(f, "exit code {code}"),
            ExitInfo::Signal(sig) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(s) => f.write_str(s.as_str()),
                Err(_) => write!(f, "signal {sig}"),
            },
            ExitInfo::Unknown => f.write_str("unknown exit status"),
        }
    }
}

/// Everything that can go wrong with a task or a worker.
///
/// Each task gets exactly one of these on failure; a failure of one task never
/// fails the pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The task ran past its time limit; its worker and the task's processes were killed.
    #[error("task timed out after {limit:?}")]
    Timeout {
        /// The limit that was exceeded.
        limit: Duration,
    },
    /// The worker process died while running the task (crash, abort, `exit`).
    #[error("worker died ({exit})")]
    WorkerDied {
        /// How the worker ended.
        exit: ExitInfo,
    },
    /// The task took its worker past the pool's memory ceiling
    /// (`memory_limit`) while it ran; the worker and the task's processes
    /// were killed and a fresh worker takes its place.
    #[error("task exceeded the worker memory limit of {limit} bytes; the worker was killed")]
    MemoryLimit {
        /// The ceiling, in bytes.
        limit: u64,
    },
    /// The task returned an error or panicked; the worker keeps serving.
    #[error("task failed ({kind}): {message}")]
    Task {
        /// `"panic"` for a caught panic, otherwise the kind the task reported.
        kind: String,
        /// The error or panic message.
        message: String,
    },
    /// The worker program does not register a task of this name.
    #[error("unknown task {name:?}: the worker program registers {known:?}")]
    UnknownTask {
        /// The name that was asked for.
        name: String,
        /// The names the worker program registers.
        known: Vec<String>,
    },
    /// The task was aborted through its handle before it finished.
    #[error("task cancelled")]
    Cancelled,
    /// The pool was shut down or killed before the task could finish.
    #[error("pool shut down")]
    Shutdown,
    /// The bounded queue is full (use `submit_wait` to wait for room).
    #[error("task queue is full ({capacity} tasks)")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// A worker process could not be started or did not complete its handshake.
    #[error("failed to spawn worker: {message}")]
    Spawn {
        /// What went wrong, with the program's path.
        message: String,
    },
    /// The worker's initializer failed; the worker is not used.
    #[error("worker initializer failed: {source}")]
    Initializer {
        /// The initializer's own failure.
        #[source]
        source: Box<PoolError>,
    },
    /// A frame is larger than the configured maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum frame size of {max} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The worker sent something that breaks the protocol; it was killed.
    #[error("protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// A task or its output could not be (de)serialized in the parent.
    #[error("codec error: {message}")]
    Codec {
        /// The serializer's message.
        message: String,
    },
    /// The pool's configuration is invalid.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
}

impl PoolError {
    pub(crate) fn spawn(message: impl Into<String>) -> Self {
        PoolError::Spawn { message: message.into() }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        PoolError::Protocol { message: message.into() }
    }

    pub(crate) fn codec(err: postcard::Error) -> Self {
        PoolError::Codec { message: err.to_string() }
    }

    /// True when the worker process was lost with this error (timeout, crash,
    /// memory limit, cancellation of a running task, protocol error), so a new one is started.
    pub fn killed_worker(&self) -> bool {
        matches!(
            self,
            PoolError::Timeout { .. }
                | PoolError::WorkerDied { .. }
                | PoolError::MemoryLimit { .. }
                | PoolError::Protocol { .. }
                | PoolError::Cancelled
        )
    }
}

/// An error and its sources, `: `-separated, leaving out a source whose
/// text the chain already contains (an error that prints its source).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The failure a task reports from [`Task::run`](crate::Task::run).
///
/// Any `std::error::Error` converts into it with `?` (the kind becomes the
/// error's type name), or build one with [`TaskFailure::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// A short machine-readable category, e.g. `"io"` or `"compile_error"`.
    pub kind: String,
    /// A human-readable message.
    pub message: String,
}

impl TaskFailure {
    /// A failure with an explicit kind.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        TaskFailure { kind: kind.into(), message: message.into() }
    }

    /// A failure of kind `"error"`.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::new("error", message)
    }
}

impl<E: std::error::Error> From<E> for TaskFailure {
    fn from(err: E) -> Self {
        let full = std::any::type_name::<E>();
        let short = full.rsplit("::").next().unwrap_or(full);
        TaskFailure::new(short, error_chain(&err))
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_serializes_as_itself() {
        let json = serde_json::to_string(&[ExitInfo::Code(3), ExitInfo::Signal(9)]).unwrap();
        assert_eq!(json, r#"[{"Code":3},{"Signal":9}]"#);
        let back: Vec<ExitInfo> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, [ExitInfo::Code(3), ExitInfo::Signal(9)]);
    }

    #[test]
    fn the_error_chain_leaves_out_repeated_sources() {
        let inner = std::io::Error::other("disk full");
        let outer = PoolError::Initializer { source: Box::new(PoolError::spawn("no")) };
        assert_eq!(error_chain(&outer), "worker initializer failed: failed to spawn worker: no");
        assert_eq!(error_chain(&inner), "disk full");
    }
}
