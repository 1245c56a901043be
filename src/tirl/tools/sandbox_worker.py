"""Warm sandbox worker: imports heavy modules once, then runs each snippet in a fresh forked child.

LocalSandbox starts this file as a script (`python -I sandbox_worker.py CONFIG_JSON`) with an empty
environment. It speaks length-prefixed JSON: requests `{"code": str}` on stdin, replies (one per request)
on stdout. Both channel fds are moved to private descriptors at start so that nothing a snippet does to
its own fds 0/1/2 can touch them.

Per snippet the worker forks a child that, before running the code: starts a new session (own process
group, no controlling terminal), drops to a dedicated unprivileged uid when the worker runs as root,
applies RLIMIT_AS / CPU / FSIZE / NPROC / CORE / NOFILE, chdirs into a private temp dir, clears the
environment, and points stdin at /dev/null; then it enters the worker's Landlock domain (see below). The
worker enforces the wall-clock timeout and the output cap, then kills every process the snippet left behind
(the worker is a child subreaper, so orphans come back to it) and removes the temp dir.

Isolation that does not depend on running as root (`_isolate`, once per worker, before anything is
imported): the worker moves into new PID, mount and network namespaces (plus a user namespace when it is
not root, which is what lets an ordinary user create the others), mounts a private /proc, and forks: the
child is the namespace's init and serves snippets; the parent only waits for it (killing the parent kills
the namespace). Snippets then see no process outside it and have no network but an unconfigured loopback.
A Landlock ruleset, applied in each snippet's child, allows reading only the interpreter's files and
system directories, writing only under the worker's temp root, and (ABI >= 6) signals only inside the
domain. Each layer is used where the kernel offers it; the ready message reports what was contained.

This module imports nothing from tirl, so it runs from its file path; LocalSandbox imports the framing
helpers and exit codes from it.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import linecache
import os
import resource
import selectors
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
import types

# Exit statuses the child uses to tell the worker how the snippet ended. A snippet can fake them with
# sys.exit(211); that only mislabels its own failure, so it is not worth a side channel.
EXIT_SYNTAX = 211
EXIT_MEMORY = 212
EXIT_SETUP = 213  # the child could not set up its limits: a sandbox fault, not the snippet's
EXIT_FLUSH = 120  # what CPython itself returns when flushing stdout fails at exit

_HEADER = struct.Struct("!I")
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_READ_CHUNK = 1 << 16
_STATUS_FD = 250  # in the child: where it reports its exit status, just under its RLIMIT_NOFILE of 256
_SNIPPET_NAME = "<snippet>"


# ---------------------------------------------------------------- framing (shared with the parent)


def write_message(fd: int, message: dict) -> None:
    """Send one JSON object, prefixed by its byte length."""
    payload = json.dumps(message).encode()
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def read_exactly(fd: int, n: int, deadline: float | None = None) -> bytes | None:
    """Read n bytes from fd; None on EOF. Raises TimeoutError when the monotonic deadline passes."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            _wait_readable(fd, deadline)
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(fd: int, deadline: float | None = None) -> dict | None:
    """Receive one length-prefixed JSON object; None when the other side closed the channel."""
    header = read_exactly(fd, _HEADER.size, deadline)
    if header is None:
        return None
    payload = read_exactly(fd, _HEADER.unpack(header)[0], deadline)
    return None if payload is None else json.loads(payload)


