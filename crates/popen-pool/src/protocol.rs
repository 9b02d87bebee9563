//! Messages between the parent and a worker process.
//!
//! Every message is one frame (see [`codec`](crate::codec)). The worker speaks
//! first with `Hello`; the parent refuses a version it does not know.
//!
//! The parent may send several `Run`s before the first `Done` (a small
//! window per worker). The worker runs them one at a time in the order
//! sent and answers each with exactly one `Done`, in the same order, written
//! and flushed before it starts the next task: so the `Done` of one task
//! tells the parent that the next one has started.

use serde::{Deserialize, Serialize};

/// Bumped whenever a message or the framing changes shape (2: frames
/// start with a magic; 3: `Refused`; 4: pipelined tasks, `Cancel` and
/// `Skipped`).
pub(crate) const PROTOCOL_VERSION: u32 = 4;

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
    /// Exit cleanly once the tasks sent before this one are done.
    Exit,
    /// Do not start task `id` (sent earlier, maybe still queued in the
    /// worker): a worker that has not started it answers `Skipped` in its
    /// place; one that has started or finished it ignores this.
    Cancel { id: u64 },
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
    Failed {
        kind: String,
        message: String,
    },
    Panicked {
        message: String,
    },
    UnknownTask {
        name: String,
    },
    TooLarge {
        len: u64,
        max: u64,
    },
    /// The task was cancelled before it started; it did not run.
    Skipped,
}
