//! The one error enum of the tracker subsystem (server, codec and clients).

use std::io;
use std::time::Duration;

use super::codec::MAX_FRAME;

/// The longest [`TrackerError::Protocol`] message, in bytes.
const MAX_MESSAGE: usize = 300;

/// Everything that can go wrong when speaking the tracker protocol.
///
/// On the server side an error ends the one connection it happened on (a
/// peer that sends a bad magic, a malformed frame or an ill-typed request is
/// disconnected); the tracker keeps serving everyone else. On the client side
/// an error other than [`TrackerError::Refused`] leaves the connection closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// Reading from or writing to the connection failed.
    #[error("tracker connection i/o failed")]
    Io(#[from] io::Error),
    /// The TCP connection to the tracker could not be established.
    #[error("cannot connect to the tracker at {addr}")]
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
    /// A frame's length exceeds [`MAX_FRAME`] (1 MiB).
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: usize,
    },
    /// A frame is malformed (a length of zero or less, or a truncated frame).
    #[error("malformed frame: {reason}")]
    BadFrame {
        /// What is wrong with it.
        reason: String,
    },
    /// A frame's body is not valid UTF-8.
    #[error("frame is not valid utf-8")]
    InvalidUtf8 {
        /// The decoding error.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A frame's body is not valid JSON.
    #[error("frame is not valid json")]
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
    /// The tracker answered a request with a failure (e.g. `STOP` with a
    /// wrong stop key is answered with `FAIL`). The connection stays usable.
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
