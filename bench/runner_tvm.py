#!/usr/bin/env python3
"""Per-measurement overhead of Apache TVM's meta-schedule runners.

Peer side of runner_bench (crates/rpc-runner/examples/runner_bench.rs);
prints ONE JSON line with `overhead_per_measurement_s` as
{"local": .., "rpc_1_server": .., "rpc_2_servers": ..}: wall time per
candidate minus the kernel's own calls, median over runs.

Workload: runner_bench's as far as TVM allows: three float32 [256, 256]
arguments, EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0), one
candidate per RunnerInput, N in a row per run. The kernel is TVM's own
`C = A + B` built with its LLVM (TVM cannot load our busy-wait); its time
(run_secs, a few us) times 2 calls (TVM's evaluator also makes one warm-up
call) is subtracted, as runner_bench subtracts 2 x 200 us.

RPC: a tracker and one or two servers, `python -m tvm.exec.rpc_tracker` /
`rpc_server`, as bench/rpc_tvm.py starts them (own process groups, killed
at the end). Run: bench/.venv/bin/python bench/runner_tvm.py [--quick]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rpc_tvm import Child, free_port, tcp_accepts  # noqa: E402

import tvm  # noqa: E402
from tvm import te  # noqa: E402
from tvm.s_tir.meta_schedule.arg_info import TensorInfo  # noqa: E402
from tvm.s_tir.meta_schedule.runner import (  # noqa: E402
    EvaluatorConfig,
    LocalRunner,
    RPCConfig,
    RPCRunner,
    RunnerInput,
)

HOST = "127.0.0.1"
KEY = "runner-bench"


def log(msg):
    print(f"runner_tvm: {msg}", file=sys.stderr, flush=True)


def build(path):
    a = te.placeholder((256, 256), "float32", name="A")
    b = te.placeholder((256, 256), "float32", name="B")
    c = te.compute((256, 256), lambda i, j: a[i, j] + b[i, j], name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    tvm.compile(mod, target="llvm").export_library(path)


def inputs(path, n):
    args = [TensorInfo("float32", [256, 256]) for _ in range(3)]
    return [RunnerInput(path, "cpu", args) for _ in range(n)]


def evaluator():
    return EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)


def measure(runner, path, n, parallel):
    for f in runner.run(inputs(path, max(1, int(parallel)))):  # warm
        f.result()
    t = time.perf_counter()
    results = [f.result() for f in runner.run(inputs(path, n))]
    wall = time.perf_counter() - t
    errors = [r.error_msg for r in results if r.error_msg]
    if errors:
        raise RuntimeError(errors[0][:2000])
    kernel = statistics.median(float(r.run_secs[0]) for r in results)
    return wall / n - 2 * kernel / parallel


def wait_port(child, limit=20.0):
    deadline = time.monotonic() + limit
    while child.bound_port is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if child.bound_port is None:
        raise RuntimeError(f"{child.name} did not bind")
    return child.bound_port


def rpc(path, n, servers):
    port = free_port()
    children = []
    try:
        tracker = Child("tracker", "tvm.exec.rpc_tracker",
                        ["--host", HOST, "--port", port, "--port-end", port + 10])
        children.append(tracker)
        tport = wait_port(tracker)
        while not tcp_accepts(tport):
            time.sleep(0.02)
        for i in range(servers):
            sport = free_port()
            children.append(Child(f"server{i}", "tvm.exec.rpc_server",
                                  ["--tracker", f"{HOST}:{tport}", "--key", KEY, "--host", HOST,
                                   "--port", sport, "--port-end", sport + 10]))
        cfg = RPCConfig(tracker_host=HOST, tracker_port=tport, tracker_key=KEY,
                        session_timeout_sec=60)
        deadline = time.monotonic() + 30
        while True:
            summary = cfg.connect_tracker().summary()
            free = summary["queue_info"].get(KEY, {}).get("free", 0)
            if free >= servers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"servers did not register: {summary}")
            time.sleep(0.1)
        runner = RPCRunner(cfg, evaluator_config=evaluator(), max_workers=servers)
        return measure(runner, path, n, servers)
    finally:
        for c in children:
            c.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=0)
    opts = ap.parse_args()
    runs = opts.runs or (1 if opts.quick else 3)
    n = 16 if opts.quick else 64
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "add.so")
        build(path)
        out = {"local": [], "rpc_1_server": [], "rpc_2_servers": []}
        for r in range(runs):
            log(f"run {r + 1} of {runs}: local")
            out["local"].append(measure(LocalRunner(timeout_sec=60, evaluator_config=evaluator()),
                                        path, n, 1))
            for name, servers in (("rpc_1_server", 1), ("rpc_2_servers", 2)):
                log(f"run {r + 1} of {runs}: {name}")
                out[name].append(rpc(path, n, servers))
    print(json.dumps({
        "overhead_per_measurement_s": {k: statistics.median(v) for k, v in out.items()},
        "overhead_runs_s": out,
        "candidates_per_run": n,
        "runs": runs,
        "tvm": tvm.__version__,
        "load": {"before": load_before, "after": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
