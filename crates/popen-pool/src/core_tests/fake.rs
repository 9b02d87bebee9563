//! The fake child and launcher: scripted workers for the state machine's tests.

use super::*;

// The script and the log, shared by the launcher, its children and the test.

/// How a fake worker opens the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Greeting {
    /// A correct Hello.
    Hello,
    /// A Hello with a protocol version the parent does not speak.
    WrongVersion,
    /// A `Done` frame instead of a Hello.
    NotHello,
    /// Closes its channel before saying anything, exiting with code 3.
    CloseFirst,
    /// Says nothing, ever.
    Silent,
}

/// How the next launches behave; tests may change it between calls.
#[derive(Debug)]
pub(super) struct Script {
    pub(super) greeting: Greeting,
    pub(super) fail_launch: bool,
    pub(super) launch_delay: Option<Duration>,
    pub(super) rss: Option<u64>,
    /// `shutdown` waits out the whole grace period, then kills, like a worker
    /// slow to exit.
    pub(super) stubborn_exit: bool,
    /// A kernel-enforced memory ceiling (as a cgroup's `memory.max`): a
    /// child that dies reports an OOM kill.
    pub(super) oom_ceiling: Option<u64>,
    /// Largest frame `send` accepts (mirrors the real codec).
    pub(super) max_frame: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: Greeting::Hello,
            fail_launch: false,
            launch_delay: None,
            rss: None,
            stubborn_exit: false,
            oom_ceiling: None,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct FakeLog {
    pub(super) script: Script,
    /// Calls of `launch`, counted when they begin.
    pub(super) launch_attempts: usize,
    /// Children launched, in order.
    pub(super) pids: Vec<u32>,
    /// (pid, task name) of each `Run` a child accepted.
    pub(super) sent: Vec<(u32, String)>,
    pub(super) kills: Vec<u32>,
    pub(super) reaps: Vec<u32>,
    /// Children asked to exit (`shutdown` called).
    pub(super) shutdowns: Vec<u32>,
    /// Children that exited when asked (`shutdown` returned without a kill).
    pub(super) exits: Vec<u32>,
    pub(super) drops: Vec<u32>,
    /// Task ids a child answered `Skipped` (cancelled while queued in it).
    pub(super) skipped: Vec<u64>,
}

impl FakeLog {
    /// The task names child `pid` was sent, in order.
    pub(super) fn sent_to(&self, pid: u32) -> Vec<&str> {
        self.sent.iter().filter(|(p, _)| *p == pid).map(|(_, n)| n.as_str()).collect()
    }

    /// Children neither killed, reaped, exited nor dropped.
    pub(super) fn alive(&self) -> Vec<u32> {
        let ended = [&self.kills, &self.reaps, &self.exits, &self.drops];
        self.pids.iter().copied().filter(|p| !ended.iter().any(|e| e.contains(p))).collect()
    }
}

pub(super) fn lock(log: &Mutex<FakeLog>) -> MutexGuard<'_, FakeLog> {
    // Never panic again in a Drop after a failed assertion.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// The fake child and launcher.

#[derive(Debug)]
pub(super) enum Reply {
    /// Never comes, nor anything queued after it (a hanging task).
    Never,
    Now(BytesMut),
    At(Instant, BytesMut),
    Error(PoolError),
    Close,
}

#[derive(Debug)]
pub(super) struct FakeChild {
    pub(super) pid: u32,
    pub(super) log: Arc<Mutex<FakeLog>>,
    /// The answers to come, in order, with the task id each answers; the
    /// first is the task running now, the others are queued in the worker.
    pub(super) replies: VecDeque<(u64, Reply)>,
    /// When the last queued answer is due: tasks run one after another.
    pub(super) busy_until: Option<Instant>,
    /// What `reap` reports once the channel closed.
    pub(super) exit: ExitInfo,
}

impl FakeChild {
    /// Queues the worker's answer to task `id`.
    pub(super) fn answer(&mut self, id: u64, name: &str, payload: &[u8]) {
        let done = |outcome| Reply::Now(frame(&FromWorker::Done { id, outcome }));
        let reply = match name {
            "echo" | "init" => done(Outcome::Ok(payload)),
            "slow" => {
                let ms: u64 = postcard::from_bytes(payload).expect("a Slow task");
                let from = self.busy_until.map_or_else(Instant::now, |b| b.max(Instant::now()));
                let at = from + Duration::from_millis(ms);
                self.busy_until = Some(at);
                Reply::At(at, frame(&FromWorker::Done { id, outcome: Outcome::Ok(payload) }))
            }
            "hang" => Reply::Never,
            "die" => {
                self.exit = ExitInfo::Signal(11);
                Reply::Close
            }
            "fail" | "init_fail" => done(Outcome::Failed {
                kind: if name == "fail" { "custom" } else { "init" }.into(),
                message: format!("{name} went wrong"),
            }),
            "panic" => done(Outcome::Panicked { message: "boom".into() }),
            "garbage" => Reply::Now(BytesMut::from(&[0xff, 0xff, 0xff][..])),
            "too_big" => done(Outcome::TooLarge { len: 1 << 30, max: 1 << 28 }),
            "oversized" => Reply::Error(PoolError::FrameTooLarge { len: 1 << 30, max: 1 << 28 }),
            "wrong_id" => Reply::Now(frame(&FromWorker::Done {
                id: id + 1000,
                outcome: Outcome::Ok(payload),
            })),
            other => done(Outcome::UnknownTask { name: other.into() }),
        };
        self.replies.push_back((id, reply));
    }

