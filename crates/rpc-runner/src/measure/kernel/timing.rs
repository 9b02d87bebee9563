//! The time evaluator's loop (TVM's semantics) and the tasks' worker-side bodies.

use super::buffers::ArgSet;
use super::env::{EnvProbe, Environment};
use super::env::{context_switches, thread_cpu_time};
use super::realtime::maybe_realtime;
use super::rounds::{BatchTime, RoundsOut, StopReason, run_rounds};
use super::*;

/// The next `number` after a batch of `number` calls took `batch`, shorter
/// than `min_repeat_ms`.
///
/// TVM's formula (`WrapTimeEvaluator` in `src/runtime/profiling.cc`, formerly
/// `rpc_module.cc`), truncated to an integer as its `static_cast<int>`:
///
/// ```text
/// number = max(min_repeat_ms / (batch_ms / number) + 1, number * 1.618)
/// ```
///
/// On a zero reading TVM keeps `number` and retries; we grow it to
/// `max(number + 1, number * 1.618)` so a coarse clock gets a longer batch.
pub(super) fn next_number(number: u32, batch: Duration, min_repeat_ms: u64) -> u32 {
    let n = f64::from(number);
    let grown = if batch.is_zero() {
        (n * GOLDEN_RATIO).max(n + 1.0)
    } else {
        let batch_ms = batch.as_nanos() as f64 / 1e6;
        (min_repeat_ms as f64 / (batch_ms / n) + 1.0).max(n * GOLDEN_RATIO)
    };
    // `as` truncates toward zero and saturates at u32::MAX.
    grown as u32
}

pub(super) fn check_config(cfg: &EvaluatorConfig) -> Result<(), KernelError> {
    if cfg.number == 0 {
        return Err(KernelError::BadConfig("number must be at least 1".into()));
    }
    if cfg.repeat == 0 {
        return Err(KernelError::BadConfig("repeat must be at least 1".into()));
    }
    Ok(())
}

/// TVM's time evaluator over one argument set, on a closure.
///
/// `call` runs the kernel once (`Err(code)` for a nonzero return); `flush`
/// runs before each timed batch when the config asks for a cache flush.
/// `number` starts at the config's value for the first set and carries the
/// grown value from set to set.
pub(super) fn time_batches(
    cfg: &EvaluatorConfig,
    number: &mut u32,
    mut call: impl FnMut() -> Result<(), i32>,
    flush: impl FnMut(),
) -> Result<Vec<f64>, KernelError> {
    // The discarded warm-up call.
    call().map_err(KernelError::Kernel)?;
    run_batches(
        cfg,
        number,
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                call()?;
            }
            Ok(start.elapsed())
        },
        flush,
        std::thread::sleep,
    )
}

/// The batch loop of [`time_batches`], over `batch(number) -> elapsed`, so
/// it can be tested with a fake clock.
pub(super) fn run_batches(
    cfg: &EvaluatorConfig,
    number: &mut u32,
    mut batch: impl FnMut(u32) -> Result<Duration, i32>,
    mut flush: impl FnMut(),
    mut pause: impl FnMut(Duration),
) -> Result<Vec<f64>, KernelError> {
    check_config(cfg)?;
    *number = (*number).max(1);
    let min_ms = cfg.min_repeat_ms as f64;
    let mut costs = Vec::with_capacity(cfg.repeat.min(PREALLOC) as usize);
    for i in 0..cfg.repeat {
        if i > 0 && cfg.cooldown_ms > 0 {
            pause(Duration::from_millis(cfg.cooldown_ms));
        }
        let mut zero_batches = 0;
        let elapsed = loop {
            if cfg.enable_cpu_cache_flush {
                flush();
            }
            let elapsed = batch(*number).map_err(KernelError::Kernel)?;
            if elapsed.as_nanos() as f64 / 1e6 >= min_ms {
                break elapsed;
            }
            if elapsed.is_zero() {
                zero_batches += 1;
                if zero_batches >= MAX_ZERO_TIME_BATCHES {
                    return Err(KernelError::ZeroTime(zero_batches, *number));
                }
            } else {
                zero_batches = 0;
            }
            *number = next_number(*number, elapsed, cfg.min_repeat_ms);
        };
        costs.push(elapsed.as_secs_f64() / f64::from(*number));
    }
    Ok(costs)
}

