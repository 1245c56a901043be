"""The sandbox: results and feedback, every limit, hostile snippets, the pool's survival, the HTTP client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tirl.tools.sandbox import (
    ExecResult,
    FusionSandbox,
    LocalSandbox,
    SandboxClosedError,
    SandboxConfigError,
    build_sandbox,
)

IS_ROOT = os.geteuid() == 0
SECRET_NAME, SECRET_VALUE = "TIRL_SANDBOX_TEST_SECRET", "hunter2-do-not-leak"
root_only = pytest.mark.skipif(not IS_ROOT, reason="uid isolation needs root; without it these are not contained")


@pytest.fixture(scope="module")
def sandbox():
    os.environ[SECRET_NAME] = SECRET_VALUE  # set before the workers start: they must not inherit it
    try:
        with LocalSandbox(workers=2, timeout_s=1.0) as sb:
            yield sb
    finally:
        os.environ.pop(SECRET_NAME, None)


@pytest.fixture(scope="module")
def small():
    """One worker, nothing preloaded, tight limits: quick to start, quick to hit every limit."""
    with LocalSandbox(workers=1, timeout_s=3.0, cpu_time_s=1, memory_mb=64, max_output_bytes=1000,
                      preload=(), max_file_mb=1, max_procs=8) as sb:
        yield sb


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, uid) for every process, zombies included, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # it exited while we looked
        table[int(entry)] = (ppid, uid)
    return table


def _descendants(roots: list[int]) -> set[int]:
    table = _proc_table()
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _leftovers(sb: LocalSandbox, within_s: float = 2.0) -> set[int]:
    """Processes a snippet left: below a worker, or (root) under a worker slot's uid.

    A worker replies as soon as the snippet reported its status and closed its output, and reaps it
    (and kills anything it left) right after; so this polls briefly instead of looking once.
    """
    uids = {w.uid for w in sb._slots if w.uid is not None}
    deadline = time.monotonic() + within_s
    while True:
        by_uid = {pid for pid, (_, uid) in _proc_table().items() if uid in uids}
        found = _descendants(sb.worker_pids()) | by_uid
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# ---------------------------------------------------------------- results and feedback


def test_print_passes_and_feedback_is_stdout(sandbox):
    result = sandbox.run("print(1 + 1)")
    assert (result.ok, result.error, result.stdout, result.passed) == (True, None, "2\n", True)
    assert result.feedback() == "2"
    assert 0 < result.duration_s < 1.0


def test_preloaded_libraries_work(sandbox):
    result = sandbox.run("import sympy, numpy as np\nprint(sympy.factorint(360), int(np.arange(5).sum()))")
    assert result.stdout == "{2: 3, 3: 2, 5: 1} 10\n"


def test_modules_not_preloaded_still_import(small):
    # Even when the interpreter lives under a home the snippet's uid cannot enter (pyenv in /root).
    result = small.run("import decimal, statistics, fractions\nprint(statistics.mean([1, 2, 3, 4]))")
    assert result.stdout == "2.5\n"


def test_clean_run_without_output_does_not_pass(sandbox):
    result = sandbox.run("x = 1")
    assert result.ok and not result.passed and result.feedback() == ""


def test_syntax_error(sandbox):
    result = sandbox.run("def f(:\n    pass\n")
    assert result.error == "syntax" and not result.ok
    assert result.feedback().startswith("SyntaxError")


def test_runtime_error_feedback_is_the_last_line(sandbox):
    result = sandbox.run("x = 1\ny = x / 0\n")
    assert result.error == "runtime"
    assert result.feedback() == "ZeroDivisionError: division by zero"
    assert 'File "<snippet>", line 2' in result.stderr  # the traceback points into the snippet


def test_feedback_head_tail_and_fallbacks():
    long = ExecResult(ok=True, stdout="0123456789" * 3 + "\n", stderr="", error=None, duration_s=0.0)
    assert long.feedback(max_chars=13) == "01234\n…\n56789"  # 13 = 5 head + 3 marker + 5 tail
    assert len(long.feedback(max_chars=20)) == 20
    assert long.feedback(max_chars=100) == "0123456789" * 3
    quiet_failure = ExecResult(ok=False, stdout="", stderr="", error="timeout", duration_s=1.0)
    assert quiet_failure.feedback() == "Error: timeout" and not quiet_failure.passed
    noisy = ExecResult(ok=False, stdout="partial", stderr="Traceback\nValueError: " + "v" * 50, error="runtime",
                       duration_s=0.1)
    assert noisy.feedback(max_chars=20) == "ValueError: vvvvvvv…" and not noisy.passed


def test_exit_statuses(sandbox):
    clean = sandbox.run("import sys\nsys.exit(0)")
    assert clean.ok and not clean.passed
    three = sandbox.run("import sys\nsys.exit(3)")
    assert three.error == "runtime" and three.feedback() == "SystemExit: 3"
    message = sandbox.run("raise SystemExit('bye')")
    assert message.error == "runtime" and message.feedback() == "bye"
    hard = sandbox.run("import os\nprint('out', flush=True)\nos._exit(0)")
    assert hard.passed and hard.stdout == "out\n"


def test_closing_stdout(sandbox):
    closed_fd = sandbox.run("import os\nos.close(1)\nprint('lost')")
    assert closed_fd.error == "runtime" and "Bad file descriptor" in closed_fd.feedback()
    closed_stream = sandbox.run("import sys\nprint('kept', flush=True)\nsys.stdout.close()")
    assert closed_stream.ok and closed_stream.stdout == "kept\n"
    assert sandbox.run("print('still fine')").passed


# ---------------------------------------------------------------- limits


def test_infinite_loop_times_out_within_the_limit(sandbox):
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass")
    elapsed = time.monotonic() - start
    assert result.error == "timeout" and not result.ok
    assert 0.9 <= elapsed < 1.0 + 1.0
    assert result.feedback().startswith("TimeoutError")


def test_cpu_time_limit():
    # CPU limit 1 s, wall limit 60 s: a busy loop is stopped by RLIMIT_CPU, not by the wall clock. (A tight wall
    # limit made this depend on the machine's load: on two busy cores the loop got 0.5 s of CPU in 3 s.)
    with LocalSandbox(workers=1, timeout_s=60.0, cpu_time_s=1, preload=()) as sb:
        result = sb.run("while True:\n    pass")
    assert result.error == "timeout" and "CPU" in result.feedback()
    assert result.duration_s < 59


def test_memory_bombs(sandbox, small):
    assert sandbox.run("x = bytearray(64 * 1024**3)").error == "memory"
    grow = small.run("chunks = []\nwhile True:\n    chunks.append(' ' * 10**6)")
    assert grow.error == "memory" and grow.feedback().startswith("MemoryError")
    assert small.run("print(len(bytearray(16 * 1024**2)))").stdout == "16777216\n"  # 16 MB fits in 64


def test_output_flood_is_cut_quickly(sandbox, small):
    start = time.monotonic()
    result = sandbox.run("print('x' * 100_000_000)")
    assert result.error == "output_limit" and time.monotonic() - start < 1.0
    assert len(result.stdout.encode()) <= 65536
    endless = small.run("while True:\n    print('spam')")
    assert endless.error == "output_limit" and len(endless.stdout) <= 1000
    assert endless.feedback().startswith("OutputLimitError")


def test_file_size_limit(small):
    result = small.run("open('big.bin', 'wb').write(b'0' * (2 << 20))")
    assert result.error == "runtime" and "File too large" in result.feedback()
    assert small.run("print(open('ok.bin', 'wb').write(b'0' * 1000))").stdout == "1000\n"


def test_workdir_is_private_and_removed(small, tmp_path):
    result = small.run("import os\nopen('note.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = result.stdout.strip()
    assert result.ok and workdir != os.getcwd() and os.path.isabs(workdir)
    # Cleanup runs right after the reply, always before the worker takes the next snippet.
    assert small.run("import os\nprint(os.listdir('.'))").stdout == "[]\n"
    assert not os.path.exists(workdir)  # removed together with the file written in it


def test_cannot_write_outside_its_dir(small, tmp_path):
    if not (IS_ROOT or small.isolation["contained"]["files"]):
        pytest.skip("neither a uid of its own nor Landlock here (the sandbox warned about it)")
    target = tmp_path / "not_the_snippets.txt"  # root's (mode 0755) as root; the user's own otherwise
    result = small.run(f"open({str(target)!r}, 'w').write('x')")
    assert result.error == "runtime" and "PermissionError" in result.feedback()
    assert not target.exists()


def test_parent_environment_is_not_visible(sandbox):
    result = sandbox.run(f"import os\nprint(os.environ.get({SECRET_NAME!r}))\nprint(sorted(os.environ))")
    assert result.stdout.splitlines()[0] == "None"
    assert SECRET_VALUE not in result.stdout
    assert SECRET_NAME in os.environ  # the test process does have it


def test_other_processes_environment_is_not_readable(sandbox):
    # Not permitted (another uid, Landlock), or not there at all (a PID namespace with its own /proc).
    result = sandbox.run(f"print(open('/proc/{os.getpid()}/environ').read())")
    assert result.error == "runtime" and result.feedback().startswith(("PermissionError", "FileNotFoundError"))
    assert SECRET_VALUE not in result.stdout


# ---------------------------------------------------------------- hostile snippets vs the pool


def test_fork_bomb_is_contained(small):
    start = time.monotonic()
    result = small.run("import os\nwhile True:\n    os.fork()")
    assert not result.ok and time.monotonic() - start < 3.0 + 1.0
    assert _leftovers(small) == set()
    assert small.run("print('alive')").passed


def test_background_processes_are_killed_after_the_run(small):
    code = ("import subprocess, os\n"
            "subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(30)\n"
            "print('parent done')")
    result = small.run(code)
    assert result.passed
    assert _leftovers(small) == set()


def test_signalling_the_parent_does_not_break_the_pool(sandbox):
    result = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('survived')")
    if IS_ROOT or sandbox.isolation["contained"]["processes"]:
        # Not permitted (another uid, Landlock's signal scope) or no such process (a PID namespace).
        refused = ("PermissionError", "ProcessLookupError")
        assert result.error == "runtime" and result.feedback().startswith(refused)
        # Signal 0 only checks permission: the snippet may not signal the trainer (this process) either.
        probe = sandbox.run(f"import os\nos.kill({os.getpid()}, 0)")
        assert probe.error == "runtime" and probe.feedback().startswith(refused)
    results = sandbox.run_batch(["print(7)"] * 4)
    assert all(r.passed and r.stdout == "7\n" for r in results)


def test_a_dead_worker_is_replaced(small):
    (pid,) = small.worker_pids()
    os.kill(pid, 9)
    small._slots[0].proc.wait(10)  # let it die for sure (the process started for it ends with it)
    results = [small.run("print(5)") for _ in range(3)]
    assert all(r.passed for r in results[1:]) and results[0].error in (None, "sandbox")
    assert small.worker_pids() != [pid]


def test_deep_recursion_is_a_clean_error(sandbox, small):
    result = sandbox.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert result.error == "runtime" and result.feedback().startswith("RecursionError")
    # With the recursion limit lifted, frames fill the 64 MB headroom (CPython 3.11 then reports a
    # MemoryError or a SystemError), or the 1 s CPU limit comes first on a busy machine: an error
    # the model can read, not a crashed worker.
    unbounded = small.run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert unbounded.error in ("runtime", "memory", "timeout") and not unbounded.ok
    assert small.run("print('ok')").passed


def test_state_does_not_leak_between_snippets(small):
    first = small.run("import math\nmath.pi = 3\nsecret = 42\nopen('f.txt', 'w').write('x')\nprint(math.pi)")
    assert first.stdout == "3\n"
    second = small.run("import math, os\nprint(math.pi, 'secret' in globals(), os.path.exists('f.txt'))")
    assert second.stdout == "3.141592653589793 False False\n"


def test_run_batch_keeps_order_and_runs_concurrently(sandbox):
    codes = [f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(4)]
    start = time.monotonic()
    results = sandbox.run_batch(codes)
    assert time.monotonic() - start < 1.6  # 2 workers: two rounds of 0.5 s, not four
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]


def test_close_leaves_no_processes():
    sb = LocalSandbox(workers=2, timeout_s=5.0, preload=())
    pids = sb.worker_pids()
    busy = threading.Thread(target=sb.run, args=("while True:\n    pass",))
    busy.start()
    time.sleep(0.3)  # the loop is running in a snippet now
    sb.close()
    busy.join(15)   # generous: the point is that it ends, and a loaded CI machine is slow
    assert not busy.is_alive()
    assert _leftovers(sb) == set() and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    with pytest.raises(SandboxClosedError):
        sb.run("print(1)")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead worker reparented to init may linger as one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_workers_end_with_the_process_that_owns_them(ending):
    # Interpreter exit without close() (the finalizer runs at exit), or a hard kill of the owner (the
    # workers read EOF on their channel): either way no worker outlives it.
    script = ("import sys, time\nfrom tirl.tools.sandbox import LocalSandbox\n"
              "sb = LocalSandbox(workers=2, preload=())\nprint(*sb.worker_pids(), flush=True)\n"
              "sys.stdin.readline()\n"          # the workers are seen alive before the owner ends (no race)
              "if sys.argv[1] == 'sigkill':\n    time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, ending], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 2 and all(_running(p) for p in pids)
    owner.stdin.write("go\n")
    owner.stdin.flush()
    if ending == "sigkill":
        owner.kill()
    owner.wait(10)
    deadline = time.monotonic() + 15.0   # generous: CI machines can be loaded
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)


def test_stdin_is_closed(sandbox):
    result = sandbox.run("input()")
    assert result.error == "runtime" and result.feedback().startswith("EOFError")


def test_bad_settings_fail_with_a_clear_message():
    with pytest.raises(SandboxConfigError, match="workers"):
        LocalSandbox(workers=0)
    with pytest.raises(SandboxConfigError, match="local"):
        build_sandbox("docker")
    with pytest.raises(SandboxConfigError, match="http"):
        FusionSandbox(url="localhost:8080")


# ---------------------------------------------------------------- SandboxFusion client


class _FakeFusion(BaseHTTPRequestHandler):
    """Answers like SandboxFusion; the code text picks the behaviour."""

    requests_seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests_seen.append(body)
        code = body["code"]
        if "FAIL500" in code:
            self.send_error(500, "boom")
            return
        if "STALL" in code:
            time.sleep(2.0)
        if "ZERO" in code:
            run = {"status": "Finished", "return_code": 1, "stdout": "",
                   "stderr": "Traceback...\nZeroDivisionError: division by zero\n", "execution_time": 0.01}
        elif "SLOW" in code:
            run = {"status": "TimeLimitExceeded", "return_code": None, "stdout": "", "stderr": "",
                   "execution_time": 5.0}
        else:
            run = {"status": "Finished", "return_code": 0, "stdout": "2\n", "stderr": "", "execution_time": 0.02}
        payload = json.dumps({"status": "Success", "message": "", "run_result": run}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fusion_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeFusion)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fusion_good_reply(fusion_url):
    with build_sandbox("fusion", url=fusion_url, timeout_s=3.0) as sb:
        result = sb.run("print(1 + 1)")
        assert result.passed and result.stdout == "2\n" and result.duration_s == 0.02
        sent = _FakeFusion.requests_seen[-1]
        assert sent == {"code": "print(1 + 1)", "language": "python", "run_timeout": 3.0, "memory_limit_MB": 1024}
        zero, slow = sb.run_batch(["ZERO", "SLOW"])
        assert zero.error == "runtime" and zero.feedback() == "ZeroDivisionError: division by zero"
        assert slow.error == "timeout"


def test_fusion_server_error_is_retried_then_reported(fusion_url):
    before = len(_FakeFusion.requests_seen)
    with FusionSandbox(url=fusion_url, retries=2, backoff_s=0.01) as sb:
        result = sb.run("FAIL500")
    assert len(_FakeFusion.requests_seen) - before == 3  # the first try and two retries
    assert result.error == "sandbox" and "HTTP 500" in result.feedback() and "3 attempt" in result.feedback()


def test_fusion_stall_times_out(fusion_url):
    start = time.monotonic()
    with FusionSandbox(url=fusion_url, request_timeout_s=0.3) as sb:
        result = sb.run("STALL")
    assert result.error == "timeout" and time.monotonic() - start < 1.5


def test_fusion_unreachable_server_is_a_result_not_an_exception():
    with FusionSandbox(url="http://127.0.0.1:9", retries=1, backoff_s=0.01) as sb:  # port 9: nothing listens
        result = sb.run("print(1)")
    assert result.error == "sandbox" and "SandboxFusion" in result.feedback()


def test_a_killed_worker_leaves_no_temp_root_behind():
    import signal as _signal

    # The sandbox's own roots, not a glob of /tmp: other processes on the machine may run sandboxes too.
    sb = LocalSandbox(workers=1, timeout_s=2.0)
    assert sb.run("print(1)").passed
    roots = {w.tmp_root for w in sb._slots}
    assert len(roots) == 1 and all(os.path.isdir(r) for r in roots)
    for pid in sb.worker_pids():
        os.kill(pid, _signal.SIGKILL)     # no chance for the worker to clean up after itself
    lost = sb.run("print(2)")                 # the dead worker's slot answers with a sandbox error, once
    assert lost.stdout.strip() == "2" or lost.error == "sandbox"
    assert sb.run("print(3)").stdout.strip() == "3"   # a replacement worker serves
    roots |= {w.tmp_root for w in sb._slots}
    assert len(roots) == 2
    sb.close()
    assert not any(os.path.exists(r) for r in roots)


# ---------------------------------------------------------------- isolation without root

CANARY = "tirl-canary-7f3a"

# Runs as the (non-root) trainer: starts a sandbox, has snippets try each way out, prints what they got.
_TRAINER_SCRIPT = r'''
import json, os, sys, warnings
from tirl.tools.sandbox import LocalSandbox, SandboxIsolationError
port, home_file, disable = int(sys.argv[1]), sys.argv[2], tuple(a for a in sys.argv[3].split(",") if a)
out = {"uid": os.geteuid()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sb = LocalSandbox(workers=1, timeout_s=3.0, preload=(), max_procs=8, disable_isolation=disable)
out["warnings"] = [str(w.message) for w in caught if "sandbox" in str(w.message)]
probes = {
    "trainer_environ": f"print(open('/proc/{os.getpid()}/environ').read())",
    "ancestor_environ": f"print(open('/proc/{os.getppid()}/environ').read())",
    "home_file": f"print(open({home_file!r}).read())",
    "home_write": f"open({home_file!r} + '.new', 'w').write('x')\nprint('wrote')",
    "network": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(s.recv(64).decode())",
    "fork": "import os, time\nn = 0\ntry:\n    while n < 64:\n        if os.fork() == 0:\n            time.sleep(1)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)",
}
with sb:
    out["contained"] = sb.isolation["contained"]
    out["runs"] = {name: [r.stdout, r.feedback()] for name, r in ((n, sb.run(c)) for n, c in probes.items())}
try:
    LocalSandbox(workers=1, preload=(), require_isolation=True, disable_isolation=disable).close()
    out["required"] = None
except SandboxIsolationError as exc:
    out["required"] = str(exc)
print(json.dumps(out))
'''


def _reachable_by_others(path: str) -> bool:
    path = os.path.realpath(path)
    while path != os.sep:
        if not os.stat(path).st_mode & 0o001:
            return False
        path = os.path.dirname(path)
    return True


def _non_root_command(how: str = "any") -> tuple[list[str], str, int] | None:
    """How to run the trainer as an ordinary user: (command prefix, python, uid), or None.

    Preferred: a real unprivileged uid (setpriv) with an interpreter it can reach; else a user namespace
    mapping this user to uid 1000 (util-linux unshare), which is what an ordinary user looks like from inside.
    """
    import shutil

    if not IS_ROOT:
        return [], sys.executable, os.geteuid()
    pythons = [p for p in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3") if p and os.path.exists(p)]
    reachable = [p for p in pythons if _reachable_by_others(p) and sys.version_info[:2] == tuple(
        map(int, subprocess.run([p, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                                text=True).stdout.split() or (0, 0)))]
    if how in ("any", "setpriv") and shutil.which("setpriv") and reachable and _reachable_by_others(
            os.path.dirname(__import__("tirl").__file__)):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], reachable[0], 65534
    if how in ("any", "unshare") and shutil.which("unshare"):
        return ["unshare", "--user", "--map-user=1000", "--map-group=1000"], sys.executable, 1000
    return None


@pytest.fixture
def open_tmp():
    """A temp dir an unprivileged uid can enter (pytest's tmp_path sits under a root-only dir)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="tirl-test-")
    os.chmod(path, 0o755)
    yield __import__("pathlib").Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _run_as_non_root(tmp_path, disable: str = "", how: str = "any") -> dict:
    found = _non_root_command(how)
    if found is None:
        pytest.skip(f"no way to run as an ordinary user here ({how}: needs setpriv and a python it can reach, "
                    f"or util-linux unshare)")
    prefix, python, uid = found
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine api.wandb.ai password {CANARY}\n")
    os.chmod(home / ".netrc", 0o600)
    os.chmod(home, 0o700)
    os.chmod(tmp_path, 0o755)
    if IS_ROOT and uid != 1000:   # setpriv: the files belong to that user, like a real home
        for path in (home, home / ".netrc"):
            os.chown(path, uid, uid)
    listener = __import__("socket").create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        listener.settimeout(20)
        try:
            while True:
                conn, _ = listener.accept()
                conn.sendall(CANARY.encode())
                conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER_SCRIPT)
    os.chmod(script, 0o644)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "WANDB_API_KEY": CANARY,
           "PYTHONPATH": os.path.dirname(os.path.dirname(__import__("tirl").__file__))}
    # `sh` stays the trainer's parent (`; exit`), an ancestor of the user's with the key in its environment.
    inner = f"{python} {script} {port} {home / '.netrc'} '{disable}'; exit $?"
    try:
        done = subprocess.run([*prefix, "sh", "-c", inner], env=env, capture_output=True, text=True, timeout=120,
                              cwd=str(tmp_path))
    finally:
        listener.close()
    if done.returncode != 0 and "Operation not permitted" in done.stderr and prefix[:1] == ["unshare"]:
        pytest.skip(f"user namespaces are not available to simulate an ordinary user: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == uid != 0
    return out


NAMED_IN_WARNING = {"processes": "other processes", "files": "your files", "network": "the network"}
LEAKS = {"processes": ("ancestor_environ",), "files": ("home_file",), "network": ("network",)}


@pytest.mark.parametrize("how", ["setpriv", "unshare"])  # a real unprivileged uid; a user namespace
def test_non_root_snippets_are_contained_or_the_gap_is_named(open_tmp, how):
    """As an ordinary user: the trainer's environment never leaks (PID namespace, Landlock, or at least a
    non-dumpable trainer); each other way out (an ancestor's environ, a token file in the home directory, a
    loopback server) is closed, or else it is named in the one warning and require_isolation refuses."""
    out = _run_as_non_root(open_tmp, how=how)
    runs, contained = out["runs"], out["contained"]
    assert CANARY not in runs["trainer_environ"][0] and not runs["trainer_environ"][0]
    open_threats = [t for t, how in contained.items() if how is None]
    for threat, how in contained.items():
        if how is not None:
            for probe in LEAKS[threat]:
                assert CANARY not in runs[probe][0] and runs[probe][0] == "", (threat, how, runs[probe])
    if contained["files"]:
        assert runs["home_write"][0] == "" and "PermissionError" in runs["home_write"][1]
    if how == "setpriv" and contained["processes"] == "pid namespace":
        # max_procs=8 bounds the snippet's tree (itself + 7) through its worker's user namespace. (Not with
        # `unshare`: that caller is still root outside, and root is exempt from RLIMIT_NPROC.)
        assert runs["fork"][0] == "7\n"
    if open_threats:
        assert len(out["warnings"]) == 1
        assert all(NAMED_IN_WARNING[t] in out["warnings"][0] for t in open_threats)
        assert out["required"] and out["required"].count(". ") == 0 and out["required"].endswith(".")
    else:
        assert out["warnings"] == [] and out["required"] is None


def test_non_root_without_namespaces_or_landlock_warns_and_require_refuses(open_tmp):
    """A host with neither layer (simulated by switching both off): everything is named, the trainer is made
    non-dumpable so its own environ still does not leak, and require_isolation is a one-sentence error."""
    out = _run_as_non_root(open_tmp, disable="namespaces,landlock")
    assert out["contained"] == {"processes": None, "files": None, "network": None}
    (warning,) = out["warnings"]
    assert all(phrase in warning for phrase in NAMED_IN_WARNING.values()) and "require_isolation" in warning
    trainer_stdout, trainer_feedback = out["runs"]["trainer_environ"]
    assert trainer_stdout == "" and trainer_feedback.startswith("PermissionError")
    # What the warning says is true: the probes do reach what is not contained.
    assert CANARY in out["runs"]["home_file"][0] and CANARY in out["runs"]["network"][0]
    assert out["required"].startswith("sandbox.require_isolation is set but") and out["required"].count(". ") == 0


def test_network_is_unreachable_from_a_snippet(sandbox):
    if not sandbox.isolation["contained"]["network"]:
        pytest.skip("no network namespace on this host (the sandbox warned about it)")
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('in')")
    assert result.error == "runtime" and result.stdout == ""
    assert result.feedback().startswith(("OSError", "PermissionError", "ConnectionRefusedError", "TimeoutError"))


def test_as_root_every_threat_is_contained_here(sandbox):
    # uid drop (+ Landlock) as before; on this kernel the namespaces add the network.
    if not IS_ROOT:
        pytest.skip("the root layout is checked as root")
    assert sandbox.isolation["contained"]["processes"] == "separate uid"
    assert sandbox.isolation["contained"]["files"] in ("landlock", "separate uid")


def test_require_isolation_is_checked_before_any_model_loads(monkeypatch):
    """validate() runs the probe when sandbox.require_isolation is set and turns a gap into a ConfigError."""
    from omegaconf import OmegaConf

    import tirl.tools.local_sandbox as sandbox_module
    from tirl.config import ConfigError, validate

    gap = {"contained": {"processes": "pid namespace", "files": None, "network": "net namespace"},
           "problems": ["Landlock: Function not implemented"]}
    monkeypatch.setattr(sandbox_module, "probe_isolation", lambda: gap)
    from hydra import compose, initialize_config_dir

    from tirl.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["sandbox.require_isolation=true"])
    with pytest.raises(ConfigError, match=r"^sandbox.require_isolation is set but .*your files.*Landlock") as err:
        validate(cfg)
    assert str(err.value).count(". ") == 0
    OmegaConf.update(cfg, "sandbox.require_isolation", False)
    validate(cfg)  # not required: no probe, no error (the pool warns when it starts)
