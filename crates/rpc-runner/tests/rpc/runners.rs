//! The measurement pipeline end to end: real C kernels compiled with `cc`,
//! measured through `RpcRunner` (tracker + device server + session worker)
//! and `LocalRunner`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use rpc_runner::measure::{
    ArgInfo, DType, DefaultPipeline, DeviceSession, EvaluatorConfig, LocalRunner, Pipeline,
    RpcConfig, RpcConfigError, RpcRunner, RunError, Runner, RunnerInput, RunnerResult,
    StageContext,
};
use rpc_runner::tracker::TrackerHandle;
use rpc_runner::{ServerHandle, TrackerClient};
use tokio_util::sync::CancellationToken;

use crate::sessions::{server, tracker};
use rpc_runner::measure::failure_kind;

const SOON: Duration = Duration::from_secs(30);

const PRELUDE: &str = r#"
#include <stdint.h>
#include <time.h>
typedef struct { void* data; struct { int32_t t, id; } dev; int32_t ndim;
                 struct { uint8_t code, bits; uint16_t lanes; } dtype;
                 int64_t* shape; int64_t* strides; uint64_t byte_offset; } DLTensor;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
"#;

/// Compiles `body` (after the prelude) into a shared library in `dir`.
pub(crate) fn kernel(dir: &Path, name: &str, body: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, format!("{PRELUDE}\n{body}")).unwrap();
    let out = dir.join(format!("{name}.so"));
    let st = std::process::Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc failed for {name}");
    out
}

const BUSY_200US: &str = r#"
int32_t entry(DLTensor* args, int32_t n) {
    double end = now() + 200e-6; while (now() < end) {} return 0;
}"#;

fn args() -> Vec<ArgInfo> {
    vec![ArgInfo::tensor(DType::F32, [16, 16]), ArgInfo::tensor(DType::F32, [16])]
}

struct Stack {
    tracker: TrackerHandle,
    server: ServerHandle,
    dir: tempfile::TempDir,
}

