//! Containment by cgroup v2 (Linux): one cgroup per worker, killed as a
//! whole with `cgroup.kill`, so a task that `setsid`s or daemonizes dies with
//! its worker.
//!
//! Layout: `<base>/popen-pool-<pid>-<starttime>-<n>/w<k>`, where `<base>` is
//! this process's own cgroup (found through `/proc/self/cgroup` and the
//! cgroup2 mount in `/proc/self/mountinfo`) or, if placing a worker there is
//! refused (`EBUSY`/`EOPNOTSUPP`: the "no internal processes" rule or a
//! threaded subtree), its parent. The pool directory is removed when the
//! last of its workers and the pool are gone; a worker's directory right
//! after its processes are reaped. Directories whose owner process is dead
//! (its parent was SIGKILLed) are killed and removed when a later pool of any
//! process starts under the same base.
//!
//! A worker is placed in its cgroup by the parent, which writes its pid to
//! `cgroup.procs` right after the spawn and then sends it a byte; the worker
//! waits for that byte before it does anything of its own, and no task is
//! sent before the handshake, so it is inside before any task code runs
//! (see `startup`).

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a pool's workers are contained; see [`PopenPool::containment`].
///
/// [`PopenPool::containment`]: crate::PopenPool::containment
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Containment {
    /// Each worker runs in its own cgroup v2 under this directory; a kill
    /// writes `cgroup.kill`, which reaches every process the task started.
    Cgroup {
        /// The pool's cgroup directory.
        dir: PathBuf,
    },
    /// No usable cgroup: workers are contained by their process group, a
    /// walk of their process tree (each worker is a child subreaper) and a
    /// worker-side guard that kills its tree when the parent dies.
    ProcessTree {
        /// Why cgroups are not used.
        reason: String,
    },
}

/// The cgroup2 directory of this process, found once (a process that
/// starts a pool per worker would otherwise parse mountinfo per worker).
/// (Keyed by pid: a forked copy of this process finds its own.)
fn own_cgroup_dir() -> Result<PathBuf, String> {
    static OWN: Mutex<Option<(u32, Result<PathBuf, String>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    match &*own {
        Some((p, found)) if *p == pid => found.clone(),
        _ => own.insert((pid, find_own_cgroup_dir())).1.clone(),
    }
}

/// The cgroup2 directory of this process, from `/proc/self/{mountinfo,cgroup}`.
fn find_own_cgroup_dir() -> Result<PathBuf, String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 hierarchy")?
        .trim();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else { continue };
        let root = unescape(root);
        let rel = if root == "/" {
            own.trim_start_matches('/')
        } else if let Some(rest) = own.strip_prefix(root.as_str()) {
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            rest.trim_start_matches('/')
        } else {
            continue;
        };
        let dir = Path::new(&unescape(mount)).join(rel);
        if dir.join("cgroup.procs").exists() {
            return Ok(dir);
        }
    }
    Err(format!("no cgroup2 mount shows this process's cgroup {own:?}"))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Field 22 of /proc/PID/stat: the start time, to tell a pid's reuse apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Writes `1` to `dir/cgroup.kill`: SIGKILL to every process in it.
pub(crate) fn kill(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.kill"), b"1")
}

fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l == "populated 1"),
        Err(_) => false,
    }
}

