//! The `rpc-runner` binary: tracker, server and query as separate processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rpc_runner::tasks::WorkerInfo;
use rpc_runner::{SessionError, TrackerClient};

const SOON: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` and waits (bounded) for the exit status.
    pub(crate) fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(self.pid(), sig) };
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "process {} did not exit", self.pid());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Starts `rpc-runner ARGS` and waits for its "... listening on ADDR" line.
pub(crate) fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("rpc-runner starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(SOON).expect("rpc-runner prints its address");
    Proc { child, addr }
}

/// Arguments of `rpc-runner server` on a free loopback port, registered
/// with `tracker` under `key`, keeping its session dirs under `work_dir` (a
/// SIGKILLed server cannot remove them itself: the test's tempdir does).
pub(crate) fn server_args<'a>(tracker: &'a str, key: &'a str, work_dir: &'a str) -> [&'a str; 11] {
    [
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tracker",
        tracker,
        "--key",
        key,
        "--work-dir",
        work_dir,
    ]
}

/// `pid`'s parent, from /proc (`None`: no such process).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace();
    // A zombie is as good as gone.
    (fields.next()? != "Z").then_some(())?;
    fields.next()?.parse().ok()
}

fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_of(p) == Some(parent))
        .collect()
}

/// True if `pid`'s exec-time environment is a popen-pool zygote's.
fn from_zygote(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == b"POPEN_POOL_ZYGOTE=1"))
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

async fn wait_free(tracker: &str, key: &str, free: usize) {
    let mut tc = TrackerClient::connect(tracker).await.unwrap();
    let deadline = Instant::now() + SOON;
    loop {
        let n = tc.summary().await.unwrap().queue_info.get(key).map_or(0, |q| q.free);
        if n == free {
            return;
        }
        assert!(Instant::now() < deadline, "tracker shows {n} free {key} servers, want {free}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cli_tracker_server_query_and_a_server_killed_mid_session() {
    let tracker = spawn(&["tracker", "--host", "127.0.0.1", "--port", "0"]);
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().to_str().unwrap();
    let server_args = server_args(&tracker.addr, "cpu", work_dir);
    let mut server = spawn(&server_args);
    wait_free(&tracker.addr, "cpu", 1).await;

    let out = Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .args(["query", "--host", "127.0.0.1", "--port", port(&tracker.addr)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("cpu"), "query output lists the server:\n{text}");

    // A session on the CLI server runs tasks in the binary's own workers.
    let mut tc = TrackerClient::connect(&tracker.addr).await.unwrap();
    let mut sess = tc.request("cpu", 1, None).await.unwrap();
    let info = sess.call(WorkerInfo, None).await.unwrap();
    assert_eq!(std::path::Path::new(&info.cwd), std::path::Path::new(sess.workdir()));
    // Forked by the server's zygote (its exec-time environment is the
    // zygote's), yet the server's own child.
    let server_pid = server.pid() as u32;
    assert!(from_zygote(info.pid), "the session worker was not forked by a zygote");
    assert_eq!(parent_of(info.pid), Some(server_pid));
    let zygotes: Vec<u32> =
        children_of(server_pid).into_iter().filter(|&p| p != info.pid && from_zygote(p)).collect();
    assert_eq!(zygotes.len(), 1, "one zygote under the server: {zygotes:?}");

    // The server is SIGKILLed mid-session: its zygote goes too.
    server.signal_and_wait(9);
    let deadline = Instant::now() + SOON;
    while parent_of(zygotes[0]).is_some_and(|pp| pp != 0) && from_zygote(zygotes[0]) {
        assert!(Instant::now() < deadline, "the zygote outlived its server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = sess.listdir("").await.unwrap_err();
    assert!(matches!(err, SessionError::ConnectionLost { .. }), "{err:?}");
    assert!(err.to_string().contains("lost"), "{err}");
    wait_free(&tracker.addr, "cpu", 0).await;
    let summary = tc.summary().await.unwrap();
    assert!(summary.server_info.iter().all(|s| !s.key.contains("cpu")), "{summary:?}");

    // Restarted, it registers again and serves.
    let mut server = spawn(&server_args);
    wait_free(&tracker.addr, "cpu", 1).await;
    tc.request("cpu", 1, None).await.unwrap().close().await.unwrap();

    // SIGTERM: clean shutdown, exit code 0.
    let st = server.signal_and_wait(15);
    assert!(st.success(), "server exit status {st:?}");
    let mut tracker = tracker;
    let st = tracker.signal_and_wait(2);
    assert!(st.success(), "tracker exit status {st:?}");
}

#[test]
fn cli_help_and_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_rpc-runner")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for sub in ["tracker", "server", "query"] {
        assert!(help.contains(sub), "{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .args(["query", "--port", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot query the tracker"));
}

/// Runs `rpc-runner ARGS` to its end (bounded); returns (exit code, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rpc-runner starts");
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rpc-runner {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn bad_server_arguments_are_clear_errors_not_panics() {
    let missing = std::env::temp_dir().join(format!("rpc-no-such-dir-{}", std::process::id()));
    let m = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 10] = [
        // A valid list gets past parsing and pinning to the next check.
        (&["server", "--port", "0", "--measure-cpus", "0", "--work-dir", m], "work dir"),
        (&["server", "--port", "0", "--cpus", "3-1"], "not a CPU range"),
        (&["server", "--port", "0", "--measure-cpus", "4000"], "not online"),
        (&["server", "--port", "0", "--measure-cpus", "0", "--no-pin"], "cannot be used with"),
        (&["server", "--port", "0", "--memory-limit", "4X"], "unknown unit"),
        (&["server", "--port", "0", "--memory-limit", "99999999999T"], "out of range"),
        (&["server", "--port", "0", "--session-timeout", "1e20"], "out of range"),
        (&["server", "--port", "0", "--session-timeout=-1"], "out of range"),
        (&["server", "--port", "0", "--session-timeout", "soon"], "not a number"),
        (&["server", "--port", "0", "--work-dir", missing.to_str().unwrap()], "work dir"),
    ];
    for (args, says) in cases {
        let (code, stderr) = run_to_end(args);
        assert!(matches!(code, Some(1 | 2)), "{args:?} exited with {code:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
    }
}

#[test]
fn kernel_header_prints_the_shipped_header() {
    let out = Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .arg("kernel-header")
        .stdin(Stdio::null())
        .output()
        .expect("rpc-runner runs");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), rpc_runner::measure::KERNEL_HEADER);
    assert!(rpc_runner::measure::KERNEL_HEADER.contains("typedef struct"));
}
