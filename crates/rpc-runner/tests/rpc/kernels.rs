//! Kernels measured through a real server, session and session worker: C
//! compiled at test time (`cc -O2 -shared -fPIC -I include/`, `kernels/kernels.c`),
//! uploaded, loaded, timed, read back.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use popen_pool::{ExitInfo, PoolError};
use rpc_runner::measure::{
    AllocArgs, ArgInfo, DType, EvaluatorConfig, LoadKernel, ReadArg, TimeKernel, failure_kind,
};
use rpc_runner::{ConnectOptions, ServerHandle, Session, SessionError};
use tempfile::TempDir;

use crate::sessions::server;

/// Generous per-call limit: timing calls take at most a few hundred ms.
const CALL: Option<Duration> = Some(Duration::from_secs(60));

/// The test kernels, compiled into a temp dir.
struct Library {
    _dir: TempDir,
    path: PathBuf,
}

fn compile_kernels() -> Library {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kernels.so");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rpc/kernels/kernels.c");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let out = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-I", include, "-o"])
        .arg(&path)
        .arg(source)
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed: {}", String::from_utf8_lossy(&out.stderr));
    Library { _dir: dir, path }
}

/// A server, a session on it, and the kernels uploaded as `kernels.so`.
async fn setup() -> (ServerHandle, Session, Library) {
    let lib = compile_kernels();
    let s = server(None, "dev", |c| c).await;
    let mut sess =
        Session::connect(&s.addr().to_string(), "dev", &ConnectOptions::default()).await.unwrap();
    sess.upload(&lib.path, "kernels.so").await.unwrap();
    (s, sess, lib)
}

fn config(number: u32, repeat: u32, min_repeat_ms: u64) -> EvaluatorConfig {
    EvaluatorConfig { number, repeat, min_repeat_ms, ..EvaluatorConfig::default() }
}

fn one_arg() -> Vec<ArgInfo> {
    vec![ArgInfo::tensor(DType::F32, [4])]
}

/// Loads `entry` from the uploaded kernels and allocates `args`.
async fn prepare(sess: &mut Session, entry: &str, args: Vec<ArgInfo>, alloc_repeat: u32) {
    sess.call(LoadKernel::new("kernels.so").with_entry(entry), CALL).await.unwrap();
    sess.call(AllocArgs { args, alloc_repeat, seed: 1 }, CALL).await.unwrap();
}

async fn time(sess: &mut Session, cfg: EvaluatorConfig) -> Result<Vec<f64>, SessionError> {
    sess.call(TimeKernel { config: cfg }, CALL).await.map(|t| t.costs)
}

