//! Tests of the kernel tasks on real buffers and libraries.

use super::fill::{SplitMix64, fill};
use super::flush::scratch_flush;
use super::rounds::StopReason;
use super::*;

fn config(number: u32, repeat: u32, min_repeat_ms: u64) -> EvaluatorConfig {
    EvaluatorConfig { number, repeat, min_repeat_ms, ..Default::default() }
}

fn args() -> Vec<ArgInfo> {
    vec![
        ArgInfo::tensor(DType::F32, [3, 5]),
        ArgInfo::tensor(DType::F16, [100]),
        ArgInfo::tensor(DType::I32, [7]),
        ArgInfo::tensor(DType::U8, [0, 4]),
        ArgInfo::tensor(DType::F64, Vec::<i64>::new()),
    ]
}

fn read(ctx: &WorkerContext, set: u32, index: u32) -> Vec<u8> {
    read_arg(ReadArg { set, index }, ctx).unwrap().into_vec()
}

#[test]
fn alloc_args_is_seeded_aligned_and_in_range() {
    let mut ctx = WorkerContext::default();
    AllocArgs { args: args(), alloc_repeat: 2, seed: 42 }.run(&mut ctx).unwrap();
    let sets = &ctx.get::<ArgSets>().unwrap().sets;
    assert_eq!(sets.len(), 2);
    for set in sets {
        for (t, buf) in set.tensors.iter().zip(&set.bufs) {
            assert_eq!(t.data as usize % 64, 0);
            assert_eq!(t.data, buf.ptr.as_ptr().cast());
        }
        assert_eq!(set.tensors[0].ndim, 2);
        // SAFETY: the shape pointer points at the set's own 2-element shape.
        assert_eq!(unsafe { *set.tensors[0].shape.add(1) }, 5);
        assert_eq!(set.tensors[1].dtype, DLDataType { code: 2, bits: 16, lanes: 1 });
        assert_eq!(set.tensors[4].ndim, 0);
    }
    let a = read(&ctx, 0, 0);
    assert_eq!(a.len(), 60);
    for v in a.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())) {
        assert!((1.0..10.0).contains(&v), "{v}");
    }
    for h in read(&ctx, 0, 1).chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])) {
        assert!((0x3c00..0x4900).contains(&h), "{h:#x}");
    }
    for v in read(&ctx, 1, 2).chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap())) {
        assert!((0..10).contains(&v), "{v}");
    }
    assert!(read(&ctx, 0, 3).is_empty());
    let scalar = f64::from_ne_bytes(read(&ctx, 1, 4).try_into().unwrap());
    assert!((1.0..10.0).contains(&scalar));
    assert_ne!(read(&ctx, 0, 0), read(&ctx, 1, 0), "sets are independent");

    // Same seed, same bytes; set 0 does not depend on alloc_repeat.
    let mut again = WorkerContext::default();
    AllocArgs { args: args(), alloc_repeat: 1, seed: 42 }.run(&mut again).unwrap();
    for i in 0..5 {
        assert_eq!(read(&ctx, 0, i), read(&again, 0, i));
    }
    AllocArgs { args: args(), alloc_repeat: 1, seed: 43 }.run(&mut again).unwrap();
    assert_ne!(read(&ctx, 0, 0), read(&again, 0, 0));
}

