//! Errors of sessions, as a client sees them.

use std::time::Duration;

use popen_pool::PoolError;

use crate::tracker::TrackerError;
use crate::wire::error::WireError;

/// Everything that can go wrong with a session, from the client's side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The TCP connection to the server could not be made.
    #[error("cannot connect to device server {addr}")]
    Connect {
        /// The server's address.
        addr: String,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// A step did not finish in time.
    #[error("timed out after {limit:?} while {what}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The server did not accept the match key (it is not the server's
    /// current key: leased to someone else, or stale).
    #[error("the device server refused the match key {matchkey:?} (mismatch)")]
    KeyMismatch {
        /// The key that was refused.
        matchkey: String,
    },
    /// The server is serving another session.
    #[error("the device server is busy with another session")]
    Busy,
    /// The server requires a token and the one given (or none) is wrong.
    #[error("the device server refused the session token")]
    Unauthorized,
    /// The handshake failed otherwise (not an RPC server, bad answer).
    #[error("handshake with the device server failed: {message}")]
    Handshake {
        /// What went wrong.
        message: String,
    },
    /// A remote path was rejected: absolute, containing `..`, or empty.
    #[error("remote path {path:?} rejected: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A remote file or directory does not exist.
    #[error("remote path {path:?} not found")]
    NotFound {
        /// The path.
        path: String,
    },
    /// A filesystem operation failed on the server.
    #[error("remote i/o error: {message}")]
    RemoteIo {
        /// The server's message.
        message: String,
    },
    /// A local file could not be read or written.
    #[error("local i/o error on {path}")]
    LocalIo {
        /// The local path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An upload exceeds the server's size limit.
    #[error("upload of {len} bytes exceeds the server's limit of {limit} bytes")]
    UploadTooLarge {
        /// The upload's size.
        len: u64,
        /// The server's limit.
        limit: u64,
    },
    /// A task run in the session's worker failed: timeout, worker died
    /// (e.g. `worker died (SIGSEGV)`), task error or panic, unknown task.
    #[error("remote task failed: {0}")]
    Task(#[source] PoolError),
    /// The server ended the session because it ran past its timeout.
    #[error("session timed out after {limit:?}: the server ended it")]
    SessionTimeout {
        /// The session timeout.
        limit: Duration,
    },
    /// The server is shutting down and ended the session.
    #[error("the device server is shutting down")]
    ServerShutdown,
    /// The connection broke (server killed, network down).
    #[error("connection to the device server was lost")]
    ConnectionLost {
        /// The i/o error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The session was already closed.
    #[error("the session is closed")]
    Closed,
    /// An earlier error left the session unusable (the connection broke, the
    /// server ended the session, or the protocol lost sync); every method
    /// fails fast with this until the session is dropped or closed.
    #[error("the session is unusable after an earlier error: {reason}")]
    Broken {
        /// The earlier error, as text.
        reason: String,
    },
    /// A frame is larger than a limit: a request larger than the server
    /// accepts (checked before sending), or a frame from the server larger
    /// than this client accepts (reported by whichever side saw it).
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's payload size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A reply (call output, download into memory) is larger than
    /// [`ConnectOptions::max_reply_bytes`](crate::ConnectOptions::max_reply_bytes).
    #[error("reply of {len} bytes exceeds this client's limit of {limit} bytes")]
    ReplyTooLarge {
        /// The reply's size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The server accepted the connection but could not set up a session
    /// (e.g. its work dir is missing or unwritable); it takes itself out of
    /// its tracker until it can serve again.
    #[error("the device server cannot set up a session: {message}")]
    SetupFailed {
        /// The server's reason.
        message: String,
    },
    /// The server refused the connection: it is at its connection limit.
    #[error("the device server refused the connection: it is at its connection limit")]
    AtCapacity,
    /// The server broke the protocol.
    #[error("session protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// Talking to the tracker failed (the message is the tracker error's,
    /// which carries its cause).
    #[error(transparent)]
    Tracker(#[from] TrackerError),
}

impl SessionError {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        SessionError::Protocol { message: message.into() }
    }

    pub(crate) fn from_wire(e: WireError) -> Self {
        match e {
            WireError::BadPath { path, reason } => SessionError::BadPath { path, reason },
            WireError::NotFound { path } => SessionError::NotFound { path },
            WireError::Io { message } => SessionError::RemoteIo { message },
            WireError::UploadTooLarge { len, limit } => SessionError::UploadTooLarge { len, limit },
            WireError::TaskTimeout { limit_ms } => {
                SessionError::Task(PoolError::Timeout { limit: Duration::from_millis(limit_ms) })
            }
            WireError::WorkerDied { exit } => SessionError::Task(PoolError::WorkerDied { exit }),
            WireError::Task { kind, message } => {
                SessionError::Task(PoolError::Task { kind, message })
            }
            WireError::UnknownTask { name, known } => {
                SessionError::Task(PoolError::UnknownTask { name, known })
            }
            WireError::Worker { message } => SessionError::Task(PoolError::Protocol { message }),
            WireError::SessionTimeout { limit_ms } => {
                SessionError::SessionTimeout { limit: Duration::from_millis(limit_ms) }
            }
            WireError::ServerShutdown => SessionError::ServerShutdown,
            WireError::Protocol { message } => SessionError::Protocol { message },
            WireError::FrameTooLarge { len, limit } => SessionError::FrameTooLarge { len, limit },
            WireError::SetupFailed { message } => SessionError::SetupFailed { message },
            WireError::MemoryLimit { limit } => {
                SessionError::Task(PoolError::MemoryLimit { limit })
            }
            WireError::Cancelled => SessionError::protocol("the server cancelled a live request"),
        }
    }
}