/// Kills everything in `dir`, waits (bounded) until it is empty, removes it.
fn kill_and_remove_blocking(dir: &Path, limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let _ = kill(dir);
    let mut pause = Duration::from_micros(20);
    loop {
        match remove_dir_tree(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    }
}

/// Most cgroup directories [`remove_dir_tree`] walks, and how deep.
const MAX_TREE_DIRS: usize = 4096;
const MAX_TREE_DEPTH: usize = 32;

/// Removes the cgroup `dir` with every cgroup below it, deepest first, each
/// tried once (gone already counts as removed). The cgroups a task makes
/// below its worker's (a task that runs a pool itself nests one per pool)
/// would otherwise keep the worker's from being removed. The plain
/// `rmdir` comes first; the walk only when that fails, and it is iterative
/// and bounded (`MAX_TREE_DIRS` dirs, `MAX_TREE_DEPTH` levels). Fails with
/// the first dir that cannot go yet (a process still in it: `EBUSY`).
fn remove_dir_tree(dir: &Path) -> io::Result<()> {
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    let Err(first) = gone(std::fs::remove_dir(dir)) else { return Ok(()) };
    let mut order = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        if order.len() >= MAX_TREE_DIRS {
            return Err(io::Error::other(format!(
                "{}: more than {MAX_TREE_DIRS} nested cgroups",
                dir.display()
            )));
        }
        if depth < MAX_TREE_DEPTH
            && let Ok(entries) = std::fs::read_dir(&d)
        {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        order.push(d);
    }
    if order.len() == 1 {
        return Err(first); // nothing nested: the dir itself is busy
    }
    // Children come after their parent in `order`: remove from the end.
    for d in order.iter().rev() {
        gone(std::fs::remove_dir(d))?;
    }
    Ok(())
}

/// Kills and removes pool directories under `base` whose owner is dead.
///
/// A worker directory that cannot be removed within the bound (`EBUSY`
/// with nothing running: a zombie charged to it whose parent does not reap
/// it) is not retried by this process: each new pool would otherwise wait
/// that bound again, per leftover.
fn clean_stale(base: &Path) {
    static GAVE_UP: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let gave_up = |dir: &Path| {
        GAVE_UP.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|s| s.contains(dir))
    };
    let give_up = |dir: PathBuf| {
        let mut set = GAVE_UP.lock().unwrap_or_else(|e| e.into_inner());
        set.get_or_insert_with(HashSet::new).insert(dir);
    };
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("popen-pool-")) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(pid), Some(start)) = (parts.next(), parts.next()) else { continue };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { continue };
        if (pid, start) == own_start() || start_time(pid) == Some(start) {
            continue; // its owner lives
        }
        let dir = e.path();
        if gave_up(&dir) {
            continue;
        }
        match kill_and_remove_blocking(&dir, Duration::from_secs(1)) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed a stale popen-pool cgroup"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a stale popen-pool cgroup");
                give_up(dir);
            }
        }
    }
}

/// The cgroup directory of one pool, shared by its launcher and workers.
#[derive(Debug)]
pub(crate) struct PoolCgroup {
    state: Mutex<State>,
    next: AtomicU64,
    /// Enable the memory controller for workers (a memory ceiling is set).
    want_memory: bool,
}

#[derive(Debug)]
struct State {
    /// Where new workers go; `Err`: cgroups are off, and why.
    current: Result<PathBuf, String>,
    /// A candidate to move to if placement under `current` is refused.
    sibling: Option<PathBuf>,
    /// Every pool directory made, to remove at the end.
    made: Vec<PathBuf>,
    /// Worker directories that could not be removed yet.
    leftover: HashSet<PathBuf>,
    /// The memory controller is enabled for the workers under `current`.
    memory: bool,
}

/// This process's pid and start time (read once per pid).
fn own_start() -> (u32, u64) {
    static START: Mutex<(u32, u64)> = Mutex::new((0, 0));
    let pid = std::process::id();
    let mut st = START.lock().unwrap_or_else(|e| e.into_inner());
    if st.0 != pid {
        *st = (pid, start_time(pid).unwrap_or(0));
    }
    *st
}

