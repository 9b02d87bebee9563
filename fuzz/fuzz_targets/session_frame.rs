//! Session data-plane frames through the shared frame decoder and the
//! request and response decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rpc_runner::fuzzing::session_frame(data));
