//! Which CPUs measure and which do everything else ([`CpuPlan`]), and
//! pinning a whole process ([`pin_this_process`]).

use std::io;

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

use super::kernel::online_cpus;

/// The split of the machine's CPUs between timing kernels and the rest
/// (the server, the tracker, builds).
///
/// The default ([`CpuPlan::detect`]) measures on the last online CPU and
/// leaves the others for the rest; on a single-CPU machine both share it.
///
/// ```
/// use rpc_runner::measure::CpuPlan;
/// let plan = CpuPlan::detect();
/// assert_eq!(plan.measure.len(), 1);
/// assert!(!plan.measure.iter().any(|c| plan.others.contains(c)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuPlan {
    /// The CPUs session workers time kernels on.
    pub measure: Vec<usize>,
    /// The other online CPUs (empty on a single-CPU machine).
    pub others: Vec<usize>,
}

impl CpuPlan {
    /// The last online CPU measures; the others do the rest. If the online
    /// CPUs cannot be read, CPU 0 measures and `others` is empty.
    pub fn detect() -> CpuPlan {
        let online = online_cpus();
        match online.last() {
            Some(&last) => CpuPlan::with_measure(&online, [last]),
            None => CpuPlan { measure: vec![0], others: Vec::new() },
        }
    }

    /// These CPUs measure; the other CPUs of `online` do the rest.
    pub fn with_measure(online: &[usize], measure: impl IntoIterator<Item = usize>) -> CpuPlan {
        let mut measure: Vec<usize> = measure.into_iter().collect();
        measure.sort_unstable();
        measure.dedup();
        let others = online.iter().copied().filter(|c| !measure.contains(c)).collect();
        CpuPlan { measure, others }
    }
}

/// Pins every thread of this process (and what it starts later) to `cpus`,
/// e.g. [`CpuPlan::others`] in a program that embeds a device server, so
/// that its runtime, tracker and builds stay off the measuring CPU (its
/// session workers pin themselves). Threads are found in /proc/self/task;
/// one that ends meanwhile is skipped.
///
/// # Errors
///
/// `InvalidInput` for an empty list or a CPU beyond the affinity mask, the
/// OS error if this thread cannot be pinned (e.g. a CPU not allowed by the
/// process's cpuset).
pub fn pin_this_process(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no CPU to pin to"));
    }
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {c} is beyond the affinity mask"),
            )
        })?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)?;
    let tasks = std::fs::read_dir("/proc/self/task")?;
    for entry in tasks.flatten().take(1 << 16) {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // A thread that exited meanwhile (ESRCH) is fine to skip.
        let _ = sched_setaffinity(Pid::from_raw(tid), &set);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_splits_the_online_cpus() {
        let p = CpuPlan::with_measure(&[0, 1, 2, 3], [3, 3]);
        assert_eq!((p.measure, p.others), (vec![3], vec![0, 1, 2]));
        let p = CpuPlan::with_measure(&[0], [0]);
        assert!(p.others.is_empty());
        let d = CpuPlan::detect();
        assert_eq!(d.measure, vec![*online_cpus().last().unwrap()]);
        assert_eq!(d.others.len() + 1, online_cpus().len());
        assert!(pin_this_process(&[]).is_err());
        assert!(pin_this_process(&[1 << 20]).is_err());
    }
}
