#!/usr/bin/env bash
# Side-by-side benchmark: our rpc-runner crate vs Apache TVM's RPC tracker +
# RPC server. Both sides print one JSON line with the same keys (see
# bench/rpc_tvm.py for what each key measures and how the TVM processes are
# launched); compare.py renders them as a Markdown table.
# Results land in bench/out/. Works from any cwd.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bench/out

bench/setup_tvm.sh

echo "rpc.sh: running TVM tracker + RPC server bench (~1-1.5 min)" >&2
bench/.venv/bin/python bench/rpc_tvm.py > bench/out/rpc_tvm.json

echo "rpc.sh: running rpc-runner bench" >&2
cargo run --release -q -p rpc-runner --example rpc_bench > bench/out/rpc_ours.json

python3 bench/compare.py bench/out/rpc_ours.json bench/out/rpc_tvm.json \
    --title "rpc-runner vs TVM tracker + RPC server"
