//! Sessions with a device server, the client side: the client
//! (`client.rs`, the request/answer plumbing in `io.rs`), its errors
//! (`error.rs`). Leasing a device through a tracker
//! (`TrackerClient::request*`) is in [`tracker`](crate::tracker). The wire
//! protocol it shares with the server is in [`wire`](crate::wire).

pub(crate) mod client;
pub(crate) mod error;
mod io;
mod options;
mod upload;
pub(crate) use io::{ReadAhead, read_ahead};
pub(crate) use upload::UploadOrCall;

/// How a device is leased (defined with the tracker client, re-exported here).
pub use crate::tracker::RequestOptions;
pub use crate::wire::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, DirEntry,
    RPC_MAGIC,
};
pub use client::Session;
pub use error::SessionError;
pub use options::ConnectOptions;
