//! The RPC tracker (control plane), wire-compatible with Apache TVM's.
//!
//! Device servers register with the tracker; clients lease a free server of
//! a device key from it, then talk to that server directly. Because the wire
//! protocol is TVM's, TVM's `query_rpc_tracker`, TVM's Python RPC servers and
//! TVM's own tracker interoperate with the types here. The full protocol is
//! in `docs/tracker.md`; in short:
//!
//! - TCP. The client sends the magic `0x2F271` (`i32` LE), the tracker echoes
//!   it (or, at its connection limit, answers [`TRACKER_AT_CAPACITY`]). Then
//!   frames `[i32 LE length][UTF-8 JSON]`: requests `0 < length <= 1 MiB`,
//!   replies up to [`MAX_REPLY`].
//! - Requests are arrays whose first element is a [`TrackerCode`]: `PING`,
//!   `STOP`, `PUT` (a server is free), `REQUEST` (lease one; the reply comes
//!   when a server is free), `UPDATE_INFO`, `SUMMARY`, `GET_PENDING_MATCHKEYS`.
//! - Per device key, free servers are leased first in, first out; waiting
//!   requests are served by priority (higher first), then arrival.
//! - A connection that breaks the protocol is closed; nobody else notices.
//!   A closed server connection withdraws its servers; a closed client
//!   connection withdraws its requests. What one peer can make the tracker
//!   hold (keys, info, outstanding requests, connections) is bounded by
//!   [`TrackerConfig`]; a request over a limit is answered `[-1, reason]`.
//!
//! # Examples
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use rpc_runner::tracker::{Tracker, TrackerClient, TrackerConfig, TrackerLink, random_matchkey};
//!
//! let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default()).await?;
//! let addr = tracker.addr().to_string();
//!
//! // A device server registers...
//! let mut link = TrackerLink::connect(&addr).await?;
//! link.update_info("rasp4", None, 9090).await?;
//! let matchkey = random_matchkey("rasp4");
//! link.put("rasp4", 9090, &matchkey, None).await?;
//!
//! // ...and a client leases it.
//! let mut client = TrackerClient::connect(&addr).await?;
//! let lease = client.request_lease("rasp4", 1).await?;
//! assert_eq!((lease.host.as_str(), lease.port), ("127.0.0.1", 9090));
//! assert_eq!(lease.matchkey, matchkey);
//!
//! tracker.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `codec.rs`: the magic constants and [`JsonFrameCodec`].
//! - `proto.rs`: [`TrackerCode`], typed [`TrackerRequest`]s, [`Lease`].
//! - `summary.rs`: [`Summary`] and TVM's text layout of it.
//! - `state.rs`: queues and matching rules (no I/O).
//! - `config.rs`: [`TrackerConfig`].
//! - `server.rs`: [`Tracker`], [`TrackerHandle`].
//! - `client.rs`: [`TrackerClient`] (with its [`ReconnectPolicy`]) and [`TrackerLink`];
//!   `lease.rs`: leasing a device and opening its session
//!   ([`TrackerClient::request`], `request_with`, `request_and_run`, [`RequestOptions`]).
//! - `error.rs`: [`TrackerError`].

mod client;
mod codec;
mod config;
mod error;
mod lease;
mod proto;
mod server;
mod state;
mod summary;

/// Internals the fuzz targets (`crate::fuzzing`) drive directly.
pub(crate) mod fuzz_support {
    pub(crate) use super::codec::JsonFrameCodec;
    pub(crate) use super::config::{TRACKER_DEPTH, request_codec};
    pub(crate) use super::proto::{TrackerRequest, expect_success};
    pub(crate) use super::state::{
        Applied, ConnId, Delivery, Limits, MAX_KEY_LEN, MAX_MATCHKEY_LEN, State,
    };
    pub(crate) use super::summary::text_summary_of;
}

pub use client::{DEFAULT_TIMEOUT, ReconnectPolicy, TrackerClient, TrackerLink};
pub use codec::{
    JsonFrameCodec, MAX_FRAME, MAX_REPLY, MAX_REPLY_DEPTH, RPC_MAGIC, TRACKER_AT_CAPACITY,
    TRACKER_MAGIC,
};
pub use config::TrackerConfig;
pub use error::TrackerError;
pub use lease::RequestOptions;
pub use proto::{Lease, TrackerCode, TrackerRequest, random_matchkey};
pub use server::{Tracker, TrackerHandle};
pub use summary::{QueueInfo, ServerInfo, Summary};
