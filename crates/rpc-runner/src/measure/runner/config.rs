//! [`RpcConfig`]: where and how an [`RpcRunner`](super::RpcRunner) leases devices.

use std::time::Duration;

/// Where and how [`RpcRunner`](super::RpcRunner) leases devices: TVM's
/// `RPCConfig`, plus a bound on waiting for a device.
///
/// Configured like tokio's builders: each setter takes the value itself;
/// optional settings have a separate way to unset them
/// ([`no_token`](Self::no_token), [`no_lease_timeout`](Self::no_lease_timeout)).
/// The fields are public for reading.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rpc_runner::measure::RpcConfig;
///
/// let rpc = RpcConfig::new("127.0.0.1", 9190, "cpu")
///     .session_timeout(Duration::from_secs(10))
///     .lease_timeout(Duration::from_secs(120))
///     .token("secret");
/// assert_eq!(rpc.tracker_addr(), "127.0.0.1:9190");
/// assert_eq!(rpc.lease_timeout, Some(Duration::from_secs(120)));
/// assert_eq!(rpc.no_token().token, None);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RpcConfig {
    /// Tracker host (env `TVM_TRACKER_HOST`).
    pub tracker_host: String,
    /// Tracker port (env `TVM_TRACKER_PORT`).
    pub tracker_port: u16,
    /// Device key (env `TVM_TRACKER_KEY`).
    pub tracker_key: String,
    /// Priority of lease requests (TVM default 1).
    pub session_priority: i32,
    /// Limit of one measurement, counted from when the device is leased; the
    /// server enforces it too (TVM default 60 s).
    pub session_timeout: Duration,
    /// Longest wait for a free device, from when the measurement asks the
    /// tracker; past it the measurement fails with
    /// [`RunError::LeaseTimeout`](super::RunError::LeaseTimeout). Default
    /// `None` (wait as long as it takes, as TVM does): a batch larger than
    /// the farm queues behind itself, and a fixed bound would fail its tail.
    /// Set one when the farm may be empty or shared with other tuners.
    pub lease_timeout: Option<Duration>,
    /// Longest wait for a session's orderly close in the cleanup stage
    /// (default 10 s); past it the connection is dropped, which frees the
    /// device as well.
    pub close_timeout: Duration,
    /// Token of servers that require one (default none).
    pub token: Option<String>,
    /// What kind of device server the key's devices run (default: ours).
    pub backend: Backend,
}

/// The kind of device server a runner measures on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// Our `rpc-runner server`: our session protocol, our evaluator (all of
    /// `EvaluatorConfig`, the environment record, interleaving).
    #[default]
    Ours,
    /// Apache TVM's RPC servers (`python -m tvm.exec.rpc_server`, `tvm_rpc`,
    /// TVM >= 0.21): kernels built with
    /// [`LocalBuilderConfig::tvm_export`](crate::measure::LocalBuilderConfig::tvm_export)
    /// under this function name, timed by TVM's `RPCTimeEvaluator`.
    Tvm {
        /// The exported function's name (`__tvm_ffi_<function>` in the library).
        function: String,
    },
}

/// Why [`RpcConfig::from_env`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcConfigError {
    /// A variable is not set (or not Unicode).
    #[error("{var} is not set")]
    Missing {
        /// The variable.
        var: &'static str,
        /// Why it could not be read.
        #[source]
        source: std::env::VarError,
    },
    /// `TVM_TRACKER_PORT` is not a port number.
    #[error("TVM_TRACKER_PORT is not a port: {value:?}")]
    BadPort {
        /// The variable's value.
        value: String,
        /// The parse error.
        #[source]
        source: std::num::ParseIntError,
    },
}

impl RpcConfig {
    /// A configuration for `key` at `host:port`, with TVM's defaults.
    pub fn new(host: impl Into<String>, port: u16, key: impl Into<String>) -> Self {
        RpcConfig {
            tracker_host: host.into(),
            tracker_port: port,
            tracker_key: key.into(),
            session_priority: 1,
            session_timeout: Duration::from_secs(60),
            lease_timeout: None,
            close_timeout: Duration::from_secs(10),
            token: None,
            backend: Backend::Ours,
        }
    }

    /// Reads `TVM_TRACKER_HOST`, `TVM_TRACKER_PORT` and `TVM_TRACKER_KEY`.
    ///
    /// # Errors
    ///
    /// [`RpcConfigError::Missing`] naming an unset variable,
    /// [`RpcConfigError::BadPort`] for a malformed port.
    pub fn from_env() -> Result<Self, RpcConfigError> {
        let var = |var: &'static str| {
            std::env::var(var).map_err(|source| RpcConfigError::Missing { var, source })
        };
        let host = var("TVM_TRACKER_HOST")?;
        let value = var("TVM_TRACKER_PORT")?;
        let port = value.parse().map_err(|source| RpcConfigError::BadPort { value, source })?;
        Ok(Self::new(host, port, var("TVM_TRACKER_KEY")?))
    }

    /// Sets [`session_priority`](Self::session_priority).
    #[must_use]
    pub fn session_priority(mut self, priority: i32) -> Self {
        self.session_priority = priority;
        self
    }

    /// Sets [`session_timeout`](Self::session_timeout).
    #[must_use]
    pub fn session_timeout(mut self, limit: Duration) -> Self {
        self.session_timeout = limit;
        self
    }

    /// Sets [`lease_timeout`](Self::lease_timeout).
    #[must_use]
    pub fn lease_timeout(mut self, limit: Duration) -> Self {
        self.lease_timeout = Some(limit);
        self
    }

    /// Waits for a device without a bound (the default).
    #[must_use]
    pub fn no_lease_timeout(mut self) -> Self {
        self.lease_timeout = None;
        self
    }

    /// Sets [`close_timeout`](Self::close_timeout).
    #[must_use]
    pub fn close_timeout(mut self, limit: Duration) -> Self {
        self.close_timeout = limit;
        self
    }

    /// Measure on this kind of server (see [`Backend`]; default
    /// [`Backend::Ours`]).
    #[must_use]
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets [`token`](Self::token).
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sends no token (the default).
    #[must_use]
    pub fn no_token(mut self) -> Self {
        self.token = None;
        self
    }

    /// `host:port` of the tracker.
    pub fn tracker_addr(&self) -> String {
        format!("{}:{}", self.tracker_host, self.tracker_port)
    }
}
