#!/usr/bin/env python3
"""Benchmark Apache TVM's own RPC tracker + RPC server on loopback.

Peer side of bench/rpc.sh; prints ONE JSON line to stdout (progress and
diagnostics go to stderr) with these keys (all floats):

  tracker_and_server_ready_s     wall time from launching the tracker process
                                 until the tracker's summary lists one free
                                 server for key "bench"; median of REPS cold
                                 starts (both processes killed and relaunched,
                                 fresh ports, every rep)
  request_release_s_per_session  steady state, one server: the time of N cycles
                                 of request -> upload 16 B -> release, / N;
                                 median of up to REPS runs (after WARMUP cycles)
  upload_mib_per_s               one 64 MiB sess.upload() over loopback, MiB/s;
                                 median of REPS uploads, each in a fresh session

How the processes are run
-------------------------
Tracker and server are separate OS processes, started the way they are
deployed:

  python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port P --port-end P+10
  python -m tvm.exec.rpc_server  --tracker 127.0.0.1:P --key bench
                                 --host 127.0.0.1 --port Q --port-end Q+10

(each of these in turn runs its real work in a tvm PopenWorker child process,
and the server forks one more process per session). Each is started in its own
session/process group so that cleanup can signal the whole tree.

Launch order: the server is launched as soon as the tracker's port accepts TCP
connections (both inside the timed interval). If the server were launched at
the same moment as the tracker, TVM's server would find the port closed and
sleep a fixed 5 s (tvm.rpc.base.connect_with_retry) before retrying, so the
result would mostly be that constant.

Readiness is polled with connect_tracker(...).summary() every ~20 ms, but only
once the tracker port accepts a plain TCP probe, because connect_tracker()
also sleeps 5 s on "connection refused". Note that one summary() round trip
itself takes ~40 ms on Linux loopback (TVM sends each JSON message as two
small writes, which meets Nagle + delayed ACK), so readiness is detected with
roughly that much lag.

How TVM releases a session
--------------------------
RPCSession has no close(). The client-side connection lives in the C++
RPC session object held by RPCSession._sess; when the last Python reference
to the RPCSession goes away (CPython refcounting; the cached remote functions
in _remote_funcs do not point back at the Python object, so there is no
cycle), the C++ session is destroyed and its socket closed. The server's
per-session child process then sees EOF and exits, the server's listen loop
joins it, deletes the session's temp dir and re-registers (PUT) a new match
key with the tracker. Only then can the tracker hand the server to the next
request; a request made earlier simply waits in the tracker's queue. The
session_timeout (20 s here) only matters if the client never disconnects.
So the benchmark releases with a plain `del sess`, as a user would.

Run with the venv made by bench/setup_tvm.sh: bench/.venv/bin/python bench/rpc_tvm.py
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

from tvm import rpc

HOST = "127.0.0.1"
KEY = "bench"
REPS = 3
N = 20  # request/release cycles per run
WARMUP = 2  # cycles before the timed runs
SESSION_TIMEOUT = 20  # seconds, passed to TrackerSession.request
POLL_S = 0.02
READY_TIMEOUT_S = 60.0  # per cold start
CYCLES_BUDGET_S = 90.0  # bound on the whole request/release phase
CYCLES_SECOND_RUN_IF_BELOW_S = 20.0  # only do more runs if one run is faster
UPLOAD_BYTES = 64 << 20
UPLOAD_BUDGET_S = 60.0
SLOW_CYCLE_S = 1.0  # cycles slower than this are reported as "blocked"

# Child log lines that are routine and only counted, not echoed.
ROUTINE = re.compile(
    r"connected from|start serving at|finish serving|If you are running ROCM|bind to "
)
BIND = re.compile(r"bind to ([0-9.]+):(\d+)")
SERVING_DIR = re.compile(r"start serving at (\S+)")
IDLE_TIMEOUT_S = 10.0  # wait for the server to finish its last session


def log(msg):
    print(f"[rpc_tvm {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return float(statistics.median(xs))


def free_port():
    """A port the kernel just handed out for an ephemeral bind (free right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tcp_accepts(port):
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Child:
    """One `python -m tvm.exec.*` process in its own process group.

    Its stdout+stderr are drained by a thread: routine INFO lines are counted,
    everything else (warnings, tracebacks, session timeouts) is echoed to our
    stderr with a prefix. The "bind to host:port" line is parsed.
    """

    def __init__(self, name, module, args):
        self.name = name
        self.bound_port = None
        self.sessions_served = 0
        self.serving_dirs = []  # per-session temp dirs the server reported
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: pgid == pid
        )
        self.pgid = self.proc.pid
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            m = BIND.search(line)
            if m and self.bound_port is None:
                self.bound_port = int(m.group(2))
            m = SERVING_DIR.search(line)
            if m:
                self.serving_dirs.append(m.group(1))
            if "finish serving" in line:
                self.sessions_served += 1
            if not ROUTINE.search(line):
                print(f"    [{self.name}] {line}", file=sys.stderr, flush=True)

    def group_alive(self):
        """True while the process group has a member that is not a zombie.

        Killed grandchildren are reparented to PID 1 and linger as zombies
        until it reaps them; they are dead, so they do not count.
        """
        if not os.path.isdir("/proc/self"):
            try:
                os.killpg(self.pgid, 0)
                return True
            except ProcessLookupError:
                return False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            # fields after "(comm)": state ppid pgrp ...
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.pgid and fields[0] not in ("Z", "X"):
                return True
        return False

    def kill(self):
        """SIGTERM the whole process group, SIGKILL whatever is left after 2 s."""
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while self.group_alive() and time.monotonic() < deadline:
                if self.proc.poll() is None:
                    try:
                        self.proc.wait(timeout=0.05)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.05)
            if not self.group_alive():
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self._drain.join(timeout=2)
        if self.group_alive():
            log(f"WARNING: process group {self.pgid} ({self.name}) still has members")
        # A server killed mid-session cannot delete that session's temp dir.
        for path in self.serving_dirs:
            if os.path.isdir(path) and os.path.basename(path).startswith("tmp"):
                log(f"  removing session dir left by killed {self.name}: {path}")
                shutil.rmtree(path, ignore_errors=True)


