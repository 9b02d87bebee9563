//! RPC benchmark: prints one JSON line with the keys of `bench/rpc_tvm.py`.
//!
//! `cargo run --release -p rpc-runner --example rpc_bench [-- --quick]`
//!
//! - `tracker_and_server_ready_s`: start a tracker process and a device-server
//!   process (this example re-executed in those roles, as TVM's are separate
//!   Python processes) until the tracker's summary shows the server as free;
//!   `tracker_and_server_ready_in_process_s`: the same, embedded in this
//!   process (as `tune_matmul` does);
//! - `request_release_s_per_session`: lease through the tracker, upload 16
//!   bytes, release the session by dropping it (as a TVM user does); per cycle;
//! - `upload_mib_per_s`: one 64 MiB upload over loopback.
//!
//! Each figure is a median over repetitions.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popen_pool::WorkerProgram;
use rpc_runner::tracker::{Tracker, TrackerClient, TrackerConfig};
use rpc_runner::{DeviceServer, ServerConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn wait_free(tc: &mut TrackerClient, key: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tc.summary().await?.queue_info.get(key).is_some_and(|q| q.free > 0) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "server never showed as free");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A child process of this example, killed and reaped on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this example as `role` (`tracker` or `server TRACKER`); returns it
/// with the address it printed.
fn spawn_role(args: &[&str]) -> anyhow::Result<(Proc, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_default().to_owned();
    anyhow::ensure!(!addr.is_empty(), "{args:?} did not start: {line:?}");
    Ok((proc, addr))
}

/// The roles of the separate-process measurement.
async fn serve_role(role: &str, tracker: Option<String>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    let forever = std::future::pending::<()>();
    if role == "tracker" {
        Tracker::run(listener, TrackerConfig::default(), forever).await?;
    } else {
        let mut cfg = ServerConfig::new("bench", WorkerProgram::current_exe()?);
        if let Some(addr) = tracker {
            cfg = cfg.tracker(addr);
        }
        DeviceServer::run(listener, cfg, forever).await?;
    }
    Ok(())
}

/// An embedded tracker and device server, once the server shows as free.
async fn embedded(
    program: &WorkerProgram,
) -> anyhow::Result<(rpc_runner::tracker::TrackerHandle, rpc_runner::ServerHandle, TrackerClient)> {
    let tracker = Tracker::start("127.0.0.1:0", TrackerConfig::default()).await?;
    let cfg = ServerConfig::new("bench", program.clone()).tracker(tracker.addr().to_string());
    let server = DeviceServer::start("127.0.0.1:0", cfg).await?;
    let mut tc = TrackerClient::connect(&tracker.addr().to_string()).await?;
    wait_free(&mut tc, "bench").await?;
    Ok((tracker, server, tc))
}

fn main() -> anyhow::Result<()> {
    // Before any thread: the servers' zygotes fork session workers from here.
    popen_pool::serve_if_worker(rpc_runner::tasks::registry());
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(role @ ("tracker" | "server")) = args.get(1).map(String::as_str) {
        return serve_role(role, args.get(2).cloned()).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let cycles = if quick { 20 } else { 50 };
    let program = WorkerProgram::current_exe()?;

    let mut ready = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let (tracker, addr) = spawn_role(&["tracker"])?;
        let (server, _) = spawn_role(&["server", &addr])?;
        let mut tc = TrackerClient::connect(&addr).await?;
        wait_free(&mut tc, "bench").await?;
        ready.push(start.elapsed().as_secs_f64());
        drop((server, tracker));
    }

    let mut ready_in_process = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let (tracker, server, _tc) = embedded(&program).await?;
        ready_in_process.push(start.elapsed().as_secs_f64());
        server.shutdown().await?;
        tracker.shutdown().await?;
    }

    let (tracker, server, mut tc) = embedded(&program).await?;
    let timeout = Some(Duration::from_secs(20));
    for _ in 0..2 {
        let mut sess = tc.request("bench", 1, timeout).await?;
        sess.upload_bytes(&[7u8; 16], "tiny.bin").await?;
    }
    let mut per_session = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..cycles {
            let mut sess = tc.request("bench", 1, timeout).await?;
            sess.upload_bytes(&[7u8; 16], "tiny.bin").await?;
            drop(sess);
        }
        per_session.push(start.elapsed().as_secs_f64() / f64::from(cycles));
    }

    let big = vec![0xa5u8; 64 << 20];
    let mut upload = Vec::new();
    let mut sess = tc.request("bench", 1, None).await?;
    for i in 0..reps.min(5) {
        let start = Instant::now();
        sess.upload_bytes(&big, &format!("big{i}.bin")).await?;
        upload.push(64.0 / start.elapsed().as_secs_f64());
    }
    sess.close().await?;
    server.shutdown().await?;
    tracker.shutdown().await?;

    let out = serde_json::json!({
        "tracker_and_server_ready_s": median(ready),
        "tracker_and_server_ready_in_process_s": median(ready_in_process),
        "request_release_s_per_session": median(per_session),
        "upload_mib_per_s": median(upload),
    });
    println!("{out}");
    Ok(())
}
