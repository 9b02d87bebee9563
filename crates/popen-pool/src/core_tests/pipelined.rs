//! Pipelined dispatch (`WorkerCore::serve`): tasks sent ahead of the one
//! running, and what becomes of them when that one ends badly.

use tokio::sync::Notify;

use super::*;
use crate::core::{Job, Jobs};

struct TestJob {
    tag: &'static str,
    task: ErasedTask,
    limit: Option<Duration>,
    cancel: CancellationToken,
}

impl Job for TestJob {
    fn task(&self) -> &ErasedTask {
        &self.task
    }
    fn limit(&self) -> Option<Duration> {
        self.limit
    }
    fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// A queue that ends when empty; results by tag, in the order delivered.
/// Counts queued jobs as a pool does.
struct TestJobs {
    counters: Arc<Counters>,
    queue: Mutex<VecDeque<TestJob>>,
    results: Mutex<Vec<(&'static str, Result<Bytes, PoolError>)>>,
    given_back: Mutex<Vec<&'static str>>,
    queued: Notify,
    aborted: Notify,
}

impl TestJobs {
    fn new(h: &Harness) -> Self {
        TestJobs {
            counters: Arc::clone(&h.counters),
            queue: Mutex::default(),
            results: Mutex::default(),
            given_back: Mutex::default(),
            queued: Notify::new(),
            aborted: Notify::new(),
        }
    }

    fn push<T: Task>(
        &self,
        tag: &'static str,
        task: T,
        limit: Option<Duration>,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        let job = TestJob { tag, task: erased(task), limit, cancel: cancel.clone() };
        self.queue.lock().unwrap().push_back(job);
        crate::core::bump(&self.counters.queued);
        cancel
    }

    fn result(&self, tag: &str) -> Result<Bytes, PoolError> {
        let results = self.results.lock().unwrap();
        let mut hits = results.iter().filter(|(t, _)| *t == tag);
        let (_, r) = hits.next().unwrap_or_else(|| panic!("no result for {tag}"));
        assert!(hits.next().is_none(), "two results for {tag}");
        r.clone()
    }

