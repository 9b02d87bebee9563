//! [`ServerConfig`]: how a device server runs.

use std::path::PathBuf;
use std::time::Duration;

use popen_pool::{OutputMode, WorkerProgram};

#[cfg(doc)]
use super::DeviceServer;
#[cfg(doc)]
use crate::wire::CODE_AT_CAPACITY;

use super::ServerError;

/// How a device server runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The device key clients request through the tracker (e.g. `"cpu"`).
    pub(crate) key: String,
    /// The tracker to register with (`host:port`); `None`: no tracker, and
    /// the match key is the key itself.
    pub(crate) tracker: Option<String>,
    /// The address the tracker hands out for this server when it cannot see
    /// the right one (NAT, containers). `None`: the peer address the tracker sees.
    pub(crate) custom_addr: Option<String>,
    /// If set, clients must present this token (`-token=` in the handshake).
    pub(crate) token: Option<String>,
    /// Upper bound of every session's length, whatever the client asks.
    pub(crate) session_timeout: Option<Duration>,
    /// Largest upload accepted, in bytes (default 1 GiB).
    pub(crate) max_upload_bytes: u64,
    /// The program the session workers run: it serves the task types a
    /// client can `call` (the `rpc-runner` binary itself, or a test binary).
    pub(crate) worker: WorkerProgram,
    /// Where session temp dirs are created (default: [`default_work_root`]).
    pub(crate) work_root: Option<PathBuf>,
    /// Where the session workers' stdout/stderr go (default: inherited).
    pub(crate) worker_output: OutputMode,
    /// How long a client may take to complete its handshake (default 10 s).
    pub(crate) handshake_timeout: Duration,
    /// Re-register with a fresh match key when the current one was leased
    /// but no client connected for this long (default 4 s, as TVM).
    pub(crate) unused_lease_timeout: Duration,
    /// How often the server checks its lease with the tracker (default 1 s),
    /// and, while it is unavailable, whether it can serve again.
    pub(crate) tracker_poll: Duration,
    /// Most connections handled at once: the session plus clients in their
    /// handshake (default 64). Beyond it a client is refused with
    /// [`CODE_AT_CAPACITY`]
    /// ([`SessionError::AtCapacity`](crate::SessionError::AtCapacity)).
    pub(crate) max_connections: usize,
    /// CPUs the session workers are pinned to (default: the last online
    /// CPU, [`CpuPlan::detect`](crate::measure::CpuPlan::detect); `None`:
    /// the server's own affinity).
    pub(crate) worker_cpus: Option<Vec<usize>>,
    /// Memory ceiling of a session worker while a task runs (default: none).
    pub(crate) worker_memory_limit: Option<u64>,
    /// Keep a warm spare session (dir and started worker) ready (default: off).
    pub(crate) warm_spare: bool,
    /// Fork session workers from a zygote (default: on).
    pub(crate) use_zygote: bool,
    /// The running server's zygote (set when it starts).
    pub(crate) zygote: Option<popen_pool::Zygote>,
}

/// Where session dirs go unless [`ServerConfig::work_root`] says otherwise:
/// `/dev/shm` when it is a tmpfs mounted writable and without `noexec`,
/// else [`std::env::temp_dir`]. A session's upload, written, loaded and
/// unlinked once per measurement, costs ~20 µs on tmpfs against
/// 100-300 µs on a disk file system (more with `discard`); the price is
/// that an upload occupies memory while its session lives (at most
/// [`ServerConfig::max_upload_bytes`], one session at a time per server).
/// Decided once per process.
pub fn default_work_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        if usable_tmpfs(shm) { shm.to_path_buf() } else { std::env::temp_dir() }
    })
    .clone()
}

