//! A client for Apache TVM's own RPC session protocol (TVM >= 0.21, tested
//! against apache-tvm 0.27): measure on unmodified TVM servers
//! (`python -m tvm.exec.rpc_server`, the C++ `tvm_rpc`, TVM's Android app).
//!
//! After TVM's handshake (shared with our own sessions, `wire::handshake`),
//! everything is a packet `[u64 LE nbytes][i32 LE RPCCode][body]`
//! (`packet.rs`) whose arguments are packed with TVM-FFI type indices
//! (`args.rs`). [`TvmSession`] (`session.rs`; the server functions a
//! measurement uses in `functions.rs`, options in `options.rs`) drives it; leasing a device
//! through a tracker is [`TrackerClient::request_tvm`](crate::TrackerClient::request_tvm)
//! (`lease.rs`); errors are [`TvmError`] (`error.rs`).
//!
//! TVM servers older than 0.21 use another argument encoding under the same
//! version string; they are not supported and are reported as
//! [`TvmError::Incompatible`] on the first reply.

mod args;
mod error;
mod functions;
mod lease;
mod options;
mod packet;
mod session;

pub use args::{DataType, Device, RemoteFunc, RemoteModule, RemoteTensor, TvmValue};
pub use error::TvmError;
pub use options::{TimeEvaluatorConfig, TvmOptions};
pub use session::TvmSession;

/// TVM's `DeviceAttrKind` values for [`TvmSession::device_attr`].
pub mod attr {
    /// 1 if the device exists, else 0.
    pub const EXIST: i32 = 0;
    /// Max threads per block (CPU: not set).
    pub const MAX_THREADS_PER_BLOCK: i32 = 1;
    /// Warp size.
    pub const WARP_SIZE: i32 = 2;
    /// Compute version (a string).
    pub const COMPUTE_VERSION: i32 = 4;
    /// Device name (a string).
    pub const DEVICE_NAME: i32 = 5;
    /// Multiprocessor count.
    pub const MULTI_PROCESSOR_COUNT: i32 = 7;
    /// Total global memory in bytes.
    pub const TOTAL_GLOBAL_MEMORY: i32 = 14;
}
