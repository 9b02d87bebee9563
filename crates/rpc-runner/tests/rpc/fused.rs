//! The default pipeline's deferred steps: load, alloc, timing and
//! read-back as one call to the worker, the same results step by step for
//! a worker program that lacks the fused task, and custom stages that call
//! the worker after deferred steps.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use popen_pool::{Registry, WorkerProgram};
use rpc_runner::measure::{
    AllocArgs, ArgInfo, DType, DefaultPipeline, DeviceSession, EvaluatorConfig, LoadKernel,
    LocalRunner, Measurement, Pipeline, ReadArg, RpcConfig, RpcRunner, RunError, Runner,
    RunnerInput, StageContext, TimeKernel,
};
use rpc_runner::tasks::WorkerInfo;
use rpc_runner::tracker::TrackerHandle;
use rpc_runner::{DeviceServer, ServerConfig, ServerHandle};

use crate::runners::kernel;
use crate::sessions::tracker;

const SOON: Duration = Duration::from_secs(30);

/// `c = a + b` over the three f32 `[64]` arguments of [`args`].
const ADD: &str = "int32_t entry(DLTensor* t, int32_t n) {
    float *a = t[0].data, *b = t[1].data, *c = t[2].data;
    for (int i = 0; i < 64; i++) c[i] = a[i] + b[i];
    return 0;
}";

fn args() -> Vec<ArgInfo> {
    vec![ArgInfo::tensor(DType::F32, [64]); 3]
}

fn evaluator() -> EvaluatorConfig {
    EvaluatorConfig { number: 1, repeat: 2, min_repeat_ms: 0, ..EvaluatorConfig::default() }
}

/// The registry of an older worker program: every kernel task but
/// `MeasureKernel`.
fn unfused_registry() -> Registry {
    Registry::new()
        .register::<WorkerInfo>()
        .register::<LoadKernel>()
        .register::<AllocArgs>()
        .register::<TimeKernel>()
        .register::<ReadArg>()
}

/// Serves [`unfused_registry`] when run as a worker; passes otherwise.
#[test]
fn unfused_worker_entry() {
    popen_pool::serve_if_worker(unfused_registry());
}

fn unfused_program() -> WorkerProgram {
    WorkerProgram::test_entry(module_path!(), "unfused_worker_entry").unwrap()
}

/// A tracker, one registered server for `key` running `program` (unpinned,
/// `tweak` applied) and a runner leasing it.
async fn one_server(
    key: &str,
    program: WorkerProgram,
    tweak: impl FnOnce(ServerConfig) -> ServerConfig,
) -> (TrackerHandle, ServerHandle, RpcRunner) {
    let t = tracker().await;
    let cfg =
        ServerConfig::new(key, program).no_worker_cpu_affinity().tracker(t.addr().to_string());
    let s = DeviceServer::start("127.0.0.1:0", tweak(cfg)).await.unwrap();
    s.wait_for(SOON, |st| st.registered).await.expect("registered");
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), key).session_timeout(SOON);
    let runner = RpcRunner::builder(rpc).evaluator(evaluator()).build().await.unwrap();
    (t, s, runner)
}

/// Checks that `r` is an upload error of `artifact` whose cause mentions `says`.
fn assert_upload_error(
    r: &rpc_runner::measure::RunnerResult,
    artifact: &std::path::Path,
    says: &str,
) {
    match r {
        Err(RunError::Upload { artifact: a, source }) => {
            assert_eq!(a, artifact);
            assert!(source.text().contains(says), "{}", source.text());
        }
        other => panic!("an upload error of {}: {other:?}", artifact.display()),
    }
}

/// Checks `c = a + b` in a measurement's outputs.
fn assert_sum(m: &Measurement) {
    let f = |i: usize| -> Vec<f32> {
        m.outputs[i]
            .bytes
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(m.outputs.len(), 3);
    let (a, b, c) = (f(0), f(1), f(2));
    assert!(a.iter().all(|v| (1.0..10.0).contains(v)), "{a:?}");
    assert!((0..64).all(|i| c[i] == a[i] + b[i]), "{c:?}");
}

/// Records, at cleanup, how many tasks the local worker has run.
#[derive(Clone, Default)]
struct CountTasks(Arc<Mutex<Vec<u64>>>);

impl Pipeline for CountTasks {
    async fn cleanup(&self, ctx: &StageContext, mut dev: DeviceSession) {
        let info = dev.call(WorkerInfo).await.expect("worker info");
        self.0.lock().unwrap().push(info.tasks_run);
        DefaultPipeline.cleanup(ctx, dev).await;
    }
}

#[tokio::test]
async fn a_default_measurement_is_one_call_to_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let add = kernel(dir.path(), "add", ADD);
    let counts = CountTasks::default();
    let local = LocalRunner::builder(crate::test_worker_program())
        .pipeline(counts.clone())
        .evaluator(evaluator())
        .timeout(SOON)
        .build()
        .unwrap();
    let input = RunnerInput::new(&add, args()).read_args([0, 1, 2]);
    let results = local.run(vec![input; 3]).collect_ordered().await;
    for r in &results {
        let m = r.as_ref().expect("measured");
        assert_eq!(m.run_secs.len(), 2);
        assert_sum(m);
        assert!(
            m.stages.load > Duration::ZERO && m.stages.alloc > Duration::ZERO,
            "{:?}",
            m.stages
        );
    }
    let counts = counts.0.lock().unwrap().clone();
    // Each measurement: one fused call, then the counting call itself.
    let steps: Vec<u64> = counts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(steps, [2, 2], "tasks run at each cleanup: {counts:?}");
}

