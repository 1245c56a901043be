"""Run untrusted, model-written Python on a SandboxFusion server over HTTP (``FusionSandbox``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tirl.tools.exec_result import (
    ExecResult,
    SandboxConfigError,
    _check_positive,
    _classify_stderr,
    _sandbox_error,
)


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
