//! `RpcRunner` with `Backend::Tvm`: kernels built by our `LocalBuilder`
//! (with the TVM export) measured on Apache TVM's own Python RPC server,
//! leased through our tracker; the same artifacts through `LocalRunner`.

use std::time::Duration;

use rpc_runner::measure::{
    ArgInfo, Backend, DType, EvaluatorConfig, LocalRunner, RpcConfig, RpcRunner, RunError, Runner,
    RunnerInput, failure_kind,
};
use rpc_runner::tracker::TrackerClient;

use crate::common::{addr_of, start_tracker, within};
use crate::tracker_interop::{assert_group_gone, require_tvm, tvm_python};
use crate::tvm_session::{start_tvm_server, wait_registered};
use crate::tvm_shim::{build_kernels, builder};

const N: i64 = 4096;

fn vadd_args() -> Vec<ArgInfo> {
    vec![ArgInfo::tensor(DType::F32, [N]); 3]
}

fn evaluator() -> EvaluatorConfig {
    EvaluatorConfig { number: 2, repeat: 5, min_repeat_ms: 0, ..EvaluatorConfig::default() }
}

#[tokio::test]
async fn the_rpc_runner_measures_on_tvms_own_server() {
    let python = require_tvm!();
    let out = tempfile::tempdir().unwrap();
    let b = builder(out.path(), Some("kernel"));
    let (vadd, busy) = build_kernels(&b).await;
    b.shutdown().await;

    let tracker = start_tracker().await;
    let taddr = addr_of(&tracker);
    let (server, _) = start_tvm_server(&python, "tvmcpu", Some(&taddr)).await;
    let mut client = TrackerClient::connect(&taddr).await.unwrap();
    wait_registered(&mut client, "tvmcpu").await;

    let port: u16 = taddr.rsplit(':').next().unwrap().parse().unwrap();
    let rpc = RpcConfig::new("127.0.0.1", port, "tvmcpu")
        .session_timeout(Duration::from_secs(60))
        .backend(Backend::Tvm { function: "kernel".into() });
    let runner =
        RpcRunner::builder(rpc.clone()).evaluator(evaluator()).seed(5).build().await.unwrap();
    // Five in a row on one device: each lease waits for the last to end.
    let mut inputs = vec![RunnerInput::new(&busy, vadd_args())];
    inputs.extend((0..4).map(|_| RunnerInput::new(&vadd, vadd_args()).read_args([2])));
    let results = within("five TVM measurements", runner.run(inputs).collect_ordered()).await;
    let busy_m = results[0].as_ref().unwrap_or_else(|e| panic!("busy: {e:?}"));
    assert_eq!(busy_m.run_secs.len(), 5, "TVM's repeat");
    assert!(busy_m.run_secs.iter().all(|&c| (195e-6..2e-3).contains(&c)), "{:?}", busy_m.run_secs);
    assert!(busy_m.env.warnings.iter().any(|w| w.contains("RPCTimeEvaluator")), "{:?}", busy_m.env);

    // The outputs are the LocalRunner's on the same seed: same inputs, same kernel.
    let local = LocalRunner::builder(crate::test_worker_program())
        .evaluator(evaluator())
        .seed(5)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let lm = local
        .run(vec![RunnerInput::new(&vadd, vadd_args()).read_args([0, 1, 2])])
        .collect_ordered()
        .await
        .pop()
        .unwrap()
        .unwrap();
    local.shutdown().await;
    let (a, b2, c) = (
        lm.output_as::<f32>(0).unwrap(),
        lm.output_as::<f32>(1).unwrap(),
        lm.output_as::<f32>(2).unwrap(),
    );
    assert!(c.iter().zip(a.iter().zip(&b2)).all(|(c, (a, b))| *c == a + b));
    for r in &results[1..] {
        let m = r.as_ref().unwrap_or_else(|e| panic!("vadd: {e:?}"));
        assert_eq!(m.output_as::<f32>(0).unwrap(), c, "TVM's output equals the local one");
        assert!(m.server.starts_with("127.0.0.1:"), "{}", m.server);
    }

    // A function the library does not export, a kernel that fails.
    let missing = RpcRunner::builder(rpc.clone().backend(Backend::Tvm { function: "nope".into() }))
        .evaluator(evaluator())
        .build()
        .await
        .unwrap();
    let r = missing.run(vec![RunnerInput::new(&vadd, vadd_args())]).collect_ordered().await;
    assert!(
        matches!(&r[0], Err(RunError::Load { kind, .. }) if kind == failure_kind::MISSING_SYMBOL),
        "{:?}",
        r[0]
    );
    let two_args = vec![ArgInfo::tensor(DType::F32, [N]); 2];
    let r = runner.run(vec![RunnerInput::new(&vadd, two_args)]).collect_ordered().await;
    assert!(matches!(&r[0], Err(RunError::KernelError { .. })), "{:?}", r[0]);
    // Interleaving needs our server: refused at once, nothing leased.
    let r =
        runner.run_interleaved(vec![RunnerInput::new(&busy, vadd_args())]).collect_ordered().await;
    assert!(
        matches!(&r[0], Err(RunError::Other { message }) if message.contains("interleaving")),
        "{:?}",
        r[0]
    );
    // And the device is free again for the next measurement.
    let r = runner.run(vec![RunnerInput::new(&busy, vadd_args())]).collect_ordered().await;
    assert!(r[0].is_ok(), "{:?}", r[0]);

    // The same busy kernel through our own server and evaluator agrees
    // with TVM's RPCTimeEvaluator on TVM's server.
    let ours = crate::sessions::server(Some(&tracker), "ours", |c| c).await;
    let rpc_ours =
        RpcConfig::new("127.0.0.1", port, "ours").session_timeout(Duration::from_secs(60));
    let ours_runner = RpcRunner::builder(rpc_ours).evaluator(evaluator()).build().await.unwrap();
    let r = ours_runner.run(vec![RunnerInput::new(&busy, vadd_args())]).collect_ordered().await;
    let ours_m = r[0].as_ref().unwrap();
    let (a, b) = (median(&ours_m.run_secs), median(&busy_m.run_secs));
    assert!((a / b - 1.0).abs() < 0.1, "ours {a} s vs TVM's {b} s for a 200 us kernel");
    ours.shutdown().await.unwrap();

    let pgid = server.pgid();
    drop(server);
    assert_group_gone(pgid).await;
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
