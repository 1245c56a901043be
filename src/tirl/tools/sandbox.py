"""Run untrusted, model-written Python: a local pool of warm workers, or a SandboxFusion server.

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
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue
from typing import Protocol

from tirl.errors import UserError
from tirl.tools import sandbox_worker

ERROR_KINDS = ("timeout", "memory", "syntax", "runtime", "output_limit", "sandbox")
DEFAULT_PRELOAD = ("math", "sympy", "numpy", "fractions", "itertools")
_REPLY_GRACE_S = 10.0  # how long past the snippet's timeout the parent waits before calling a worker hung
_START_TIMEOUT_S = 120.0
_UID_BASE = 1_000_000_000  # far above any real account
_uid_counter = itertools.count()
_PR_SET_DUMPABLE = 4
# What each isolation threat means to a user, for the warning and the error.
THREATS = {
    "processes": "other processes of your user (signals, /proc/<pid>/environ with API keys)",
    "files": "your files (W&B and HF tokens in your home directory, say)",
    "network": "the network",
}
ISOLATION_LAYERS = ("namespaces", "landlock")


class SandboxConfigError(UserError, ValueError):
    """A sandbox was configured with values it cannot run with."""


class SandboxIsolationError(SandboxConfigError):
    """The host cannot contain snippets as required (`require_isolation=True`)."""


class SandboxClosedError(RuntimeError):
    """The sandbox was used after close()."""


@dataclass
class ExecResult:
    ok: bool  # exit 0 and no limit hit
    stdout: str
    stderr: str
    error: str | None  # None or one of ERROR_KINDS
    duration_s: float

    @property
    def passed(self) -> bool:
        """THOR's step reward: the block ran cleanly and printed something."""
        return self.ok and self.stdout.strip() != ""

    def feedback(self, max_chars: int = 1024) -> str:
        """What the model sees: its stdout (a long one as head … tail), or the last line of the error."""
        if self.ok:
            return _head_tail(self.stdout.rstrip("\n"), max_chars)
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"Error: {self.error}"
        return last if len(last) <= max_chars else last[: max_chars - 1] + "…"


def _head_tail(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    marker = "\n…\n"
    keep = max(max_chars - len(marker), 0)
    head = keep - keep // 2
    tail = keep // 2
    return text[:head] + marker + (text[-tail:] if tail else "")


def _sandbox_error(message: str, duration_s: float = 0.0) -> ExecResult:
    return ExecResult(ok=False, stdout="", stderr=message, error="sandbox", duration_s=duration_s)


class Sandbox(Protocol):
    def run(self, code: str) -> ExecResult: ...

    def run_batch(self, codes: list[str]) -> list[ExecResult]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- local pool


class _WorkerLost(Exception):
    pass


class _WorkerProcess:
    """One warm worker: a `python -I sandbox_worker.py` child speaking framed JSON over its pipes."""

    def __init__(self, cfg: dict) -> None:
        self.uid: int | None = cfg.get("uid")
        # The parent owns the worker's temp root, so it is removed however the worker ends (even SIGKILL).
        self.tmp_root = tempfile.mkdtemp(prefix="tirl-sandbox-")
        cfg = {**cfg, "tmp_root": self.tmp_root}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", sandbox_worker.__file__, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
            cwd="/",
            close_fds=True,
            start_new_session=True,  # a Ctrl-C meant for the trainer must not kill a worker mid-run
        )
        self.ready: dict | None = None
        self.serving_pid = self.proc.pid

    def wait_ready(self, timeout_s: float) -> dict:
        try:
            message = sandbox_worker.read_message(self.proc.stdout.fileno(), time.monotonic() + timeout_s)
        except (TimeoutError, OSError, ValueError) as exc:
            message = None
            reason = str(exc)
        else:
            reason = "it exited during start-up"
        if not message or not message.get("ready"):
            self.stop()
            raise RuntimeError(f"The sandbox worker did not start ({reason}); check that {sys.executable} runs.")
        self.ready = message
        # In a PID namespace the serving worker is the started process's only child (sandbox_worker._isolate).
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            children = []
        self.serving_pid = children[0] if message.get("isolation", {}).get("namespaces") and children else self.proc.pid
        return message

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, code: str, deadline: float) -> dict:
        try:
            sandbox_worker.write_message(self.proc.stdin.fileno(), {"code": code})
            reply = sandbox_worker.read_message(self.proc.stdout.fileno(), deadline)
        except (OSError, TimeoutError, ValueError) as exc:
            raise _WorkerLost(str(exc)) from exc
        if reply is None:
            raise _WorkerLost("the worker closed its channel")
        return reply

    def stop(self, grace_s: float = 2.0) -> None:
        """Ask the worker to finish (EOF on its stdin), then kill it and anything it left behind."""
        forced = False
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                if self.serving_pid != self.proc.pid:  # the namespace's init first: its parent then reaps it
                    try:
                        os.kill(self.serving_pid, 9)
                        self.proc.wait(1.0)
                    except (OSError, subprocess.TimeoutExpired):
                        pass
                self.proc.kill()
                self.proc.wait()
                forced = True
        else:
            forced = True  # it died on its own: its snippet may be orphaned
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if forced and self.uid is not None:
            _kill_all_of_uid_from_parent(self.uid)
        shutil.rmtree(self.tmp_root, ignore_errors=True)


