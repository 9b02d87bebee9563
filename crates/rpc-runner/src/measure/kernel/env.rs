//! The environment a kernel was timed in: the timed thread's CPUs, the
//! frequency governor and turbo, the load of the other CPUs, real-time
//! priority; and warnings when any of these make the costs suspect.

use std::fs;

use serde::{Deserialize, Serialize};

/// Where and under what conditions a measurement was timed (see
/// docs/measure.md, "Environment"). Values the machine does not expose are
/// `None` ("unknown").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Environment {
    /// The CPUs the timed thread was allowed to run on (its affinity),
    /// ascending; empty if unknown.
    pub cpus: Vec<usize>,
    /// How many CPUs were online (0 if unknown).
    pub online_cpus: usize,
    /// The timed thread was pinned: its CPUs are a strict subset of the
    /// online ones.
    pub pinned: bool,
    /// The frequency governor of the timed thread's CPUs (distinct values
    /// joined by `,`); `None` where the machine has no cpufreq (most VMs).
    pub governor: Option<String>,
    /// Turbo / boost is on (`intel_pstate/no_turbo` or `cpufreq/boost`);
    /// `None` where the machine does not say.
    pub turbo: Option<bool>,
    /// How busy the other CPUs were while the kernel was timed, 0 to 1 (their
    /// busy time over their capacity, from /proc/stat before and after; for
    /// an unpinned thread, all CPUs minus the timed thread's own CPU time);
    /// `None` if unknown (no /proc/stat, a single CPU, or a timing too
    /// short for /proc/stat's clock ticks, 10 ms on Linux: its counts did
    /// not move).
    pub neighbour_load: Option<f64>,
    /// The share of the wall time the timed thread was on a CPU while
    /// timing (its CPU time over the wall time, sleeps excluded), 0 to 1;
    /// below 1 when another task shared its CPU (e.g. a second server pinned
    /// to the same CPU) or for kernels that sleep. `None` if unknown.
    pub cpu_share: Option<f64>,
    /// The timed loop ran under `SCHED_FIFO`.
    pub realtime: bool,
    /// Every argument set was backed by huge pages (sets of at least
    /// 256 KiB are allocated 2 MiB-aligned and advised `MADV_HUGEPAGE`;
    /// false for smaller sets or where the advice was refused).
    pub huge_pages: bool,
    /// Why the costs may be suspect: not pinned, a governor other than
    /// `performance`, turbo on, busy neighbours, real-time priority refused.
    pub warnings: Vec<String>,
}

/// Neighbour load above which a measurement gets a warning.
pub(crate) const NEIGHBOUR_LOAD_WARNING: f64 = 0.25;

/// CPU share below which a measurement gets a warning.
pub(crate) const CPU_SHARE_WARNING: f64 = 0.9;

/// CPU times of one CPU from /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct CpuTimes {
    pub(super) busy: u64,
    pub(super) total: u64,
}

/// The per-CPU lines of /proc/stat, by CPU number (`None` for absent ones).
/// Bounded: at most 4096 CPUs, unparsable lines ignored.
pub(super) fn parse_proc_stat(text: &str) -> Vec<Option<CpuTimes>> {
    const MAX_CPUS: usize = 4096;
    let mut out: Vec<Option<CpuTimes>> = Vec::new();
    for line in text.lines() {
        // "cpu0 ...", not the aggregate "cpu  ...".
        let Some(rest) =
            line.strip_prefix("cpu").filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        else {
            continue;
        };
        let mut fields = rest.split_ascii_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else { continue };
        if cpu >= MAX_CPUS {
            continue;
        }
        // user nice system idle iowait irq softirq steal (guest is in user).
        let v: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        let idle = get(3).saturating_add(get(4));
        let busy = [0, 1, 2, 5, 6, 7].iter().fold(0u64, |a, &i| a.saturating_add(get(i)));
        if out.len() <= cpu {
            out.resize(cpu + 1, None);
        }
        out[cpu] = Some(CpuTimes { busy, total: busy.saturating_add(idle) });
    }
    out
}