pub(super) fn time_kernel(
    cfg: &EvaluatorConfig,
    ctx: &mut WorkerContext,
) -> Result<Timing, KernelError> {
    check_config(cfg)?;
    // The library stays in the context, untouched, for the whole task.
    let entry = ctx.get::<LoadedKernel>().ok_or(KernelError::NoKernel)?.entry;
    let sets = ctx.get_mut::<ArgSets>().ok_or(KernelError::NoArgs)?;
    if cfg.adaptive.is_some() {
        let (mut out, env) = time_subjects(cfg, &mut [(entry, sets)], 0)?;
        return out.pop().unwrap_or(Err(KernelError::NoArgs)).map(|o| Timing::of(o, env));
    }
    let huge_pages = sets.sets.iter().all(|s| s.huge_pages);
    let probe = EnvProbe::start();
    let mut number = cfg.number;
    let (costs, realtime, warning) =
        maybe_realtime(cfg.realtime, || tvm_loop(cfg, entry, sets, &mut number));
    let costs = costs?;
    let pauses = (costs.len().saturating_sub(1) as u64).saturating_mul(cfg.cooldown_ms);
    let mut env =
        probe.finish(realtime, Duration::from_millis(pauses), warning.into_iter().collect());
    env.huge_pages = huge_pages;
    Ok(Timing { costs, number, stop: StopReason::Repeat, preempted: 0, env })
}

/// TVM's evaluator over every argument set in turn.
fn tvm_loop(
    cfg: &EvaluatorConfig,
    entry: EntryFn,
    sets: &mut ArgSets,
    number: &mut u32,
) -> Result<Vec<f64>, KernelError> {
    let mut costs =
        Vec::with_capacity(sets.sets.len().saturating_mul(cfg.repeat.min(PREALLOC) as usize));
    for (i, set) in sets.for_kernel().iter_mut().enumerate() {
        if i > 0 && cfg.cooldown_ms > 0 {
            std::thread::sleep(Duration::from_millis(cfg.cooldown_ms));
        }
        let (tensors, num_args) = set.raw_args();
        let mut flusher = CacheFlush::new(&set.bufs);
        // SAFETY: see `call_entry`.
        let call = || unsafe { call_entry(entry, tensors, num_args) };
        costs.extend(time_batches(cfg, number, call, || flusher.flush())?);
    }
    Ok(costs)
}

/// Calls a kernel's entry once.
///
/// # Safety
///
/// `entry` comes from a library kept loaded for the whole call; `tensors`
/// points to `num_args` DLTensors whose data and shape pointers point into
/// live buffers of the sizes they describe. What the kernel does with them
/// is beyond our control: a bad kernel can only crash this worker process,
/// which is what session workers are for.
unsafe fn call_entry(entry: EntryFn, tensors: *mut DLTensor, num_args: i32) -> Result<(), i32> {
    // SAFETY: the caller's promise above.
    let rc = unsafe { entry(tensors, num_args) };
    if rc == 0 { Ok(()) } else { Err(rc) }
}