def _worker_env() -> dict[str, str]:
    # Built from nothing: no variable of the caller's (API keys, tokens) reaches a worker or a snippet.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",  # one thread: the worker stays single-threaded, so fork is safe
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_all_of_uid_from_parent(uid: int) -> None:
    """Kill every process of a worker slot's uid (the worker itself is gone, so it cannot)."""
    script = "import os\nfor s in (19, 19, 9, 9):\n    try: os.kill(-1, s)\n    except ProcessLookupError: pass\n"
    try:
        subprocess.run([sys.executable, "-I", "-c", script], user=uid, group=uid, extra_groups=[],
                       env={}, cwd="/", timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def _allocate_uid() -> int | None:
    if os.geteuid() != 0:
        return None
    # Unique among live processes (pid) and among this process's worker slots (counter).
    return _UID_BASE + (os.getpid() % 4_000_000) * 256 + next(_uid_counter) % 256


def _stop_workers(workers: list[_WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


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


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise SandboxConfigError(f"Sandbox setting {name} must be > 0, got {value!r}.")


# ---------------------------------------------------------------- SandboxFusion over HTTP


class FusionSandbox:
    """Client for a SandboxFusion server (POST {url}/run_code). Never raises on server trouble."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 65536,
        workers: int = 8,
        retries: int = 3,
        backoff_s: float = 0.5,
        request_timeout_s: float | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SandboxConfigError(f"FusionSandbox url must start with http:// or https://, got {url!r}.")
        _check_positive(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes, workers=workers)
        self.endpoint = url.rstrip("/") + "/run_code"
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        # The server may queue the request, then runs it for up to timeout_s: allow for both.
        self.request_timeout_s = float(request_timeout_s or self.timeout_s + 10.0)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fusion")

    def run(self, code: str) -> ExecResult:
        payload = json.dumps({"code": code, "language": "python", "run_timeout": self.timeout_s,
                              "memory_limit_MB": self.memory_mb}).encode()
        start = time.monotonic()
        problem = "no attempt was made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._post(payload)
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:  # our request is wrong: retrying will not help
                    break
            except TimeoutError:  # socket.timeout is TimeoutError since 3.10
                return ExecResult(False, "", f"TimeoutError: SandboxFusion at {self.endpoint} did not answer "
                                  f"within {self.request_timeout_s:g} s", "timeout", time.monotonic() - start)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                problem = str(getattr(exc, "reason", exc))
            else:
                return self._to_result(reply, time.monotonic() - start)
        return _sandbox_error(f"SandboxError: SandboxFusion at {self.endpoint} failed after "
                              f"{attempt + 1} attempt(s): {problem}.", time.monotonic() - start)

    def _post(self, payload: bytes) -> dict:
        request = urllib.request.Request(self.endpoint, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.request_timeout_s) as response:
            reply = json.loads(response.read())
        if not isinstance(reply, dict):
            raise ValueError("the reply is not a JSON object")
        return reply

    def _to_result(self, reply: dict, duration_s: float) -> ExecResult:
        run = reply.get("run_result") or {}
        if reply.get("status") == "SandboxError" or not run:
            message = reply.get("message") or "no run_result in the reply"
            return _sandbox_error(f"SandboxError: SandboxFusion could not run the code: {message}.", duration_s)
        stdout, stderr = run.get("stdout") or "", run.get("stderr") or ""
        duration = float(run.get("execution_time") or duration_s)
        if len(stdout.encode()) + len(stderr.encode()) > self.max_output_bytes:
            stdout = stdout.encode()[: self.max_output_bytes].decode(errors="replace")
            stderr = f"OutputLimitError: the output exceeded {self.max_output_bytes} bytes\n"
            return ExecResult(False, stdout, stderr, "output_limit", duration)
        if run.get("status") == "TimeLimitExceeded":
            stderr += f"\nTimeoutError: the code ran longer than {self.timeout_s:g} s and was stopped\n"
            return ExecResult(False, stdout, stderr, "timeout", duration)
        if run.get("status") == "Finished" and run.get("return_code") == 0:
            return ExecResult(True, stdout, stderr, None, duration)
        return ExecResult(False, stdout, stderr, _classify_stderr(stderr), duration)

    def run_batch(self, codes: list[str]) -> list[ExecResult]:
        return list(self._executor.map(self.run, codes))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> FusionSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _classify_stderr(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax"
    if last.startswith("MemoryError"):
        return "memory"
    return "runtime"


# ---------------------------------------------------------------- factory

_KINDS = {"local": LocalSandbox, "fusion": FusionSandbox}


def build_sandbox(kind: str = "local", **kw) -> Sandbox:
    """Build a sandbox by name (for Hydra configs): kind 'local' or 'fusion', the rest are its arguments."""
    if kind not in _KINDS:
        raise SandboxConfigError(f"Unknown sandbox kind {kind!r}; choose one of {sorted(_KINDS)}.")
    if kind == "fusion":
        kw.pop("require_isolation", None)  # isolation is the server's
    if "preload" in kw and kw["preload"] is not None:
        kw["preload"] = tuple(kw["preload"])  # Hydra hands lists over as ListConfig
    return _KINDS[kind](**kw)
