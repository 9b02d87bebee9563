//! Real-time priority (`SCHED_FIFO`) for the timed loop, where permitted.

use nix::libc;

/// While alive, the calling thread runs under `SCHED_FIFO` priority 1; the
/// previous policy comes back on drop.
pub(super) struct Realtime {
    policy: libc::c_int,
    param: libc::sched_param,
}

impl Realtime {
    /// Switches the calling thread to `SCHED_FIFO` priority 1; the error is
    /// the reason it was refused (e.g. "EPERM: Operation not permitted").
    pub(super) fn enter() -> Result<Realtime, String> {
        // SAFETY: plain syscalls on the calling thread (pid 0) with valid
        // pointers to stack values.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut param = libc::sched_param { sched_priority: 0 };
            if policy < 0 || libc::sched_getparam(0, &mut param) != 0 {
                return Err(nix::errno::Errno::last().desc().to_owned());
            }
            let fifo = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) != 0 {
                let e = nix::errno::Errno::last();
                return Err(format!("{e}: {}", e.desc()));
            }
            Ok(Realtime { policy, param })
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; restoring the policy read there.
        unsafe {
            libc::sched_setscheduler(0, self.policy, &self.param);
        }
    }
}

/// Runs `f` under `SCHED_FIFO` when `wanted`; returns its result, whether it
/// ran real-time, and a warning if real-time was refused.
pub(super) fn maybe_realtime<T>(wanted: bool, f: impl FnOnce() -> T) -> (T, bool, Option<String>) {
    if !wanted {
        return (f(), false, None);
    }
    match Realtime::enter() {
        Ok(guard) => {
            let out = f();
            drop(guard);
            (out, true, None)
        }
        Err(reason) => (
            f(),
            false,
            Some(format!(
                "real-time priority (SCHED_FIFO) was refused ({reason}); timed at normal priority"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_is_entered_and_left_or_refused_with_a_reason() {
        let (policy, rt, warning) = maybe_realtime(true, || {
            // SAFETY: a plain syscall on the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        });
        if rt {
            assert_eq!(policy, libc::SCHED_FIFO);
            assert!(warning.is_none());
        } else {
            assert!(warning.unwrap().contains("refused"));
        }
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER, "restored");
        let (_, rt, warning) = maybe_realtime(false, || ());
        assert!(!rt && warning.is_none());
    }
}
