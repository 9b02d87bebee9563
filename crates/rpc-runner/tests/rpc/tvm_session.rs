//! Our `TvmSession` against TVM's own RPC server (`python -m
//! tvm.exec.rpc_server`, apache-tvm 0.27): directly, through TVM's tracker
//! and through ours; faults. Skipped (with a note) without a TVM virtualenv.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rpc_runner::tracker::TrackerClient;
use rpc_runner::tvm::{
    DataType, Device, TimeEvaluatorConfig, TvmError, TvmOptions, TvmSession, TvmValue, attr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::chaos::open_fds;
use crate::common::{addr_of, eventually, free_port, queue, start_tracker, within};
use crate::tracker_interop::{
    PyProcess, TVM_START, assert_group_gone, require_tvm, start_tvm_tracker, tvm_python,
};

/// A kernel library TVM loads: `__tvm_ffi_<name>` with TVM-FFI's
/// `TVMFFISafeCallType`, unpacking `DLTensor*` (or `Tensor` object) args.
const KERNELS_C: &str = r#"
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
  void* data; DLDevice device; int32_t ndim; DLDataType dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} DLTensor;
typedef struct { int32_t type_index; uint32_t zero_padding; union { int64_t v_int64; void* v_ptr; }; } TVMFFIAny;
/* kTVMFFIDLTensorPtr = 7; kTVMFFITensor = 70 (a 24-byte object header, then the DLTensor). */
static DLTensor* tensor(const TVMFFIAny* a) {
  if (a->type_index == 7) return (DLTensor*)a->v_ptr;
  if (a->type_index == 70) return (DLTensor*)((char*)a->v_ptr + 24);
  return 0;
}
static float* f32(const TVMFFIAny* a) { DLTensor* t = tensor(a); return (float*)((char*)t->data + t->byte_offset); }
static int64_t numel(const TVMFFIAny* a) { DLTensor* t = tensor(a); int64_t n = 1; for (int i = 0; i < t->ndim; i++) n *= t->shape[i]; return n; }
int __tvm_ffi_add(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  if (n != 3 || !tensor(&args[0]) || !tensor(&args[1]) || !tensor(&args[2])) return -1;
  float *a = f32(&args[0]), *b = f32(&args[1]), *c = f32(&args[2]);
  for (int64_t i = 0; i < numel(&args[0]); i++) c[i] = a[i] + b[i];
  return 0;
}
/* Busy-waits 2 ms. */
int __tvm_ffi_busy(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
  do { clock_gettime(CLOCK_MONOTONIC, &t); } while ((t.tv_sec - t0.tv_sec) * 1e9 + (t.tv_nsec - t0.tv_nsec) < 2e6);
  return 0;
}
/* Busy-waits 200 ms: long enough to kill the server meanwhile. */
int __tvm_ffi_slow(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
  do { clock_gettime(CLOCK_MONOTONIC, &t); } while ((t.tv_sec - t0.tv_sec) * 1e9 + (t.tv_nsec - t0.tv_nsec) < 2e8);
  return 0;
}
int __tvm_ffi_crash(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  abort();
}
"#;

/// The kernel library's bytes, compiled once per test.
fn kernel_lib() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("kernels.c");
    std::fs::write(&src, KERNELS_C).unwrap();
    let out = dir.path().join("kernels.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed");
    std::fs::read(out).unwrap()
}

