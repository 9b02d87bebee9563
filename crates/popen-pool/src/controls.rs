//! Spawn-time process controls: CPU affinity, nice, rlimits.
//!
//! They are applied by the worker itself, right after exec and before its
//! handshake: workers are started with `posix_spawn`, not a `fork()` of the
//! parent (whose cost grows with the parent's memory), so there is no code of
//! ours between fork and exec (see `process`).
//! The parent passes them in the worker's environment ([`ENV_CONTROLS`]);
//! a worker that cannot apply one refuses to serve and says why (the spawn
//! fails with [`PoolError::Spawn`](crate::PoolError::Spawn)).
//!
//! The memory ceiling is not here: the parent enforces it (a cgroup's
//! `memory.max`, or a watchdog on the worker's RSS); see `child.rs`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::error::PoolError;

/// Set in a worker's environment to its encoded [`Controls`].
pub(crate) const ENV_CONTROLS: &str = "POPEN_POOL_CONTROLS";

/// Largest CPU number an affinity may name (the size of a `cpu_set_t`).
pub(crate) const MAX_CPU: usize = 1023;

/// The controls a worker applies to itself before it serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Controls {
    /// CPUs the worker (every thread, and what it starts) may run on.
    pub(crate) cpus: Option<Vec<usize>>,
    /// Nice level (-20..=19) of every thread.
    pub(crate) nice: Option<i32>,
    /// RLIMIT_AS, bytes.
    pub(crate) address_space: Option<u64>,
    /// RLIMIT_CPU, whole seconds (rounded up).
    pub(crate) cpu_time: Option<u64>,
    /// RLIMIT_NOFILE.
    pub(crate) open_files: Option<u64>,
    /// Keep RLIMIT_CORE as inherited (else it is set to 0).
    pub(crate) core_dumps: bool,
}

