#!/usr/bin/env bash
# Side-by-side benchmark of the per-measurement overhead: our runners
# (runner_bench: LocalRunner, RpcRunner on 1 and 2 servers) vs TVM's
# meta-schedule LocalRunner / RPCRunner (bench/runner_tvm.py), RUNS runs
# each (default 3), alternating, then the medians and ratios.
# Results land in bench/out/. Works from any cwd.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bench/out
runs=${RUNS:-3}

# TVM_PYTHON: a Python with apache-tvm 0.27 (default: bench/.venv, made by setup_tvm.sh).
if [[ -z "${TVM_PYTHON:-}" ]]; then
    bench/setup_tvm.sh
fi
py=${TVM_PYTHON:-bench/.venv/bin/python}
cargo build --release -q -p rpc-runner --example runner_bench

for i in $(seq "$runs"); do
    echo "runner.sh: run $i of $runs: ours" >&2
    target/release/examples/runner_bench --runs 1 > "bench/out/runner_ours_$i.json"
    echo "runner.sh: run $i of $runs: TVM" >&2
    "$py" bench/runner_tvm.py --runs 1 > "bench/out/runner_tvm_$i.json" 2>/dev/null
done

python3 - "$runs" <<'PY'
import json, statistics, sys
runs = int(sys.argv[1])
load = lambda side, i: json.load(open(f"bench/out/runner_{side}_{i}.json"))
ours = [load("ours", i) for i in range(1, runs + 1)]
tvm = [load("tvm", i) for i in range(1, runs + 1)]
goals = ours[0]["goals_s"]
med = lambda xs: statistics.median(x for x in xs if x is not None)
print("| runner | ours (median wall) | ours (median measurement) | TVM 0.27 | TVM / ours | ours / goal |")
print("|---|---:|---:|---:|---:|---:|")
for k in ("local", "rpc_1_server", "rpc_2_servers", "rpc_1_server_no_spare"):
    o = med(r["overhead_per_measurement_s"][k] for r in ours)
    m = med(r["overhead_median_per_measurement_s"][k] for r in ours)
    t = med(r["overhead_per_measurement_s"].get(k) for r in tvm) if k in tvm[0]["overhead_per_measurement_s"] else None
    g = goals.get(k)
    print(f"| {k} | {o*1e3:.2f} ms | {m*1e3:.2f} ms | {'' if t is None else f'{t*1e3:.1f} ms'} | "
          f"{'' if t is None else f'{t/o:.0f}x'} | {'' if g is None else f'{o/g:.1f}'} |")
for k in sorted(k for k in ours[0] if "worker_start" in k):
    print(f"{k}: {med(r[k] for r in ours)*1e3:.2f} ms")
for k in ("local", "rpc_1_server", "rpc_2_servers"):
    c = [r.get("cpu_per_measurement_s", {}).get(k) for r in ours]
    if all(c):
        print(f"CPU per measurement ({k}): this process {med(x['process'] for x in c)*1e3:.2f} ms, "
              f"its workers {med(x['workers'] for x in c)*1e3:.2f} ms (the kernel's 0.40 ms included)")
print("alloc median (rpc_1_server):", f"{med(r['stages_s']['rpc_1_server']['alloc'] for r in ours)*1e3:.2f} ms")
print("loopback TCP round trip:", f"{med(r['limit_tcp_rtt_s'] for r in ours)*1e6:.1f} us")
print("load (1 min):", [r["load"] for r in ours], [r["load"] for r in tvm])
PY