    fn order(&self) -> Vec<&'static str> {
        self.results.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }
}

impl Jobs for TestJobs {
    type Job = TestJob;
    fn try_next(&self) -> Option<TestJob> {
        self.queue.lock().unwrap().pop_front()
    }
    async fn next(&self) -> Option<TestJob> {
        self.try_next()
    }
    fn someone_idle(&self) -> bool {
        false
    }
    fn give_back(&self, jobs: Vec<TestJob>) {
        let mut q = self.queue.lock().unwrap();
        self.given_back.lock().unwrap().extend(jobs.iter().map(|j| j.tag));
        for job in jobs.into_iter().rev() {
            q.push_front(job);
        }
    }
    fn finish(&self, job: TestJob, result: Result<Bytes, PoolError>) {
        self.results.lock().unwrap().push((job.tag, result));
    }
    fn queued(&self) -> &Notify {
        &self.queued
    }
    fn pass_on(&self) {}
    fn aborted(&self) -> &Notify {
        &self.aborted
    }
}

fn echo_bytes(b: &[u8]) -> Bytes {
    Bytes::from(postcard::to_stdvec(&b.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn tasks_queue_in_the_worker_after_a_fast_one() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    for tag in ["a", "b", "c", "d"] {
        jobs.push(tag, Echo(tag.as_bytes().to_vec()), None);
    }
    within(h.core.serve(&jobs)).await;
    assert_eq!(jobs.order(), ["a", "b", "c", "d"]);
    assert_eq!(jobs.result("c"), Ok(echo_bytes(b"c")));
    assert_eq!(h.log().sent_to(P1).len(), 4);
    assert_eq!(h.stats().completed, 4);
    assert_eq!((h.stats().queued, h.stats().running), (0, 0));
}

/// The deadline of a task queued in the worker starts when it starts; a
/// task queued behind one that times out did not start: it goes back to
/// the queue and succeeds in the next worker.
#[tokio::test(start_paused = true)]
async fn a_task_queued_behind_a_timing_out_one_runs_elsewhere() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    jobs.push("slow", Slow(80), Some(ms(100)));
    jobs.push("hang", Hang(()), Some(ms(100)));
    jobs.push("after", Echo(vec![7]), None);
    let start = Instant::now();
    within(h.core.serve(&jobs)).await;
    // 80 ms for "slow", then 100 ms for "hang" from when it started.
    assert_eq!(start.elapsed(), ms(180));
    assert_eq!(jobs.result("slow"), Ok(Bytes::from(postcard::to_stdvec(&80u64).unwrap())));
    assert_eq!(jobs.result("hang"), Err(PoolError::Timeout { limit: ms(100) }));
    assert_eq!(jobs.result("after"), Ok(echo_bytes(&[7])));
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["echo", "slow", "hang", "echo"], "sent ahead");
    assert_eq!(log.sent_to(P2), ["echo"]);
    assert_eq!(log.kills, [P1]);
    assert_eq!(*jobs.given_back.lock().unwrap(), ["after"]);
    drop(log);
    let stats = h.stats();
    assert_eq!((stats.timeouts, stats.completed, stats.crashes), (1, 3, 0));
}

/// A worker that dies with a full window fails only the task it ran.
#[tokio::test(start_paused = true)]
async fn a_crash_with_a_full_window_fails_only_the_running_task() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    jobs.push("a", Echo(vec![1]), None);
    jobs.push("die", Die(()), None);
    for tag in ["b", "c", "d"] {
        jobs.push(tag, Echo(vec![2]), None);
    }
    within(h.core.serve(&jobs)).await;
    assert_eq!(jobs.result("die"), Err(PoolError::WorkerDied { exit: ExitInfo::Signal(11) }));
    for tag in ["a", "b", "c", "d"] {
        assert!(jobs.result(tag).is_ok(), "{tag}: {:?}", jobs.result(tag));
    }
    let log = h.log();
    assert_eq!(log.sent_to(P1).len(), 6, "all sent ahead: {:?}", log.sent_to(P1));
    assert_eq!(log.sent_to(P2).len(), 3);
    drop(log);
    assert_eq!(*jobs.given_back.lock().unwrap(), ["b", "c", "d"]);
    let stats = h.stats();
    assert_eq!((stats.crashes, stats.completed), (1, 5));
    assert_eq!((stats.queued, stats.running), (0, 0));
}

/// Aborting a task queued in the worker skips it there; the worker lives.
#[tokio::test(start_paused = true)]
async fn aborting_a_task_queued_in_the_worker_skips_it() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    jobs.push("slow", Slow(100), None);
    let queued = jobs.push("queued", Echo(vec![1]), None);
    jobs.push("after", Echo(vec![2]), None);
    let abort = async {
        sleep(ms(10)).await;
        queued.cancel();
        jobs.aborted.notify_waiters();
        sleep(ms(10)).await;
        // Answered at once, not when the running task ends.
        jobs.order()
    };
    let ((), early) = tokio::join!(within(h.core.serve(&jobs)), abort);
    assert_eq!(early, ["warm", "queued"]);
    assert_eq!(jobs.result("queued"), Err(PoolError::Cancelled));
    assert!(jobs.result("slow").is_ok());
    assert_eq!(jobs.result("after"), Ok(echo_bytes(&[2])));
    let log = h.log();
    assert_eq!(log.sent_to(P1), ["echo", "slow", "echo", "echo"]);
    assert_eq!(log.skipped.len(), 1);
    assert!(log.kills.is_empty(), "the worker was killed: {:?}", log.kills);
    assert_eq!(log.pids, [P1]);
    drop(log);
    assert_eq!((h.stats().cancelled, h.stats().completed), (1, 3));
}

/// Aborting the running task still kills the worker; the tasks behind it
/// go back to the queue.
#[tokio::test(start_paused = true)]
async fn aborting_the_running_task_kills_the_worker_and_requeues_the_rest() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    let running = jobs.push("hang", Hang(()), None);
    jobs.push("after", Echo(vec![3]), None);
    let abort = async {
        sleep(ms(10)).await;
        running.cancel();
    };
    tokio::join!(within(h.core.serve(&jobs)), abort);
    assert_eq!(jobs.result("hang"), Err(PoolError::Cancelled));
    assert_eq!(jobs.result("after"), Ok(echo_bytes(&[3])));
    let log = h.log();
    assert_eq!(log.kills, [P1]);
    assert_eq!(log.sent_to(P2), ["echo"]);
}