    /// A `Cancel` for task `id`: answered `Skipped` if it has not started.
    fn cancel(&mut self, id: u64) {
        let queued = self.replies.iter_mut().skip(1).find(|(i, _)| *i == id);
        if let Some((_, reply)) = queued {
            *reply = Reply::Now(frame(&FromWorker::Done { id, outcome: Outcome::Skipped }));
            lock(&self.log).skipped.push(id);
        }
    }
}

impl Child for FakeChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn send(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError> {
        self.feed(msg)
    }

    async fn flush(&mut self) -> Result<(), PoolError> {
        Ok(())
    }

    fn feed(&mut self, msg: &ToWorker<'_>) -> Result<(), PoolError> {
        let max = lock(&self.log).script.max_frame;
        let len = postcard::to_stdvec(msg).expect("messages serialize").len();
        if len > max {
            return Err(PoolError::FrameTooLarge { len, max });
        }
        match *msg {
            ToWorker::Run { id, name, payload } => {
                lock(&self.log).sent.push((self.pid, name.to_owned()));
                self.answer(id, name, payload);
            }
            ToWorker::Cancel { id } => self.cancel(id),
            ToWorker::Exit => {}
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<BytesMut>, PoolError> {
        let Some((_, next)) = self.replies.front() else {
            return std::future::pending().await;
        };
        match next {
            // Cancel-safe: the reply stays queued until its time has come.
            Reply::At(at, _) => tokio::time::sleep_until(*at).await,
            Reply::Never => std::future::pending().await,
            _ => {}
        }
        match self.replies.pop_front().expect("a reply is queued").1 {
            Reply::Never => unreachable!("never delivered"),
            Reply::Now(bytes) | Reply::At(_, bytes) => Ok(Some(bytes)),
            Reply::Error(e) => Err(e),
            Reply::Close => Ok(None),
        }
    }

    async fn kill(&mut self) -> ExitInfo {
        lock(&self.log).kills.push(self.pid);
        self.replies.clear();
        ExitInfo::Signal(9)
    }

    async fn reap(&mut self) -> ExitInfo {
        lock(&self.log).reaps.push(self.pid);
        self.exit
    }

    async fn shutdown(&mut self, grace: Duration) -> ExitInfo {
        let stubborn = {
            let mut log = lock(&self.log);
            log.shutdowns.push(self.pid);
            log.script.stubborn_exit
        };
        if stubborn {
            sleep(grace).await;
            lock(&self.log).kills.push(self.pid);
            return ExitInfo::Signal(9);
        }
        lock(&self.log).exits.push(self.pid);
        ExitInfo::Code(0)
    }

    fn rss_bytes(&self) -> Option<u64> {
        lock(&self.log).script.rss
    }

    fn memory_ceiling(&self) -> Option<crate::child::Ceiling> {
        let limit = lock(&self.log).script.oom_ceiling?;
        Some(crate::child::Ceiling { limit, watch: None })
    }

    fn oom_killed(&self) -> bool {
        lock(&self.log).script.oom_ceiling.is_some()
    }
}

impl Drop for FakeChild {
    fn drop(&mut self) {
        lock(&self.log).drops.push(self.pid);
    }
}

#[derive(Debug)]
pub(super) struct FakeLauncher {
    pub(super) log: Arc<Mutex<FakeLog>>,
}

impl Launcher for FakeLauncher {
    type Child = FakeChild;

    async fn launch(&self) -> Result<FakeChild, PoolError> {
        let delay = {
            let mut log = lock(&self.log);
            log.launch_attempts += 1;
            log.script.launch_delay
        };
        if let Some(delay) = delay {
            sleep(delay).await;
        }
        let mut log = lock(&self.log);
        if log.script.fail_launch {
            return Err(PoolError::spawn("fake: cannot start /bin/worker"));
        }
        let pid = P1 + log.pids.len() as u32;
        log.pids.push(pid);
        let hello = |version| FromWorker::Hello { version, pid, tasks: known() };
        let (first, exit) = match log.script.greeting {
            Greeting::Hello => (Some(Reply::Now(frame(&hello(PROTOCOL_VERSION)))), None),
            Greeting::WrongVersion => (Some(Reply::Now(frame(&hello(99)))), None),
            Greeting::NotHello => {
                let done = FromWorker::Done { id: 0, outcome: Outcome::Ok(b"") };
                (Some(Reply::Now(frame(&done))), None)
            }
            Greeting::CloseFirst => (Some(Reply::Close), Some(ExitInfo::Code(3))),
            Greeting::Silent => (None, None),
        };
        Ok(FakeChild {
            pid,
            log: Arc::clone(&self.log),
            replies: first.into_iter().map(|r| (0, r)).collect(),
            busy_until: None,
            exit: exit.unwrap_or(ExitInfo::Code(0)),
        })
    }
}
