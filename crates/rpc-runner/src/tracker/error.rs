//! The one error enum of the tracker subsystem (server, codec and clients).

use std::io;
use std::time::Duration;

/// The longest [`TrackerError::Protocol`] message, in bytes.
const MAX_MESSAGE: usize = 300;

/// Everything that can go wrong when speaking the tracker protocol.
///
/// On the server side an error ends the one connection it happened on (a
/// peer that sends a bad magic, a malformed frame or an ill-typed request is
/// disconnected); the tracker keeps serving everyone else. On the client side
/// an error other than [`TrackerError::Refused`] leaves the connection closed.
///
/// Every message carries its cause (e.g. `cannot connect to the tracker at
/// 10.0.0.1:9190: Connection refused (os error 111)`), so a caller that only
/// prints the top-level message still says what happened; the cause is also
/// the error's `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// Reading from or writing to the connection failed.
    #[error("tracker connection i/o failed: {0}")]
    Io(#[from] io::Error),
    /// The TCP connection to the tracker could not be established.
    #[error("cannot connect to the tracker at {addr}: {source}")]
    Connect {
        /// The address that was dialled (`host:port`).
        addr: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The peer's handshake magic is not `TRACKER_MAGIC` (`0x2F271`): it is
    /// not a tracker (client side) or not a tracker client (server side).
    #[error(
        "bad tracker magic {got:#x} (expected 0x2f271): the peer does not speak the tracker protocol"
    )]
    BadMagic {
        /// The 4 bytes received, as a little-endian `i32`.
        got: i32,
    },
    /// A frame's length exceeds the limit of its direction:
    /// [`MAX_FRAME`](super::MAX_FRAME) (1 MiB) for requests,
    /// [`MAX_REPLY`](super::MAX_REPLY) (64 MiB) for replies.
    #[error("frame of {len} bytes exceeds the maximum of {limit} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// A frame's JSON nests arrays and objects deeper than allowed (checked
    /// without recursion before parsing). The tracker answers such a request
    /// with `FAIL` and keeps the connection; a client drops the connection.
    #[error("frame nests json deeper than {limit} levels")]
    TooDeep {
        /// The deepest nesting allowed.
        limit: usize,
    },
    /// A frame is malformed (a length of zero or less, or a truncated frame).
    #[error("malformed frame: {reason}")]
    BadFrame {
        /// What is wrong with it.
        reason: String,
    },
    /// A frame's body is not valid UTF-8.
    #[error("frame is not valid utf-8: {source}")]
    InvalidUtf8 {
        /// The decoding error.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A frame's body is not valid JSON.
    #[error("frame is not valid json: {source}")]
    InvalidJson {
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A well-formed JSON message that breaks the protocol: an unknown code,
    /// a missing field, a field of the wrong type, an unexpected reply.
    #[error("protocol error: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The tracker answered a request with a failure: `STOP` with a wrong
    /// stop key is answered `-1`; our tracker answers a request over one of
    /// its limits `[-1, "<reason>"]`. The connection stays usable.
    #[error("the tracker refused {request}: it replied {reply}")]
    Refused {
        /// The request that was refused, e.g. `"STOP"`.
        request: &'static str,
        /// The tracker's reply, as JSON text.
        reply: String,
    },
    /// A network operation did not finish within its time limit.
    #[error("{what} timed out after {limit:?}")]
    Timeout {
        /// What timed out, e.g. `"connecting to the tracker"`.
        what: &'static str,
        /// The limit that was exceeded.
        limit: Duration,
    },
    /// The peer closed the connection (before a reply, or earlier).
    #[error("the tracker connection is closed")]
    Closed,
    /// The tracker is at its connection limit and refused this connection
    /// (it answered the handshake with
    /// [`TRACKER_AT_CAPACITY`](super::TRACKER_AT_CAPACITY)). Transient:
    /// [`TrackerClient::request_lease`](super::TrackerClient::request_lease)
    /// retries it like a lost connection.
    #[error("tracker refused the connection: at its connection limit ({})", fmt_limit(*.limit))]
    AtCapacity {
        /// The tracker's limit, if it said.
        limit: Option<u32>,
    },
    /// The connection to the tracker was lost while a request waited for a
    /// device, and reconnecting (with the client's [`ReconnectPolicy`](super::ReconnectPolicy))
    /// did not get the request back in place: the tracker stayed away, or
    /// kept dropping the connection.
    #[error(
        "tracker connection lost while waiting for a '{key}' device ({reconnects} reconnects failed): {source}"
    )]
    ConnectionLost {
        /// The device key that was requested.
        key: String,
        /// How many reconnects were tried.
        reconnects: u32,
        /// The last failure (a connection error, or the loss itself when
        /// reconnecting is disabled).
        #[source]
        source: Box<TrackerError>,
    },
}

fn fmt_limit(limit: Option<u32>) -> String {
    limit.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
}

impl TrackerError {
    /// A protocol error. Messages quote what the peer sent, so they are cut
    /// at [`MAX_MESSAGE`] bytes: a 1 MiB frame must not become a 1 MiB log line.
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        TrackerError::Protocol { message }
    }

    /// True for failures a reconnect may cure: the connection was lost or
    /// could not be made (refused, timed out, tracker at capacity).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            TrackerError::Io(_)
                | TrackerError::Connect { .. }
                | TrackerError::Timeout { .. }
                | TrackerError::Closed
                | TrackerError::AtCapacity { .. }
        )
    }

    /// True for the ways a peer ends a connection without breaking the
    /// protocol (closing it, resetting it).
    pub(crate) fn is_disconnect(&self) -> bool {
        match self {
            TrackerError::Closed => true,
            TrackerError::Io(err) => matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}
