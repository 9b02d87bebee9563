//! Messages between the parent and a worker process.
//!
//! Every message is one frame (see [`codec`](crate::codec)). The worker speaks
//! first with `Hello`; the parent refuses a version it does not know.

use serde::{Deserialize, Serialize};

/// Bumped whenever a message or the framing changes shape (2: frames
/// start with a magic; 3: `Refused`).
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// Parent to worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker<'a> {
    /// Run the task registered under `name` on `payload`.
    Run {
        id: u64,
        name: &'a str,
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
    },
    /// Exit cleanly now.
    Exit,
}

/// Worker to parent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker<'a> {
    /// First frame of every worker.
    Hello { version: u32, pid: u32, tasks: Vec<String> },
    /// The outcome of task `id`.
    Done {
        id: u64,
        #[serde(borrow)]
        outcome: Outcome<'a>,
    },
    /// Sent instead of `Hello` by a worker that cannot apply its process
    /// controls; it exits right after.
    Refused { version: u32, message: String },
}

/// What running one task produced.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome<'a> {
    Ok(#[serde(with = "serde_bytes")] &'a [u8]),
    Failed { kind: String, message: String },
    Panicked { message: String },
    UnknownTask { name: String },
    TooLarge { len: u64, max: u64 },
}