#[test]
fn alloc_args_again_for_the_same_shapes_reuses_the_buffers_and_restores_the_bytes() {
    let mut ctx = WorkerContext::default();
    AllocArgs { args: args(), alloc_repeat: 2, seed: 9 }.run(&mut ctx).unwrap();
    let fresh: Vec<Vec<u8>> = (0..5).map(|i| read(&ctx, 1, i)).collect();
    let ptr = ctx.get::<ArgSets>().unwrap().sets[1].bufs[0].ptr;
    // A kernel wrote its outputs over set 1's buffers (handed over as the
    // timing hands them to one).
    // Twice: the second refill is copied from the first's bytes.
    for round in 0..3 {
        let sets = ctx.get_mut::<ArgSets>().unwrap().for_kernel();
        for buf in &mut sets[1].bufs {
            buf.as_mut_slice().fill(0xAB);
        }
        AllocArgs { args: args(), alloc_repeat: 2, seed: 9 }.run(&mut ctx).unwrap();
        assert_eq!(ctx.get::<ArgSets>().unwrap().sets[1].bufs[0].ptr, ptr, "buffers kept");
        for (i, want) in fresh.iter().enumerate() {
            assert_eq!(&read(&ctx, 1, i as u32), want, "round {round}: argument {i} filled again");
        }
    }
    // Another seed after the copy was made: computed, not copied.
    AllocArgs { args: args(), alloc_repeat: 2, seed: 10 }.run(&mut ctx).unwrap();
    assert_ne!(read(&ctx, 1, 0), fresh[0], "seed 10's bytes");
    let mut other_ctx = WorkerContext::default();
    AllocArgs { args: args(), alloc_repeat: 2, seed: 10 }.run(&mut other_ctx).unwrap();
    assert_eq!(read(&ctx, 1, 0), read(&other_ctx, 1, 0));
    AllocArgs { args: args(), alloc_repeat: 2, seed: 9 }.run(&mut ctx).unwrap();
    // Other shapes or another alloc_repeat: new sets.
    AllocArgs { args: args(), alloc_repeat: 1, seed: 9 }.run(&mut ctx).unwrap();
    assert_eq!(ctx.get::<ArgSets>().unwrap().sets.len(), 1);
    let mut other = args();
    other[0] = ArgInfo::tensor(DType::F32, [5, 3]);
    AllocArgs { args: other, alloc_repeat: 1, seed: 9 }.run(&mut ctx).unwrap();
    assert_eq!(ctx.get::<ArgSets>().unwrap().sets[0].tensors[0].ndim, 2);
    // SAFETY: the shape pointer points at the set's own 2-element shape.
    assert_eq!(unsafe { *ctx.get::<ArgSets>().unwrap().sets[0].tensors[0].shape }, 5);
}

#[test]
fn fill_is_stable() {
    // Pinned so a change to the generator is noticed: fills are part of
    // what a tuning log reproduces.
    let mut rng = SplitMix64(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    let mut bytes = [0u8; 4];
    fill(&mut bytes, DType::I32, &mut SplitMix64(7));
    assert_eq!(i32::from_ne_bytes(bytes), (SplitMix64(7).next_u64() % 10) as i32);
}

#[test]
fn bad_alloc_args_and_read_arg_bounds() {
    let mut ctx = WorkerContext::default();
    let bad = |args: Vec<ArgInfo>, alloc_repeat| {
        AllocArgs { args, alloc_repeat, seed: 0 }.run(&mut WorkerContext::default()).unwrap_err()
    };
    assert_eq!(bad(args(), 0).kind, "bad_args");
    let err = bad(vec![ArgInfo::tensor(DType::F32, [2, -1])], 1);
    assert_eq!(err.kind, "bad_args");
    assert!(err.message.contains("negative dimension -1"), "{}", err.message);
    let err = bad(vec![ArgInfo::tensor(DType::F64, [1 << 40, 1 << 40])], 1);
    assert_eq!(err.kind, "bad_args");

    let err = ReadArg { set: 0, index: 0 }.run(&mut ctx).unwrap_err();
    assert_eq!(err.kind, "no_args");
    AllocArgs { args: args(), alloc_repeat: 2, seed: 0 }.run(&mut ctx).unwrap();
    let err = ReadArg { set: 2, index: 0 }.run(&mut ctx).unwrap_err();
    assert_eq!(err.kind, "out_of_range");
    assert_eq!(err.message, "argument set 2 out of range: there are 2");
    let err = ReadArg { set: 1, index: 5 }.run(&mut ctx).unwrap_err();
    assert_eq!(err.message, "argument 5 out of range: there are 5");
}

#[test]
fn time_kernel_needs_a_kernel_and_args() {
    let mut ctx = WorkerContext::default();
    let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
    assert_eq!(err.kind, "no_kernel");
    assert!(err.message.contains("LoadKernel"), "{}", err.message);
    ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
    let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
    assert_eq!(err.kind, "no_args");
    assert!(err.message.contains("AllocArgs"), "{}", err.message);
}

/// `c = a + b` over f32 vectors of one length; 7 on a bad signature.
unsafe extern "C" fn add_kernel(args: *mut DLTensor, num_args: i32) -> i32 {
    if num_args != 3 {
        return 7;
    }
    // SAFETY: the caller passes `num_args` tensors.
    let t = unsafe { std::slice::from_raw_parts(args, 3) };
    // SAFETY: each tensor has `ndim` dims at `shape`.
    let lens: Vec<_> = t.iter().map(|t| unsafe { *t.shape } as usize).collect();
    if t.iter().any(|t| t.ndim != 1 || t.dtype.code != 2 || t.dtype.bits != 32) {
        return 7;
    }
    // SAFETY: compact f32 tensors of `lens[i]` elements.
    let (a, b, c) = unsafe {
        (
            std::slice::from_raw_parts(t[0].data as *const f32, lens[0]),
            std::slice::from_raw_parts(t[1].data as *const f32, lens[1]),
            std::slice::from_raw_parts_mut(t[2].data as *mut f32, lens[2]),
        )
    };
    for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
        *c = a + b;
    }
    0
}