/// A CPU list such as `0-3,5` (sysfs's `online`), bounded to 4096 CPUs.
pub(super) fn parse_cpu_list(text: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.trim().parse(), part.trim().parse()),
        };
        if let (Ok(lo), Ok(hi)) = (lo, hi) {
            cpus.extend((lo..=hi.min(4095)).take(4096));
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Reads a small /proc or sysfs file whole: one `read` into a buffer of
/// 16 KiB for the usual sizes (a `read_to_string` sizes the file first
/// and reads /proc files in growing steps, 32 bytes first: 8 reads for
/// /proc/stat), at most 1 MiB; `None` if it cannot be read or is not UTF-8.
fn read_small(path: &str) -> Option<String> {
    use std::io::Read as _;
    let file = fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(16 << 10);
    file.take(1 << 20).read_to_end(&mut buf).ok()?;
    String::from_utf8(buf).ok()
}

/// The machine's online CPUs (empty if unknown).
pub(crate) fn online_cpus() -> Vec<usize> {
    read_small("/sys/devices/system/cpu/online").map(|s| parse_cpu_list(&s)).unwrap_or_default()
}

/// The calling thread's CPU affinity, ascending (empty if unknown).
fn own_affinity() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect()
        }
        Err(_) => Vec::new(),
    }
}

/// Context switches so far: the calling thread's voluntary ones (it waited
/// of its own accord) and the whole process's involuntary ones (a thread
/// was preempted).
pub(super) fn context_switches() -> Option<(i64, i64)> {
    use nix::sys::resource::{UsageWho, getrusage};
    let thread = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
    let process = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    Some((thread.voluntary_context_switches(), process.involuntary_context_switches()))
}

/// The calling thread's CPU time.
pub(super) fn thread_cpu_time() -> Option<std::time::Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(std::time::Duration::from)
}

/// The frequency governor of `cpu` (`None` without cpufreq for it).
fn read_governor(cpu: usize) -> Option<String> {
    let path = format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor");
    read_small(&path).map(|g| g.trim().chars().take(32).collect())
}

fn turbo() -> Option<bool> {
    let read = |p: &str| read_small(p).map(|s| s.trim().to_owned());
    if let Some(v) = read("/sys/devices/system/cpu/intel_pstate/no_turbo") {
        return Some(v == "0");
    }
    read("/sys/devices/system/cpu/cpufreq/boost").map(|v| v == "1")
}

/// What changes rarely on a machine (a CPU brought on or offline, a
/// governor or turbo switched by hand): the online CPUs, the governor of
/// each of the first [`MAX_GOVERNORS`] of them, and turbo.
#[derive(Debug, Clone, PartialEq)]
struct SlowFacts {
    online: Vec<usize>,
    governors: Vec<(usize, Option<String>)>,
    turbo: Option<bool>,
}

/// Most CPUs whose governor the [`SlowFacts`] hold (a timed thread's CPUs
/// beyond them are read when asked about).
const MAX_GOVERNORS: usize = 64;

impl SlowFacts {
    /// The governors of `cpus` (of the online CPUs if empty; the first
    /// [`MAX_GOVERNORS`]), distinct values joined by `,`.
    fn governor(&self, cpus: &[usize]) -> Option<String> {
        let cpus = if cpus.is_empty() { &self.online } else { cpus };
        let mut seen: Vec<String> = Vec::new();
        for &cpu in cpus.iter().take(MAX_GOVERNORS) {
            let known = self.governors.iter().find(|(c, _)| *c == cpu);
            let g = known.map_or_else(|| read_governor(cpu), |(_, g)| g.clone());
            if let Some(g) = g.filter(|g| !seen.contains(g)) {
                seen.push(g);
            }
        }
        (!seen.is_empty()).then(|| seen.join(","))
    }
}

/// How long a process reuses the [`SlowFacts`] it read (they cost ~15 µs of
/// sysfs reads per measurement, most of a local measurement's margin).
/// A zygote refreshes them before each fork ([`warm_for_fork`]), so a
/// forked session worker starts with them.
const SLOW_FACTS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

type SlowCache = std::sync::Mutex<Option<(std::time::Instant, SlowFacts)>>;

static SLOW_CACHE: SlowCache = std::sync::Mutex::new(None);

/// The [`SlowFacts`], read at most once per [`SLOW_FACTS_TTL`] by this
/// process or by the zygote it was forked from.
fn slow_facts() -> SlowFacts {
    cached_facts(&SLOW_CACHE, std::time::Instant::now(), read_slow_facts)
}

/// Refreshes this process's [`SlowFacts`] if they are older than
/// [`SLOW_FACTS_TTL`]: the `before_fork` hook of
/// [`registry`](crate::tasks::registry), so the workers a zygote forks
/// inherit fresh facts instead of reading sysfs in their first
/// measurement (on its critical path). Single-threaded, a few sysfs reads
/// at most once a second.
pub(crate) fn warm_for_fork() {
    let _ = slow_facts();
}

fn cached_facts(
    cache: &SlowCache,
    now: std::time::Instant,
    read: impl FnOnce() -> SlowFacts,
) -> SlowFacts {
    let mut slot = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, facts)) = slot.as_ref()
        && now.saturating_duration_since(*at) < SLOW_FACTS_TTL
    {
        return facts.clone();
    }
    let facts = read();
    *slot = Some((now, facts.clone()));
    facts
}

