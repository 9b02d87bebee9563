//! popen-pool end-to-end tests: real worker processes, re-run from this test
//! binary through `test_support!` (one test binary; modules by theme).

mod basics;
mod chaos;
mod common;
mod containment;
mod controls;
mod dropping;
mod edges;
mod faults;
mod hygiene;
mod output;
mod pipelining;
mod spawning;

popen_pool::test_support!(common::registry());
mod zygote;