def _wait_readable(fd: int, deadline: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sel.select(remaining):
            raise TimeoutError("no reply from the sandbox worker before the deadline")


# ---------------------------------------------------------------- the snippet's side of the fork


def _child_main(code: str, workdir: str, pipes: tuple[int, int, int], cfg: dict) -> None:
    """Runs in the forked child; never returns (always os._exit)."""
    try:
        os.setsid()  # own session and process group: the worker can kill the group, no tty signals
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(pipes[0], 1)
        os.dup2(pipes[1], 2)
        os.dup2(pipes[2], _STATUS_FD)
        # The worker's channel, the other pipes, the epoll fd: all gone.
        landlock_fd = cfg.get("landlock_fd")
        _close_fds_except([_STATUS_FD, *cfg.get("keep_fds", []), *([landlock_fd] if landlock_fd is not None else [])])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _apply_limits(cfg)
        os.chdir(workdir)
        uid = cfg.get("uid")
        if uid is not None:  # last: setting limits and the uid needs root, running the code must not
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if landlock_fd is not None:  # after the uid drop: from here on nothing can widen it
            _landlock_restrict(landlock_fd)
        os.environ.clear()
        os.environ.update(_snippet_env(workdir))
        tempfile.tempdir = workdir
        _rebind_std_streams()
    except BaseException:
        os._exit(EXIT_SETUP)
    try:
        status = _run_code(code)
    except BaseException:  # reporting the snippet's own error failed (e.g. no memory left even for that)
        _write_stderr_line("RuntimeError: the code failed and left too little memory to report why")
        status = 1
    _report_status(status)
    os._exit(status)


def _write_stderr_line(line: str) -> None:
    try:
        os.write(2, f"\n{line}\n".encode())
    except OSError:
        pass


def _report_status(status: int) -> None:
    """Close stdout/stderr, then tell the worker the exit status before the slow part of exiting.

    Tearing down a forked copy of a 100+ MB interpreter takes ~1 ms; with the status in hand and the
    output pipes at EOF the worker can reply at once and reap this process afterwards.
    """
    for fd in (1, 2):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.write(_STATUS_FD, status.to_bytes(4, "big"))
    except OSError:
        pass


def _close_fds_except(keep: list[int]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _apply_limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_time_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft → SIGXCPU, hard → SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (cfg["as_limit_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if cfg.get("uid") is not None:
        # RLIMIT_NPROC counts every process of the uid; with a uid of its own this is the snippet's
        # whole process tree. (Root ignores NPROC, hence the uid drop.)
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"],) * 2)
    elif cfg.get("user_namespace"):
        # Counted per user namespace (Linux >= 5.14): the worker's own namespace holds the two worker
        # processes (the one that created it and its init) and the snippet's tree only. Without either,
        # the count would include all of the user's processes: skipped.
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_procs"] + 2,) * 2)


def _snippet_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _rebind_std_streams() -> None:
    # Fresh stream objects on the new fds, so nothing buffered in the worker leaks in.
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        open(2, "wb", buffering=0, closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.argv = ["-c"]


def _run_code(code: str) -> int:
    """Compile and exec like `python -c`, returning the exit status."""
    linecache.cache[_SNIPPET_NAME] = (len(code), None, code.splitlines(keepends=True), _SNIPPET_NAME)
    main = types.ModuleType("__main__")  # a clean __main__, not the worker's
    sys.modules["__main__"] = main
    try:
        compiled = compile(code, _SNIPPET_NAME, "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: source code string cannot contain null bytes
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        _flush_streams()
        return EXIT_SYNTAX
    except MemoryError:
        return _report_memory_error(main)
    status = 0
    try:
        exec(compiled, main.__dict__)
    except SystemExit as exc:
        status = _system_exit_status(exc)
    except MemoryError:
        return _report_memory_error(main)
    except BaseException as exc:
        status = 1
        try:  # skip our own exec frame so the traceback starts at the snippet
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        except BaseException:  # too deep or too little memory to format it: the type alone
            _write_stderr_line(type(exc).__name__)
    if not _flush_streams() and status == 0:
        status = EXIT_FLUSH
    return status


def _system_exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1, as CPython does
    return 1


def _report_memory_error(main: types.ModuleType) -> int:
    # The snippet's globals may hold what filled memory; drop them before writing anything.
    main.__dict__.clear()
    try:
        os.write(2, b"\nMemoryError: the code ran out of memory (address-space limit)\n")
    except OSError:
        pass
    return EXIT_MEMORY


def _flush_streams() -> bool:
    """Flush both streams; False when stdout could not be flushed (closed, or fd 1 closed under it)."""
    try:
        sys.stderr.flush()
    except Exception:
        pass
    if sys.stdout.closed:  # sys.stdout.close() by the snippet: CPython exits quietly too
        return True
    try:
        sys.stdout.flush()
    except Exception as exc:
        try:
            os.write(2, f"\nException ignored while flushing stdout: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        return False
    return True


# ---------------------------------------------------------------- the worker's side


class Worker:
    def __init__(self, cfg: dict, reply_fd: int, request_fd: int) -> None:
        self.cfg = cfg
        self.reply_fd = reply_fd
        self.request_fd = request_fd
        self.uid: int | None = cfg.get("uid")
        self.tmp_root = cfg.get("tmp_root") or tempfile.mkdtemp(prefix="tirl-sandbox-")   # made by the parent
        os.chmod(self.tmp_root, 0o711)  # the snippet's uid may enter its own subdir, not list others
        self.workdir: str | None = None

    def serve(self) -> None:
        try:
            while True:
                request = read_message(self.request_fd)
                if request is None:  # the parent closed the channel (or died)
                    return
                reply, capture = self.run_snippet(request["code"])
                if not capture.parent_gone:
                    write_message(self.reply_fd, reply)
                self.finish(capture)  # after the reply: off the caller's clock, before the next snippet
                if capture.parent_gone:
                    return
        finally:
            shutil.rmtree(self.tmp_root, ignore_errors=True)

    def run_snippet(self, code: str) -> tuple[dict, _Capture]:
        workdir = self._fresh_workdir()
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, exit status
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                _child_main(code, workdir, tuple(w for _, w in pipes), self.cfg)
            finally:
                os._exit(EXIT_SETUP)
        for _, w in pipes:
            os.close(w)
        capture = _Capture(pid, *(r for r, _ in pipes), self.request_fd, self.cfg["max_output_bytes"])
        capture.deadline = start + self.cfg["timeout_s"]
        capture.collect(on_exit=self._kill_leftovers_if_any)
        if capture.status is None and capture.reported is None:
            # Timeout, output cap, or the parent went away: stop everything now.
            status = self.kill_snippet_tree(pid)
            capture.status = status if status is not None else _reap(pid)
            capture.drain()
        return _make_reply(capture, time.monotonic() - start, self.cfg), capture

    def finish(self, capture: _Capture) -> None:
        """Reap the snippet (it reported its status and is exiting), end leftovers, retire the workdir."""
        if capture.status is None:
            remaining = max(capture.deadline - time.monotonic(), 0.05)
            with selectors.DefaultSelector() as sel:
                sel.register(capture.pidfd, selectors.EVENT_READ)
                exited = bool(sel.select(remaining))
            if exited:
                capture.status = os.waitpid(capture.pid, 0)[1]
                self._kill_leftovers_if_any(capture.pid)
            else:  # it reported, closed its output, and still runs: it is stopped like any overrun
                self.kill_snippet_tree(capture.pid)
        capture.close()
        self._retire_workdir()

    def _fresh_workdir(self) -> str:
        if self.workdir is None:
            os.makedirs(self.tmp_root, mode=0o711, exist_ok=True)   # a tmp cleaner may have removed it
            self.workdir = tempfile.mkdtemp(dir=self.tmp_root)
            if self.uid is not None:
                os.chown(self.workdir, self.uid, self.uid)
        return self.workdir

    def _retire_workdir(self) -> None:
        # A dir the snippet left exactly as it got it (empty, same owner and mode) is as good as a new
        # one and saves an rmdir+mkdir per run; anything else is removed with all its contents.
        try:
            st = os.lstat(self.workdir)
            pristine = (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
                        and st.st_uid == (self.uid if self.uid is not None else os.getuid())
                        and not os.listdir(self.workdir))
        except OSError:
            pristine = False
        if not pristine:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _kill_leftovers_if_any(self, snippet_pid: int) -> None:
        # The snippet is reaped; anything it left running was reparented to us (subreaper).
        if _child_pids():
            self.kill_snippet_tree(snippet_pid)

    def kill_snippet_tree(self, snippet_pid: int) -> int | None:
        """Kill every process the snippet started, wherever it moved, and reap them all.

        Returns the snippet's own wait status when it was reaped here (None if it was reaped before).
        """
        snippet_status = None
        if self.cfg.get("pid_namespace"):
            _kill_all_but_init()  # this worker is the namespace's init: everything else in it is the snippet's
        elif self.uid is not None:
            _kill_all_of_uid(self.uid)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.uid is None and not self.cfg.get("pid_namespace"):
                # no uid or namespace of its own: process group, then whatever got reparented to us
                for pid in [snippet_pid, *_child_pids()]:
                    for kill in (os.killpg, os.kill):
                        try:
                            kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # no children left: the whole tree is gone
            if pid == snippet_pid:
                snippet_status = status
            if pid == 0:
                time.sleep(0.001)
        return snippet_status


class _Capture:
    """Reads the snippet's stdout/stderr under the cap while watching its exit and the parent channel."""

    def __init__(self, pid: int, out_r: int, err_r: int, status_r: int, control_fd: int, cap: int) -> None:
        self.pid = pid
        self.cap = cap
        self.buffers = {out_r: bytearray(), err_r: bytearray()}
        self.out_r, self.err_r, self.status_r = out_r, err_r, status_r
        self.total = 0
        self.deadline = 0.0
        self.status: int | None = None  # waitpid status once the snippet exited
        self.reported: int | None = None  # exit status the snippet reported just before exiting
        self.timed_out = self.over_cap = self.parent_gone = False
        self.pidfd = os.pidfd_open(pid)
        self.control_fd = control_fd

    def collect(self, on_exit) -> None:
        """Until the output pipes hit EOF and the exit status is known (reported or waited for)."""
        open_pipes = {self.out_r, self.err_r}
        with selectors.DefaultSelector() as sel:
            for fd in (self.out_r, self.err_r, self.status_r, self.pidfd, self.control_fd):
                sel.register(fd, selectors.EVENT_READ)
            while open_pipes or (self.status is None and self.reported is None):
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.timed_out = True
                    break
                for key, _ in sel.select(remaining):
                    fd = key.fd
                    if fd == self.pidfd:
                        sel.unregister(fd)
                        _, self.status = os.waitpid(self.pid, 0)
                        on_exit(self.pid)  # kills leftovers so their copies of the pipes close
                    elif fd == self.status_r:
                        sel.unregister(fd)
                        data = os.read(fd, 4)
                        if len(data) == 4:
                            self.reported = int.from_bytes(data, "big")
                    elif fd == self.control_fd:
                        self.parent_gone = True  # EOF (or a protocol breach): stop at once
                    elif not self._read(fd):
                        sel.unregister(fd)
                        open_pipes.discard(fd)
                if self.over_cap or self.parent_gone:
                    break

    def exit_code(self) -> int | None:
        """Exit code as subprocess reports it (negative: killed by that signal); None if unknown."""
        if self.status is not None:
            return os.waitstatus_to_exitcode(self.status)
        return self.reported

    def close(self) -> None:
        for fd in (self.out_r, self.err_r, self.status_r, self.pidfd):
            os.close(fd)

    def _read(self, fd: int) -> bool:
        data = os.read(fd, _READ_CHUNK)
        if not data:
            return False
        room = self.cap - self.total
        self.buffers[fd] += data[: max(room, 0)]
        self.total += len(data)
        if self.total > self.cap:
            self.over_cap = True
        return True

    def drain(self) -> None:
        """After the kill: read what is left in the pipes, still under the cap."""
        for fd in (self.out_r, self.err_r):
            os.set_blocking(fd, False)
            try:
                while self.total <= self.cap and self._read(fd):
                    pass
            except BlockingIOError:
                pass

    def text(self, fd: int) -> str:
        return self.buffers[fd].decode("utf-8", errors="replace")


def _make_reply(capture: _Capture, duration: float, cfg: dict) -> dict:
    stdout, stderr = capture.text(capture.out_r), capture.text(capture.err_r)
    code = capture.exit_code()
    error, note = None, None
    if capture.over_cap:
        error, note = "output_limit", f"OutputLimitError: the output exceeded {cfg['max_output_bytes']} bytes"
    elif capture.timed_out:
        error, note = "timeout", f"TimeoutError: the code ran longer than {cfg['timeout_s']:g} s and was stopped"
    elif capture.parent_gone or code is None:
        error, note = "sandbox", "SandboxError: the run was interrupted"
    elif code == -signal.SIGXCPU:
        error, note = "timeout", f"TimeoutError: the code used more than {cfg['cpu_time_s']} s of CPU time"
    elif code == EXIT_SYNTAX:
        error = "syntax"
    elif code == EXIT_MEMORY:
        error = "memory"
    elif code == EXIT_SETUP:
        error, note = "sandbox", "SandboxError: the sandbox could not set up the run"
    elif code < 0:
        error, note = "runtime", f"Killed by signal {signal.Signals(-code).name}"
    elif code != 0:
        error = "runtime"
        if not stderr.strip():
            note = f"SystemExit: {code}"
    if note:
        stderr = f"{stderr}{'' if not stderr or stderr.endswith(chr(10)) else chr(10)}{note}\n"
    return {"ok": error is None, "stdout": stdout, "stderr": stderr, "error": error, "duration_s": duration}


def _child_pids() -> list[int]:
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.extend(int(p) for p in f.read().split())
    return pids


def _kill_all_of_uid(uid: int) -> None:
    """Fork a helper that becomes `uid` and signals every process of that uid (kill(-1) semantics).

    Stopping first freezes a fork bomb so the final SIGKILL pass catches every member; the uid is this
    worker's alone, so nothing else is hit. Processes that called setsid() are caught too.
    """
    helper = os.fork()
    if helper == 0:
        try:
            os.setuid(uid)
            for sig in (signal.SIGSTOP, signal.SIGSTOP, signal.SIGSTOP, signal.SIGKILL, signal.SIGKILL):
                try:
                    os.kill(-1, sig)
                except ProcessLookupError:
                    pass
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _kill_all_but_init() -> None:
    """kill(-1) from a PID namespace's init reaches every other process in the namespace, setsid or not."""
    for sig in (signal.SIGSTOP, signal.SIGSTOP, signal.SIGKILL, signal.SIGKILL):
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            pass


def _reap(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # already reaped by kill_snippet_tree
        return None


def _reroute_unreachable_import_paths() -> list[int]:
    """Let a snippet's uid import from dirs it cannot reach by name, and nothing more.

    An interpreter under a private home (e.g. /root at mode 0700 with pyenv inside) has its stdlib behind
    a dir the snippet's uid may not enter. For each such sys.path dir the worker keeps a directory fd
    open (inherited by every snippet) and points sys.path and every loaded package's __path__/__file__
    at /proc/self/fd/N/..., which resolves through the fd without walking the private parent. The rest
    of that parent stays closed to the snippet. Returns the fds to keep open in children.
    """
    mapping: dict[str, str] = {}
    for entry in sys.path:
        if entry and entry not in mapping and os.path.isdir(entry) and not _reachable_by_others(entry):
            mapping[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"
    if not mapping:
        return []
    prefixes = sorted(mapping, key=len, reverse=True)

    def remap(path: str) -> str:
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix + os.sep):
                return mapping[prefix] + path[len(prefix) :]
        return path

    sys.path[:] = [remap(p) for p in sys.path]
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [remap(p) if isinstance(p, str) else p for p in package_path]
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            module.__file__ = remap(file)
    sys.path_importer_cache.clear()
    return [int(fd_path.rsplit("/", 1)[1]) for fd_path in mapping.values()]


def _reachable_by_others(path: str) -> bool:
    """Can a uid with no groups list `path` and walk down to it (other-x on every ancestor)?"""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & 0o005 == 0o005:
        return False
    while path != os.sep:
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True

# ---------------------------------------------------------------- isolation: namespaces and Landlock

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 1 << 18
# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ALL_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_READ_ONLY = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
# What a snippet may read besides the interpreter's own paths: system libraries, executables, config.
_SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc",
                      "/sys/devices/system/cpu")
_DEVICE_FILES = {"/dev/null": _FS_READ_FILE | _FS_WRITE_FILE, "/dev/zero": _FS_READ_FILE,
                 "/dev/urandom": _FS_READ_FILE, "/dev/random": _FS_READ_FILE}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _isolate(cfg: dict, channel_fds: tuple[int, int]) -> dict:
    """Namespaces (then fork into the new PID namespace) and a Landlock ruleset for the snippets.

    Returns the report sent with the ready message: per threat, what contains it (None: nothing does).
    Only the namespace's init returns; the process that created the namespaces waits for it and exits.
    """
    report = {"uid": cfg.get("uid") is not None, "namespaces": [], "proc": False, "landlock_abi": 0,
              "problems": []}
    if not cfg.get("namespaces", True):
        report["problems"].append("namespaces switched off")
    else:
        _enter_namespaces(report, channel_fds)
    try:
        abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
        if abi < 0:
            report["problems"].append(f"Landlock: {os.strerror(ctypes.get_errno())}")
        elif not cfg.get("landlock", True):
            report["problems"].append("Landlock switched off")
        else:
            cfg["landlock_fd"] = _landlock_ruleset(abi, cfg["tmp_root"], proc_is_private=report["proc"])
            _verify_landlock(cfg["landlock_fd"])
            report["landlock_abi"] = abi
    except OSError as exc:
        cfg.pop("landlock_fd", None)
        report["problems"].append(f"Landlock: {exc}")
    report["contained"] = _contained(report)
    return report


def _enter_namespaces(report: dict, channel_fds: tuple[int, int]) -> None:
    uid, gid = os.getuid(), os.getgid()
    wanted = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET
    if uid != 0:  # an ordinary user may create the others inside a user namespace of its own
        wanted |= _CLONE_NEWUSER
    for flags in (wanted, wanted & ~_CLONE_NEWNET):  # some hosts forbid only network namespaces
        if _libc.unshare(flags) == 0:
            break
        err = ctypes.get_errno()
    else:
        report["problems"].append(f"namespaces: {os.strerror(err)}")
        return
    try:
        if flags & _CLONE_NEWUSER:  # the same ids inside as outside, no root inside
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except OSError as exc:
        report["problems"].append(f"user namespace maps: {exc}")
    report["namespaces"] = [n for bit, n in ((_CLONE_NEWUSER, "user"), (_CLONE_NEWPID, "pid"), (_CLONE_NEWNS, "mount"),
                                             (_CLONE_NEWNET, "net")) if flags & bit]
    # unshare(CLONE_NEWPID) places the caller's next child, not the caller, in the new namespace.
    child = os.fork()
    if child:
        for fd in channel_fds:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the parent killed: the namespace goes too
    try:
        _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        _check(_libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None), "mount /proc")
        report["proc"] = True
    except OSError as exc:
        report["problems"].append(str(exc))
    if flags & _CLONE_NEWUSER:
        _drop_capabilities()  # the namespace's capabilities would let a snippet unmount the private /proc


def _drop_capabilities() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all sets empty
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _landlock_ruleset(abi: int, tmp_root: str, proc_is_private: bool) -> int:
    """A ruleset fd: read the interpreter and the system, write the temp root, TCP nowhere, signals inside."""
    handled = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (
        _FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
                        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    os.set_inheritable(ruleset, True)
    rules = {p: _READ_ONLY for p in (*_SYSTEM_READ_PATHS, *_interpreter_paths())}
    if proc_is_private:  # a /proc of the snippet's own PID namespace: nothing of anyone else's in it
        rules["/proc"] = _READ_ONLY
    rules.update(_DEVICE_FILES)
    rules[tmp_root] = handled
    for path, access in rules.items():
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # not on this system
        try:
            if not os.path.isdir(path):
                access &= _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE
            rule = _PathBeneathAttr(access & handled, fd)
            _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                                 ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        finally:
            os.close(fd)
    return ruleset


def _interpreter_paths() -> list[str]:
    """Where the interpreter and its modules live (resolved), which a snippet must read to import."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in sys.path if p)
    resolved = {os.path.realpath(p) for p in paths if os.path.exists(p)}
    return sorted(p for p in resolved if p != os.sep)


def _landlock_restrict(ruleset_fd: int) -> None:
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset_fd)


def _verify_landlock(ruleset_fd: int) -> None:
    """Apply the ruleset once in a throwaway child, so a kernel or seccomp refusal shows up now."""
    pid = os.fork()
    if pid == 0:
        try:
            _landlock_restrict(ruleset_fd)
            os._exit(0)
        except BaseException:
            os._exit(1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise OSError("the ruleset could not be applied")


def _contained(report: dict) -> dict[str, str | None]:
    """For each threat, the mechanism that contains it (None: not contained)."""
    spaces, abi, root = report["namespaces"], report["landlock_abi"], report["uid"]
    private_pids = "pid" in spaces and report["proc"]
    return {
        # signals, ptrace, /proc/<pid>/environ of the trainer and of the user's other processes
        "processes": "separate uid" if root else "pid namespace" if private_pids else
                     "landlock" if abi >= 6 else None,
        # the user's own files (tokens in the home directory), and writes outside the temp dir
        "files": "landlock" if abi else "separate uid" if root else None,
        "network": "net namespace" if "net" in spaces else None,
    }


def _measure_address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read VmSize from /proc/self/status")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # Private copies of the channel; fds 0/1 become /dev/null so no stray write can corrupt the protocol.
    request_fd, reply_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a PID namespace's init, only handled signals arrive
    isolation = _isolate(cfg, (request_fd, reply_fd))  # before any import: the waiting parent stays small
    cfg["pid_namespace"] = "pid" in isolation["namespaces"]
    cfg["user_namespace"] = "user" in isolation["namespaces"]
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a snippet come back to us, not init
    missing = []
    for name in cfg["preload"]:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    # Move everything imported so far out of the collector's sight: a collection in a child would
    # otherwise touch (and so copy) every page of the preloaded heap.
    gc.freeze()
    if cfg.get("uid") is not None:
        cfg["keep_fds"] = _reroute_unreachable_import_paths()
    baseline = _measure_address_space()
    cfg["as_limit_bytes"] = baseline + cfg["memory_mb"] * (1 << 20)
    worker = Worker(cfg, reply_fd, request_fd)
    write_message(reply_fd, {"ready": True, "pid": os.getpid(), "baseline_mb": baseline / (1 << 20), "missing": missing,
                             "isolation": isolation})
    worker.serve()


if __name__ == "__main__":
    main()
