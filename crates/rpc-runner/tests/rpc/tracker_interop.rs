//! Interoperability with Apache TVM's Python implementation: TVM's query
//! tool and RPC server against our tracker, our clients against TVM's
//! tracker. Skipped (with a note) when no TVM virtualenv is available.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rpc_runner::tracker::{RPC_MAGIC, TrackerClient, TrackerError, TrackerLink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{addr_of, eventually, free_port, queue, start_tracker, wait_pending, within};

/// How long TVM (a slow Python import, then a subprocess) may take to start.
pub(crate) const TVM_START: Duration = Duration::from_secs(60);

/// The TVM Python: `$TVM_PYTHON`, else `<workspace>/bench/.venv/bin/python`
/// if it imports tvm.
pub(crate) fn tvm_python() -> Option<PathBuf> {
    if let Some(python) = std::env::var_os("TVM_PYTHON") {
        return Some(python.into());
    }
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/.venv/bin/python");
    let imports = Command::new(&python)
        .args(["-c", "import tvm"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    imports.then_some(python)
}

macro_rules! require_tvm {
    () => {
        match tvm_python() {
            Some(python) => python,
            None => {
                eprintln!(
                    "SKIPPED: TVM interop (no TVM virtualenv: set TVM_PYTHON or run bench/setup_tvm.sh)"
                );
                return;
            }
        }
    };
}
pub(crate) use require_tvm;

/// Runs a short Python program to completion and returns its stdout.
async fn run_python(python: &Path, args: &[&str]) -> String {
    let run = tokio::process::Command::new(python)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(TVM_START, run).await {
        Ok(out) => out.expect("run python"),
        Err(_) => panic!("python {args:?} did not finish within {TVM_START:?}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python {args:?} failed: {}\n{stderr}", out.status);
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A long-running TVM Python process in its own process group. Dropping it
/// (also when a test fails) kills the whole group (the process's
/// `PopenWorker` and session children too) and reaps it; on a panic its log
/// is printed.
pub(crate) struct PyProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PyProcess {
    pub(crate) fn spawn(name: &'static str, python: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(python)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("spawn python");
        PyProcess { name, child, log, _dir: dir }
    }

    pub(crate) fn pgid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        kill_group(self.pgid(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}-----", self.name, self.log());
        }
    }
}

/// Sends `signal` to process group `pgid`; true if any process received it.
pub(crate) fn kill_group(pgid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Asserts that no process of group `pgid` is left.
pub(crate) async fn assert_group_gone(pgid: u32) {
    eventually("the TVM process group to be gone", async || !kill_group(pgid, "0")).await;
}

/// TVM's `text_summary()` of the tracker at `port`, computed by TVM itself.
async fn tvm_text_summary(python: &Path, port: u16) -> String {
    let code = format!(
        "import sys, tvm.rpc\n\
         sys.stdout.write(tvm.rpc.connect_tracker('127.0.0.1', {port}).text_summary())\n"
    );
    run_python(python, &["-c", &code]).await
}

/// The data-plane handshake of a TVM RPC server: returns the server's key.
async fn rpc_handshake(host: &str, port: u16, matchkey: &str) -> String {
    let mut s =
        within("connect to the RPC server", TcpStream::connect((host, port))).await.unwrap();
    let key = format!("client:{matchkey}");
    let mut hello = RPC_MAGIC.to_le_bytes().to_vec();
    hello.extend_from_slice(&(key.len() as i32).to_le_bytes());
    hello.extend_from_slice(key.as_bytes());
    s.write_all(&hello).await.unwrap();
    let code = within("handshake code", s.read_i32_le()).await.unwrap();
    assert_eq!(code, RPC_MAGIC, "the server accepts our matchkey (0xFF273 = mismatch)");
    let len = within("server key length", s.read_i32_le()).await.unwrap();
    let mut server_key = vec![0u8; usize::try_from(len).unwrap()];
    within("server key", s.read_exact(&mut server_key)).await.unwrap();
    String::from_utf8(server_key).unwrap()
}

#[tokio::test]
async fn tvm_text_summary_of_our_tracker_matches_ours() {
    let python = require_tvm!();
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let port = tracker.addr().port();
    let mut a = TrackerLink::connect(&addr).await.unwrap();
    a.update_info("rasp4", None, 9090).await.unwrap();
    a.put("rasp4", 9090, "rasp4:0.1", None).await.unwrap();
    let mut b = TrackerLink::connect(&addr).await.unwrap();
    b.update_info("v100", Some("10.0.0.9"), 9091).await.unwrap();
    b.put("v100", 9091, "v100:0.2", Some("10.0.0.9")).await.unwrap();
    b.put("v100", 9091, "v100:0.3", Some("10.0.0.9")).await.unwrap();
    let mut waiting = TrackerClient::connect(&addr).await.unwrap();
    let wait = tokio::spawn(async move { waiting.request_lease("jetson", 2).await });
    let mut ours = TrackerClient::connect(&addr).await.unwrap();
    wait_pending(&mut ours, "jetson", 1).await;

    let text = ours.text_summary().await.unwrap();
    assert!(text.contains("127.0.0.1:9090           server:rasp4\n"), "{text}");
    assert!(text.contains("10.0.0.9:9091            server:v100\n"), "{text}");
    assert_eq!(tvm_text_summary(&python, port).await, text);

    // What `python -m tvm.exec.query_rpc_tracker` prints.
    let query = run_python(
        &python,
        &["-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1", "--port", &port.to_string()],
    )
    .await;
    assert_eq!(query, format!("Tracker address 127.0.0.1:{port}\n\n{text}\n"));
    wait.abort();
}

#[tokio::test]
async fn a_tvm_rpc_server_registers_with_our_tracker_and_we_lease_it() {
    let python = require_tvm!();
    let tracker = start_tracker().await;
    let addr = addr_of(&tracker);
    let port = free_port();
    let (port_arg, port_end_arg) = (port.to_string(), (port + 100).to_string());
    let server = PyProcess::spawn(
        "tvm rpc_server",
        &python,
        &[
            "-m",
            "tvm.exec.rpc_server",
            &format!("--tracker={addr}"),
            "--key=interop",
            "--host",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--port-end",
            &port_end_arg,
        ],
    );
    let pgid = server.pgid();

    // It registers: UPDATE_INFO (null address -> its peer IP), then PUT.
    let mut client = TrackerClient::connect(&addr).await.unwrap();
    let registered = tokio::time::timeout(TVM_START, async {
        loop {
            if queue(&mut client, "interop").await.free == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    if registered.await.is_err() {
        panic!("the TVM server did not register within {TVM_START:?}");
    }
    let summary = client.summary().await.unwrap();
    assert_eq!(summary.server_info.len(), 1, "{summary:?}");
    let info = &summary.server_info[0];
    assert_eq!(info.key, "server:interop");
    assert_eq!(info.addr.0, "127.0.0.1");
    let server_port = info.addr.1;
    assert!((port..port + 100).contains(&server_port), "{server_port}");

    // We lease it and pass its handshake with the matchkey.
    let lease = within("lease", client.request_lease("interop", 1)).await.unwrap();
    assert_eq!((lease.host.as_str(), lease.port), ("127.0.0.1", server_port));
    assert!(lease.matchkey.starts_with("interop:"), "{lease:?}");
    assert_eq!(rpc_handshake(&lease.host, lease.port, &lease.matchkey).await, "server:interop");

    // After the session it puts itself back with a new matchkey.
    let requeued = tokio::time::timeout(TVM_START, async {
        while queue(&mut client, "interop").await.free != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(requeued.await.is_ok(), "the TVM server did not re-register");
    // TVM's own text summary of our tracker, with TVM's server in it.
    let text = client.text_summary().await.unwrap();
    assert!(text.contains(&format!("127.0.0.1:{server_port}")), "{text}");
    assert_eq!(tvm_text_summary(&python, tracker.addr().port()).await, text);

    // A TVM client leases it through our tracker and opens a real session.
    let code = format!(
        "import tvm.rpc\n\
         t = tvm.rpc.connect_tracker('127.0.0.1', {})\n\
         s = t.request('interop', priority=1, session_timeout=30)\n\
         print('session', s.cpu(0).exist)\n",
        tracker.addr().port()
    );
    let out = run_python(&python, &["-c", &code]).await;
    assert_eq!(out, "session True\n");

    drop(server);
    assert_group_gone(pgid).await;
    // Its tracker connection closed with it: the tracker forgot it.
    eventually("the killed server to leave the tracker", async || {
        client.summary().await.unwrap().server_info.is_empty()
    })
    .await;
    assert_eq!(queue(&mut client, "interop").await.free, 0);
}

#[tokio::test]
async fn our_clients_work_against_tvms_tracker() {
    let python = require_tvm!();
    let (tvm_tracker, port, mut client) = start_tvm_tracker(&python).await;
    let pgid = tvm_tracker.pgid();
    let addr = format!("127.0.0.1:{port}");
    client.ping().await.unwrap();

    let mut link = TrackerLink::connect(&addr).await.unwrap();
    link.update_info("farm", None, 9090).await.unwrap();
    link.put("farm", 9090, "farm:0.1", None).await.unwrap();
    link.put("farm", 9091, "farm:0.2", Some("10.0.0.3")).await.unwrap();
    link.ping().await.unwrap();
    assert_eq!(link.pending_matchkeys().await.unwrap().len(), 2);

    let summary = client.summary().await.unwrap();
    assert_eq!(summary.queue_info["farm"].free, 2);
    assert_eq!(summary.server_info.len(), 1);
    assert_eq!(summary.server_info[0].addr, ("127.0.0.1".to_owned(), 9090));
    let text = client.text_summary().await.unwrap();
    assert_eq!(tvm_text_summary(&python, port).await, text);
    assert_eq!(summary.to_text(), text);

    let lease = within("lease", client.request_lease("farm", 0)).await.unwrap();
    assert_eq!(
        (lease.host.as_str(), lease.port, lease.matchkey.as_str()),
        ("127.0.0.1", 9090, "farm:0.1")
    );
    let lease = within("lease", client.request_lease("farm", 0)).await.unwrap();
    assert_eq!((lease.host.as_str(), lease.matchkey.as_str()), ("10.0.0.3", "farm:0.2"));
    assert!(link.pending_matchkeys().await.unwrap().is_empty());

    let err = client.stop("not the key").await.unwrap_err();
    assert!(matches!(err, TrackerError::Refused { .. }), "{err:?}");
    client.ping().await.unwrap();

    drop(tvm_tracker);
    assert_group_gone(pgid).await;
}

/// Starts TVM's own tracker on a free port; returns it, its port and a
/// client of ours connected to it.
pub(crate) async fn start_tvm_tracker(python: &Path) -> (PyProcess, u16, TrackerClient) {
    let port = free_port();
    let (port_arg, port_end_arg) = (port.to_string(), (port + 1).to_string());
    let args = ["-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", &port_arg];
    let tvm_tracker = PyProcess::spawn(
        "tvm rpc_tracker",
        python,
        &[&args[..], &["--port-end", &port_end_arg]].concat(),
    );
    let addr = format!("127.0.0.1:{port}");
    let client = tokio::time::timeout(TVM_START, async {
        loop {
            if let Ok(c) = TrackerClient::connect(&addr).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("TVM's tracker did not start");
    (tvm_tracker, port, client)
}

/// (3) Our device server registers with TVM's tracker; our client leases it
/// through TVM's tracker and runs a whole session.
#[tokio::test]
async fn our_server_and_sessions_work_through_tvms_tracker() {
    let python = require_tvm!();
    let (tvm_tracker, port, mut client) = start_tvm_tracker(&python).await;
    let addr = format!("127.0.0.1:{port}");

    let server = crate::sessions::server(None, "ours", |c| c.tracker(addr.clone())).await;
    server
        .wait_for(TVM_START, |s| s.registered)
        .await
        .expect("our server registers with TVM's tracker");
    eventually("TVM's tracker to list our server as free", async || {
        queue(&mut client, "ours").await.free == 1
    })
    .await;

    for round in 0..2 {
        let mut sess = within("a session through TVM's tracker", client.request("ours", 1, None))
            .await
            .unwrap();
        sess.upload_bytes(format!("round {round}").as_bytes(), "kernel.so").await.unwrap();
        let names: Vec<_> = sess.listdir("").await.unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["kernel.so".to_owned()]);
        sess.close().await.unwrap();
        // The server re-registers with TVM's tracker after each session.
        server
            .wait_for(TVM_START, |s| s.sessions == round + 1 && s.registered && !s.busy)
            .await
            .expect("our server re-registers");
    }
    let pgid = tvm_tracker.pgid();
    server.shutdown().await.unwrap();
    drop(tvm_tracker);
    assert_group_gone(pgid).await;
}

/// TVM's tracker caps only what it receives: after 30,000 keys requested
/// once, its summary is 1.4 MB, and our client must read it.
#[tokio::test]
async fn our_client_reads_a_tvm_summary_above_a_request_frame() {
    let python = require_tvm!();
    let (tvm_tracker, port, mut client) = start_tvm_tracker(&python).await;
    let pgid = tvm_tracker.pgid();
    let mut raw = crate::common::RawConn::handshake(&format!("127.0.0.1:{port}")).await;
    let mut bytes = Vec::new();
    for i in 0..30_000 {
        let body = serde_json::json!([4, format!("device-key-{i:013}"), "", 0]).to_string();
        bytes.extend_from_slice(&(body.len() as i32).to_le_bytes());
        bytes.extend_from_slice(body.as_bytes());
    }
    raw.send_bytes(&bytes).await;
    raw.send_json(&serde_json::json!([1])).await;
    assert_eq!(raw.recv_json().await, serde_json::json!(0), "the requests were handled");

    let summary = within("a 1.4 MB summary", client.summary()).await.unwrap();
    assert_eq!(summary.queue_info.len(), 30_000);
    assert!(summary.raw.to_string().len() > rpc_runner::tracker::MAX_FRAME);
    within("its text", client.text_summary()).await.unwrap();
    drop(tvm_tracker);
    assert_group_gone(pgid).await;
}

/// What a TVM client sees when our tracker is at its connection limit.
#[tokio::test]
async fn a_tvm_client_sees_our_tracker_at_capacity_as_not_a_tracker() {
    let python = require_tvm!();
    let config = rpc_runner::tracker::TrackerConfig::default().max_connections(1);
    let tracker = rpc_runner::tracker::Tracker::start("127.0.0.1:0", config).await.unwrap();
    let port = tracker.addr().port();
    let _held = TrackerLink::connect(&addr_of(&tracker)).await.unwrap();
    let code = format!(
        "import tvm.rpc\n\
         try:\n    tvm.rpc.connect_tracker('127.0.0.1', {port})\n    print('connected')\n\
         except Exception as e:\n    print(type(e).__name__ + ': ' + str(e))\n"
    );
    let out = run_python(&python, &["-c", &code]).await;
    assert_eq!(out.trim(), format!("RuntimeError: ('127.0.0.1', {port}) is not RPC Tracker"));
    tracker.shutdown().await.unwrap();
}