fn pool_dir_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let (pid, start) = own_start();
    format!("popen-pool-{pid}-{start}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

impl PoolCgroup {
    /// Sets up the pool's cgroup directory, or records why there is none.
    /// With `memory`, also enables the memory controller for the workers'
    /// directories where the hierarchy allows it.
    pub(crate) fn new(enabled: bool, memory: bool) -> Arc<Self> {
        let (current, sibling) = if enabled {
            match own_cgroup_dir() {
                Ok(own) => {
                    clean_stale(&own);
                    let sibling = own.parent().filter(|p| p.join("cgroup.procs").exists());
                    (Ok(own.clone()), sibling.map(Path::to_path_buf))
                }
                Err(why) => (Err(why), None),
            }
        } else {
            (Err("disabled by the pool's configuration".to_owned()), None)
        };
        let mut state =
            State { current, sibling, made: Vec::new(), leftover: HashSet::new(), memory: false };
        if let Ok(base) = state.current.clone() {
            state.current = make_pool_dir(&base, &mut state.made);
            if state.current.is_err() {
                if let Some(sib) = state.sibling.take() {
                    clean_stale(&sib);
                    state.current = make_pool_dir(&sib, &mut state.made);
                }
            }
        }
        state.memory = memory && state.current.as_deref().is_ok_and(enable_memory);
        if let Err(why) = &state.current {
            tracing::debug!(reason = %why, "popen-pool: no cgroup containment");
        }
        Arc::new(PoolCgroup {
            state: Mutex::new(state),
            next: AtomicU64::new(0),
            want_memory: memory,
        })
    }

    /// The pool directory shared by this process's single workers
    /// ([`PopenWorker`](crate::PopenWorker)s) with the same settings, made
    /// by the first and removed with the last: a server that starts a
    /// worker per session then makes and removes one directory per worker,
    /// not two (a cgroup's creation and removal are not cheap).
    pub(crate) fn shared(enabled: bool, memory: bool) -> Arc<Self> {
        type Entry = (u32, bool, bool, std::sync::Weak<PoolCgroup>);
        static SHARED: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
        let pid = std::process::id();
        let mut all = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(p, _, _, w)| *p == pid && w.strong_count() > 0);
        let found = all
            .iter()
            .find(|(_, e, m, _)| (*e, *m) == (enabled, memory))
            .and_then(|(_, _, _, w)| w.upgrade());
        if let Some(cg) = found {
            return cg;
        }
        let cg = Self::new(enabled, memory);
        all.push((pid, enabled, memory, Arc::downgrade(&cg)));
        cg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn containment(&self) -> Containment {
        match &self.lock().current {
            Ok(dir) => Containment::Cgroup { dir: dir.clone() },
            Err(reason) => Containment::ProcessTree { reason: reason.clone() },
        }
    }

    /// A fresh, empty cgroup for one worker, or `None` without cgroups.
    pub(crate) fn worker(self: &Arc<Self>) -> Option<WorkerCgroup> {
        let (dir, memory) = {
            let st = self.lock();
            (st.current.clone().ok()?, st.memory)
        };
        let path = dir.join(format!("w{}", self.next.fetch_add(1, Ordering::Relaxed)));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) => {
                self.disable(&dir, format!("cannot create {}: {e}", path.display()));
                return None;
            }
        }
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
        Some(WorkerCgroup {
            path,
            procs,
            pool: Arc::clone(self),
            removed: AtomicBool::new(false),
            memory,
        })
    }

    /// Placing a worker under `dir` failed with `err`: move to the sibling
    /// location if the error says this one cannot take processes, else
    /// turn cgroups off for this pool.
    pub(crate) fn placement_failed(&self, dir: &Path, err: &io::Error) {
        let mut st = self.lock();
        if st.current.as_deref().ok() != Some(dir) {
            return; // another worker already handled it
        }
        let refused = matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EOPNOTSUPP));
        if let (true, Some(sib)) = (refused, st.sibling.take()) {
            clean_stale(&sib);
            let mut made = std::mem::take(&mut st.made);
            st.current = make_pool_dir(&sib, &mut made);
            st.made = made;
            st.memory = self.want_memory && st.current.as_deref().is_ok_and(enable_memory);
            if st.current.is_ok() {
                return;
            }
        }
        st.current =
            Err(format!("cannot place a worker in a cgroup under {}: {err}", dir.display()));
        tracing::warn!(reason = ?st.current, "popen-pool: falling back to process-tree containment");
    }

    fn disable(&self, dir: &Path, why: String) {
        let mut st = self.lock();
        if st.current.as_deref().ok() == Some(dir) {
            st.current = Err(why);
        }
    }
}

