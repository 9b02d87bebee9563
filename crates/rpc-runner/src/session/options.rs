//! How a session is opened: [`ConnectOptions`].

use std::time::Duration;

#[cfg(doc)]
use super::{Session, SessionError};

/// How to open a session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Ask the server to end the session after this long (TVM's `session_timeout`).
    pub session_timeout: Option<Duration>,
    /// The server's shared token, if it requires one.
    pub token: Option<String>,
    /// Limit of the TCP connect plus handshake (default 10 s).
    pub connect_timeout: Duration,
    /// Limit of each request's wait for its answer (default 10 min); a call's
    /// own timeout, if longer, extends it. A request that runs past it is
    /// cancelled (the session stays usable).
    pub request_timeout: Duration,
    /// Largest reply held in memory: a call's output or a [`Session::download`]
    /// (default 1 GiB). A larger one fails with [`SessionError::ReplyTooLarge`]
    /// and the session goes on.
    pub max_reply_bytes: u64,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            session_timeout: None,
            token: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            max_reply_bytes: 1 << 30,
        }
    }
}

impl ConnectOptions {
    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, limit: Option<Duration>) -> Self {
        self.session_timeout = limit;
        self
    }

    /// Sets the token.
    #[must_use]
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Sets the limit of each request's wait for its answer.
    #[must_use]
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// Sets the largest reply held in memory.
    #[must_use]
    pub fn max_reply_bytes(mut self, bytes: u64) -> Self {
        self.max_reply_bytes = bytes;
        self
    }
}
