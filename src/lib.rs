//! tuning-harness: the build-and-measure engine of an auto-tuner.
//!
//! This root package re-exports the workspace crates so that applications can
//! depend on one crate:
//!
//! - [`popen_pool`]: a tokio process-pool executor (tasks in isolated worker
//!   processes with hard timeouts, crash detection and recycling).
//!
//! # Layout
//!
//! - `crates/popen-pool`: the process pool.
//! - `examples/`: runnable programs.
//! - `tests/`: end-to-end tests across crates.

pub use popen_pool;
