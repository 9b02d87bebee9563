//! Session chaos: thousands of random client operations against one device
//! server (upload, download, call, listdir, remove, close, drop), a third of
//! them cancelled at a random point. Every operation must end in exactly one
//! of {done and correct, an expected typed error, cancelled}; nothing may hang;
//! at the end the server is idle and leasable, and no session dir, worker
//! process or fd is left. `CHAOS_SEED=N` replays a run.

use std::time::{Duration, Instant};

use rpc_runner::tracker::TrackerClient;
use rpc_runner::{Session, SessionError};

use crate::common::{eventually, within};
use crate::sessions::{server, tracker};
use crate::tasks::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Each name always gets the same content, so any successful download can be checked.
fn content(name: u64) -> Vec<u8> {
    let len = [0usize, 1, 1000, 300_000, 1 << 20, (3 << 20) + 17][name as usize % 6];
    (0..len).map(|i| (i as u64 ^ name).wrapping_mul(31) as u8).collect()
}

pub(crate) fn children_of(pid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat")).ok().and_then(|stat| {
                let rest = stat.rsplit_once(") ")?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .count()
}

pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[derive(Debug, Default)]
struct Tally {
    done: u32,
    typed: u32,
    cancelled: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_with_random_cancellation() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 0x9e37_79b9 + 1);
    eprintln!("chaos seed {seed} (CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed | 1);
    let t = tracker().await;
    let root = tempfile::tempdir().unwrap();
    let work = root.path().to_path_buf();
    let s = server(Some(&t), "cpu", move |c| c.work_root(work)).await;
    let mut tc = TrackerClient::connect(&t.addr().to_string()).await.unwrap();
    let (fds_before, children_before) = (open_fds(), children_of(std::process::id()));

    let mut sess: Option<Session> = None;
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut ops = 0u32;
    while ops < 2500 && start.elapsed() < Duration::from_secs(40) {
        ops += 1;
        if sess.is_none() {
            let leased = within("lease", tc.request("cpu", 1, None)).await;
            sess = Some(leased.unwrap_or_else(|e| panic!("op {ops} (seed {seed}): lease: {e:?}")));
        }
        let session = sess.as_mut().unwrap();
        let op = rng.below(100);
        let name = rng.below(12);
        let cut = (rng.below(3) == 0).then(|| Duration::from_micros(rng.below(3000)));
        let payload: Vec<u8> = (0..rng.below(2000)).map(|_| rng.next() as u8).collect();
        let what = match op {
            0..=24 => "upload",
            25..=44 => "download",
            45..=64 => "echo",
            65..=71 => "sleep",
            72..=75 => "count",
            76..=77 => "segfault",
            78..=87 => "listdir",
            88..=93 => "remove",
            94..=96 => "close",
            _ => "drop",
        };
        let sleep_ms = rng.below(5);
        // Ok(true): done and checked; Ok(false): an expected typed error.
        let outcome: Option<Result<bool, SessionError>> = {
            let fut = async {
                match op {
                    0..=24 => session
                        .upload_bytes(&content(name), &format!("f{name}"))
                        .await
                        .map(|()| true),
                    25..=44 => match session.download(&format!("f{name}")).await {
                        Ok(data) => {
                            assert_eq!(data, content(name), "op {ops} seed {seed}: f{name}");
                            Ok(true)
                        }
                        Err(SessionError::NotFound { .. }) => Ok(false),
                        Err(e) => Err(e),
                    },
                    45..=64 => {
                        let out = session.call(Echo(payload.clone()), None).await?;
                        assert_eq!(out.as_ref(), &payload[..], "op {ops} seed {seed}: echo");
                        Ok(true)
                    }
                    65..=71 => {
                        assert_eq!(session.call(SleepMs(sleep_ms), None).await?, sleep_ms);
                        Ok(true)
                    }
                    72..=75 => {
                        assert!(session.call(Count, None).await? >= 1);
                        Ok(true)
                    }
                    76..=77 => match session.call(Segfault, None).await {
                        Err(SessionError::Task(popen_pool::PoolError::WorkerDied { .. })) => {
                            Ok(false)
                        }
                        Err(e) => Err(e),
                        Ok(()) => panic!("op {ops} seed {seed}: a segfault succeeded"),
                    },
                    78..=87 => {
                        let listing = session.listdir("").await?;
                        for e in listing {
                            let n: u64 = e.name[1..].parse().expect("only f<N> files");
                            assert_eq!(e.size, content(n).len() as u64, "op {ops} seed {seed}");
                        }
                        Ok(true)
                    }
                    88..=93 => match session.remove(&format!("f{name}")).await {
                        Ok(()) => Ok(true),
                        Err(SessionError::NotFound { .. }) => Ok(false),
                        Err(e) => Err(e),
                    },
                    94..=96 => session.close().await.map(|()| true),
                    _ => Ok(true),
                }
            };
            match cut {
                Some(cut) => within("op", tokio::time::timeout(cut, fut)).await.ok(),
                None => Some(within("op", fut).await),
            }
        };
        match outcome {
            None => tally.cancelled += 1,
            Some(Ok(true)) => tally.done += 1,
            Some(Ok(false)) => tally.typed += 1,
            Some(Err(e)) => panic!("op {ops} ({what}, seed {seed}) ended in {e:?}"),
        }
        match what {
            "drop" => sess = None,
            "close" => {
                if let Some(mut old) = sess.take() {
                    // A cancelled close is resumed by the next one.
                    within("close again", old.close()).await.unwrap();
                }
            }
            _ => assert!(
                sess.as_ref().is_some_and(Session::is_open),
                "op {ops} ({what}, seed {seed}) left the session unusable"
            ),
        }
    }
    eprintln!("chaos: {ops} ops in {:?}: {tally:?}", start.elapsed());
    assert!(tally.done > ops / 3 && tally.cancelled > ops / 20, "{tally:?}");

    if let Some(mut old) = sess.take() {
        within("final close", old.close()).await.unwrap();
    }
    // Healthy and leasable.
    let mut last = within("lease", tc.request("cpu", 1, None)).await.unwrap();
    assert_eq!(within("echo", last.call(Echo(b"end".to_vec()), None)).await.unwrap(), b"end"[..]);
    within("close", last.close()).await.unwrap();
    drop(last);
    s.wait_for(crate::common::LIMIT, |st| !st.busy && st.registered).await.expect("idle");
    eventually("no session dir left", async || {
        std::fs::read_dir(root.path()).unwrap().next().is_none()
    })
    .await;
    eventually("no session worker left", async || {
        children_of(std::process::id()) <= children_before
    })
    .await;
    let fds = async || open_fds() <= fds_before;
    if tokio::time::timeout(crate::common::LIMIT, async {
        while !fds().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_err()
    {
        let list: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .map(|e| format!("{:?}", std::fs::read_link(e.path()).unwrap_or_default()))
            .collect();
        panic!("fds left: {} before, now {list:?}", fds_before);
    }
    drop(s);
}