class Cluster:
    """A TVM tracker + one TVM RPC server (key "bench"), as separate processes."""

    def __init__(self):
        self.tracker = None
        self.server = None
        self.port = None

    def start(self, deadline):
        """Launch both; return once the tracker lists the server as free."""
        p, q = free_port(), free_port()
        self.tracker = Child(
            "tracker",
            "tvm.exec.rpc_tracker",
            ["--host", HOST, "--port", p, "--port-end", p + 10],
        )
        # Wait until the tracker listens. It binds the first free port in
        # [p, p+10); normally p itself, the log line says which.
        while True:
            port = self.tracker.bound_port or p
            if tcp_accepts(port):
                self.port = port
                break
            self._check(deadline, "tracker to listen")
            time.sleep(POLL_S)
        self.server = Child(
            "server",
            "tvm.exec.rpc_server",
            [
                "--tracker", f"{HOST}:{self.port}", "--key", KEY,
                "--host", HOST, "--port", q, "--port-end", q + 10,
            ],
        )
        ts = rpc.connect_tracker(HOST, self.port)
        try:
            while True:
                queue = ts.summary()["queue_info"].get(KEY, {})
                if queue.get("free", 0) >= 1:
                    return
                self._check(deadline, "server to register as free")
                time.sleep(POLL_S)
        finally:
            ts.close()

    def wait_idle(self, timeout_s=IDLE_TIMEOUT_S):
        """Wait until the server has re-registered as free, i.e. finished (and
        cleaned up after) its last session, so stop() does not interrupt it."""
        if self.server is None:
            return
        ts = rpc.connect_tracker(HOST, self.port)
        try:
            deadline = time.perf_counter() + timeout_s
            while ts.summary()["queue_info"].get(KEY, {}).get("free", 0) < 1:
                if time.perf_counter() > deadline:
                    log(f"WARNING: server not free again after {timeout_s:.0f} s")
                    return
                time.sleep(POLL_S)
        finally:
            ts.close()

    def _check(self, deadline, what):
        for child in (self.tracker, self.server):
            if child is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")

    def stop(self):
        for child in (self.server, self.tracker):
            if child is not None:
                child.kill()
        self.server = self.tracker = None


