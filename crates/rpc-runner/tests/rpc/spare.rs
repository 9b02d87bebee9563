//! The warm spare (`ServerConfig::warm_spare`): a started, never-used
//! worker and a fresh dir per session, torn down with the session; nothing
//! left when the server stops.

use std::path::Path;

use popen_pool::PoolError;
use rpc_runner::SessionError;
use rpc_runner::tasks::WorkerInfo;

use crate::common::{LIMIT, within};
use crate::sessions::{server, tracker};
use crate::tasks::{HoldMemory, PathsExist, Segfault};

/// True while `pid` exists (a reaped process does not).
fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_gets_a_fresh_started_spare_and_nothing_outlives_the_server() {
    let root = tempfile::tempdir().unwrap();
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c.warm_spare(true).work_root(root.path())).await;
    let mut tc = rpc_runner::TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    let mut seen = Vec::new();
    // The last session's worker pids and dir, gone by the next session's first call.
    let mut previous: Vec<String> = Vec::new();
    for round in 0..3 {
        // A spare is ready before the lease: its worker runs already.
        let st = s.wait_for(LIMIT, |st| st.spare.is_some() && !st.busy && st.registered).await;
        let spare = st.expect("a spare is made while the server is idle").spare.unwrap();
        assert!(exists(spare));
        assert_eq!(entries(root.path()), 1, "round {round}: one spare dir while idle");

        let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
        // The previous teardown may finish after its close() returned, but
        // before this session's first call runs: reaped, dir removed.
        let left = within("paths", sess.call(PathsExist(previous.clone()), None)).await.unwrap();
        assert!(
            left.iter().all(|&e| !e),
            "round {round}: left of the last session {previous:?}: {left:?}"
        );
        let info = within("worker info", sess.call(WorkerInfo, None)).await.unwrap();
        assert_eq!(info.pid, spare, "round {round}: the session got the started spare");
        assert_eq!(info.tasks_run, 1, "round {round}: the spare ran nothing before the check");
        assert_eq!(
            std::fs::canonicalize(&info.cwd).unwrap(),
            std::fs::canonicalize(sess.workdir()).unwrap(),
            "the spare works in the session's dir"
        );
        assert!(!seen.contains(&info.pid), "a worker serves one session only: {seen:?}");
        seen.push(info.pid);
        let mut session_pids = vec![info.pid];
        if round == 1 {
            // A crash kills only this session's worker; the session goes on
            // with a fresh one.
            let err = within("segfault", sess.call(Segfault, None)).await.unwrap_err();
            assert!(matches!(err, SessionError::Task(PoolError::WorkerDied { .. })), "{err:?}");
            let again = within("worker info", sess.call(WorkerInfo, None)).await.unwrap();
            assert_ne!(again.pid, info.pid);
            assert_eq!(again.tasks_run, 0);
            assert!(!seen.contains(&again.pid));
            seen.push(again.pid);
            session_pids.push(again.pid);
        }
        let workdir = sess.workdir().to_owned();
        within("close", sess.close()).await.unwrap();
        assert!(!Path::new(&workdir).exists(), "round {round}: close() removed the session dir");
        // The workers are killed; their reap finishes in the background, as
        // without the spare: checked by the next session's first call.
        previous = session_pids.iter().map(|p| format!("/proc/{p}")).collect();
        previous.push(workdir);
    }
    // The last teardown is done once the status says so.
    s.wait_for(LIMIT, |st| !st.retiring).await.expect("teardown finishes");
    for p in &previous {
        assert!(!Path::new(p).exists(), "{p} is left after the last teardown");
    }
    let last = s.wait_for(LIMIT, |st| st.spare.is_some()).await.unwrap().spare.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
    assert!(!exists(last), "the spare's worker is reaped when the server stops");
    assert_eq!(entries(root.path()), 0, "the spare's dir is removed when the server stops");
    drop(t);
}

