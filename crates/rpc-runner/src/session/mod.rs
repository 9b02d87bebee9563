//! Sessions with a device server: TVM's handshake, then our own framed
//! protocol (`proto.rs`); the client (`client.rs`) and its errors (`error.rs`);
//! leasing through a tracker (`lease.rs`).

pub(crate) mod client;
pub(crate) mod error;
pub(crate) mod handshake;
mod lease;
pub(crate) mod proto;

pub use client::{ConnectOptions, Session};
pub use error::SessionError;
pub use handshake::{CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, RPC_MAGIC};
pub use lease::RequestOptions;
pub use proto::DirEntry;
