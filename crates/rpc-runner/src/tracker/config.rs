//! [`TrackerConfig`]: how a tracker runs, and the request decoder and
//! state limits it implies.

use std::time::Duration;

use super::codec::{JsonFrameCodec, RequestCodec};
use super::state::Limits;

/// The deepest `max_info_depth` honoured: the summary nests an info 3
/// levels down, and clients parse at most 128 levels.
const MAX_INFO_DEPTH_CAP: usize = 100;

/// The default `max_info_depth`.
const DEFAULT_MAX_INFO_DEPTH: usize = 32;

/// The request depth limit of a default tracker (an info inside the request array).
pub(crate) const TRACKER_DEPTH: usize = DEFAULT_MAX_INFO_DEPTH + 1;

/// The request decoder of a default tracker.
pub(crate) fn request_codec() -> RequestCodec {
    TrackerConfig::default().request_codec()
}

/// How a tracker runs.
///
/// # Examples
///
/// ```
/// use rpc_runner::tracker::TrackerConfig;
///
/// use std::time::Duration;
///
/// let config = TrackerConfig::default()
///     .stop_key("secret")
///     .handshake_timeout(Duration::from_secs(5))
///     .max_connections(256);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// The key a `STOP` request must carry to stop the tracker. `None`: a
    /// random one, `tracker:<random>` like TVM's (see [`TrackerHandle::stop_key`]).
    pub(crate) stop_key: Option<String>,
    /// How long a new connection may take to send its magic before it is
    /// closed (TVM waits forever). Default 10 s.
    pub(crate) handshake_timeout: Duration,
    /// How long one reply may take to be written before its connection is
    /// closed (a peer that does not read must not hold a lease). Default 10 s.
    pub(crate) write_timeout: Duration,
    /// The most connections served at once (at least 1). One more is
    /// answered with [`TRACKER_AT_CAPACITY`](super::TRACKER_AT_CAPACITY) and
    /// the limit instead of the magic echo, then closed; our clients report
    /// [`TrackerError::AtCapacity`]. Default 4096 (the process's file
    /// descriptor limit must allow it).
    pub(crate) max_connections: usize,
    /// The most device keys known at once; a `PUT` or `REQUEST` naming a new
    /// key beyond it is refused (`[-1, reason]`). A key with no free server,
    /// no waiting request and no open connection that put a server to it is
    /// forgotten at once, so this bounds the idle keys too. Default 4096.
    pub(crate) max_keys: usize,
    /// The most free servers plus waiting requests one connection may have;
    /// a `PUT` or `REQUEST` beyond it is refused. Default 1024.
    pub(crate) max_per_connection: usize,
    /// The largest info one connection may describe itself with (its merged
    /// `UPDATE_INFO` objects, as JSON bytes); an `UPDATE_INFO` beyond it is
    /// refused and nothing is merged. Default 4096 (TVM servers send ~50).
    pub(crate) max_info_bytes: usize,
    /// The deepest nesting of an `UPDATE_INFO` info object (at most 100); a
    /// request frame nested deeper than this plus one (the request array)
    /// is answered `[-1, reason]` unparsed, and the connection is served on.
    /// Default 32.
    pub(crate) max_info_depth: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        TrackerConfig {
            stop_key: None,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_keys: limits.max_keys,
            max_per_connection: limits.max_per_connection,
            max_info_bytes: limits.max_info_bytes,
            max_info_depth: DEFAULT_MAX_INFO_DEPTH,
        }
    }
}

impl TrackerConfig {
    /// Sets the key a `STOP` request must carry (default: a random one).
    #[must_use]
    pub fn stop_key(mut self, key: impl Into<String>) -> Self {
        self.stop_key = Some(key.into());
        self
    }

    /// Sets how long a new connection may take to send its magic (default 10 s).
    #[must_use]
    pub fn handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }

    /// Sets how long one reply may take to be written (default 10 s).
    #[must_use]
    pub fn write_timeout(mut self, limit: Duration) -> Self {
        self.write_timeout = limit;
        self
    }

    /// Sets the most connections served at once (default 4096, at least 1).
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Sets the most device keys known at once (default 4096).
    #[must_use]
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Sets the most free servers plus waiting requests per connection (default 1024).
    #[must_use]
    pub fn max_per_connection(mut self, n: usize) -> Self {
        self.max_per_connection = n;
        self
    }

    /// Sets the largest info of one connection, in JSON bytes (default 4096).
    #[must_use]
    pub fn max_info_bytes(mut self, n: usize) -> Self {
        self.max_info_bytes = n;
        self
    }

    /// Sets the deepest nesting of an info object (default 32, at most 100).
    #[must_use]
    pub fn max_info_depth(mut self, n: usize) -> Self {
        self.max_info_depth = n;
        self
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_keys: self.max_keys,
            max_per_connection: self.max_per_connection,
            max_info_bytes: self.max_info_bytes,
        }
    }

    /// The request codec: frames up to 1 MiB nested at most one level
    /// deeper than an info may be.
    pub(crate) fn request_codec(&self) -> RequestCodec {
        RequestCodec(JsonFrameCodec::tracker(self.max_info_depth.min(MAX_INFO_DEPTH_CAP) + 1))
    }
}
