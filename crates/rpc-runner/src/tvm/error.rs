//! Errors of sessions with TVM's RPC servers: [`TvmError`].

use std::time::Duration;

use crate::tracker::TrackerError;

/// Everything that can go wrong with a [`TvmSession`](super::TvmSession).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TvmError {
    /// The TCP connection to the server could not be made.
    #[error("cannot connect to TVM RPC server {addr}")]
    Connect {
        /// The server's address.
        addr: String,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not accept the match key.
    #[error("the TVM RPC server refused the match key {matchkey:?} (mismatch)")]
    KeyMismatch {
        /// The key that was refused.
        matchkey: String,
    },
    /// The handshake failed otherwise (not an RPC server, a refusal code).
    #[error("handshake with the TVM RPC server failed: {message}")]
    Handshake {
        /// What went wrong.
        message: String,
    },
    /// The server's first reply does not decode in TVM's current (>= 0.21)
    /// wire format: an older TVM, or not a TVM server at all.
    #[error(
        "the server's first reply does not decode ({detail}): this looks like a TVM server \
         older than 0.21 (whose RPC wire format differs under the same version string \
         \"0.8.0\"; only TVM >= 0.21 is supported), or not a TVM RPC server"
    )]
    Incompatible {
        /// What did not decode.
        detail: String,
        /// The reply was a well-formed TVM packet whose content did not
        /// decode (an older TVM), rather than no TVM packet at all (e.g. an
        /// absurd length: another protocol).
        tvm_framing: bool,
    },
    /// A step did not finish in time (connect, a call, close).
    #[error("timed out after {limit:?} while {what}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// The server ended the session because its session timeout passed.
    #[error("the TVM RPC server ended the session: {message}")]
    SessionTimeout {
        /// The server's message (`RPCSessionTimeoutError: ...`).
        message: String,
    },
    /// The server raised an error (a `kException` packet).
    #[error("remote error: {message}")]
    Remote {
        /// The server's message.
        message: String,
    },
    /// The server has no global function of this name.
    #[error("the TVM RPC server has no global function {name:?}")]
    NoSuchFunction {
        /// The name asked for.
        name: String,
    },
    /// A packet announced more bytes than this client accepts.
    #[error("packet of {len} bytes exceeds this client's limit of {limit} bytes")]
    PacketTooLarge {
        /// The announced length.
        len: u64,
        /// The limit ([`TvmOptions::max_packet_bytes`](super::TvmOptions::max_packet_bytes)).
        limit: u64,
    },
    /// A reply did not decode, or was not the kind expected.
    #[error("TVM RPC protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The connection broke (the server or its session process died).
    #[error("connection to the TVM RPC server was lost while {what}")]
    ConnectionLost {
        /// What was under way.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The session is unusable after an earlier failure or a cancelled call.
    #[error("the TVM session is unusable after an earlier error: {reason}")]
    Broken {
        /// The earlier failure.
        reason: String,
    },
    /// The session was closed.
    #[error("the TVM session is closed")]
    Closed,
    /// An argument cannot be sent (e.g. a tensor too large to describe).
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong.
        message: String,
    },
    /// Leasing the device from the tracker failed.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
}

impl TvmError {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        TvmError::Protocol { message: message.into() }
    }

    /// True for the errors after which the session cannot go on.
    pub(crate) fn breaks_session(&self) -> bool {
        !matches!(
            self,
            TvmError::Remote { .. }
                | TvmError::NoSuchFunction { .. }
                | TvmError::InvalidArgument { .. }
        )
    }
}
