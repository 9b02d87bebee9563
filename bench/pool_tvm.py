#!/usr/bin/env python3
"""Benchmark Apache TVM's tvm.support.popen_pool.PopenPoolExecutor.

Peer side of bench/pool.sh; prints ONE JSON line to stdout (progress goes to
stderr) with these keys (all floats, each the median over up to 3 reps):

  cold_start_s                   PopenPoolExecutor(max_workers=2) construction
                                 until the first identity task's result is back
  submit_tasks_per_s             warm 2-worker pool: N identity tasks submitted
                                 one by one, then all results collected
  map_tasks_per_s                same pool: list(map_with_error_catching(...))
  timeout_50ms_observed_s        1 worker, timeout=0.05: submit(sleep_fn, 10)
                                 until .result() raises TimeoutError
  respawn_after_timeout_s        next identity task on that pool (the worker
                                 was killed, so this includes a respawn)
  recycle_every_task_s_per_task  2 workers, maximum_process_uses=1: M identity
                                 tasks, elapsed / M

Run with the venv made by bench/setup_tvm.sh: bench/.venv/bin/python bench/pool_tvm.py
"""

import json
import os
import statistics
import sys
import time

from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

N = 2000  # tasks for the throughput metrics
M = 100  # tasks for the recycle metric
REPS = 3
RECYCLE_BUDGET_S = 60.0  # stop recycle reps early once this much time is spent

# Worker stdout goes to our stderr so nothing can pollute the JSON line.
WORKER_IO = dict(stdout=sys.stderr.fileno())


def identity(x):
    return x


def sleep_fn(seconds):
    time.sleep(seconds)
    return seconds


def sleep_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def log(msg):
    print(f"[pool_tvm {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return float(statistics.median(xs))


def warm(pool, workers):
    """Run tasks until `workers` distinct worker processes have answered."""
    pids = set()
    while len(pids) < workers:
        futs = [pool.submit(sleep_pid, 0.05) for _ in range(2 * workers)]
        pids.update(f.result() for f in futs)


def bench_cold_start():
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        pool = PopenPoolExecutor(max_workers=2, **WORKER_IO)
        assert pool.submit(identity, 1).result() == 1
        times.append(time.perf_counter() - t0)
        pool.shutdown()
    return median(times)


def bench_throughput():
    pool = PopenPoolExecutor(max_workers=2, **WORKER_IO)
    warm(pool, 2)
    submit, mapped = [], []
    for _ in range(REPS):
        t0 = time.perf_counter()
        futs = [pool.submit(identity, i) for i in range(N)]
        results = [f.result() for f in futs]
        submit.append(N / (time.perf_counter() - t0))
        assert results == list(range(N))
    for _ in range(REPS):
        t0 = time.perf_counter()
        results = list(pool.map_with_error_catching(identity, range(N)))
        mapped.append(N / (time.perf_counter() - t0))
        assert all(r.status == StatusKind.COMPLETE for r in results)
        assert [r.value for r in results] == list(range(N))
    pool.shutdown()
    return median(submit), median(mapped)


def bench_timeout():
    pool = PopenPoolExecutor(max_workers=1, timeout=0.05, **WORKER_IO)
    observed, respawn = [], []
    for _ in range(REPS):
        assert pool.submit(identity, 1).result() == 1
        t0 = time.perf_counter()
        fut = pool.submit(sleep_fn, 10)
        try:
            fut.result()
            raise AssertionError("sleep_fn(10) did not time out")
        except TimeoutError:
            pass
        t1 = time.perf_counter()
        assert pool.submit(identity, 2).result() == 2
        t2 = time.perf_counter()
        observed.append(t1 - t0)
        respawn.append(t2 - t1)
    pool.shutdown()
    return median(observed), median(respawn)


def bench_recycle():
    pool = PopenPoolExecutor(max_workers=2, maximum_process_uses=1, **WORKER_IO)
    warm(pool, 2)
    per_task, spent = [], 0.0
    while len(per_task) < REPS and (not per_task or spent < RECYCLE_BUDGET_S):
        t0 = time.perf_counter()
        futs = [pool.submit(identity, i) for i in range(M)]
        assert [f.result() for f in futs] == list(range(M))
        elapsed = time.perf_counter() - t0
        spent += elapsed
        per_task.append(elapsed / M)
        log(f"  recycle rep {len(per_task)}: {elapsed:.1f}s for {M} tasks")
    pool.shutdown()
    return median(per_task)


def main():
    out = {}
    log("cold start")
    out["cold_start_s"] = bench_cold_start()
    log(f"throughput (N={N})")
    out["submit_tasks_per_s"], out["map_tasks_per_s"] = bench_throughput()
    log("timeout + respawn")
    out["timeout_50ms_observed_s"], out["respawn_after_timeout_s"] = bench_timeout()
    log(f"recycle every task (M={M})")
    out["recycle_every_task_s_per_task"] = bench_recycle()
    log("done")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    T0 = time.perf_counter()
    main()
