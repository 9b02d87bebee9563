//! Leasing a device that runs TVM's RPC server through a tracker (ours or
//! TVM's): [`TrackerClient::request_tvm`].

use super::error::TvmError;
use super::options::TvmOptions;
use super::session::TvmSession;
use crate::tracker::TrackerClient;

/// How many times a lease whose server refuses the match key or cannot be
/// reached is retried with a new lease (as TVM's `TrackerSession.request`).
const MAX_RETRY: u32 = 2;

impl TrackerClient {
    /// Leases a device of `key` (waiting for one to be free) and opens a
    /// [`TvmSession`] on its TVM RPC server. A lease whose server refuses
    /// the match key, cannot be reached or times out is retried with a new
    /// lease up to twice.
    ///
    /// # Errors
    ///
    /// [`TvmError::Tracker`], or the last connection error after the retries.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while waiting for a lease leaves the tracker
    /// client as [`request_lease`](TrackerClient::request_lease) does;
    /// while connecting, the half-open connection is dropped.
    pub async fn request_tvm(
        &mut self,
        key: &str,
        priority: i32,
        opts: &TvmOptions,
    ) -> Result<TvmSession, TvmError> {
        let mut attempt = 0;
        loop {
            let lease = self.request_lease(key, priority).await?;
            let addr = format!("{}:{}", lease.host, lease.port);
            match TvmSession::connect(&addr, &lease.matchkey, opts).await {
                Ok(sess) => return Ok(sess),
                Err(
                    e @ (TvmError::KeyMismatch { .. }
                    | TvmError::Connect { .. }
                    | TvmError::Timeout { .. }
                    | TvmError::Handshake { .. }),
                ) if attempt < MAX_RETRY => {
                    attempt += 1;
                    tracing::warn!(%addr, error = %e, attempt, "leased TVM server refused; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    }
}
