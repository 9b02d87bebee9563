//! The measurement pipeline: kernels as shared libraries over DLPack tensors,
//! TVM's time evaluator, the builder and the runners.
//!
//! # Layout
//!
//! - `args.rs`: [`ArgInfo`] / [`DType`] in TVM's JSON shape.
//! - `evaluator.rs`: [`EvaluatorConfig`].
//! - `dlpack.rs`, `kernel.rs`: the worker side: loading a kernel, allocating
//!   arguments, the timing loop (session-worker task types).

mod args;
mod evaluator;

pub use args::{ArgInfo, DType};
pub use evaluator::EvaluatorConfig;
