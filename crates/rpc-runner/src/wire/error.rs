//! Errors as they travel from server to client.

use popen_pool::{ExitInfo, PoolError};
use serde::{Deserialize, Serialize};

/// An error as it travels from server to client (`Response::Error` or
/// `Response::Terminated`); the client turns it into a `SessionError`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum WireError {
    /// A remote path was rejected (absolute, `..`, empty).
    #[error("remote path {path:?} rejected: {reason}")]
    BadPath { path: String, reason: String },
    /// A file or directory does not exist.
    #[error("remote path {path:?} not found")]
    NotFound { path: String },
    /// A filesystem operation failed.
    #[error("remote i/o error: {message}")]
    Io { message: String },
    /// An upload exceeds the server's limit.
    #[error("upload of {len} bytes exceeds the server's limit of {limit} bytes")]
    UploadTooLarge { len: u64, limit: u64 },
    /// The task ran past its time limit (the session's worker was replaced).
    #[error("task timed out after {limit_ms} ms")]
    TaskTimeout { limit_ms: u64 },
    /// The session's worker died under the task.
    #[error("worker died ({exit})")]
    WorkerDied { exit: ExitInfo },
    /// The task returned an error or panicked.
    #[error("task failed ({kind}): {message}")]
    Task { kind: String, message: String },
    /// The worker program does not register the task.
    #[error("unknown task {name:?}")]
    UnknownTask { name: String, known: Vec<String> },
    /// Another pool error (spawn, frame size...), as text.
    #[error("worker error: {message}")]
    Worker { message: String },
    /// The session ran past its timeout.
    #[error("session timed out after {limit_ms} ms")]
    SessionTimeout { limit_ms: u64 },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ServerShutdown,
    /// The peer broke the protocol.
    #[error("protocol error: {message}")]
    Protocol { message: String },
    /// A frame (request or reply) is larger than the receiver's limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: u64 },
    /// The client cancelled the request.
    #[error("cancelled by the client")]
    Cancelled,
    /// The session's worker crossed its memory ceiling during the task.
    #[error("worker crossed its memory ceiling of {limit} bytes")]
    MemoryLimit { limit: u64 },
    /// The server could not set up the session (e.g. its work dir is gone).
    #[error("the server cannot set up a session: {message}")]
    SetupFailed { message: String },
}

impl WireError {
    /// How a pool error travels to the client.
    pub(crate) fn from_pool(e: PoolError) -> Self {
        match e {
            PoolError::Timeout { limit } => WireError::TaskTimeout {
                limit_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            },
            PoolError::WorkerDied { exit } => WireError::WorkerDied { exit },
            PoolError::Task { kind, message } => WireError::Task { kind, message },
            PoolError::UnknownTask { name, known } => WireError::UnknownTask { name, known },
            PoolError::MemoryLimit { limit } => WireError::MemoryLimit { limit },
            other => WireError::Worker { message: error_chain(&other) },
        }
    }
}

/// An error and its sources, `: `-separated (the one helper, popen-pool's).
pub(crate) use popen_pool::error_chain;
