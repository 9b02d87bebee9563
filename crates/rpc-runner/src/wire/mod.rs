//! The session wire protocol, shared by the client ([`Session`](crate::Session))
//! and the device server: TVM's handshake (`handshake.rs`), the frame codec
//! (`codec.rs`), the messages (`proto.rs`) and the errors that travel in
//! them (`error.rs`).

pub(crate) mod codec;
pub(crate) mod error;
pub(crate) mod handshake;
pub(crate) mod proto;

pub use handshake::{
    CODE_AT_CAPACITY, CODE_DUPLICATE, CODE_MISMATCH, CODE_SUCCESS, CODE_UNAUTHORIZED, RPC_MAGIC,
};
pub use proto::DirEntry;