def run_bounded(name, budget_s, fn, cluster):
    """Run fn() in a daemon thread; if it overruns, kill the cluster (which
    unblocks or strands the thread) and return None."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported below
            box["error"] = exc

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join(budget_s)
    if t.is_alive():
        log(f"ERROR: {name} still running after {budget_s:.0f} s; killing tracker+server")
        cluster.stop()
        t.join(5)
        return None
    if "error" in box:
        log(f"ERROR: {name} failed: {box['error']!r}")
        cluster.stop()
        return None
    return box["value"]


# ---------------------------------------------------------------- phases ---


def bench_ready(reps):
    times = []
    for i in range(reps):
        cluster = Cluster()
        try:
            t0 = time.perf_counter()
            cluster.start(t0 + READY_TIMEOUT_S)
            times.append(time.perf_counter() - t0)
        finally:
            cluster.stop()
        log(f"  cold start {i + 1}/{reps}: {times[-1]:.3f} s")
    return median(times)


def cycle(ts, timings):
    t0 = time.perf_counter()
    sess = ts.request(KEY, priority=1, session_timeout=SESSION_TIMEOUT)
    t1 = time.perf_counter()
    sess.upload(bytearray(b"x" * 16), "tiny.bin")
    # Release the way a TVM user does: drop the last reference. This destroys
    # the C++ session and closes the socket (see module docstring); the server
    # becomes requestable again once it has re-registered with the tracker,
    # and the next request() simply waits for that.
    del sess
    t2 = time.perf_counter()
    timings.append((t1 - t0, t2 - t1, t2 - t0))


def bench_request_release(cluster, reps, n):
    ts = rpc.connect_tracker(HOST, cluster.port)
    try:
        warm = []
        for _ in range(WARMUP):
            cycle(ts, warm)
        runs, spent, all_timings = [], 0.0, []
        while len(runs) < reps:
            timings = []
            t0 = time.perf_counter()
            for _ in range(n):
                cycle(ts, timings)
            elapsed = time.perf_counter() - t0
            spent += elapsed
            runs.append(elapsed / n)
            all_timings += timings
            log(f"  run {len(runs)}: {n} cycles in {elapsed:.3f} s -> {elapsed / n * 1e3:.1f} ms/cycle")
            if elapsed > CYCLES_SECOND_RUN_IF_BELOW_S and len(runs) < reps:
                log(f"  cycles are slow; doing only {len(runs)} run(s) instead of {reps}")
                break
        req = sorted(t[0] for t in all_timings)
        tot = sorted(t[2] for t in all_timings)
        rest = sorted(t[1] for t in all_timings)
        log(
            "  per cycle: request() min/median/max "
            f"{req[0] * 1e3:.1f}/{median(req) * 1e3:.1f}/{req[-1] * 1e3:.1f} ms, "
            f"upload+release median {median(rest) * 1e3:.2f} ms, "
            f"whole cycle max {tot[-1] * 1e3:.1f} ms"
        )
        slow = [t for t in tot if t > SLOW_CYCLE_S]
        if slow:
            log(f"  {len(slow)} cycle(s) blocked > {SLOW_CYCLE_S} s (longest {max(slow):.2f} s)")
        else:
            log(f"  no cycle blocked > {SLOW_CYCLE_S} s (no wait for the {SESSION_TIMEOUT} s session timeout)")
        return median(runs)
    finally:
        ts.close()


def bench_upload(cluster, reps):
    # Allocated once, outside the timed region; each upload gets its own fresh
    # session (request + upload + release), only sess.upload() is timed.
    blob = bytearray(UPLOAD_BYTES)
    ts = rpc.connect_tracker(HOST, cluster.port)
    rates = []
    try:
        for i in range(reps):
            sess = ts.request(KEY, priority=1, session_timeout=SESSION_TIMEOUT)
            t0 = time.perf_counter()
            sess.upload(blob, "big.bin")
            elapsed = time.perf_counter() - t0
            del sess
            rates.append(UPLOAD_BYTES / (1 << 20) / elapsed)
            log(f"  upload {i + 1}/{reps}: {elapsed:.3f} s -> {rates[-1]:.0f} MiB/s")
        return median(rates)
    finally:
        ts.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--cycles", type=int, default=N)
    args = ap.parse_args()

    log(
        "machine is shared (2 cores, possibly busy compiling): expect noisy numbers; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    out = {}
    log(f"tracker+server cold start x{args.reps} (separate processes)")
    out["tracker_and_server_ready_s"] = bench_ready(args.reps)

    cluster = Cluster()
    try:
        log("starting tracker+server for the steady-state phases")
        cluster.start(time.perf_counter() + READY_TIMEOUT_S)

        log(f"request/release: {WARMUP} warm-up + up to {args.reps} x {args.cycles} cycles")
        served0 = cluster.server.sessions_served
        out["request_release_s_per_session"] = run_bounded(
            "request/release",
            CYCLES_BUDGET_S,
            lambda: bench_request_release(cluster, args.reps, args.cycles),
            cluster,
        )
        if cluster.server is not None:
            cluster.wait_idle()
            time.sleep(0.1)  # let the last "finish serving" line arrive
            log(f"  server logged {cluster.server.sessions_served - served0} finished sessions")

        if cluster.server is None:
            log("restarting tracker+server after the failure above")
            cluster.start(time.perf_counter() + READY_TIMEOUT_S)
        log(f"upload 64 MiB x{args.reps} (fresh session each)")
        out["upload_mib_per_s"] = run_bounded(
            "upload", UPLOAD_BUDGET_S, lambda: bench_upload(cluster, args.reps), cluster
        )
        cluster.wait_idle()
    finally:
        cluster.stop()

    log("done")
    print(json.dumps(out), flush=True)
    if any(v is None for v in out.values()):
        sys.exit(1)


if __name__ == "__main__":
    T0 = time.perf_counter()
    main()
