"""The parent's side of one warm sandbox worker (``sandbox_worker.py`` in a process of its own): start it, send
it a snippet and wait for the reply with a deadline, stop it and everything of its uid. ``LocalSandbox`` keeps a
pool of these."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tirl.tools import sandbox_worker

_REPLY_GRACE_S = 10.0  # how long past the snippet's timeout the parent waits before calling a worker hung
_START_TIMEOUT_S = 120.0
_UID_BASE = 1_000_000_000  # far above any real account
_uid_counter = itertools.count()


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