impl Controls {
    pub(crate) fn validate(&self) -> Result<(), PoolError> {
        let bad = |message: String| Err(PoolError::Config { message });
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return bad("cpu_affinity needs at least one CPU".into());
            }
            if let Some(c) = cpus.iter().find(|&&c| c > MAX_CPU) {
                return bad(format!("cpu_affinity: CPU {c} is over the maximum of {MAX_CPU}"));
            }
        }
        if let Some(n) = self.nice {
            if !(-20..=19).contains(&n) {
                return bad(format!("nice must be in -20..=19, got {n}"));
            }
        }
        if self.open_files == Some(0) {
            return bad("rlimit_open_files must be >= 1".into());
        }
        if self.cpu_time == Some(0) {
            return bad("rlimit_cpu_time must be at least 1 second".into());
        }
        Ok(())
    }

    /// Rounds a CPU-time limit up to whole seconds (RLIMIT_CPU's unit).
    pub(crate) fn cpu_seconds(limit: Duration) -> u64 {
        limit.as_secs().saturating_add(u64::from(limit.subsec_nanos() > 0)).max(1)
    }

    /// The environment form: `key=value` pairs joined by `;`.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(cpus) = &self.cpus {
            let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
            let _ = write!(out, "cpus={};", list.join(","));
        }
        let mut num = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = write!(out, "{key}={v};");
            }
        };
        num("nice", self.nice.map(|n| n.to_string()));
        num("as", self.address_space.map(|n| n.to_string()));
        num("cpu", self.cpu_time.map(|n| n.to_string()));
        num("nofile", self.open_files.map(|n| n.to_string()));
        num("core", (!self.core_dumps).then(|| "0".to_owned()));
        out
    }

    /// Parses [`encode`](Self::encode)'s form.
    pub(crate) fn decode(s: &str) -> Result<Self, String> {
        let mut c = Controls { core_dumps: true, ..Controls::default() };
        for item in s.split(';').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| format!("bad item {item:?}"))?;
            let int = |v: &str| v.parse::<u64>().map_err(|e| format!("bad {key}={v:?}: {e}"));
            match key {
                "cpus" => {
                    let cpus = value
                        .split(',')
                        .map(|v| v.parse::<usize>().map_err(|e| format!("bad CPU {v:?}: {e}")))
                        .collect::<Result<Vec<_>, _>>()?;
                    c.cpus = Some(cpus);
                }
                "nice" => c.nice = Some(value.parse().map_err(|e| format!("bad nice: {e}"))?),
                "as" => c.address_space = Some(int(value)?),
                "cpu" => c.cpu_time = Some(int(value)?),
                "nofile" => c.open_files = Some(int(value)?),
                "core" => c.core_dumps = false,
                other => return Err(format!("unknown process control {other:?}")),
            }
        }
        Ok(c)
    }

    /// Applies the controls to this process (in the worker, before it
    /// serves). Affinity and nice are per thread on Linux: they are set on
    /// every thread that exists now, and threads started later inherit them.
    pub(crate) fn apply(&self) -> Result<(), String> {
        use nix::sys::resource::{Resource, setrlimit};
        let limit = |res: Resource, what: &str, v: u64| {
            setrlimit(res, v, v).map_err(|e| format!("cannot set {what} to {v}: {e}"))
        };
        if let Some(v) = self.address_space {
            limit(Resource::RLIMIT_AS, "RLIMIT_AS", v)?;
        }
        if let Some(v) = self.cpu_time {
            limit(Resource::RLIMIT_CPU, "RLIMIT_CPU", v)?;
        }
        if let Some(v) = self.open_files {
            limit(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", v)?;
        }
        if !self.core_dumps {
            limit(Resource::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
        }
        if self.nice.is_none() && self.cpus.is_none() {
            return Ok(());
        }
        let threads = own_threads();
        if let Some(n) = self.nice {
            for &tid in &threads {
                set_nice(tid, n).map_err(|e| format!("cannot set nice {n}: {e}"))?;
            }
        }
        if let Some(cpus) = &self.cpus {
            set_affinity(&threads, cpus)?;
        }
        Ok(())
    }
}

/// The ids of this process's threads (just this one if /proc is missing).
fn own_threads() -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    if tids.is_empty() {
        tids.push(0);
    }
    tids
}

fn set_nice(tid: i32, n: i32) -> std::io::Result<()> {
    let who = libc::id_t::try_from(tid).unwrap_or(0);
    // SAFETY: a plain syscall on integers (nix has no safe wrapper for it).
    // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, n) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(target_os = "linux")]
fn set_affinity(threads: &[i32], cpus: &[usize]) -> Result<(), String> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    }
    for &tid in threads {
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            Ok(()) => {}
            // A thread that ended since the listing.
            Err(nix::errno::Errno::ESRCH) if tid != 0 => {}
            Err(e) => return Err(format!("cannot set CPU affinity {cpus:?}: {e}")),
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_affinity(_threads: &[i32], _cpus: &[usize]) -> Result<(), String> {
    Err("CPU affinity is supported on Linux only".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let c = Controls {
            cpus: Some(vec![0, 3]),
            nice: Some(-2),
            address_space: Some(1 << 30),
            cpu_time: Some(7),
            open_files: Some(64),
            core_dumps: false,
        };
        assert_eq!(Controls::decode(&c.encode()), Ok(c));
        let d = Controls { core_dumps: true, ..Controls::default() };
        assert_eq!(d.encode(), "");
        assert_eq!(Controls::decode(""), Ok(d));
        assert!(Controls::decode("bogus=1").is_err());
        assert!(Controls::decode("cpus=a").is_err());
    }

    #[test]
    fn cpu_time_rounds_up() {
        assert_eq!(Controls::cpu_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(Controls::cpu_seconds(Duration::from_secs(3)), 3);
        assert_eq!(Controls::cpu_seconds(Duration::ZERO), 1);
    }
}
