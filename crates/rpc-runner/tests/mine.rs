//! Temporary harness for the session tests while tests/rpc/main.rs is being written.
#[path = "rpc/cli.rs"]
mod cli;
#[path = "rpc/server_input.rs"]
mod server_input;
#[path = "rpc/sessions.rs"]
mod sessions;
#[path = "rpc/tasks.rs"]
mod tasks;

popen_pool::test_support!(tasks::registry());
