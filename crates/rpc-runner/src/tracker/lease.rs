//! Leasing a device through the tracker and opening its session.

use std::time::Duration;

use super::TrackerClient;
use crate::session::{ConnectOptions, Session, SessionError};

/// How [`TrackerClient::request_with`] leases a device.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RequestOptions {
    /// Priority of the request at the tracker (higher first; TVM's default 1).
    pub priority: i32,
    /// Options of the session itself (session timeout, token...).
    pub connect: ConnectOptions,
    /// How many times a lease whose server refuses or cannot be reached is
    /// retried with a new lease (default 2, as TVM).
    pub max_retry: u32,
    /// Limit of the wait for a free device, per attempt (default: none).
    pub lease_timeout: Option<Duration>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            priority: 1,
            connect: ConnectOptions::default(),
            max_retry: 2,
            lease_timeout: None,
        }
    }
}

impl RequestOptions {
    /// Options with this priority and session timeout.
    pub fn new(priority: i32, session_timeout: Option<Duration>) -> Self {
        RequestOptions {
            priority,
            connect: ConnectOptions::default().session_timeout(session_timeout),
            ..RequestOptions::default()
        }
    }
}

impl TrackerClient {
    /// Leases a device of `key` and opens a session on it (TVM's
    /// `TrackerSession.request`).
    ///
    /// # Errors
    ///
    /// As [`request_with`](TrackerClient::request_with).
    pub async fn request(
        &mut self,
        key: &str,
        priority: i32,
        session_timeout: Option<Duration>,
    ) -> Result<Session, SessionError> {
        self.request_with(key, &RequestOptions::new(priority, session_timeout)).await
    }

    /// Leases a device of `key` (waiting for one to be free) and opens a
    /// session on it. A lease whose server refuses the match key, is busy or
    /// cannot be reached is retried up to `max_retry` times.
    ///
    /// # Errors
    ///
    /// The tracker's error, [`SessionError::Timeout`] if `lease_timeout`
    /// passed, or the last connection error after the retries.
    pub async fn request_with(
        &mut self,
        key: &str,
        opts: &RequestOptions,
    ) -> Result<Session, SessionError> {
        let mut attempt = 0;
        loop {
            let lease = match opts.lease_timeout {
                Some(limit) => tokio::time::timeout(limit, self.request_lease(key, opts.priority))
                    .await
                    .map_err(|_| SessionError::Timeout {
                        what: "waiting for a free device",
                        limit,
                    })??,
                None => self.request_lease(key, opts.priority).await?,
            };
            let addr = format!("{}:{}", lease.host, lease.port);
            match Session::connect(&addr, &lease.matchkey, &opts.connect).await {
                Ok(sess) => return Ok(sess),
                Err(
                    e @ (SessionError::KeyMismatch { .. }
                    | SessionError::Busy
                    | SessionError::Connect { .. }
                    | SessionError::Timeout { .. }
                    | SessionError::Handshake { .. }),
                ) if attempt < opts.max_retry => {
                    attempt += 1;
                    tracing::warn!(%addr, error = %e, attempt, "leased device refused; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Leases a device of `key`, runs `f` on its session and always closes
    /// the session afterwards, whatever `f` returned.
    ///
    /// # Errors
    ///
    /// `f`'s error if it failed (a close error is then only logged), else
    /// the close error, else the request's error.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(tracker: &mut rpc_runner::TrackerClient) -> Result<(), rpc_runner::SessionError> {
    /// use rpc_runner::RequestOptions;
    /// let files = tracker
    ///     .request_and_run("cpu", &RequestOptions::default(), async |sess| {
    ///         sess.upload_bytes(b"data", "input.bin").await?;
    ///         sess.listdir("").await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn request_and_run<R>(
        &mut self,
        key: &str,
        opts: &RequestOptions,
        f: impl AsyncFnOnce(&mut Session) -> Result<R, SessionError>,
    ) -> Result<R, SessionError> {
        let mut sess = self.request_with(key, opts).await?;
        let result = f(&mut sess).await;
        let closed = sess.close().await;
        match (result, closed) {
            (Ok(r), Ok(())) => Ok(r),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), closed) => {
                if let Err(ce) = closed {
                    tracing::debug!(error = %ce, "closing the session after a failure also failed");
                }
                Err(e)
            }
        }
    }
}
