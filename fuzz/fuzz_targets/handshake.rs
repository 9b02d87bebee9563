//! TVM's RPC handshake through the server's readers and key parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rpc_runner::fuzzing::handshake(data));
