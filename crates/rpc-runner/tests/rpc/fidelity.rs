//! Measurement fidelity end to end: adaptive, interleaved measurements of
//! real C kernels through a real tracker + device server, the environment
//! record (pinning, neighbour load, real-time), and faults inside an
//! interleaved set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rpc_runner::measure::{
    AdaptiveStop, ArgInfo, CpuPlan, DType, EvaluatorConfig, LocalRunner, RpcConfig, RpcRunner,
    RunError, Runner, RunnerInput, StopReason, Verdict, best_within_noise,
};

use crate::common::eventually;
use crate::runners::kernel;
use crate::sessions::{server, tracker};

const SOON: Duration = Duration::from_secs(60);

fn busy(us: u32) -> String {
    format!(
        "int32_t entry(DLTensor* args, int32_t n) {{\n\
         double end = now() + {us}e-6; while (now() < end) {{}} return 0; }}"
    )
}

fn args() -> Vec<ArgInfo> {
    vec![ArgInfo::tensor(DType::F32, [16])]
}

/// Adaptive, with generous bounds for a loaded 2-core machine.
fn adaptive() -> EvaluatorConfig {
    EvaluatorConfig { min_repeat_ms: 2, ..EvaluatorConfig::adaptive() }.with_adaptive(
        AdaptiveStop { target_rel_noise: 0.02, min_batches: 5, max_batches: 40, max_time_ms: 2000 },
    )
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn an_interleaved_set_is_measured_pinned_ranked_and_faults_stay_with_their_kernel() {
    let fds_before = open_fds();
    let t = tracker().await;
    // Pinned as a default server is (see `server::tests`).
    let s = server(Some(&t), "cpu", |c| c.worker_cpu_affinity(CpuPlan::detect().measure)).await;
    let dir = tempfile::tempdir().unwrap();
    let fast = kernel(dir.path(), "fast", &busy(100));
    let mid = kernel(dir.path(), "mid", &busy(200));
    let slow = kernel(dir.path(), "slow", &busy(400));
    let fails = kernel(dir.path(), "fails", "int32_t entry(DLTensor* a, int32_t n) { return 5; }");
    let not_a_library = dir.path().join("broken.so");
    std::fs::write(&not_a_library, b"not an ELF file").unwrap();

    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu").session_timeout(SOON);
    let runner = RpcRunner::builder(rpc).evaluator(adaptive()).seed(3).build().await.unwrap();
    let inputs: Vec<RunnerInput> = [&slow, &fails, &fast, &not_a_library, &mid]
        .into_iter()
        .map(|p| RunnerInput::new(p, args()).read_args([0]))
        .collect();
    let r = runner.run_interleaved(inputs).collect_ordered().await;
    assert_eq!(r.len(), 5);
    assert!(
        matches!(&r[1], Err(RunError::KernelError { message }) if message.contains('5')),
        "{:?}",
        r[1]
    );
    assert!(
        matches!(&r[3], Err(RunError::Load { artifact, .. }) if artifact == &not_a_library),
        "{:?}",
        r[3]
    );
    let plan = CpuPlan::detect();
    let mut stats = Vec::new();
    for (i, nominal) in [(0, 400e-6), (2, 100e-6), (4, 200e-6)] {
        let m = r[i].as_ref().unwrap_or_else(|e| panic!("input {i}: {e}"));
        assert!(m.interleaved, "{m:?}");
        assert_eq!(m.server, s.addr().to_string());
        assert!(m.run_secs.len() >= 5, "{:?}", m.run_secs);
        assert!(m.stop != StopReason::Repeat, "the adaptive rule ran: {:?}", m.stop);
        assert_eq!(m.noise_threshold, 0.02);
        let st = m.stats().unwrap();
        // The minimum: a busy-wait is never faster than its wait, and one
        // unpreempted batch is enough to be within 10%.
        assert!((st.min / nominal - 1.0).abs() < 0.1, "input {i}: {st:?} for {nominal}");
        assert!(st.median >= st.min);
        assert!(m.env.cpu_share.is_some_and(|s| s > 0.0), "{:?}", m.env);
        assert_eq!(m.env.cpus, plan.measure, "pinned to the measuring CPU: {:?}", m.env);
        assert_eq!(m.env.pinned, !plan.others.is_empty());
        assert_eq!(m.outputs.len(), 1, "outputs read back per candidate");
        stats.push(st);
    }
    // slow, fast, mid: in order, and never the wrong way round beyond noise
    // (on a loaded machine "tied" is a fair answer; the tests of this file
    // run alone, see .config/nextest.toml).
    assert!(stats[1].median < stats[2].median && stats[2].median < stats[0].median, "{stats:?}");
    assert_ne!(stats[1].compare(&stats[2]), Verdict::Slower, "{stats:?}");
    assert_ne!(stats[2].compare(&stats[0]), Verdict::Slower, "{stats:?}");
    assert_eq!(best_within_noise(&stats)[0], 1, "{stats:?}");

    // The runner keeps its tracker connection for the next lease until it
    // is dropped.
    drop(runner);
    s.shutdown().await.unwrap();
    drop(t);
    eventually("the sockets and pipes to close", async || open_fds() <= fds_before).await;
}

#[tokio::test]
async fn a_kernel_that_crashes_an_interleaved_set_is_the_one_reported() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let dir = tempfile::tempdir().unwrap();
    let a = kernel(dir.path(), "a", &busy(50));
    // Survives its warm-up and calibration, then crashes while timed.
    let crash = kernel(
        dir.path(),
        "crash",
        "static int calls;\n\
         int32_t entry(DLTensor* a, int32_t n) {\n\
           if (++calls > 200) *(volatile int*)0 = 1;\n\
           double end = now() + 50e-6; while (now() < end) {} return 0; }",
    );
    let b = kernel(dir.path(), "b", &busy(80));
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu").session_timeout(SOON);
    let runner = RpcRunner::builder(rpc).evaluator(adaptive()).build().await.unwrap();
    let inputs = [&a, &crash, &b].map(|p| RunnerInput::new(p, args())).to_vec();
    let r = runner.run_interleaved(inputs).collect_ordered().await;
    assert!(matches!(&r[1], Err(RunError::KernelCrash { .. })), "{:?}", r[1]);
    for i in [0, 2] {
        let m = r[i].as_ref().unwrap_or_else(|e| panic!("input {i}: {e}"));
        assert!(!m.interleaved, "timed again on its own");
        assert!(m.env.warnings.iter().any(|w| w.contains("crashed")), "{:?}", m.env.warnings);
    }
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn neighbour_load_and_missing_pinning_are_recorded_and_warned_about() {
    let plan = CpuPlan::detect();
    // Timed for >= 125 ms (25 batches of >= 5 ms): /proc/stat counts in
    // 10 ms clock ticks, and a shorter timing can read no load at all.
    let long = AdaptiveStop {
        target_rel_noise: 0.02,
        min_batches: 25,
        max_batches: 40,
        max_time_ms: 2000,
    };
    let config =
        EvaluatorConfig { realtime: true, min_repeat_ms: 5, ..adaptive() }.with_adaptive(long);
    let local = LocalRunner::builder(crate::test_worker_program())
        .evaluator(config)
        .timeout(SOON)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path(), "k", &busy(300));
    // A spinning thread on every CPU but the one the worker measures on is
    // not known here (the local worker is not pinned): load all others.
    let stop = Arc::new(AtomicBool::new(false));
    let spinning = Arc::new(std::sync::Barrier::new(plan.others.len() + 1));
    let spinners: Vec<_> = plan
        .others
        .iter()
        .map(|&cpu| {
            let (stop, spinning) = (Arc::clone(&stop), Arc::clone(&spinning));
            std::thread::spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).unwrap();
                // Pid 0: this thread only.
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                spinning.wait();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // Every spinner is on its CPU before the measurement starts.
    spinning.wait();
    let m = local.run(vec![RunnerInput::new(&k, args())]).collect_ordered().await.pop().unwrap();
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    let m = m.unwrap();
    local.shutdown().await;
    let env = &m.env;
    if plan.others.is_empty() {
        return; // A single CPU: nothing to compare with.
    }
    assert!(!env.pinned, "the local runner's worker is not pinned: {env:?}");
    assert!(env.warnings.iter().any(|w| w.contains("not pinned")), "{env:?}");
    let load = env.neighbour_load.expect("/proc/stat is readable");
    assert!(load > 0.3, "a spinning thread on the other CPU(s): {env:?}");
    assert!(env.warnings.iter().any(|w| w.contains("busy while timing")), "{env:?}");
    // Real-time priority: taken, or refused with a reason.
    assert!(env.realtime || env.warnings.iter().any(|w| w.contains("SCHED_FIFO")), "{env:?}");
}

#[tokio::test]
async fn dropping_an_interleaved_set_frees_the_device_for_the_next_one() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c).await;
    let dir = tempfile::tempdir().unwrap();
    let slow = kernel(dir.path(), "slow", &busy(200_000));
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu")
        .session_timeout(SOON)
        .lease_timeout(Duration::from_secs(30));
    let runner = RpcRunner::builder(rpc).evaluator(adaptive()).build().await.unwrap();
    // A set that takes seconds, dropped while it is being timed.
    let inputs = vec![RunnerInput::new(&slow, args()); 4];
    let stream = runner.run_interleaved(inputs);
    s.wait_for(SOON, |st| st.busy).await.expect("the set's session starts");
    drop(stream);
    // The session is closed in the background: the next set leases the
    // one device well before the dropped set (4 kernels x 200 ms calls x
    // at least 7 calls each) could have
    // finished on its own.
    let fast = kernel(dir.path(), "fast", &busy(50));
    let rpc = RpcConfig::new("127.0.0.1", t.addr().port(), "cpu")
        .session_timeout(SOON)
        .lease_timeout(Duration::from_secs(3));
    let next = RpcRunner::builder(rpc).evaluator(adaptive()).build().await.unwrap();
    let r = next.run_interleaved(vec![RunnerInput::new(&fast, args())]).collect_ordered().await;
    assert!(r[0].is_ok(), "{:?}", r[0]);
    s.shutdown().await.unwrap();
}
