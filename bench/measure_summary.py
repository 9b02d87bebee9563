#!/usr/bin/env python3
"""Print a Markdown table of measure_bench results: the median over runs of
every key per mode, and the ratios ours / tvm_mode, ours / harness_free and
(when the runs had TVM) ours / tvm_server
(ratio of those medians; for errors, noise, CV, shift and time lower is
better, for kendall_tau_min, top1_agreement and unstable_flagged higher is).

usage: measure_summary.py RESULT_JSON_FILE...
"""

import json
import math
import statistics
import sys

MODES = ["ours", "tvm_mode", "harness_free"]


def load(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    return json.loads(lines[-1])


def sig(x, digits=3):
    if x is None:
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def med(values):
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(values) if values else None


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main():
    runs = [load(p) for p in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    keys = [k for k, v in runs[0]["ours"].items() if not isinstance(v, dict)]
    # TVM's own server and evaluator, when the runs had TVM.
    modes = MODES + (["tvm_server"] if all("tvm_server" in r for r in runs) else [])
    peers = modes[1:]
    print(f"### measure_bench: median of {len(runs)} run(s)\n")
    print("| metric | " + " | ".join(modes) + " | " + " | ".join(f"ours / {p}" for p in peers) + " |")
    print("|---|" + "---:|" * (len(modes) + len(peers)))
    for k in keys:
        m = {mode: med([r[mode].get(k) for r in runs]) for mode in modes}
        cells = [sig(m[mode]) for mode in modes]
        if k == "kendall_candidates":  # a count, not a figure
            cells += [""] * len(peers)
        else:
            cells += [sig(ratio(m["ours"], m[p])) for p in peers]
        print(f"| `{k}` | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{r['load']['before']}→{r['load']['after']}" for r in runs)
    print(
        f"\n{runs[0]['cpus']} online CPUs, measuring on CPU {runs[0].get('measure_cpu')}; "
        f"quick: {json.dumps(runs[0]['quick'])}; 1-minute loadavg before→after each run: {loads}."
    )


if __name__ == "__main__":
    main()