#[cfg(target_os = "linux")]
fn usable_tmpfs(dir: &std::path::Path) -> bool {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let tmpfs = nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let flags_ok =
        statvfs(dir).is_ok_and(|v| !v.flags().intersects(FsFlags::ST_NOEXEC | FsFlags::ST_RDONLY));
    tmpfs && flags_ok && nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn usable_tmpfs(_dir: &std::path::Path) -> bool {
    false
}

impl ServerConfig {
    /// The dir session dirs are made in: [`ServerConfig::work_root`] or
    /// [`default_work_root`].
    pub(crate) fn root(&self) -> PathBuf {
        self.work_root.clone().unwrap_or_else(default_work_root)
    }

    /// A configuration for `key` whose sessions run `worker`, with defaults.
    pub fn new(key: impl Into<String>, worker: WorkerProgram) -> Self {
        ServerConfig {
            key: key.into(),
            tracker: None,
            custom_addr: None,
            token: None,
            session_timeout: None,
            max_upload_bytes: 1 << 30,
            worker,
            work_root: None,
            worker_output: OutputMode::Inherit,
            handshake_timeout: Duration::from_secs(10),
            unused_lease_timeout: Duration::from_secs(4),
            tracker_poll: Duration::from_secs(1),
            max_connections: 64,
            worker_cpus: Some(crate::measure::CpuPlan::detect().measure),
            worker_memory_limit: None,
            warm_spare: false,
            use_zygote: true,
            zygote: None,
        }
    }
}

impl ServerConfig {
    /// Registers with the tracker at `addr` (`host:port`; default: no
    /// tracker, and the match key is the key itself).
    #[must_use]
    pub fn tracker(mut self, addr: impl Into<String>) -> Self {
        self.tracker = Some(addr.into());
        self
    }

    /// Sets the address the tracker hands out for this server (default: the
    /// peer address the tracker sees).
    #[must_use]
    pub fn custom_addr(mut self, addr: impl Into<String>) -> Self {
        self.custom_addr = Some(addr.into());
        self
    }

    /// Requires clients to present `token` (default: no token).
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Bounds every session's length, whatever the client asks (default: no bound).
    #[must_use]
    pub fn session_timeout(mut self, limit: Duration) -> Self {
        self.session_timeout = Some(limit);
        self
    }

    /// Removes the bound of [`session_timeout`](Self::session_timeout).
    #[must_use]
    pub fn no_session_timeout(mut self) -> Self {
        self.session_timeout = None;
        self
    }

    /// Sets the largest upload accepted (default 1 GiB).
    #[must_use]
    pub fn max_upload_bytes(mut self, bytes: u64) -> Self {
        self.max_upload_bytes = bytes;
        self
    }

    /// Creates session dirs in `dir` (default: [`default_work_root`]:
    /// `/dev/shm` when it is a writable tmpfs that allows executables,
    /// else the system temp dir).
    #[must_use]
    pub fn work_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_root = Some(dir.into());
        self
    }

    /// Sets where the session workers' stdout/stderr go (default: inherited).
    #[must_use]
    pub fn worker_output(mut self, mode: OutputMode) -> Self {
        self.worker_output = mode;
        self
    }

    /// Sets how long a client may take to complete its handshake (default 10 s).
    #[must_use]
    pub fn handshake_timeout(mut self, limit: Duration) -> Self {
        self.handshake_timeout = limit;
        self
    }

    /// Sets after how long a leased but unused match key is replaced
    /// (default 4 s, as TVM).
    #[must_use]
    pub fn unused_lease_timeout(mut self, limit: Duration) -> Self {
        self.unused_lease_timeout = limit;
        self
    }

    /// Sets how often the lease (and, while unavailable, the work dir) is
    /// checked (default 1 s).
    #[must_use]
    pub fn tracker_poll(mut self, every: Duration) -> Self {
        self.tracker_poll = every;
        self
    }

    /// Sets the most connections handled at once (default 64, at least 1).
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Pins every session worker (and what its tasks start) to these CPUs:
    /// the CPUs kernels are timed on (default: the last online CPU, as
    /// [`CpuPlan::detect`](crate::measure::CpuPlan::detect); keep builds and
    /// other work off it, e.g. with
    /// [`pin_this_process`](crate::measure::pin_this_process)). See
    /// `popen_pool`'s `cpu_affinity`. A measurement records the CPUs it ran
    /// on in `Measurement::env`.
    #[must_use]
    pub fn worker_cpu_affinity(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        self.worker_cpus = Some(cpus.into_iter().collect());
        self
    }

    /// Session workers keep the server's own affinity (not pinned; their
    /// measurements then warn that they were not pinned).
    #[must_use]
    pub fn no_worker_cpu_affinity(mut self) -> Self {
        self.worker_cpus = None;
        self
    }

    /// A session worker that crosses `bytes` during a task is killed: that
    /// call fails with `SessionError::Task(PoolError::MemoryLimit)`, the
    /// session goes on with a fresh worker (default: no ceiling). See
    /// `popen_pool`'s `memory_limit` for how it is enforced.
    #[must_use]
    pub fn worker_memory_limit(mut self, bytes: u64) -> Self {
        self.worker_memory_limit = Some(bytes);
        self
    }

    /// Keeps one warm spare ready: a fresh session dir and a started,
    /// never-used session worker, so a session does not wait for a worker
    /// process to start (default: off). The spare is made when the server
    /// starts, at a session's first call (its process then starts while
    /// that session's worker is busy) and when a session ends, each time
    /// only if there is none. A spare serves exactly one session
    /// and is killed with it, as any session worker; a worker that ran a
    /// session's code is never reused. While the server is idle it holds
    /// that one empty dir and one idle worker process; both are removed
    /// when the server stops. A session that finds no spare ready (or one
    /// whose process died) makes its own dir and worker, as without this
    /// option.
    #[must_use]
    pub fn warm_spare(mut self, on: bool) -> Self {
        self.warm_spare = on;
        self
    }

    /// Fork each session's worker from a fork server the server starts
    /// with its first session ([`popen_pool::Zygote`]) instead of spawning
    /// a fresh process: ~1 ms less CPU per session. The worker is the same
    /// otherwise (its own process, directory, cgroup and CPU pinning; a
    /// crash still kills only it); it sees the server's environment as it
    /// was when the zygote started. Whenever the zygote cannot fork one,
    /// the worker is spawned. A [`WorkerProgram::test_entry`] program never
    /// has one. Default: on.
    ///
    /// [`WorkerProgram::test_entry`]: popen_pool::WorkerProgram::test_entry
    #[must_use]
    pub fn zygote(mut self, on: bool) -> Self {
        self.use_zygote = on;
        self
    }

    /// The device key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Checks that a server with this configuration can serve sessions at
    /// all: its work dir can hold session dirs and its worker program
    /// exists. [`DeviceServer::run`] and [`DeviceServer::start`] check it too.
    ///
    /// # Errors
    ///
    /// [`ServerError::WorkDir`] or [`ServerError::WorkerProgram`].
    pub async fn check(&self) -> Result<(), ServerError> {
        super::validate(self).await
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::path::Path;

    /// `(fstype, mount options)` of the mount at `point`, from mountinfo
    /// (the last mount there wins, as in path lookup).
    fn mount_of(point: &str) -> Option<(String, String)> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        info.lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let f: Vec<&str> = pre.split(' ').collect();
                let fstype = post.split(' ').next()?;
                let opts = f.get(5)?;
                (f.get(4) == Some(&point)).then(|| (fstype.to_owned(), (*opts).to_owned()))
            })
            .next_back()
    }

    #[test]
    fn the_default_work_root_is_dev_shm_exactly_when_it_is_an_exec_tmpfs() {
        let shm_ok = mount_of("/dev/shm").is_some_and(|(fstype, opts)| {
            let opts: Vec<&str> = opts.split(',').collect();
            fstype == "tmpfs" && !opts.contains(&"noexec") && !opts.contains(&"ro")
        });
        let expected =
            if shm_ok { Path::new("/dev/shm").to_path_buf() } else { std::env::temp_dir() };
        assert_eq!(super::default_work_root(), expected, "mount: {:?}", mount_of("/dev/shm"));
        // A dir on another file system is never taken for a tmpfs.
        if mount_of("/").is_some_and(|(fstype, _)| fstype != "tmpfs") {
            assert!(!super::usable_tmpfs(Path::new("/")));
        }
    }
}
