#!/usr/bin/env bash
# Side-by-side benchmark: our popen-pool crate vs Apache TVM's PopenPoolExecutor.
# Both sides print one JSON line with the same keys (see bench/pool_tvm.py for
# what each key measures); compare.py renders them as a Markdown table.
# Results land in bench/out/. Works from any cwd.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bench/out

bench/setup_tvm.sh

echo "pool.sh: running TVM PopenPoolExecutor bench (~1.5 min)" >&2
bench/.venv/bin/python bench/pool_tvm.py > bench/out/pool_tvm.json

echo "pool.sh: running popen-pool bench" >&2
cargo run --release -q -p popen-pool --example pool_bench > bench/out/pool_ours.json

python3 bench/compare.py bench/out/pool_ours.json bench/out/pool_tvm.json \
    --title "popen-pool vs TVM PopenPoolExecutor"