#[test]
fn time_kernel_calls_the_entry_on_each_set() {
    let mut ctx = WorkerContext::default();
    ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
    let vec = ArgInfo::tensor(DType::F32, [1000]);
    AllocArgs { args: vec![vec.clone(); 3], alloc_repeat: 2, seed: 5 }.run(&mut ctx).unwrap();
    let mut cfg = config(2, 3, 0);
    cfg.enable_cpu_cache_flush = true;
    let timing = TimeKernel { config: cfg }.run(&mut ctx).unwrap();
    let costs = timing.costs;
    assert_eq!((costs.len(), timing.stop), (6, StopReason::Repeat));
    assert!(costs.iter().all(|&c| c > 0.0 && c < 1e-3), "{costs:?}");
    let f = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
    };
    for set in 0..2 {
        let (a, b, c) = (f(read(&ctx, set, 0)), f(read(&ctx, set, 1)), f(read(&ctx, set, 2)));
        for i in 0..1000 {
            assert_eq!(c[i], a[i] + b[i]);
        }
    }
    // A bad signature is a kernel error.
    AllocArgs { args: vec![vec; 2], alloc_repeat: 1, seed: 5 }.run(&mut ctx).unwrap();
    let err = TimeKernel { config: config(1, 1, 0) }.run(&mut ctx).unwrap_err();
    assert_eq!(
        (err.kind.as_str(), err.message.as_str()),
        (failure_kind::KERNEL_ERROR, "kernel returned error 7")
    );
}

#[test]
fn missing_or_bogus_libraries_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.so");
    let err = LoadKernel::new(missing.to_str().unwrap()).run(&mut WorkerContext::default());
    let err = err.unwrap_err();
    assert_eq!(err.kind, failure_kind::LOAD_ERROR);
    assert!(err.message.contains("No such file"), "{}", err.message);
    let bogus = dir.path().join("bogus.so");
    std::fs::write(&bogus, b"not an ELF file, just text").unwrap();
    let err = LoadKernel::new(bogus.to_str().unwrap()).run(&mut WorkerContext::default());
    let err = err.unwrap_err();
    assert_eq!(err.kind, failure_kind::LOAD_ERROR);
    assert!(err.message.contains("bogus.so"), "{}", err.message);
}

#[test]
fn cache_flush_runs_on_real_buffers() {
    let bufs: Vec<_> = [0, 1, 100, 4096].map(|n| AlignedBuf::zeroed(n).unwrap()).into();
    let mut flusher = CacheFlush::new(&bufs);
    flusher.flush();
    CacheFlush::new(&[]).flush();
    let mut scratch = Vec::new();
    scratch_flush(&mut scratch);
    assert_eq!(scratch.len(), 16 << 20);
}

#[test]
fn the_adaptive_rule_times_until_quiet_and_records_the_environment() {
    let mut ctx = WorkerContext::default();
    ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
    let vec = ArgInfo::tensor(DType::F32, [1000]);
    AllocArgs { args: vec![vec; 3], alloc_repeat: 2, seed: 5 }.run(&mut ctx).unwrap();
    let stop = crate::measure::AdaptiveStop {
        target_rel_noise: 0.5,
        min_batches: 4,
        max_batches: 40,
        max_time_ms: 10_000,
    };
    let cfg =
        EvaluatorConfig { min_repeat_ms: 1, ..EvaluatorConfig::adaptive() }.with_adaptive(stop);
    let t = TimeKernel { config: cfg }.run(&mut ctx).unwrap();
    // 50% noise is reached at once (at the minimum number of batches,
    // unless a preempted batch makes the first few look noisy).
    assert_eq!(t.stop, StopReason::Converged, "{t:?}");
    assert!((4..40).contains(&t.costs.len()), "{t:?}");
    assert!(t.number > 1, "calibrated: {}", t.number);
    assert!(!t.env.cpus.is_empty() && t.env.online_cpus >= 1, "{:?}", t.env);
    assert!(!t.env.huge_pages, "12 KB sets stay in small pages");
    // An impossible target spends the batch budget.
    let stop = crate::measure::AdaptiveStop { target_rel_noise: 1e-12, max_batches: 12, ..stop };
    let cfg =
        EvaluatorConfig { min_repeat_ms: 1, ..EvaluatorConfig::adaptive() }.with_adaptive(stop);
    let t = TimeKernel { config: cfg }.run(&mut ctx).unwrap();
    assert!(matches!(t.stop, StopReason::BatchBudget | StopReason::Converged), "{t:?}");
    assert!(t.stop == StopReason::Converged || t.costs.len() == 12, "{t:?}");
}