async fn stack(session_timeout: Duration) -> (Stack, RpcConfig) {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu").session_timeout(session_timeout);
    (Stack { tracker: t, server: s, dir: tempfile::tempdir().unwrap() }, rpc)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn evaluator(number: u32, repeat: u32, min_repeat_ms: u64) -> EvaluatorConfig {
    EvaluatorConfig { number, repeat, min_repeat_ms, ..EvaluatorConfig::default() }
}

/// Measures one input.
async fn run_one(runner: &impl Runner, input: RunnerInput) -> RunnerResult {
    let mut results = runner.run(vec![input]).collect_ordered().await;
    results.pop().expect("one result")
}

#[tokio::test]
async fn a_known_kernel_time_is_measured_and_both_runners_agree() {
    let (st, rpc) = stack(SOON).await;
    let busy = kernel(st.dir.path(), "busy", BUSY_200US);
    let runner = RpcRunner::builder(rpc)
        .evaluator(evaluator(5, 7, 0))
        .alloc_repeat(2)
        .build()
        .await
        .unwrap();
    let input = RunnerInput::new(&busy, args()).read_args([1]);
    let m = run_one(&runner, input.clone()).await.unwrap();
    assert_eq!(m.run_secs.len(), 7 * 2, "repeat x alloc_repeat costs");
    let rpc_median = median(&m.run_secs);
    assert!((rpc_median - 200e-6).abs() < 20e-6, "RPC runner measured {rpc_median} s for 200 us");
    // Statistics of the 14 batch costs.
    let stats = m.stats().expect("finite costs");
    assert_eq!(stats.n, 14);
    // (The mean of the middle pair; the helper above takes the upper one.)
    assert!((stats.median - rpc_median).abs() < 5e-6, "{stats:?} vs {rpc_median}");
    assert!(stats.min <= stats.median && stats.mad >= 0.0, "{stats:?}");
    assert!((stats.rel_noise - stats.mad.max(stats.iqr / 2.0) / stats.median).abs() < 1e-12);
    // Where and how long: the server, and every stage timed.
    assert_eq!(m.server, st.server.addr().to_string());
    let t = m.stages;
    assert!(t.evaluate.as_secs_f64() > 14.0 * 5.0 * 200e-6, "{t:?}");
    for (stage, d) in
        [("upload", t.upload), ("load", t.load), ("alloc", t.alloc), ("cleanup", t.cleanup)]
    {
        assert!(d > Duration::ZERO && d < SOON, "{stage}: {d:?}");
    }
    // Typed read-back: 16 float32 values, random fill in [0, 10).
    let out: Vec<f32> = m.output_as(0).unwrap();
    assert_eq!(out.len(), 16);
    assert!(out.iter().all(|x| (0.0..10.0).contains(x)), "{out:?}");
    assert!(m.output_as::<i32>(0).is_err());

    let local = LocalRunner::builder(crate::test_worker_program())
        .evaluator(evaluator(5, 7, 0))
        .timeout(SOON)
        .build()
        .unwrap();
    let lm = run_one(&local, input).await.unwrap();
    assert_eq!(lm.run_secs.len(), 7);
    assert_eq!(lm.server, "local");
    assert_eq!(lm.output_as::<f32>(0).unwrap(), out, "same seed, same inputs");
    let local_median = median(&lm.run_secs);
    assert!(
        (local_median - rpc_median).abs() / rpc_median < 0.1,
        "local {local_median} vs rpc {rpc_median}"
    );
    local.shutdown().await;
    st.server.shutdown().await.unwrap();
    drop(st.tracker);
}

#[tokio::test]
async fn faults_are_classified_and_the_runner_keeps_working() {
    let (st, rpc) = stack(Duration::from_secs(3)).await;
    let d = st.dir.path();
    let segv = kernel(
        d,
        "segv",
        "int32_t entry(DLTensor* a, int32_t n) { *(volatile int*)0 = 1; return 0; }",
    );
    let three = kernel(d, "three", "int32_t entry(DLTensor* a, int32_t n) { return 3; }");
    let forever =
        kernel(d, "forever", "int32_t entry(DLTensor* a, int32_t n) { for (;;) {} return 0; }");
    let other = kernel(d, "other", "int32_t not_entry(DLTensor* a, int32_t n) { return 0; }");
    let good =
        kernel(d, "good", "int32_t entry(DLTensor* a, int32_t n) { return n == 2 ? 0 : 1; }");
    let text = d.join("text.so");
    std::fs::write(&text, "this is not a shared library").unwrap();

    let runner = RpcRunner::builder(rpc).evaluator(evaluator(1, 1, 0)).build().await.unwrap();
    let inputs: Vec<_> = [&segv, &three, &forever, &other, &text, &good]
        .iter()
        .map(|p| RunnerInput::new(*p, args()))
        .collect();
    let start = Instant::now();
    let results = runner.run(inputs).collect_ordered().await;
    assert!(start.elapsed() < SOON, "took {:?}", start.elapsed());
    match &results[0] {
        Err(RunError::KernelCrash { message }) => assert!(message.contains("SIGSEGV"), "{message}"),
        other => panic!("segv: {other:?}"),
    }
    match &results[1] {
        Err(RunError::KernelError { message }) => {
            assert!(message.contains("returned error 3"), "{message}")
        }
        other => panic!("nonzero: {other:?}"),
    }
    assert!(matches!(results[2], Err(RunError::Timeout { .. })), "forever: {:?}", results[2]);
    match &results[3] {
        Err(RunError::Load { kind, artifact, .. }) => {
            assert_eq!(kind, failure_kind::MISSING_SYMBOL);
            assert_eq!(artifact, &other);
        }
        other => panic!("missing symbol: {other:?}"),
    }
    match &results[4] {
        Err(e @ RunError::Load { kind, .. }) => {
            assert_eq!(kind, failure_kind::LOAD_ERROR);
            // Names the artifact, not where the session stored it.
            let shown = e.to_string();
            assert!(shown.contains(&text.display().to_string()), "{shown}");
            assert!(!shown.contains("kernel.so"), "{shown}");
        }
        other => panic!("not a library: {other:?}"),
    }
    assert!(results[5].is_ok(), "the good kernel after all that: {:?}", results[5]);
    // The device is free and the server healthy.
    st.server
        .wait_for(SOON, |s| s.registered && !s.busy && s.sessions == 6)
        .await
        .expect("server free after the faults");
    st.server.shutdown().await.unwrap();
}

/// A pipeline that records each session's temp dir, then delegates to the
/// default stages: users override any stage this way.
#[derive(Clone, Default)]
struct Recording {
    dirs: Arc<Mutex<Vec<String>>>,
    cleanups: Arc<Mutex<usize>>,
}

impl Pipeline for Recording {
    async fn create_session(&self, ctx: &StageContext) -> Result<DeviceSession, RunError> {
        let mut dev = DefaultPipeline.create_session(ctx).await?;
        let dir = dev.session().map_or_else(|| "local".to_owned(), |s| s.workdir().to_owned());
        self.dirs.lock().unwrap().push(dir);
        Ok(dev)
    }

    async fn cleanup(&self, ctx: &StageContext, dev: DeviceSession) {
        DefaultPipeline.cleanup(ctx, dev).await;
        *self.cleanups.lock().unwrap() += 1;
    }
}

#[tokio::test]
async fn cleanup_runs_on_every_path_even_when_the_caller_drops_the_future() {
    let (st, rpc) = stack(SOON).await;
    let d = st.dir.path();
    let good = kernel(d, "good", "int32_t entry(DLTensor* a, int32_t n) { return 0; }");
    let three = kernel(d, "three", "int32_t entry(DLTensor* a, int32_t n) { return 3; }");
    let slow = kernel(
        d,
        "slow",
        "int32_t entry(DLTensor* a, int32_t n) { double e = now() + 10; while (now() < e) {} return 0; }",
    );
    let rec = Recording::default();
    let runner = RpcRunner::builder(rpc)
        .pipeline(rec.clone())
        .evaluator(evaluator(1, 1, 0))
        .build()
        .await
        .unwrap();
    assert!(run_one(&runner, RunnerInput::new(&good, args())).await.is_ok());
    assert!(run_one(&runner, RunnerInput::new(&three, args())).await.is_err());
    // Dropped mid-measurement: wait until the slow kernel's session exists.
    let mut fut = runner.run(vec![RunnerInput::new(&slow, args())]);
    // Polled once (nothing is ready): the stream owns its measurement.
    assert!(futures::poll!(fut.next()).is_pending());
    let deadline = Instant::now() + SOON;
    while rec.dirs.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the third session never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(fut);
    st.server
        .wait_for(SOON, |s| s.sessions == 3 && !s.busy)
        .await
        .expect("dropped measurement cleaned up");
    let deadline = Instant::now() + SOON;
    while *rec.cleanups.lock().unwrap() < 3 {
        assert!(Instant::now() < deadline, "cleanup did not run for the dropped future");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for dir in rec.dirs.lock().unwrap().iter() {
        assert!(!Path::new(dir).exists(), "session dir {dir} left behind");
    }
    st.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_server_killed_mid_measurement_is_a_classified_error() {
    let t = tracker().await;
    let dir = tempfile::tempdir().unwrap();
    let slow = kernel(
        dir.path(),
        "slow",
        "int32_t entry(DLTensor* a, int32_t n) { double e = now() + 10; while (now() < e) {} return 0; }",
    );
    // A real server process (the rpc-runner binary), SIGKILLed mid-measurement.
    let tracker_addr = t.addr().to_string();
    let work_dir = dir.path().to_str().unwrap();
    let mut srv = crate::cli::spawn(&crate::cli::server_args(&tracker_addr, "cpu", work_dir));
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu");
    // The server process registers with the tracker: until then, no runner.
    let deadline = Instant::now() + SOON;
    let runner = loop {
        match RpcRunner::builder(rpc.clone()).evaluator(evaluator(1, 1, 0)).build().await {
            Ok(runner) => break runner,
            Err(RunError::NoServer { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the server never registered: {e:?}"),
        }
    };
    let input = RunnerInput::new(&slow, args());
    let fut = tokio::spawn(async move { run_one(&runner, input).await });
    // Mid-measurement: the server has started the session's worker process.
    let server_pid = srv.child.id();
    let deadline = Instant::now() + SOON;
    while !has_child(server_pid) {
        assert!(Instant::now() < deadline, "the measurement never reached the server's worker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.signal_and_wait(9);
    let err = fut.await.unwrap().unwrap_err();
    assert!(matches!(err, RunError::ServerLost { .. }), "{err:?}");
    drop(t);
}

/// True if some process has `pid` as its parent.
fn has_child(pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).ok().and_then(|stat| {
            let rest = stat.rsplit_once(") ")?.1.to_owned();
            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
        }) == Some(pid)
    })
}

#[test]
fn rpc_config_reads_tvm_environment_variables() {
    // Only this test touches these variables (nextest runs each test in its own process).
    // SAFETY: single-threaded at this point of this test process.
    unsafe {
        std::env::set_var("TVM_TRACKER_HOST", "10.1.2.3");
        std::env::set_var("TVM_TRACKER_PORT", "9190");
        std::env::set_var("TVM_TRACKER_KEY", "rasp4");
    }
    let cfg = RpcConfig::from_env().unwrap();
    assert_eq!(
        (cfg.tracker_host.as_str(), cfg.tracker_port, cfg.tracker_key.as_str()),
        ("10.1.2.3", 9190, "rasp4")
    );
    assert_eq!((cfg.session_priority, cfg.session_timeout), (1, Duration::from_secs(60)));
    // SAFETY: as above.
    unsafe { std::env::set_var("TVM_TRACKER_PORT", "not-a-port") };
    let err = RpcConfig::from_env().unwrap_err();
    assert!(matches!(err, RpcConfigError::BadPort { .. }), "{err:?}");
    assert!(err.to_string().contains("TVM_TRACKER_PORT"), "{err}");
    assert_eq!(cfg.lease_timeout, None, "no bound by default, as TVM");
}

#[tokio::test]
async fn the_timeout_counts_from_the_lease_not_from_the_queue() {
    let (st, rpc) = stack(Duration::from_secs(3)).await;
    // Warm-up + one call: ~1.4 s per measurement, under the 3 s limit...
    let slow = kernel(
        st.dir.path(),
        "slow",
        "int32_t entry(DLTensor* a, int32_t n) { double e = now() + 0.7; while (now() < e) {} return 0; }",
    );
    let runner =
        RpcRunner::builder(rpc).evaluator(evaluator(1, 1, 0)).max_workers(3).build().await.unwrap();
    let start = Instant::now();
    let inputs = vec![RunnerInput::new(&slow, args()); 3];
    let results = runner.run(inputs).collect_ordered().await;
    // ...but the third waited ~2.8 s for the only device before its turn.
    assert!(start.elapsed() > Duration::from_secs(3), "{:?}", start.elapsed());
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    st.server.shutdown().await.unwrap();
}

const SLOW_10S: &str = "int32_t entry(DLTensor* a, int32_t n) { double e = now() + 10; while (now() < e) {} return 0; }";

#[tokio::test]
async fn a_lease_timeout_fires_when_no_server_is_free() {
    let (st, rpc) = stack(SOON).await;
    let good = kernel(st.dir.path(), "good", "int32_t entry(DLTensor* a, int32_t n) { return 0; }");
    let runner = RpcRunner::builder(rpc.clone().lease_timeout(Duration::from_millis(500)))
        .evaluator(evaluator(1, 1, 0))
        .build()
        .await
        .unwrap();
    // Another tuner holds the only device.
    let mut other = TrackerClient::connect(&rpc.tracker_addr()).await.unwrap();
    let mut held = other.request("cpu", 1, Some(SOON)).await.unwrap();
    st.server.wait_for(SOON, |s| s.busy).await.expect("device held");
    let start = Instant::now();
    let result = run_one(&runner, RunnerInput::new(&good, args())).await;
    assert!(
        matches!(result, Err(RunError::LeaseTimeout { limit }) if limit == Duration::from_millis(500)),
        "{result:?}"
    );
    assert!(start.elapsed() < SOON, "took {:?}", start.elapsed());
    // Once the device is free again, the same runner measures.
    held.close().await.unwrap();
    assert!(run_one(&runner, RunnerInput::new(&good, args())).await.is_ok());
    st.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_batch_resolves_every_item_to_cancelled_and_frees_the_device() {
    let (st, rpc) = stack(SOON).await;
    let slow = kernel(st.dir.path(), "slow", SLOW_10S);
    let rec = Recording::default();
    let runner = RpcRunner::builder(rpc)
        .pipeline(rec.clone())
        .evaluator(evaluator(1, 1, 0))
        .build()
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let batch = runner.run_with_cancel(vec![RunnerInput::new(&slow, args()); 3], &cancel);
    assert_eq!(batch.len(), 3);
    // The first measurement is running on the only device; two wait.
    let deadline = Instant::now() + SOON;
    while rec.dirs.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the first session never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    cancel.cancel();
    let results = batch.collect_ordered().await;
    assert!(start.elapsed() < Duration::from_secs(5), "cancel took {:?}", start.elapsed());
    assert_eq!(results.len(), 3);
    for r in &results {
        assert!(matches!(r, Err(RunError::Cancelled)), "{r:?}");
    }
    st.server.wait_for(SOON, |s| !s.busy && s.registered).await.expect("device freed");
    assert_eq!(*rec.cleanups.lock().unwrap(), 1, "the leased session was cleaned up");
    for dir in rec.dirs.lock().unwrap().iter() {
        assert!(!Path::new(dir).exists(), "session dir {dir} left behind");
    }
    st.server.shutdown().await.unwrap();
}

/// Measures another artifact than the input's: an overridden stage.
struct SwapArtifact(PathBuf);

impl Pipeline for SwapArtifact {
    async fn upload_module(
        &self,
        _ctx: &StageContext,
        dev: &mut DeviceSession,
        _input: &RunnerInput,
    ) -> Result<String, RunError> {
        dev.upload(&self.0, "swapped.so").await
    }
}

#[tokio::test]
async fn the_local_runner_runs_an_overridden_stage() {
    let dir = tempfile::tempdir().unwrap();
    let good = kernel(dir.path(), "good", "int32_t entry(DLTensor* a, int32_t n) { return 0; }");
    let three = kernel(dir.path(), "three", "int32_t entry(DLTensor* a, int32_t n) { return 3; }");
    let local = LocalRunner::builder(crate::test_worker_program())
        .pipeline(SwapArtifact(three))
        .evaluator(evaluator(1, 1, 0))
        .timeout(SOON)
        .build()
        .unwrap();
    match run_one(&local, RunnerInput::new(&good, args())).await {
        Err(RunError::KernelError { message }) => assert!(message.contains("error 3"), "{message}"),
        other => panic!("the overridden upload stage did not apply: {other:?}"),
    }
    // The recording pipeline sees a local device too, and its cleanup runs.
    let rec = Recording::default();
    let local2 = LocalRunner::builder(crate::test_worker_program())
        .pipeline(rec.clone())
        .evaluator(evaluator(1, 1, 0))
        .build()
        .unwrap();
    let mut stream = local2.run(vec![RunnerInput::new(&good, args()); 2]);
    let mut seen = Vec::new();
    while let Some((i, r)) = stream.next().await {
        assert!(r.is_ok(), "{r:?}");
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1]);
    assert_eq!(*rec.dirs.lock().unwrap(), ["local", "local"]);
    assert_eq!(*rec.cleanups.lock().unwrap(), 2);
    local.shutdown().await;
    local2.shutdown().await;
}

#[tokio::test]
async fn building_a_runner_fails_clearly_without_a_tracker_or_a_server() {
    let port = crate::common::free_port();
    let err =
        RpcRunner::builder(RpcConfig::new("127.0.0.1", port, "cpu")).build().await.unwrap_err();
    assert!(matches!(err, RunError::Session { .. }), "{err:?}");
    let chain = anyhow::Error::from(err);
    assert!(format!("{chain:#}").contains("refused"), "{chain:#}");

    let t = tracker().await;
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "no-such-key");
    let err = RpcRunner::builder(rpc).build().await.unwrap_err();
    assert!(matches!(err, RunError::NoServer { ref key, .. } if key == "no-such-key"), "{err:?}");
    drop(t);
}

/// Accepts on a port of its own and relays each connection to `to`,
/// counting the connections.
async fn counting_proxy(to: std::net::SocketAddr) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, count)
}

#[tokio::test]
async fn leases_reuse_the_runners_tracker_connection() {
    let (st, _) = stack(Duration::from_secs(10)).await;
    let (port, connections) = counting_proxy(st.tracker.addr()).await;
    let rpc = RpcConfig::new("127.0.0.1", port, "cpu").session_timeout(Duration::from_secs(10));
    let runner = RpcRunner::builder(rpc).evaluator(evaluator(1, 1, 0)).build().await.unwrap();
    let built = connections.load(std::sync::atomic::Ordering::SeqCst);
    let good = kernel(st.dir.path(), "good", "int32_t entry(DLTensor* a, int32_t n) { return 0; }");
    for round in 0..3 {
        let inputs = (0..2).map(|_| RunnerInput::new(&good, args())).collect();
        for r in runner.run(inputs).collect_ordered().await {
            r.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    let leases = connections.load(std::sync::atomic::Ordering::SeqCst) - built;
    assert_eq!(leases, 1, "6 leases, one at a time, over one tracker connection");
    drop(runner);
    st.server.shutdown().await.unwrap();
}