/// Starts TVM's RPC server, direct (no tracker) with key `key`, or
/// registered with `tracker`; returns it and (direct) its address.
pub(crate) async fn start_tvm_server(
    python: &Path,
    key: &str,
    tracker: Option<&str>,
) -> (PyProcess, String) {
    let port = free_port();
    let (p, pe) = (port.to_string(), (port + 50).to_string());
    let key_arg = format!("--key={key}");
    let mut args = vec!["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", &p];
    args.extend(["--port-end", &pe, &key_arg]);
    let tracker_arg = tracker.map(|t| format!("--tracker={t}"));
    if let Some(t) = &tracker_arg {
        args.push(t);
    }
    let server = PyProcess::spawn("tvm rpc_server", python, &args);
    let start = Instant::now();
    let bound = loop {
        let log = server.log();
        if let Some(rest) = log.split("bind to 127.0.0.1:").nth(1) {
            let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break format!("127.0.0.1:{port}");
        }
        assert!(start.elapsed() < TVM_START, "TVM's server did not start:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (server, bound)
}

fn opts() -> TvmOptions {
    TvmOptions::default().call_timeout(Duration::from_secs(60)).connect_timeout(TVM_START)
}

/// Uploads and loads the kernel library as `k.so`.
async fn module_of(sess: &mut TvmSession, lib: &[u8]) -> rpc_runner::tvm::RemoteModule {
    sess.upload("k.so", lib).await.unwrap();
    sess.load_module("k.so").await.unwrap()
}

/// The seeded inputs of the `add` check.
fn inputs(round: u32, n: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..n).map(|i| (i as f32) * 0.5 + round as f32).collect();
    let b = (0..n).map(|i| 1000.0 - i as f32).collect();
    (a, b)
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One whole measurement: upload, load, time, alloc + copy + call + copy
/// back (checked), free, remove.
async fn measure_round(sess: &mut TvmSession, lib: &[u8], round: u32) {
    let path = format!("kernels{round}.so");
    sess.upload(&path, lib).await.unwrap();
    let module = sess.load_module(&path).await.unwrap();
    let dev = Device::cpu(0);
    let timer =
        sess.time_evaluator(module, "busy", dev, &TimeEvaluatorConfig::new(2, 3, 0)).await.unwrap();
    let costs = sess.time(timer, &[]).await.unwrap();
    assert_eq!(costs.len(), 3, "{costs:?}");
    for c in &costs {
        // A 2 ms busy-wait: at least 2 ms, and well under a second even on a loaded machine.
        assert!((0.0019..1.0).contains(c), "implausible cost {c} in {costs:?}");
    }
    sess.free_handle(timer.0).await.unwrap();

    let n = 1000;
    let (a, b) = inputs(round, n);
    let ta = sess.alloc(&[n as i64], DataType::FLOAT32, dev).await.unwrap();
    let tb = sess.alloc(&[n as i64], DataType::FLOAT32, dev).await.unwrap();
    let tc = sess.alloc(&[n as i64], DataType::FLOAT32, dev).await.unwrap();
    sess.copy_to_remote(&ta, &to_bytes(&a)).await.unwrap();
    sess.copy_to_remote(&tb, &to_bytes(&b)).await.unwrap();
    let add = sess.module_function(module, "add").await.unwrap();
    let args: Vec<_> = [&ta, &tb, &tc].iter().map(|t| TvmValue::Tensor((*t).clone())).collect();
    assert_eq!(sess.call(add, &args).await.unwrap(), TvmValue::None);
    let out = sess.copy_from_remote(&tc).await.unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(out, to_bytes(&want), "round {round}: outputs");
    for t in [&ta, &tb, &tc] {
        sess.free(t).await.unwrap();
    }
    sess.free_handle(add.0).await.unwrap();
    sess.free_handle(module.0).await.unwrap();
    sess.remove(&path).await.unwrap();
}

#[tokio::test]
async fn twenty_measurements_in_a_row_on_a_direct_tvm_server() {
    let python = require_tvm!();
    let lib = kernel_lib();
    let (server, addr) = start_tvm_server(&python, "direct", None).await;
    let pgid = server.pgid();
    let fds = open_fds();
    for round in 0..20 {
        let sess = within("connect", TvmSession::connect(&addr, "direct", &opts())).await;
        let mut sess = sess.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(sess.server_key(), "direct");
        assert_eq!(sess.device_attr(Device::cpu(0), attr::EXIST).await.unwrap(), TvmValue::Int(1));
        measure_round(&mut sess, &lib, round).await;
        within("close", sess.close()).await.unwrap();
        sess.close().await.unwrap();
        assert!(matches!(sess.upload("x", b"y").await, Err(TvmError::Closed)));
    }
    // Dropped without close: the server is free again at once.
    for _ in 0..3 {
        let mut sess = TvmSession::connect(&addr, "direct", &opts()).await.unwrap();
        sess.upload("a", b"b").await.unwrap();
        drop(sess);
    }
    let start = Instant::now();
    let mut sess = TvmSession::connect(&addr, "direct", &opts()).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    sess.close().await.unwrap();
    drop(sess);
    // No socket of ours outlives its session.
    eventually("our fds back to before", async || open_fds() <= fds).await;
    drop(server);
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn faults_are_typed_errors_never_hangs() {
    let python = require_tvm!();
    let lib = kernel_lib();
    let (server, addr) = start_tvm_server(&python, "faults", None).await;
    let dev = Device::cpu(0);

    // A missing global function, a missing kernel: typed errors naming them;
    // the session goes on.
    let mut sess = TvmSession::connect(&addr, "faults", &opts()).await.unwrap();
    let err = sess.get_global_func("no.such.function").await.unwrap_err();
    assert!(matches!(&err, TvmError::NoSuchFunction { name } if name == "no.such.function"));
    let module = module_of(&mut sess, &lib).await;
    let err = sess.time_evaluator(module, "nope", dev, &TimeEvaluatorConfig::default()).await;
    match err {
        Err(TvmError::Remote { message }) => assert!(message.contains("nope"), "{message}"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    let err = sess.module_function(module, "nope").await.unwrap_err();
    assert!(matches!(err, TvmError::NoSuchFunction { .. }), "{err:?}");
    assert!(matches!(sess.load_module("missing.so").await, Err(TvmError::Remote { .. })));
    assert!(sess.is_open());

    sess.close().await.unwrap();

    // A per-call timeout: typed; the session is broken, the server free.
    let short = opts().call_timeout(Duration::from_millis(50));
    let mut sess = TvmSession::connect(&addr, "faults", &short).await.unwrap();
    let module = module_of(&mut sess, &lib).await;
    let slow = sess.module_function(module, "slow").await.unwrap();
    let err = sess.call(slow, &[]).await.unwrap_err();
    assert!(matches!(err, TvmError::Timeout { .. }), "{err:?}");
    assert!(matches!(sess.get_global_func("x").await, Err(TvmError::Broken { .. })));
    drop(sess);

    // A call whose future is dropped: the session is broken, never
    // desynchronised (the next call does not read the stale reply).
    let mut sess = TvmSession::connect(&addr, "faults", &opts()).await.unwrap();
    let module = module_of(&mut sess, &lib).await;
    let slow = sess.module_function(module, "slow").await.unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(20), sess.call(slow, &[])).await;
    assert!(cut.is_err(), "the call was cut short");
    let err = sess.get_global_func("tvm.rpc.server.upload").await.unwrap_err();
    assert!(matches!(&err, TvmError::Broken { reason } if reason.contains("cancelled")), "{err:?}");
    sess.close().await.unwrap();

    // A session timeout: the server ends the session with a typed error.
    let timed = opts().session_timeout(Some(Duration::from_secs(2)));
    let mut sess = TvmSession::connect(&addr, "faults", &timed).await.unwrap();
    let module = module_of(&mut sess, &lib).await;
    let timer = sess
        .time_evaluator(module, "slow", dev, &TimeEvaluatorConfig::new(1, 100, 0))
        .await
        .unwrap();
    let err = within("the session timeout", sess.time(timer, &[])).await.unwrap_err();
    assert!(matches!(err, TvmError::SessionTimeout { .. }), "{err:?}");
    drop(sess);

    // Wrong key: typed.
    let err = TvmSession::connect(&addr, "other", &opts()).await.unwrap_err();
    assert!(matches!(err, TvmError::KeyMismatch { .. }), "{err:?}");
    let mut sess =
        within("after the faults", TvmSession::connect(&addr, "faults", &opts())).await.unwrap();
    measure_round(&mut sess, &lib, 1).await;

    // A crashing kernel kills the session's process: a typed error, no hang.
    let module = module_of(&mut sess, &lib).await;
    let crash = sess.module_function(module, "crash").await.unwrap();
    let err = within("the crash", sess.call(crash, &[])).await.unwrap_err();
    assert!(matches!(err, TvmError::ConnectionLost { .. }), "{err:?}");
    assert!(matches!(sess.upload("a", b"b").await, Err(TvmError::Broken { .. })));
    sess.close().await.unwrap();
    // TVM 0.27's Python server stops serving once a session process exits
    // non-zero (`_serving` raises in its listen thread): the next session
    // is a typed timeout, never a hang.
    let short = opts().connect_timeout(Duration::from_secs(3));
    let err = within("after the crash", TvmSession::connect(&addr, "faults", &short)).await;
    assert!(matches!(err, Err(TvmError::Timeout { .. })), "{err:?}");
    assert!(server.log().contains("exited unsuccessfully"), "{}", server.log());
    let pgid = server.pgid();
    drop(server);
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_server_killed_mid_measurement_is_a_typed_error() {
    let python = require_tvm!();
    let lib = kernel_lib();
    let (server, addr) = start_tvm_server(&python, "killed", None).await;
    let pgid = server.pgid();
    let mut sess = TvmSession::connect(&addr, "killed", &opts()).await.unwrap();
    let module = module_of(&mut sess, &lib).await;
    let timer = sess
        .time_evaluator(module, "slow", Device::cpu(0), &TimeEvaluatorConfig::new(1, 50, 0))
        .await
        .unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(server);
    });
    let err = within("the killed server", sess.time(timer, &[])).await.unwrap_err();
    assert!(matches!(err, TvmError::ConnectionLost { .. }), "{err:?}");
    killer.await.unwrap();
    assert_group_gone(pgid).await;
    assert!(sess.close().await.is_ok());
}

#[tokio::test]
async fn leased_through_tvms_tracker_and_ours() {
    let python = require_tvm!();
    let lib = kernel_lib();
    // TVM's tracker.
    let (tvm_tracker, port, mut client) = start_tvm_tracker(&python).await;
    let taddr = format!("127.0.0.1:{port}");
    let (server, _) = start_tvm_server(&python, "farm", Some(&taddr)).await;
    lease_rounds(&mut client, &lib, 3).await;
    let pgids = [server.pgid(), tvm_tracker.pgid()];
    drop(server);
    drop(tvm_tracker);
    for pgid in pgids {
        assert_group_gone(pgid).await;
    }

    // Ours.
    let tracker = start_tracker().await;
    let taddr = addr_of(&tracker);
    let (server, _) = start_tvm_server(&python, "farm", Some(&taddr)).await;
    let mut client = TrackerClient::connect(&taddr).await.unwrap();
    lease_rounds(&mut client, &lib, 3).await;
    let pgid = server.pgid();
    drop(server);
    assert_group_gone(pgid).await;
}

/// Waits (bounded) until the tracker lists `key` as free once.
pub(crate) async fn wait_registered(client: &mut TrackerClient, key: &str) {
    let registered = tokio::time::timeout(TVM_START, async {
        while queue(client, key).await.free != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    registered.await.expect("TVM's server registers");
}

/// Waits until `farm` is free, then leases and measures `rounds` times,
/// alternating close and drop; each next lease must come promptly.
async fn lease_rounds(client: &mut TrackerClient, lib: &[u8], rounds: u32) {
    wait_registered(client, "farm").await;
    for round in 0..rounds {
        let start = Instant::now();
        let mut sess = within("a lease", client.request_tvm("farm", 1, &opts())).await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "lease took {:?}", start.elapsed());
        measure_round(&mut sess, lib, round).await;
        if round % 2 == 0 {
            sess.close().await.unwrap();
        } else {
            drop(sess);
        }
    }
}

/// A scripted peer: passes the handshake, then answers each packet it
/// reads with the next of `replies` (raw bytes), then (if `linger`) holds
/// the connection until the client closes it, else closes it.
async fn scripted_server(
    replies: Vec<Vec<u8>>,
    linger: bool,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 8];
        s.read_exact(&mut head).await.unwrap();
        let len = i32::from_le_bytes(head[4..].try_into().unwrap());
        let mut key = vec![0u8; len as usize];
        s.read_exact(&mut key).await.unwrap();
        let mut reply = rpc_runner::tracker::RPC_MAGIC.to_le_bytes().to_vec();
        reply.extend(11i32.to_le_bytes());
        reply.extend(b"server:fake");
        s.write_all(&reply).await.unwrap();
        for reply in replies {
            let mut n = [0u8; 8];
            if s.read_exact(&mut n).await.is_err() {
                return;
            }
            let mut rest = vec![0u8; u64::from_le_bytes(n) as usize];
            s.read_exact(&mut rest).await.unwrap();
            if s.write_all(&reply).await.is_err() {
                return;
            }
        }
        if linger {
            let _ = s.read(&mut [0u8; 16]).await;
        }
    });
    (addr, task)
}

/// A packet `[u64 nbytes][i32 code][body]`.
fn packet(code: i32, body: &[u8]) -> Vec<u8> {
    let mut p = (4 + body.len() as u64).to_le_bytes().to_vec();
    p.extend(code.to_le_bytes());
    p.extend(body);
    p
}

/// TVM's void return: `kReturn`, one argument of type index `kTVMFFINone`.
fn void_return() -> Vec<u8> {
    let body: Vec<u8> = [1i32.to_le_bytes(), 0i32.to_le_bytes()].concat();
    packet(4, &body)
}

/// A server that passes the handshake but answers in TVM's pre-0.21
/// encoding (`kInitServer`'s void return as `[num_args=1][type code
/// kTVMNullptr=4]`): reported as an older TVM.
#[tokio::test]
async fn an_old_tvm_server_is_reported_as_such() {
    let old = packet(4, &[1i32.to_le_bytes(), 4i32.to_le_bytes()].concat());
    let (addr, fake) = scripted_server(vec![old], true).await;
    let err = TvmSession::connect(&addr, "fake", &TvmOptions::default()).await.unwrap_err();
    assert!(matches!(err, TvmError::Incompatible { tvm_framing: true, .. }), "{err:?}");
    assert!(err.to_string().contains("older than 0.21"), "{err}");
    fake.abort();

    // The probe says so, and does not try our protocol on it.
    let old = packet(4, &[1i32.to_le_bytes(), 4i32.to_le_bytes()].concat());
    let (addr, fake) = scripted_server(vec![old], true).await;
    let (code, out, err) = probe(&["--addr", &addr, "--key", "fake", "--timeout", "20"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("runs an unsupported TVM RPC server"), "{err}");
    assert!(err.contains("older than 0.21"), "{err}");
    fake.abort();
}

/// Hostile replies after a good start: typed errors, never a panic or an
/// allocation of the announced size; the session is broken afterwards.
#[tokio::test]
async fn hostile_replies_are_typed_errors() {
    let huge = [u64::MAX.to_le_bytes().as_slice(), &4i32.to_le_bytes()].concat();
    let unknown_index = packet(4, &[1i32.to_le_bytes(), 13i32.to_le_bytes()].concat());
    let unknown_code = packet(99, &[]);
    let too_many = packet(4, &i32::MAX.to_le_bytes());
    let truncated = packet(
        4,
        &[1i32.to_le_bytes(), 8i32.to_le_bytes(), 9u64.to_le_bytes()[..4].try_into().unwrap()]
            .concat(),
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (huge, "exceeds this client's limit"),
        (unknown_index, "unknown type index 13"),
        (unknown_code, "unexpected RPC code 99"),
        (too_many, "argument count"),
        (truncated, "truncated"),
    ];
    for (reply, want) in cases {
        let (addr, fake) = scripted_server(vec![void_return(), reply], true).await;
        let mut sess = TvmSession::connect(&addr, "fake", &TvmOptions::default()).await.unwrap();
        let err = within("a hostile reply", sess.get_global_func("f")).await.unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(matches!(sess.get_global_func("f").await, Err(TvmError::Broken { .. })));
        sess.close().await.unwrap();
        fake.abort();
    }
    // The server closes mid-call: connection lost.
    let (addr, fake) = scripted_server(vec![void_return(), vec![1, 2, 3]], false).await;
    let mut sess = TvmSession::connect(&addr, "fake", &TvmOptions::default()).await.unwrap();
    let err = within("a closed server", sess.get_global_func("f")).await.unwrap_err();
    assert!(matches!(err, TvmError::ConnectionLost { .. }), "{err:?}");
    fake.await.unwrap();
    // A configurable packet limit.
    let big = packet(4, &[0u8; 4096]);
    let (addr, fake) = scripted_server(vec![void_return(), big], true).await;
    let small = TvmOptions::default().max_packet_bytes(1024);
    let mut sess = TvmSession::connect(&addr, "fake", &small).await.unwrap();
    let err = sess.get_global_func("f").await.unwrap_err();
    assert!(matches!(err, TvmError::PacketTooLarge { len: 4100, limit: 1024 }), "{err:?}");
    fake.abort();
}

/// Runs `rpc-runner probe ARGS` to completion (bounded): exit code, stdout
/// and stderr.
async fn probe(args: &[&str]) -> (Option<i32>, String, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpc-runner"))
        .arg("probe")
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TVM_START, run).await.expect("probe finishes").unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn probe_tells_our_server_and_a_missing_device() {
    let tracker = start_tracker().await;
    let taddr = addr_of(&tracker);
    let server = crate::sessions::server(Some(&tracker), "ours", |c| c).await;
    let (code, out, err) = probe(&["--tracker", &taddr, "--key", "ours"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("server:   rpc-runner device server (key \"ours\")"), "{out}");
    // Direct, too (a server without a tracker answers its own key).
    let solo = crate::sessions::server(None, "solo", |c| c).await;
    let direct = solo.addr().to_string();
    let (code, out, err) = probe(&["--addr", &direct, "--key", "solo"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("rpc-runner device server (key \"solo\")"), "{out}");
    drop(server);
    // Nobody serves the key: bounded by --timeout, a clear error.
    let (code, _, err) = probe(&["--tracker", &taddr, "--key", "nobody", "--timeout", "1"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("did not finish within"), "{err}");
    // Nothing listens.
    let (code, _, err) = probe(&["--addr", "127.0.0.1:1"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn probe_tells_a_tvm_server() {
    let python = require_tvm!();
    let tracker = start_tracker().await;
    let taddr = addr_of(&tracker);
    let (server, direct) = start_tvm_server(&python, "farm", Some(&taddr)).await;
    let mut client = TrackerClient::connect(&taddr).await.unwrap();
    wait_registered(&mut client, "farm").await;
    let (code, out, err) = probe(&["--tracker", &taddr, "--key", "farm"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("server:   TVM RPC server (key \"farm\")"), "{out}");
    assert!(out.contains("protocol: 0.8.0"), "{out}");
    assert!(out.contains("device:   cpu:0 exists"), "{out}");
    // The server is free again afterwards: a session opens promptly.
    let mut sess =
        within("a lease after the probe", client.request_tvm("farm", 1, &opts())).await.unwrap();
    sess.close().await.unwrap();
    let _ = direct;
    let pgid = server.pgid();
    drop(server);
    assert_group_gone(pgid).await;
}
