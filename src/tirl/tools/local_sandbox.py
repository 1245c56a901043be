"""Run untrusted, model-written Python in a local pool of warm workers (``LocalSandbox``).

LocalSandbox keeps `workers` warm processes (sandbox_worker.py, with sympy/numpy imported once); each
snippet runs in a fresh child forked from one of them, so no state survives from one snippet to the next
and a run costs a fork, not an interpreter start.

What a local run is limited to, and what it is not (honest list):
- Wall clock `timeout_s` (the worker kills the snippet's whole tree) and RLIMIT_CPU `cpu_time_s`
  (default: timeout_s + 1, rounded up) per process.
- RLIMIT_AS = the warm worker's own address space (measured at start: ~135 MB with numpy+sympy here,
  see `baseline_mb`) plus `memory_mb`, so memory_mb is the headroom a snippet gets beyond the
  interpreter it inherits, and the floor never starves the preloaded libraries.
- Output: stdout+stderr over `max_output_bytes` stops the run ("output_limit"); neither the worker nor
  the caller ever holds more than the cap.
- Files: cwd, HOME and TMPDIR are a private temp dir (mode 0700), removed after the run (an untouched,
  still-empty one is reused); RLIMIT_FSIZE caps any one file at `max_file_mb`. Writes to absolute
  paths elsewhere are limited only by file permissions.
- Timing of cleanup: the worker replies as soon as the snippet has reported its exit status and closed
  its output, then reaps it, kills anything it left and retires the dir -- always before it takes the
  next snippet, so the ~1 ms teardown of the forked interpreter is off the caller's clock.
- Environment: empty except PATH/LANG/HOME/TMPDIR and thread counts; nothing of the caller's.
- Isolation, layered, each layer used where the kernel offers it (sandbox_worker._isolate) and none of
  them needing root: every worker lives in PID, mount and network namespaces of its own (in a user
  namespace of its own when not root), with a private /proc, so a snippet sees no other process (not the
  trainer, not its /proc/<pid>/environ) and has no network; a Landlock ruleset lets it read only the
  interpreter's and the system's directories, write only its temp dir, open no TCP connection, and
  signal nothing outside it. As root each worker slot also gets a uid of its own (>= 1e9, no account)
  so RLIMIT_NPROC (`max_procs`) bounds the snippet's tree and kill(-1) as that uid ends it; without root
  the user namespace gives the same bound. `isolation` says what contains each threat; what no layer
  contains is named in one warning at start, or refused with SandboxIsolationError when
  `require_isolation` is set. When nothing keeps snippets from the caller's processes (no root, no PID
  namespace, no Landlock), the caller is made non-dumpable so at least its own /proc/<pid>/environ and
  memory stay unreadable to its uid.
- Not contained: CPU share (no cgroups), reading the system directories (/usr, /etc, ...) and the
  interpreter's files.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

from tirl.tools.exec_result import (
    ExecResult,
    SandboxClosedError,
    SandboxConfigError,
    SandboxIsolationError,
    _check_positive,
    _sandbox_error,
)
from tirl.tools.worker_process import (
    _REPLY_GRACE_S,
    _START_TIMEOUT_S,
    _allocate_uid,
    _stop_workers,
    _WorkerLost,
    _WorkerProcess,
)

DEFAULT_PRELOAD = ("math", "sympy", "numpy", "fractions", "itertools")
_PR_SET_DUMPABLE = 4
# What each isolation threat means to a user, for the warning and the error.
THREATS = {
    "processes": "other processes of your user (signals, /proc/<pid>/environ with API keys)",
    "files": "your files (W&B and HF tokens in your home directory, say)",
    "network": "the network",
}
ISOLATION_LAYERS = ("namespaces", "landlock")




class LocalSandbox:
    """A pool of warm, pre-forked Python workers; each snippet runs in a fresh, limited child."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 65536,
        preload: tuple[str, ...] = DEFAULT_PRELOAD,
        cpu_time_s: float | None = None,
        max_file_mb: int = 16,
        max_procs: int = 32,
        require_isolation: bool = False,
        disable_isolation: tuple[str, ...] = (),
    ) -> None:
        """`require_isolation`: raise SandboxIsolationError (before any worker serves) instead of warning
        when some threat in THREATS is not contained on this host. `disable_isolation`: layers of
        ISOLATION_LAYERS not to use (for tests, and for a host where one misbehaves)."""
        unknown = set(disable_isolation) - set(ISOLATION_LAYERS)
        if unknown:
            raise SandboxConfigError(f"Unknown isolation layer(s) {sorted(unknown)}; choose from {ISOLATION_LAYERS}.")
        _check_positive(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb,
                        max_output_bytes=max_output_bytes, max_file_mb=max_file_mb, max_procs=max_procs)
        if cpu_time_s is not None:
            _check_positive(cpu_time_s=cpu_time_s)
        self.timeout_s = float(timeout_s)
        self._base_cfg = {
            "timeout_s": self.timeout_s,
            "cpu_time_s": math.ceil(cpu_time_s if cpu_time_s is not None else self.timeout_s + 1),
            "memory_mb": int(memory_mb),
            "max_output_bytes": int(max_output_bytes),
            "max_file_bytes": int(max_file_mb) << 20,
            "max_procs": int(max_procs),
            "preload": list(preload),
            **{layer: layer not in disable_isolation for layer in ISOLATION_LAYERS},
        }
        self._closed = False
        self._slots: list[_WorkerProcess] = []  # shared with the finalizer, which must not hold self
        self._idle: Queue[int] = Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_workers, self._slots)  # also runs at exit
        try:
            self._slots.extend(_WorkerProcess({**self._base_cfg, "uid": _allocate_uid()}) for _ in range(workers))
            for worker in self._slots:  # started together, waited for in turn
                missing = worker.wait_ready(_START_TIMEOUT_S)["missing"]
            if missing:
                warnings.warn(f"Sandbox preload modules not installed, snippets importing them will fail: "
                              f"{missing}.", stacklevel=2)
            self.isolation = _weakest([w.ready["isolation"] for w in self._slots])
            _enforce_isolation(self.isolation, require_isolation)
        except BaseException:
            self.close()
            raise
        for slot in range(workers):
            self._idle.put(slot)

    @property
    def baseline_mb(self) -> float:
        """The warm worker's address space, on top of which memory_mb is allowed."""
        return max(w.ready["baseline_mb"] for w in self._slots if w.ready)

    def run(self, code: str) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run takes the code as a str, got {type(code).__name__}.")
        if self._closed:
            raise SandboxClosedError("This sandbox is closed; create a new one to run more code.")
        slot = self._idle.get()
        try:
            return self._run_on(slot, code)
        finally:
            self._idle.put(slot)

    def _run_on(self, slot: int, code: str) -> ExecResult:
        start = time.monotonic()
        worker = self._slots[slot]
        if not worker.alive:  # lost on an earlier run: replace it now, same uid
            try:
                worker = self._respawn(slot)
            except RuntimeError as exc:
                return _sandbox_error(f"SandboxError: {exc}")
        try:
            reply = worker.run(code, time.monotonic() + self.timeout_s + _REPLY_GRACE_S)
        except _WorkerLost as exc:
            worker.stop(grace_s=0.0)
            message = "SandboxError: the sandbox was closed during the run" if self._closed else (
                f"SandboxError: the sandbox worker was lost during the run ({exc}); it will be restarted")
            return _sandbox_error(message, time.monotonic() - start)
        return ExecResult(**reply)

    def _respawn(self, slot: int) -> _WorkerProcess:
        old = self._slots[slot]
        old.stop(grace_s=0.0)
        worker = _WorkerProcess({**self._base_cfg, "uid": old.uid})
        self._slots[slot] = worker
        worker.wait_ready(_START_TIMEOUT_S)
        return worker

    def run_batch(self, codes: list[str]) -> list[ExecResult]:
        """Run all codes concurrently over the pool; results come back in the order given."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(len(self._slots), thread_name_prefix="sandbox")
        return list(self._executor.map(self.run, codes))

    def close(self) -> None:
        """Stop every worker and every process a snippet left; idempotent."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._finalizer()

    def worker_pids(self) -> list[int]:
        """The processes that serve snippets (each snippet is one's child), as seen from this process."""
        return [w.serving_pid for w in self._slots]

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _weakest(reports: list[dict]) -> dict:
    """One report for the pool: a threat counts as contained only if every worker contains it."""
    contained = {t: reports[0]["contained"][t] if all(r["contained"][t] for r in reports) else None for t in THREATS}
    problems = list(dict.fromkeys(p for r in reports for p in r["problems"]))
    return {"contained": contained, "problems": problems}


