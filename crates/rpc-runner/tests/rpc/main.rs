//! rpc-runner end-to-end tests over real sockets on 127.0.0.1 (one test
//! binary; modules by theme, shared helpers in `common`). Session workers are
//! this test binary, re-run through `popen_pool::test_support!`.

mod builder;
mod chaos;
mod cli;
mod common;
mod edges;
mod fidelity;
mod fused;
mod kernels;
mod runners;
mod server_input;
mod sessions;
mod spare;
mod tasks;
mod tracker;
mod tracker_interop;
mod tracker_limits;
mod tvm_runner;
mod tvm_session;
mod tvm_shim;

popen_pool::test_support!(tasks::registry());
