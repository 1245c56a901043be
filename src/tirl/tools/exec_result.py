"""What running a snippet gives back (``ExecResult``), the interface every sandbox has (``Sandbox``) and the
errors a sandbox raises. The implementations: ``tirl.tools.local_sandbox`` (a local pool of warm workers) and
``tirl.tools.fusion_sandbox`` (a SandboxFusion server); ``tirl.tools.sandbox`` builds one from config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tirl.errors import UserError

ERROR_KINDS = ("timeout", "memory", "syntax", "runtime", "output_limit", "sandbox")


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


def _classify_stderr(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax"
    if last.startswith("MemoryError"):
        return "memory"
    return "runtime"


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise SandboxConfigError(f"Sandbox setting {name} must be > 0, got {value!r}.")