/// `maximum_process_uses` stays exact: no worker is sent more tasks than
/// it has uses left.
#[tokio::test(start_paused = true)]
async fn recycling_stays_exact_with_tasks_sent_ahead() {
    let mut h = Harness::new(WorkerOptions { maximum_process_uses: Some(3), ..options(false) });
    let jobs = TestJobs::new(&h);
    const TAGS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    for tag in TAGS {
        jobs.push(tag, Echo(vec![]), None);
    }
    within(h.core.serve(&jobs)).await;
    settle().await;
    assert_eq!(jobs.order(), TAGS);
    let log = h.log();
    assert_eq!(log.pids, [P1, P2, P3, P1 + 3]);
    let per: Vec<usize> = log.pids.iter().map(|&p| log.sent_to(p).len()).collect();
    assert_eq!(per, [3, 3, 3, 1]);
    assert!(log.kills.is_empty(), "recycled gracefully: {:?}", log.kills);
    drop(log);
    assert_eq!(h.stats().recycled, 3);
}

/// With an RSS recycle limit every task is checked before the next is
/// sent: nothing is sent ahead.
#[tokio::test(start_paused = true)]
async fn an_rss_limit_sends_nothing_ahead() {
    let mut h =
        Harness::scripted(WorkerOptions { max_rss_bytes: Some(100), ..options(false) }, |s| {
            s.rss = Some(200)
        });
    let jobs = TestJobs::new(&h);
    for tag in ["a", "b", "c"] {
        jobs.push(tag, Echo(vec![]), None);
    }
    within(h.core.serve(&jobs)).await;
    let log = h.log();
    assert_eq!(log.pids, [P1, P2, P3], "each recycled after its one task");
    assert!(log.pids.iter().all(|&p| log.sent_to(p).len() == 1));
}

/// A large task is not sent ahead: it waits in the slot until the worker is
/// free, and the tasks after it wait behind it, in order.
#[tokio::test(start_paused = true)]
async fn a_large_task_waits_in_the_slot_until_the_worker_is_free() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    jobs.push("slow", Slow(50), None);
    jobs.push("big", Echo(vec![9; 100 << 10]), None);
    jobs.push("small", Echo(vec![1]), None);
    let log = Arc::clone(&h.log);
    let peek = async move {
        sleep(ms(10)).await;
        lock(&log).sent_to(P1).len()
    };
    let ((), during) = tokio::join!(within(h.core.serve(&jobs)), peek);
    assert_eq!(during, 2, "only warm and slow were sent while slow ran");
    assert_eq!(jobs.order(), ["warm", "slow", "big", "small"]);
    assert_eq!(jobs.result("big"), Ok(echo_bytes(&[9; 100 << 10])));
    assert_eq!((h.stats().queued, h.stats().running), (0, 0));
}

/// Killing the pool (every token cancelled) with a full window: the
/// running task fails, the rest go back (where the pool fails them with
/// `Shutdown`); none is counted as cancelled twice.
#[tokio::test(start_paused = true)]
async fn cancelling_every_task_of_a_full_window_kills_once() {
    let mut h = Harness::new(options(false));
    let jobs = TestJobs::new(&h);
    jobs.push("warm", Echo(vec![]), None);
    let tokens: Vec<_> =
        ["hang", "a", "b"].into_iter().map(|t| (t, jobs.push(t, Hang(()), None))).collect();
    let cancel = async {
        sleep(ms(10)).await;
        for (_, token) in &tokens {
            token.cancel();
        }
        jobs.aborted.notify_waiters();
    };
    // Serve one window, until it is lost (the test queue would hand the
    // given-back jobs out again).
    let job = jobs.try_next().expect("warm");
    let serve = h.core.serve_window(job, &jobs);
    tokio::join!(within(serve), cancel);
    assert_eq!(jobs.result("hang"), Err(PoolError::Cancelled));
    assert_eq!(*jobs.given_back.lock().unwrap(), ["a", "b"]);
    assert_eq!(h.log().kills, [P1]);
    assert!(h.log().skipped.is_empty(), "no Cancel sent for a window being lost");
    assert_eq!(h.stats().cancelled, 1);
}