def _enforce_isolation(isolation: dict, require: bool) -> None:
    open_threats = [t for t, how in isolation["contained"].items() if how is None]
    if open_threats and "processes" in open_threats and os.geteuid() != 0:
        # Last resort for the caller itself: a non-dumpable process's environ and memory are closed to
        # other processes of its uid (ptrace access mode checks). Its children inherit this until exec.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    if not open_threats:
        return
    what = "; ".join(THREATS[t] for t in open_threats)
    why = "; ".join(isolation["problems"]) or "not available"
    if require:
        raise SandboxIsolationError(
            f"sandbox.require_isolation is set but the local sandbox cannot keep snippets from {what} on this "
            f"host ({why}); enable unprivileged user namespaces and Landlock, run as root, or use sandbox=fusion.")
    warnings.warn(f"The local sandbox cannot keep model-written code from {what} on this host ({why}); "
                  f"set sandbox.require_isolation=true to refuse to run instead.", stacklevel=3)


@functools.cache
def probe_isolation() -> dict:
    """What a local sandbox worker can contain on this host: a worker with nothing preloaded, started
    and stopped (~0.1 s), reporting like LocalSandbox.isolation. Cached for the process."""
    worker = _WorkerProcess({"timeout_s": 1.0, "cpu_time_s": 2, "memory_mb": 64, "max_output_bytes": 1024,
                             "max_file_bytes": 1 << 20, "max_procs": 4, "preload": [], "uid": _allocate_uid()})
    try:
        return _weakest([worker.wait_ready(_START_TIMEOUT_S)["isolation"]])
    finally:
        worker.stop()


def check_isolation(require: bool) -> None:
    """At start, before any model is loaded: raise SandboxIsolationError if `require` and the host
    cannot contain a snippet (see THREATS); without `require`, do nothing (LocalSandbox warns later)."""
    if require:
        _enforce_isolation(probe_isolation(), require=True)