/// The server answers `close()` once the worker is killed and reaps it in the
/// background; the next session's first call still runs only after that
/// reap. The old worker holds 512 MiB, so its exit takes long enough to be
/// seen by a call that did not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_sessions_first_call_runs_after_the_last_worker_is_reaped() {
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c.warm_spare(true)).await;
    let mut tc = rpc_runner::TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    for round in 0..3 {
        s.wait_for(LIMIT, |st| st.spare.is_some() && !st.busy && st.registered).await.unwrap();
        let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
        let pid = within("worker info", sess.call(WorkerInfo, None)).await.unwrap().pid;
        within("hold", sess.call(HoldMemory(512 << 20), None)).await.unwrap();
        within("close", sess.close()).await.unwrap();
        let mut next = within("lease", tc.request("cpu", 1, None)).await.unwrap();
        let left = within("check", next.call(PathsExist(vec![format!("/proc/{pid}")]), None))
            .await
            .unwrap();
        assert_eq!(left, [false], "round {round}: worker {pid} not reaped before the next call");
        within("close", next.close()).await.unwrap();
    }
    s.wait_for(LIMIT, |st| !st.retiring).await.expect("teardown finishes");
    within("shutdown", s.shutdown()).await.unwrap();
    drop(t);
}

/// The spare is given the last session's `AllocArgs` while the server is
/// idle: a session asking for the same arguments gets the same bytes (a
/// fresh fill would give), another seed gets other bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spare_holds_the_last_sessions_arguments_and_they_are_the_seeds_bytes() {
    use rpc_runner::measure::{AllocArgs, ArgInfo, DType, ReadArg};
    let t = tracker().await;
    let s = server(Some(&t), "cpu", |c| c.warm_spare(true)).await;
    let mut tc = rpc_runner::TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    let alloc = |seed| AllocArgs {
        args: vec![ArgInfo::tensor(DType::F32, [300, 200]), ArgInfo::tensor(DType::I8, [77])],
        alloc_repeat: 2,
        seed,
    };
    let read_all = async |sess: &mut rpc_runner::Session| {
        let mut out = Vec::new();
        for (set, index) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            out.push(within("read", sess.call(ReadArg { set, index }, None)).await.unwrap());
        }
        out
    };
    let mut first = within("lease", tc.request("cpu", 1, None)).await.unwrap();
    within("alloc", first.call(alloc(5), None)).await.unwrap();
    let want = read_all(&mut first).await;
    within("close", first.close()).await.unwrap();
    for (round, seed) in [(0, 5), (1, 5), (2, 6)] {
        let st = s.wait_for(LIMIT, |st| st.spare_filled && !st.busy && st.registered).await;
        st.expect("the spare is filled while the server is idle");
        let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
        let info = within("worker info", sess.call(WorkerInfo, None)).await.unwrap();
        assert_eq!(info.tasks_run, 1, "round {round}: the spare ran the prefill only");
        within("alloc", sess.call(alloc(seed), None)).await.unwrap();
        let got = read_all(&mut sess).await;
        if seed == 5 {
            assert_eq!(got, want, "round {round}: the prefilled sets hold seed 5's bytes");
        } else {
            assert_ne!(got[0], want[0], "round {round}: another seed, other bytes");
        }
        within("close", sess.close()).await.unwrap();
    }
    // The last session asked for seed 6. One asking for seed 5 inside a
    // `MeasureKernel` (as the default pipeline does) is what the next spare
    // holds: its sets are seed 5's before any call of that session.
    let mut fused = within("lease", tc.request("cpu", 1, None)).await.unwrap();
    let task = rpc_runner::measure::MeasureKernel::default().alloc(alloc(5));
    within("fused alloc", fused.call(task, None)).await.unwrap();
    within("close", fused.close()).await.unwrap();
    let st = s.wait_for(LIMIT, |st| st.spare_filled && !st.busy && st.registered).await;
    st.expect("the spare is filled after a fused alloc");
    let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
    assert_eq!(read_all(&mut sess).await, want, "the spare holds the fused call's seed 5");
    within("close", sess.close()).await.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
    drop(t);
}