/// Times several kernels, each over its own argument sets, with the
/// adaptive / interleaved loop ([`run_rounds`]), recording the environment
/// once around all of it.
pub(super) fn time_subjects(
    cfg: &EvaluatorConfig,
    subjects: &mut [(EntryFn, &mut ArgSets)],
    order_seed: u64,
) -> Result<(Vec<Result<RoundsOut, KernelError>>, Environment), KernelError> {
    // Raw argument pointers first (they need `&mut`), then the flushers'
    // shared borrows of the buffers.
    let raw: Vec<Vec<(*mut DLTensor, i32)>> = subjects
        .iter_mut()
        .map(|(_, sets)| sets.for_kernel().iter_mut().map(ArgSet::raw_args).collect())
        .collect();
    let entries: Vec<EntryFn> = subjects.iter().map(|(e, _)| *e).collect();
    let mut flushers: Vec<Vec<CacheFlush<'_>>> = subjects
        .iter()
        .map(|(_, sets)| sets.sets.iter().map(|s| CacheFlush::new(&s.bufs)).collect())
        .collect();
    let nsets: Vec<usize> = raw.iter().map(Vec::len).collect();
    let huge_pages = subjects.iter().all(|(_, sets)| sets.sets.iter().all(|s| s.huge_pages));
    let probe = EnvProbe::start();
    let mut paused = Duration::ZERO;
    let (out, realtime, warning) = maybe_realtime(cfg.realtime, || {
        run_rounds(
            cfg,
            &nsets,
            order_seed,
            |c, s, n| {
                let (tensors, num_args) = raw[c][s];
                let switches0 = context_switches();
                let cpu0 = thread_cpu_time();
                let start = Instant::now();
                for _ in 0..n {
                    // SAFETY: see `call_entry`; the libraries and argument
                    // sets are borrowed by `subjects` for this whole call.
                    unsafe { call_entry(entries[c], tensors, num_args) }?;
                }
                let wall = start.elapsed();
                let cpu = cpu0.zip(thread_cpu_time()).map(|(a, b)| b.saturating_sub(a));
                let switches = switches0
                    .zip(context_switches())
                    .map(|((v0, i0), (v1, i1))| (v1.saturating_sub(v0), i1.saturating_sub(i0)));
                Ok(BatchTime { wall, cpu, switches })
            },
            |c, s| flushers[c][s].flush(),
            |d| {
                paused += d;
                std::thread::sleep(d);
            },
        )
    });
    let mut env = probe.finish(realtime, paused, warning.into_iter().collect());
    env.huge_pages = huge_pages;
    Ok((out?, env))
}

