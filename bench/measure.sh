#!/usr/bin/env bash
# Measurement-fidelity benchmark: runs the measure_bench example (release)
# three times, saves each JSON line to bench/out/measure_<n>.json and prints
# a Markdown table of the median over the runs per key and mode, with the
# ratios ours / tvm_mode and ours / harness_free (bench/measure_summary.py).
# Extra arguments go to the example (e.g. --quick, --passes 5).
# Works from any cwd.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bench/out

cargo build --release -q -p rpc-runner --example measure_bench
files=()
for n in 1 2 3; do
    echo "measure.sh: run $n of 3" >&2
    cargo run --release -q -p rpc-runner --example measure_bench -- "$@" > "bench/out/measure_$n.json"
    files+=("bench/out/measure_$n.json")
done

python3 bench/measure_summary.py "${files[@]}"