fn read_slow_facts() -> SlowFacts {
    let online = online_cpus();
    let governors = online.iter().take(MAX_GOVERNORS).map(|&c| (c, read_governor(c))).collect();
    SlowFacts { online, governors, turbo: turbo() }
}

/// Records the environment around one timing loop: [`EnvProbe::start`]
/// before, [`EnvProbe::finish`] after.
pub(super) struct EnvProbe {
    cpus: Vec<usize>,
    online: Vec<usize>,
    governor: Option<String>,
    turbo: Option<bool>,
    stat: Option<Vec<Option<CpuTimes>>>,
    cpu_time: Option<std::time::Duration>,
    started: std::time::Instant,
}

impl EnvProbe {
    pub(super) fn start() -> Self {
        let cpus = own_affinity();
        let facts = slow_facts();
        let governor = facts.governor(&cpus);
        let SlowFacts { online, turbo, .. } = facts;
        let stat = read_small("/proc/stat").map(|s| parse_proc_stat(&s));
        EnvProbe {
            cpus,
            online,
            governor,
            turbo,
            stat,
            cpu_time: thread_cpu_time(),
            started: std::time::Instant::now(),
        }
    }

    /// The environment, with `realtime` and any warnings of the loop
    /// itself; `paused` is how long the loop slept on purpose.
    pub(super) fn finish(
        self,
        realtime: bool,
        paused: std::time::Duration,
        mut warnings: Vec<String>,
    ) -> Environment {
        let elapsed = self.started.elapsed();
        let measured_own = match (self.cpu_time, thread_cpu_time()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let own = measured_own.unwrap_or(elapsed);
        let awake = elapsed.saturating_sub(paused);
        let cpu_share = measured_own
            .filter(|_| awake >= std::time::Duration::from_millis(1))
            .map(|cpu| (cpu.as_secs_f64() / awake.as_secs_f64()).clamp(0.0, 1.0));
        let after = read_small("/proc/stat").map(|s| parse_proc_stat(&s));
        let pinned = !self.cpus.is_empty()
            && !self.online.is_empty()
            && self.online.iter().any(|c| !self.cpus.contains(c));
        let neighbour_load = match (&self.stat, &after) {
            (Some(before), Some(after)) => {
                neighbour_load(before, after, &self.online, &self.cpus, pinned, own, elapsed)
            }
            _ => None,
        };
        let (governor, turbo) = (self.governor, self.turbo);
        if !pinned {
            warnings.push(
                "the timed thread was not pinned to a CPU: other work can preempt or migrate it"
                    .into(),
            );
        }
        if let Some(g) = governor.as_deref().filter(|g| *g != "performance") {
            warnings.push(format!(
                "CPU frequency governor {g:?}, not \"performance\": the clock speed may change while timing"
            ));
        }
        if turbo == Some(true) {
            warnings.push(
                "turbo/boost is on: the clock speed depends on temperature and on the other cores' load"
                    .into(),
            );
        }
        if let Some(share) = cpu_share.filter(|&s| s < CPU_SHARE_WARNING) {
            warnings.push(format!(
                "the timed thread was on its CPU only {:.0}% of the time: another task shared the CPU (another server or worker pinned to it?)",
                share * 100.0
            ));
        }
        if let Some(load) = neighbour_load.filter(|&l| l > NEIGHBOUR_LOAD_WARNING) {
            warnings.push(format!(
                "the other CPUs were {:.0}% busy while timing: shared caches and memory bandwidth can shift costs",
                load * 100.0
            ));
        }
        Environment {
            cpus: self.cpus,
            online_cpus: self.online.len(),
            pinned,
            governor,
            turbo,
            neighbour_load,
            cpu_share,
            realtime,
            huge_pages: false,
            warnings,
        }
    }
}

/// The busy fraction of the CPUs other than the timed thread's.
fn neighbour_load(
    before: &[Option<CpuTimes>],
    after: &[Option<CpuTimes>],
    online: &[usize],
    cpus: &[usize],
    pinned: bool,
    own: std::time::Duration,
    elapsed: std::time::Duration,
) -> Option<f64> {
    let ticks_per_sec = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    };
    let (mut busy, mut total, mut counted) = (0f64, 0f64, 0usize);
    for &cpu in online {
        if pinned && cpus.contains(&cpu) {
            continue;
        }
        let (Some(Some(b)), Some(Some(a))) = (before.get(cpu), after.get(cpu)) else { continue };
        busy += a.busy.saturating_sub(b.busy) as f64;
        total += a.total.saturating_sub(b.total) as f64;
        counted += 1;
    }
    if !pinned {
        // All CPUs were counted: take out the timed thread and one CPU's worth.
        if counted < 2 {
            return None;
        }
        busy -= own.as_secs_f64() * ticks_per_sec;
        total -= elapsed.as_secs_f64() * ticks_per_sec;
    }
    if counted == 0 || total <= 0.0 {
        return None;
    }
    Some((busy / total).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_facts_are_read_once_a_second() {
        let cache: SlowCache = std::sync::Mutex::new(None);
        let reads = std::cell::Cell::new(0u32);
        let read = || {
            reads.set(reads.get() + 1);
            let governors = vec![(0, Some("performance".into())), (1, Some("powersave".into()))];
            SlowFacts { online: vec![0, 1], governors, turbo: None }
        };
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let facts = cached_facts(&cache, t0, read);
        assert_eq!(cached_facts(&cache, t0 + ms(999), read), facts);
        assert_eq!(reads.get(), 1, "within the second: read once");
        cached_facts(&cache, t0 + ms(2000), read);
        assert_eq!(reads.get(), 2, "a second later: read again");
        // Any CPU set is answered from the same facts.
        assert_eq!(facts.governor(&[1]).as_deref(), Some("powersave"));
        assert_eq!(facts.governor(&[0, 1]).as_deref(), Some("performance,powersave"));
        assert_eq!(facts.governor(&[]).as_deref(), Some("performance,powersave"), "all online");
        // A CPU the facts do not hold is read (none such here: no governor).
        assert_eq!(facts.governor(&[100_000]), None);
    }

    /// What a process's cache holds is what a fork of it inherits: a
    /// refreshed cache makes a forked child read nothing.
    #[test]
    fn warm_for_fork_fills_the_process_cache() {
        warm_for_fork();
        let slot = SLOW_CACHE.lock().unwrap();
        let (at, facts) = slot.as_ref().expect("filled");
        assert!(at.elapsed() < SLOW_FACTS_TTL);
        assert_eq!(facts.online, online_cpus());
    }

    #[test]
    fn proc_stat_and_cpu_lists_parse() {
        let text = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                    cpu0 1 2 3 40 5 6 7 8 0 0\n\
                    cpu1 9 0 1 90\n\
                    cpux 1 2 3 4\n\
                    cpu3 1 2\n\
                    intr 5";
        let s = parse_proc_stat(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], Some(CpuTimes { busy: 1 + 2 + 3 + 6 + 7 + 8, total: 27 + 45 }));
        assert_eq!(s[1], Some(CpuTimes { busy: 10, total: 100 }));
        assert_eq!(parse_cpu_list("0-3,5\n"), vec![0, 1, 2, 3, 5]);
        assert_eq!(parse_cpu_list("1"), vec![1]);
        assert!(parse_cpu_list("x").is_empty());
        assert_eq!(parse_cpu_list("0-99999999").len(), 4096, "bounded");
    }

