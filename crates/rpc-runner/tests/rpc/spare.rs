//! The warm spare (`ServerConfig::warm_spare`): a started, never-used
//! worker and a fresh dir per session, torn down with the session; nothing
//! left when the server stops.

use std::path::Path;

use popen_pool::PoolError;
use rpc_runner::SessionError;
use rpc_runner::tasks::WorkerInfo;

use crate::common::{LIMIT, within};
use crate::sessions::{server, tracker};
use crate::tasks::Segfault;

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
    for round in 0..3 {
        // A spare is ready before the lease: its worker runs already.
        let st = s.wait_for(LIMIT, |st| st.spare.is_some() && !st.busy && st.registered).await;
        let spare = st.expect("a spare is made while the server is idle").spare.unwrap();
        assert!(exists(spare));
        assert_eq!(entries(root.path()), 1, "round {round}: one spare dir while idle");

        let mut sess = within("lease", tc.request("cpu", 1, None)).await.unwrap();
        let info = within("worker info", sess.call(WorkerInfo, None)).await.unwrap();
        assert_eq!(info.pid, spare, "round {round}: the session got the started spare");
        assert_eq!(info.tasks_run, 0, "round {round}: the spare ran nothing before");
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
        // Torn down before close() returns, as without the spare.
        for pid in session_pids {
            assert!(!exists(pid), "round {round}: the session's worker {pid} is reaped");
        }
        assert!(!Path::new(&workdir).exists(), "round {round}: the session dir is removed");
    }
    let last = s.wait_for(LIMIT, |st| st.spare.is_some()).await.unwrap().spare.unwrap();
    within("shutdown", s.shutdown()).await.unwrap();
    assert!(!exists(last), "the spare's worker is reaped when the server stops");
    assert_eq!(entries(root.path()), 0, "the spare's dir is removed when the server stops");
    drop(t);
}
