#!/usr/bin/env bash
# Create (or reuse) bench/.venv with Apache TVM installed, for the peer
# benchmarks in this directory. Idempotent: if the venv already imports
# tvm's PopenPoolExecutor, it returns immediately.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$BENCH_DIR/.venv"
PY="$VENV/bin/python"
PKGS=(apache-tvm==0.27.0.post1 cloudpickle psutil tornado)
CHECK='import tvm; from tvm.support.popen_pool import PopenPoolExecutor; print(tvm.__version__)'

die() { echo "setup_tvm.sh: error: $*" >&2; exit 1; }

if [[ -x "$PY" ]] && ver="$("$PY" -c "$CHECK" 2>/dev/null)"; then
    echo "setup_tvm.sh: reusing $VENV (tvm $ver)" >&2
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found"
if [[ ! -x "$PY" ]]; then
    echo "setup_tvm.sh: creating virtualenv $VENV" >&2
    python3 -m venv "$VENV" || die "python3 -m venv failed (is the venv module installed?)"
fi

echo "setup_tvm.sh: installing ${PKGS[*]}" >&2
"$PY" -m pip install -q --disable-pip-version-check "${PKGS[@]}" \
    || die "pip install failed"

ver="$("$PY" -c "$CHECK")" || die "installed, but this fails in $VENV: $CHECK"
echo "setup_tvm.sh: ok (tvm $ver)" >&2