#[tokio::test]
async fn a_worker_without_the_fused_task_is_measured_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let add = kernel(dir.path(), "add", ADD);
    let no_entry = kernel(dir.path(), "no_entry", "int32_t other(void) { return 0; }");
    let (_t, s, runner) = one_server("old", unfused_program(), |c| c).await;
    let inputs = vec![
        RunnerInput::new(&add, args()).read_args([0, 1, 2]),
        RunnerInput::new(&no_entry, args()),
        RunnerInput::new(&add, args()).read_args([0, 1, 2]),
    ];
    let results = runner.run(inputs).collect_ordered().await;
    for i in [0, 2] {
        let m = results[i].as_ref().expect("measured step by step");
        assert_eq!(m.run_secs.len(), 2);
        assert_sum(m);
    }
    match &results[1] {
        Err(RunError::Load { artifact, message, .. }) => {
            assert_eq!(artifact, &no_entry);
            assert!(message.contains("entry"), "{message}");
        }
        other => panic!("a missing entry is a load error: {other:?}"),
    }
    s.shutdown().await.unwrap();
}

/// Times with a call of its own: the deferred load and alloc run first.
struct OwnEvaluator;

impl Pipeline for OwnEvaluator {
    async fn run_evaluator(
        &self,
        ctx: &StageContext,
        dev: &mut DeviceSession,
        _input: &rpc_runner::measure::RunnerInput,
    ) -> Result<Measurement, RunError> {
        let timing = dev.call(TimeKernel { config: ctx.evaluator.clone() }).await?;
        let sum = dev.call(ReadArg { set: 0, index: 2 }).await?;
        if sum.iter().all(|&b| b == 0) {
            return Err(RunError::Other { message: "the kernel did not run".into() });
        }
        Ok(Measurement::new(timing.costs))
    }
}

#[tokio::test]
async fn an_overridden_evaluator_calls_the_worker_after_the_deferred_steps() {
    let dir = tempfile::tempdir().unwrap();
    let add = kernel(dir.path(), "add", ADD);
    let bad = kernel(dir.path(), "bad", "int32_t nothing(void) { return 0; }");
    let local = LocalRunner::builder(crate::test_worker_program())
        .pipeline(OwnEvaluator)
        .evaluator(evaluator())
        .timeout(SOON)
        .build()
        .unwrap();
    let results = local
        .run(vec![RunnerInput::new(&add, args()), RunnerInput::new(&bad, args())])
        .collect_ordered()
        .await;
    let m = results[0].as_ref().expect("measured by the custom stage");
    assert_eq!(m.run_secs.len(), 2);
    // The deferred load's error reaches the custom stage's call, naming the artifact.
    match &results[1] {
        Err(RunError::Load { artifact, .. }) => assert_eq!(artifact, &bad),
        other => panic!("a missing entry is a load error: {other:?}"),
    }
}

#[tokio::test]
async fn an_upload_the_server_refuses_is_an_upload_error_and_the_device_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let add = kernel(dir.path(), "add", ADD);
    let (_t, s, runner) =
        one_server("small", crate::test_worker_program(), |c| c.max_upload_bytes(64)).await;
    let results = runner.run(vec![RunnerInput::new(&add, args()); 2]).collect_ordered().await;
    for r in &results {
        assert_upload_error(r, &add, "64");
    }
    s.wait_for(SOON, |st| st.sessions == 2 && !st.busy).await.expect("both sessions ended");
    s.shutdown().await.unwrap();
}

/// The artifact is read while the device is being leased (ahead of the
/// upload): a missing one is still an upload error naming it, its session
/// ends, and the measurements around it upload what they read.
#[tokio::test]
async fn an_artifact_read_ahead_of_its_lease_is_what_gets_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let add = kernel(dir.path(), "add", ADD);
    let missing = dir.path().join("never-built.so");
    let (_t, s, runner) = one_server("ahead", crate::test_worker_program(), |c| c).await;
    let inputs = vec![
        RunnerInput::new(&add, args()).read_args([0, 1, 2]),
        RunnerInput::new(&missing, args()),
        RunnerInput::new(&add, args()).read_args([0, 1, 2]),
    ];
    let results = runner.run(inputs).collect_ordered().await;
    for i in [0, 2] {
        let m = results[i].as_ref().expect("measured");
        assert_sum(m);
        assert!(m.stages.upload > Duration::ZERO, "{:?}", m.stages);
    }
    assert_upload_error(&results[1], &missing, "never-built.so");
    s.wait_for(SOON, |st| st.sessions == 3 && !st.busy).await.expect("all sessions ended");
    s.shutdown().await.unwrap();
}