    #[test]
    fn neighbour_load_counts_only_the_other_cpus() {
        let t = |busy, total| Some(CpuTimes { busy, total });
        let before = vec![t(0, 0), t(0, 0)];
        let after = vec![t(50, 100), t(100, 100)];
        let d = std::time::Duration::from_secs(1);
        // Pinned to CPU 1: CPU 0 was half busy.
        let l = neighbour_load(&before, &after, &[0, 1], &[1], true, d, d).unwrap();
        assert!((l - 0.5).abs() < 1e-9, "{l}");
        // Not pinned: 150 ticks busy minus the thread's own second (CLK_TCK
        // ticks) over 200 minus one CPU-second.
        let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as f64;
        let after = vec![t(tck as u64 / 2, tck as u64), t(tck as u64, tck as u64)];
        let l = neighbour_load(&before, &after, &[0, 1], &[0, 1], false, d, d).unwrap();
        assert!((l - 0.5).abs() < 1e-6, "{l}");
        assert_eq!(neighbour_load(&before, &after, &[0], &[0], false, d, d), None);
    }

    #[test]
    fn a_probe_records_this_thread() {
        let probe = EnvProbe::start();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let env = probe.finish(false, std::time::Duration::from_millis(20), vec!["x".into()]);
        // Spinning, then a sleep that is accounted for: (nearly) all of its CPU.
        let share = env.cpu_share.unwrap();
        assert!(share > 0.3, "{env:?}");
        assert!(!env.cpus.is_empty(), "{env:?}");
        assert!(env.online_cpus >= 1);
        assert_eq!(env.warnings[0], "x");
        if env.online_cpus > 1 && env.cpus.len() == env.online_cpus {
            assert!(!env.pinned);
            assert!(env.warnings.iter().any(|w| w.contains("not pinned")), "{env:?}");
        }
    }
}