pub(super) fn read_arg(
    task: ReadArg,
    ctx: &WorkerContext,
) -> Result<serde_bytes::ByteBuf, KernelError> {
    let sets = &ctx.get::<ArgSets>().ok_or(KernelError::NoArgs)?.sets;
    super::candidates::read_from(sets, task.set, task.index)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn config(number: u32, repeat: u32, min_repeat_ms: u64) -> EvaluatorConfig {
        EvaluatorConfig { number, repeat, min_repeat_ms, ..Default::default() }
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn next_number_is_tvms_formula() {
        // max(100 / (1 / 3) + 1, 3 * 1.618) = 301
        assert_eq!(next_number(3, Duration::from_millis(1), 100), 301);
        // max(100 / (60 / 10) + 1, 16.18) = max(17.67, 16.18) -> 17
        assert_eq!(next_number(10, Duration::from_millis(60), 100), 17);
        // max(100 / (99 / 100) + 1, 161.8) -> 161: the golden ratio wins
        assert_eq!(next_number(100, Duration::from_millis(99), 100), 161);
        // Zero time: grow by the golden ratio, at least by one.
        assert_eq!(next_number(1, Duration::ZERO, 100), 2);
        assert_eq!(next_number(10, Duration::ZERO, 100), 16);
        // Saturates instead of wrapping.
        assert_eq!(next_number(u32::MAX, Duration::from_nanos(1), 100), u32::MAX);
    }

    #[test]
    fn short_batches_grow_number_which_stays_grown() {
        let cfg = config(3, 3, 1);
        let mut number = cfg.number;
        let mut batches = Vec::new();
        let flushes = Cell::new(0);
        // Each call takes 1 µs on the fake clock.
        let costs = run_batches(
            &cfg,
            &mut number,
            |n| {
                batches.push(n);
                Ok(us(u64::from(n)))
            },
            || flushes.set(flushes.get() + 1),
            |_| panic!("no cooldown configured"),
        )
        .unwrap();
        // 3 µs < 1 ms -> max(1 / (0.003 / 3) + 1, 4.854) = 1001 -> 1001 µs >= 1 ms.
        assert_eq!(batches, vec![3, 1001, 1001, 1001]);
        assert_eq!(number, 1001);
        assert_eq!(costs.len(), 3);
        for c in costs {
            assert!((c - 1e-6).abs() < 1e-12, "{c}");
        }
        assert_eq!(flushes.get(), 0, "the cache flush is off by default");
    }

    #[test]
    fn repeat_cooldown_and_flush() {
        let mut cfg = config(2, 4, 0);
        cfg.cooldown_ms = 7;
        cfg.enable_cpu_cache_flush = true;
        let mut number = cfg.number;
        let mut pauses = Vec::new();
        let flushes = Cell::new(0);
        let costs = run_batches(
            &cfg,
            &mut number,
            |n| Ok(us(10 * u64::from(n))),
            || flushes.set(flushes.get() + 1),
            |d| pauses.push(d),
        )
        .unwrap();
        assert_eq!(costs, vec![10e-6; 4]);
        assert_eq!(pauses, vec![Duration::from_millis(7); 3], "between batches only");
        assert_eq!(flushes.get(), 4, "before each batch");
    }

    #[test]
    fn zero_time_batches_are_bounded() {
        let cfg = config(1, 2, 10);
        let mut number = cfg.number;
        let mut batches = Vec::new();
        let err = run_batches(
            &cfg,
            &mut number,
            |n| {
                batches.push(n);
                Ok(Duration::ZERO)
            },
            || {},
            |_| {},
        )
        .unwrap_err();
        assert_eq!(err.kind(), "timer_error");
        assert_eq!(batches.len(), MAX_ZERO_TIME_BATCHES as usize);
        assert_eq!(&batches[..5], &[1, 2, 3, 4, 6]);
        assert!(err.to_string().contains("zero for 10 batches"), "{err}");

        // Without a minimum, a zero reading is accepted as in TVM.
        let mut number = 1;
        let costs =
            run_batches(&config(1, 2, 0), &mut number, |_| Ok(Duration::ZERO), || {}, |_| {})
                .unwrap();
        assert_eq!(costs, vec![0.0, 0.0]);
    }

    #[test]
    fn a_kernel_error_stops_timing() {
        let cfg = config(1, 5, 0);
        let mut calls = 0;
        let err = time_batches(
            &cfg,
            &mut 1,
            || {
                calls += 1;
                if calls == 3 { Err(3) } else { Ok(()) }
            },
            || {},
        )
        .unwrap_err();
        assert_eq!(err, KernelError::Kernel(3));
        assert_eq!(err.to_string(), "kernel returned error 3");
        assert_eq!(err.kind(), failure_kind::KERNEL_ERROR);
        assert_eq!(calls, 3);
        // The warm-up call counts too.
        let err = time_batches(&cfg, &mut 1, || Err(-1), || {}).unwrap_err();
        assert_eq!(err, KernelError::Kernel(-1));
    }

    #[test]
    fn bad_configs_are_refused() {
        for cfg in [config(0, 1, 0), config(1, 0, 0)] {
            let err = time_batches(&cfg, &mut 1, || Ok(()), || {}).unwrap_err();
            assert_eq!(err.kind(), "bad_config", "{err}");
        }
    }

    #[test]
    fn a_tiny_call_gets_a_large_number() {
        let cfg = config(3, 2, 5);
        let mut number = cfg.number;
        let mut calls = 0u64;
        let costs = time_batches(
            &cfg,
            &mut number,
            || {
                calls += 1;
                std::hint::black_box(calls);
                Ok(())
            },
            || {},
        )
        .unwrap();
        assert_eq!(costs.len(), 2);
        assert!(number > 1000, "number grew to {number}");
        assert!(calls > 2 * u64::from(number), "{calls} calls");
        for c in costs {
            assert!(c > 0.0 && c < 1e-5, "{c}");
        }
    }

    #[test]
    fn a_spinning_call_is_timed() {
        let cfg = config(3, 5, 0);
        let mut calls = 0;
        let costs = time_batches(
            &cfg,
            &mut 3,
            || {
                calls += 1;
                let start = Instant::now();
                while start.elapsed() < us(200) {
                    std::hint::spin_loop();
                }
                Ok(())
            },
            || {},
        )
        .unwrap();
        assert_eq!(calls, 1 + 5 * 3);
        let mut sorted = costs.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[2];
        assert!((200e-6..400e-6).contains(&median), "{costs:?}");
    }
}
