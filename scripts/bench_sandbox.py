"""Throughput and latency of LocalSandbox vs a fresh `python -c` per call, same limits, same concurrency.

    python scripts/bench_sandbox.py --seconds 4 --workers 2

Each mode keeps `workers` caller threads busy for the given time, calling run() back to back; latency is
what a caller sees per call. Target (DESIGN): >= 300 runs/s and p99 < 50 ms for print(1+1) on 2 cores.
The machine may be shared, so the table also gives CPU time per run summed over every process involved
(caller, workers, snippets / the interpreters), which does not depend on what else is running:
1000 / (cpu ms per run) is what one free core sustains.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from tirl.tools.sandbox import LocalSandbox

TRIVIAL = "print(1+1)"
WITH_IMPORTS = "import sympy, numpy\nprint(sympy.Integer(1) + 1)"


def cpu_seconds(worker_pids: list[int]) -> float:
    """CPU used so far by this process, its reaped children, and the given workers with their children."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in worker_pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / ticks  # utime stime cutime cstime
    return total


def measure(call, code: str, threads: int, seconds: float, worker_pids: list[int] = ()) -> dict:
    """Run `call(code)` back to back on `threads` threads for `seconds`; collect per-call latency."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop() -> None:
        mine, bad = [], 0
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            ok = call(code)
            mine.append(time.perf_counter() - t0)
            bad += not ok
        with lock:
            latencies.extend(mine)
            failures[0] += bad

    start, cpu_start = time.monotonic(), cpu_seconds(worker_pids)
    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(worker_pids) - cpu_start
    latencies.sort()
    return {
        "runs": len(latencies),
        "runs_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": failures[0],
        "cpu_ms_per_run": 1000 * cpu / len(latencies),
    }


def subprocess_call(timeout_s: float, memory_mb: int, max_file_mb: int):
    """The naive baseline: one interpreter per call, with the same rlimits, cwd and empty environment."""

    def limits() -> None:
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        # A fresh interpreter has a smaller baseline than a warm worker; give it the same absolute cap.
        resource.setrlimit(resource.RLIMIT_AS, ((memory_mb + 256) << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_mb << 20,) * 2)

    def call(code: str) -> bool:
        with tempfile.TemporaryDirectory() as workdir:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout_s,
                                  cwd=workdir, env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"},
                                  preexec_fn=limits, start_new_session=True, stdin=subprocess.DEVNULL)
        return done.returncode == 0 and done.stdout.strip() != b""

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per sandbox row")
    parser.add_argument("--baseline-seconds", type=float, default=3.0, help="measuring time per baseline row")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    rows = []
    load = os.getloadavg()
    t0 = time.monotonic()
    with LocalSandbox(workers=args.workers) as sandbox:
        start_s = time.monotonic() - t0
        sandbox.run_batch([TRIVIAL] * 20)  # warm-up
        for code in (TRIVIAL, WITH_IMPORTS):
            stats = measure(lambda c: sandbox.run(c).passed, code, args.workers, args.seconds,
                            sandbox.worker_pids())
            rows.append(("LocalSandbox", code, stats))
    baseline = subprocess_call(timeout_s=5.0, memory_mb=1024, max_file_mb=16)
    for code in (TRIVIAL, WITH_IMPORTS):
        rows.append(("subprocess -c", code, measure(baseline, code, args.workers, args.baseline_seconds)))

    print(f"workers={args.workers}  pool start-up {start_s:.2f} s  (python {sys.version.split()[0]})")
    print(f"load average before: {load[0]:.2f} (1 min), after: {os.getloadavg()[0]:.2f}")
    print(f"{'mode':<14} {'snippet':<30} {'runs':>6} {'runs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5} "
          f"{'cpu ms/run':>11} {'runs/s/core':>12}")
    for mode, code, s in rows:
        label = code.replace("\n", "; ")[:30]
        print(f"{mode:<14} {label:<30} {s['runs']:>6} {s['runs_per_s']:>8.1f} {s['p50_ms']:>8.2f} "
              f"{s['p99_ms']:>8.2f} {s['failures']:>5} {s['cpu_ms_per_run']:>11.2f} "
              f"{1000 / s['cpu_ms_per_run']:>12.0f}")
    for i, code in enumerate((TRIVIAL, WITH_IMPORTS)):
        ratio = rows[i][2]["runs_per_s"] / rows[i + 2][2]["runs_per_s"]
        print(f"speed-up over subprocess for {code.splitlines()[0]!r}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