/// Enables the memory controller for the children of pool directory `dir`
/// (possible only where its parent has it enabled for `dir`).
fn enable_memory(dir: &Path) -> bool {
    let on = std::fs::write(dir.join("cgroup.subtree_control"), b"+memory").is_ok();
    if !on {
        tracing::debug!(dir = %dir.display(), "popen-pool: no memory controller; the memory ceiling is watched by the parent");
    }
    on
}

fn make_pool_dir(base: &Path, made: &mut Vec<PathBuf>) -> Result<PathBuf, String> {
    let dir = base.join(pool_dir_name());
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            made.push(dir.clone());
            Ok(dir)
        }
        Err(e) => Err(format!("cannot create a cgroup under {}: {e}", base.display())),
    }
}

impl Drop for PoolCgroup {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for dir in st.leftover.drain() {
            let _ = kill_and_remove_blocking(&dir, Duration::from_secs(1));
        }
        for dir in st.made.drain(..) {
            if let Err(e) = remove_dir_tree(&dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), "cannot remove the pool's cgroup: {e}");
                }
            }
        }
    }
}

/// One worker's cgroup directory. Removed by [`remove`](Self::remove) after
/// the worker is reaped, or (killing what is in it) on drop.
#[derive(Debug)]
pub(crate) struct WorkerCgroup {
    path: PathBuf,
    procs: CString,
    pool: Arc<PoolCgroup>,
    removed: AtomicBool,
    /// The memory controller is enabled here.
    memory: bool,
}

impl WorkerCgroup {
    /// Sets the kernel-enforced memory ceiling of everything in this cgroup
    /// (`memory.max`; no swap past it; an OOM kill takes the whole worker).
    /// False if the memory controller is not available here.
    pub(crate) fn set_memory_max(&self, bytes: u64) -> bool {
        if !self.memory {
            return false;
        }
        if std::fs::write(self.path.join("memory.max"), bytes.to_string()).is_err() {
            return false;
        }
        let _ = std::fs::write(self.path.join("memory.swap.max"), b"0");
        let _ = std::fs::write(self.path.join("memory.oom.group"), b"1");
        true
    }

    /// True if the kernel OOM-killed a process here (`memory.events`).
    pub(crate) fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events")).is_ok_and(|ev| {
            ev.lines().any(|l| {
                l.strip_prefix("oom_kill ")
                    .is_some_and(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
            })
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/cgroup.procs`, for the child to write itself into.
    pub(crate) fn procs(&self) -> &CString {
        &self.procs
    }

    pub(crate) fn kill(&self) {
        let _ = kill(&self.path);
    }

    /// After the worker is reaped: waits until its killed descendants are
    /// gone (bounded by `limit`), then removes the directory.
    ///
    /// Cancel safety: dropping the future leaves the rest to `Drop`.
    pub(crate) async fn remove(&self, limit: Duration) {
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        // `limit` comes from the caller's kill grace: saturate, never overflow.
        let deadline = tokio::time::Instant::now() + limit.min(Duration::from_secs(3600));
        let mut pause = Duration::from_micros(50);
        loop {
            if !populated(&self.path) && remove_dir_tree(&self.path).is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return; // Drop tries again, then the pool
            }
            self.kill();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        self.removed.store(true, Ordering::Relaxed);
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        if kill_and_remove_blocking(&self.path, Duration::from_millis(100)).is_err() {
            self.pool.lock().leftover.insert(self.path.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup\040x"), "/sys/fs/cgroup x");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"\04"), r"\04");
    }
}