fn median(costs: &[f64]) -> f64 {
    let mut sorted = costs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn task_error(err: &SessionError) -> (&str, &str) {
    match err {
        SessionError::Task(PoolError::Task { kind, message }) => (kind, message),
        other => panic!("expected a task error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_busy_wait_kernel_is_timed_within_ten_percent() {
    let (s, mut sess, _lib) = setup().await;
    prepare(&mut sess, "busy_200us", one_arg(), 1).await;
    let costs = time(&mut sess, config(3, 5, 0)).await.unwrap();
    assert_eq!(costs.len(), 5);
    let m = median(&costs);
    assert!((180e-6..=220e-6).contains(&m), "median {m:e} s of {costs:?}, expected 200 us ±10%");
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn min_repeat_ms_grows_number_for_a_tiny_kernel() {
    let (s, mut sess, _lib) = setup().await;
    prepare(&mut sess, "empty", one_arg(), 1).await;
    let start = Instant::now();
    let costs = time(&mut sess, config(1, 3, 50)).await.unwrap();
    let wall = start.elapsed();
    assert_eq!(costs.len(), 3);
    // Each reported batch lasted >= 50 ms, so number grew to >= 50 ms / cost.
    assert!(wall >= Duration::from_millis(150), "three 50 ms batches took only {wall:?}");
    for c in &costs {
        assert!(*c > 0.0 && *c < 1e-6, "an empty call costs {c:e} s");
    }
    let implied_number = 50e-3 / costs[0];
    assert!(implied_number > 50_000.0, "number grew to about {implied_number}");
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn repeat_and_alloc_repeat_multiply_the_costs() {
    let (s, mut sess, _lib) = setup().await;
    prepare(&mut sess, "empty", one_arg(), 3).await;
    let costs = time(&mut sess, config(2, 4, 0)).await.unwrap();
    assert_eq!(costs.len(), 12);
    assert!(costs.iter().all(|c| c.is_finite() && *c >= 0.0), "{costs:?}");
    // Timing is repeatable on the same sets.
    assert_eq!(time(&mut sess, config(1, 1, 0)).await.unwrap().len(), 3);
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn cache_flush_is_off_by_default_and_works() {
    assert!(!EvaluatorConfig::default().enable_cpu_cache_flush);
    let (s, mut sess, _lib) = setup().await;
    // 4 MiB read one int per cache line: memory-bound once flushed.
    let args = vec![ArgInfo::tensor(DType::I32, [1]), ArgInfo::tensor(DType::I32, [1 << 20])];
    prepare(&mut sess, "sum_lines", args, 2).await;
    let warm = time(&mut sess, config(1, 7, 0)).await.unwrap();
    let mut cfg = config(1, 7, 0);
    cfg.enable_cpu_cache_flush = true;
    let cold = time(&mut sess, cfg).await.unwrap();
    assert_eq!((warm.len(), cold.len()), (14, 14));
    assert!(cold.iter().all(|c| *c > 0.0), "{cold:?}");
    let (warm, cold) = (median(&warm), median(&cold));
    eprintln!("4 MiB, one load per line: {:.1} us warm, {:.1} us flushed", warm * 1e6, cold * 1e6);
    assert!(cold > warm, "flushed {cold:e} s is not slower than warm {warm:e} s");
    // The output is still right: the flush changes no data.
    let out = sess.call(ReadArg { set: 1, index: 0 }, CALL).await.unwrap();
    let input = sess.call(ReadArg { set: 1, index: 1 }, CALL).await.unwrap();
    let sum: i32 = ints(&input).iter().step_by(16).sum();
    assert_eq!(ints(&out), vec![sum]);
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn kernel_faults_are_clear_errors_and_the_session_goes_on() {
    let (s, mut sess, _lib) = setup().await;

    // A kernel that segfaults kills the worker, not the session.
    prepare(&mut sess, "segv", one_arg(), 1).await;
    let err = time(&mut sess, config(1, 1, 0)).await.unwrap_err();
    assert!(
        matches!(err, SessionError::Task(PoolError::WorkerDied { exit: ExitInfo::Signal(11) })),
        "{err:?}"
    );
    // The fresh worker has no kernel loaded: that is a clear error too.
    let err = time(&mut sess, config(1, 1, 0)).await.unwrap_err();
    let (kind, message) = task_error(&err);
    assert_eq!(kind, "no_kernel", "{message}");

    // A kernel returning 3.
    prepare(&mut sess, "fail3", one_arg(), 1).await;
    let err = time(&mut sess, config(1, 1, 0)).await.unwrap_err();
    assert_eq!(task_error(&err), (failure_kind::KERNEL_ERROR, "kernel returned error 3"));

    // A missing entry symbol.
    let err = sess.call(LoadKernel::new("kernels.so").with_entry("no_such_fn"), CALL).await;
    let err = err.unwrap_err();
    let (kind, message) = task_error(&err);
    assert_eq!(kind, failure_kind::MISSING_SYMBOL);
    assert!(message.contains("no_such_fn"), "{message}");

    // An upload that is not a shared library, and a file that is not there.
    sess.upload_bytes(b"#!/bin/sh\necho not a library\n", "bogus.so").await.unwrap();
    let err = sess.call(LoadKernel::new("bogus.so"), CALL).await.unwrap_err();
    let (kind, message) = task_error(&err);
    assert_eq!(kind, failure_kind::LOAD_ERROR);
    assert!(message.contains("bogus.so"), "{message}");
    let err = sess.call(LoadKernel::new("absent.so"), CALL).await.unwrap_err();
    let (kind, message) = task_error(&err);
    assert_eq!(kind, failure_kind::LOAD_ERROR);
    assert!(message.contains("No such file"), "{message}");

    // After all that, the same session measures a good kernel.
    prepare(&mut sess, "empty", one_arg(), 1).await;
    assert_eq!(time(&mut sess, config(1, 2, 0)).await.unwrap().len(), 2);
    sess.close().await.unwrap();
    s.shutdown().await.unwrap();
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
}

fn ints(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap())).collect()
}

const M: usize = 16;
const K: usize = 8;
const N: usize = 12;

fn matmul_args() -> Vec<ArgInfo> {
    vec![
        ArgInfo::tensor(DType::F32, [M as i64, K as i64]),
        ArgInfo::tensor(DType::F32, [K as i64, N as i64]),
        ArgInfo::tensor(DType::F32, [M as i64, N as i64]),
    ]
}

/// Runs the matmul (the library's default `entry`) on seed `seed`; returns
/// A, B and C as read back from the worker.
async fn run_matmul(sess: &mut Session, seed: u64) -> [Vec<f32>; 3] {
    sess.call(LoadKernel::new("kernels.so"), CALL).await.unwrap();
    sess.call(AllocArgs { args: matmul_args(), alloc_repeat: 1, seed }, CALL).await.unwrap();
    let before = sess.call(ReadArg { set: 0, index: 2 }, CALL).await.unwrap();
    assert_eq!(time(sess, config(1, 1, 0)).await.unwrap().len(), 1);
    let mut out = Vec::new();
    for index in 0..3 {
        out.push(floats(&sess.call(ReadArg { set: 0, index }, CALL).await.unwrap()));
    }
    assert_ne!(floats(&before), out[2], "the kernel wrote its output");
    out.try_into().unwrap()
}

#[tokio::test]
async fn matmul_output_matches_a_reference_and_seeds_are_reproducible() {
    let (s, mut sess, lib) = setup().await;
    let [a, b, c] = run_matmul(&mut sess, 11).await;
    assert_eq!((a.len(), b.len(), c.len()), (M * K, K * N, M * N));
    assert!(a.iter().chain(&b).all(|v| (1.0..10.0).contains(v)), "fill in [1, 10)");
    for i in 0..M {
        for j in 0..N {
            let reference: f32 = (0..K).map(|p| a[i * K + p] * b[p * N + j]).sum();
            let got = c[i * N + j];
            assert!(
                (got - reference).abs() <= 1e-5 * reference,
                "C[{i},{j}] = {got} != {reference}"
            );
        }
    }
    let err = sess.call(ReadArg { set: 1, index: 0 }, CALL).await.unwrap_err();
    assert_eq!(task_error(&err).0, "out_of_range");
    sess.close().await.unwrap();

    // A second session on the same server: same seed, same inputs.
    let mut again =
        Session::connect(&s.addr().to_string(), "dev", &ConnectOptions::default()).await.unwrap();
    again.upload(&lib.path, "kernels.so").await.unwrap();
    let [a2, b2, c2] = run_matmul(&mut again, 11).await;
    assert_eq!((&a2, &b2, &c2), (&a, &b, &c));
    let [a3, _, c3] = run_matmul(&mut again, 12).await;
    assert_ne!(a3, a, "another seed, other values");
    // The kernel wrote C; the same AllocArgs again fills it again (the
    // buffers are reused, their bytes are not trusted after a kernel ran).
    again.call(AllocArgs { args: matmul_args(), alloc_repeat: 1, seed: 12 }, CALL).await.unwrap();
    let refilled = floats(&again.call(ReadArg { set: 0, index: 2 }, CALL).await.unwrap());
    assert_ne!(refilled, c3);
    assert!(refilled.iter().all(|v| (1.0..10.0).contains(v)), "C holds the fill again");
    again.close().await.unwrap();
    s.shutdown().await.unwrap();
}