#[test]
fn large_argument_sets_share_one_huge_page_arena() {
    let mut ctx = WorkerContext::default();
    let m = ArgInfo::tensor(DType::F32, [256, 256]);
    AllocArgs { args: vec![m; 3], alloc_repeat: 1, seed: 1 }.run(&mut ctx).unwrap();
    let set = &ctx.get::<ArgSets>().unwrap().sets[0];
    let base = set.bufs[0].ptr.as_ptr() as usize;
    assert_eq!(base % (2 << 20), 0, "2 MiB-aligned arena");
    for (i, buf) in set.bufs.iter().enumerate() {
        assert_eq!(buf.ptr.as_ptr() as usize - base, i * (256 << 10), "packed in order");
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.contains("[always]") || thp.contains("[madvise]") {
        assert!(set.huge_pages, "MADV_HUGEPAGE accepted ({thp})");
    }
}

#[test]
fn host_args_are_the_bytes_alloc_args_fills() {
    let mut ctx = WorkerContext::default();
    AllocArgs { args: args(), alloc_repeat: 2, seed: 9 }.run(&mut ctx).unwrap();
    let host = super::fill::host_args(&args(), 9).unwrap();
    for (i, bytes) in host.iter().enumerate() {
        assert_eq!(bytes, &read(&ctx, 0, i as u32), "argument {i}");
    }
    let bad = vec![ArgInfo::tensor(DType::F32, [-1])];
    assert_eq!(super::fill::host_args(&bad, 0).unwrap_err().kind, "bad_args");
}

#[test]
fn measure_kernel_runs_its_steps_in_order_and_fails_as_the_failing_step() {
    let vec = ArgInfo::tensor(DType::F32, [64]);
    let alloc = AllocArgs { args: vec![vec.clone(); 3], alloc_repeat: 1, seed: 9 };
    let reads = (0..3).map(|index| ReadArg { set: 0, index });
    let mut ctx = WorkerContext::default();
    ctx.insert(LoadedKernel { entry: add_kernel, _lib: None });
    let task = MeasureKernel::default()
        .alloc(alloc.clone())
        .time(TimeKernel { config: config(1, 2, 0) })
        .read(reads.clone());
    let out = task.run(&mut ctx).unwrap();
    assert_eq!(out.timing.as_ref().map(|t| t.costs.len()), Some(2));
    assert_eq!((out.load_s, out.outputs.len()), (0.0, 3));
    assert!(out.alloc_s > 0.0);
    // The outputs are the arguments after timing: c = a + b, as read alone.
    for (i, bytes) in out.outputs.iter().enumerate() {
        assert_eq!(bytes.as_slice(), read(&ctx, 0, i as u32).as_slice());
    }
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
    };
    let (a, b, c) = (f(&out.outputs[0]), f(&out.outputs[1]), f(&out.outputs[2]));
    assert!((0..64).all(|i| c[i] == a[i] + b[i]));

    // A failing load ends the task as `LoadKernel` would, and no kernel is
    // loaded: the later steps did not run.
    let missing = MeasureKernel::default()
        .load(LoadKernel::new("/nonexistent/kernel.so"))
        .alloc(AllocArgs { alloc_repeat: 0, ..alloc.clone() })
        .time(TimeKernel { config: config(1, 1, 0) });
    let err = missing.run(&mut ctx).unwrap_err();
    assert_eq!(err.kind, failure_kind::LOAD_ERROR, "{}", err.message);
    assert!(ctx.get::<LoadedKernel>().is_none());
    // A failing alloc (after no load) is a bad-arguments failure, and the
    // timing after it does not run (it would say `no_kernel`).
    let bad = MeasureKernel::default()
        .alloc(AllocArgs { alloc_repeat: 0, ..alloc })
        .time(TimeKernel { config: config(1, 1, 0) });
    assert_eq!(bad.run(&mut ctx).unwrap_err().kind, failure_kind::BAD_ARGS);
    // Reads out of range fail as `ReadArg` does.
    let mut ctx = WorkerContext::default();
    let err = MeasureKernel::default().read([ReadArg { set: 0, index: 0 }]).run(&mut ctx);
    assert_eq!(err.unwrap_err().kind, failure_kind::NO_ARGS);
}
