//! Sessions with a device server, the client side: the client
//! (`client.rs`, the request/answer plumbing in `io.rs`), its errors
//! (`error.rs`) and leasing through a tracker (`lease.rs`). The wire
//! protocol it shares with the server is in [`wire`](crate::wire).

pub(crate) mod client;
pub(crate) mod error;
mod io;
mod lease;
mod options;

pub use crate::wire::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, DirEntry,
    RPC_MAGIC,
};
pub use client::Session;
pub use error::SessionError;
pub use lease::RequestOptions;
pub use options::ConnectOptions;
