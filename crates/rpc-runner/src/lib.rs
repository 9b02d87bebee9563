//! rpc-runner: a TVM-wire-compatible RPC tracker, device servers, sessions
//! with an explicit lifecycle, and the measurement pipeline.
//!
//! - The **tracker** ([`tracker`]) speaks Apache TVM's tracker protocol, so
//!   TVM's tools and servers work with it, and ours with TVM's tracker.
//! - A **device server** ([`DeviceServer`]) registers with a tracker, accepts
//!   one [`Session`] at a time (TVM's handshake, then our framed protocol),
//!   gives each session its own temp dir and runs its risky work in a
//!   `popen_pool::PopenWorker` owned by the session: a crashing kernel fails
//!   the request, never the server.
//! - A **session** has an explicit lifecycle: [`Session::close`] returns a
//!   `Result` and is idempotent; dropping a session closes its socket at once
//!   and the server frees the device immediately.
//!
//! - The **measurement pipeline** ([`measure`]) builds candidates in a
//!   process pool and times them on leased devices with TVM's time-evaluator
//!   semantics.
//!
//! The `rpc-runner` binary wraps all of it: `rpc-runner tracker | server | query`.
//!
//! # Layout
//!
//! - `tracker/`: the control plane, wire-compatible with Apache TVM's tracker:
//!   `[i32 LE len][JSON]` frames (`codec.rs`), the tracker server
//!   (`server.rs`), its clients (`client.rs`) and leasing a device and
//!   opening its session (`lease.rs`).
//! - `wire/`: what client and server share: TVM's handshake
//!   (`handshake.rs`), the frame codec (`codec.rs`), the data-plane messages
//!   (`proto.rs`) and the errors they carry (`error.rs`).
//! - `session/`: the client [`Session`] (`client.rs`, its request plumbing
//!   and cancel safety in `io.rs`), its options (`options.rs`) and errors
//!   (`error.rs`).
//! - `server/`: the device server (`mod.rs`, its configuration in
//!   `config.rs`, errors in `error.rs`), its
//!   tracker registration (`registration.rs`), one session's loop
//!   (`session.rs`), its requests (`handlers.rs`) and the operations the
//!   loop drives (`ops.rs`: uploads, streamed answers, calls), and
//!   remote-path confinement (`paths.rs`).
//! - `measure/`: the measurement pipeline: argument info, the kernel tasks
//!   and time evaluator run by session workers, the builder and the runners.
//! - `tasks.rs`: the registry of task types every session worker serves
//!   ([`tasks::registry`]).
//! - `tvm/`: a client of TVM's own RPC servers: the packet framing
//!   (`packet.rs`), TVM-FFI packed arguments (`args.rs`), the session
//!   (`session.rs`), leasing through a tracker (`lease.rs`), errors (`error.rs`).
//! - `fuzzing.rs` (hidden from the docs): the protocol fuzz targets that
//!   `examples/fuzz_protocols.rs` and `fuzz/` drive (`docs/fuzzing.md`).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

#[doc(hidden)]
pub mod fuzzing;
pub mod measure;
pub mod server;
pub mod session;
pub mod tasks;
pub mod tracker;
pub mod tvm;
pub mod wire;

pub use server::{
    DeviceServer, ServerConfig, ServerError, ServerHandle, ServerStatus, default_work_root,
};
pub use session::{ConnectOptions, DirEntry, RequestOptions, Session, SessionError};
pub use tracker::TrackerClient;
