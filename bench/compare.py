#!/usr/bin/env python3
"""Print a Markdown table comparing two one-object JSON benchmark results.

usage: compare.py OURS_JSON_FILE PEER_JSON_FILE [--title T] [--peer-name NAME]

Generic over key sets. "ratio" is how many times better we are:
  keys ending in _per_s (rates, higher is better):  ours / peer
  all other keys (times, lower is better):          peer / ours
Keys present on only one side show "n/a". Keys ending in _s are shown in
ms/us when below one second.
"""

import argparse
import json
import math


def load(path):
    with open(path) as f:
        text = f.read().strip()
    # Tolerate noise before the result: take the last non-empty line if needed.
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def sig(x, digits=3):
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def fmt(key, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    if key.endswith("_per_s"):
        return sig(value)
    if key.endswith("_s") or "_s_" in key:
        a = abs(value)
        if a >= 1 or a == 0:
            return f"{sig(value)} s"
        if a >= 1e-3:
            return f"{sig(value * 1e3)} ms"
        return f"{sig(value * 1e6)} µs"
    return sig(value)


def ratio(key, ours, peer):
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, peer))
    if not nums:
        return "n/a"
    num, den = (ours, peer) if key.endswith("_per_s") else (peer, ours)
    if den == 0:
        return "n/a"
    return f"{sig(num / den)}×"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ours")
    ap.add_argument("peer")
    ap.add_argument("--title")
    ap.add_argument("--peer-name", default="TVM")
    args = ap.parse_args()
    ours, peer = load(args.ours), load(args.peer)

    keys = list(ours) + [k for k in peer if k not in ours]
    if args.title:
        print(f"### {args.title}\n")
    print(f"| metric | tuning-harness | {args.peer_name} | ratio |")
    print("|---|---:|---:|---:|")
    for k in keys:
        o, p = ours.get(k), peer.get(k)
        print(f"| `{k}` | {fmt(k, o)} | {fmt(k, p)} | {ratio(k, o, p)} |")
    print("\nratio = times better for tuning-harness (rates: ours/peer; times: peer/ours).")


if __name__ == "__main__":
    main()
