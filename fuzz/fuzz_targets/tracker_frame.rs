//! Tracker frames through the request decoder, parser and matching state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rpc_runner::fuzzing::tracker_frame(data));
