"""Build the sandbox that runs model-written Python: ``build_sandbox`` by name, ``sandbox_from_config`` from the
``sandbox`` config group. The parts: ``tirl.tools.exec_result`` (results, the ``Sandbox`` interface, errors),
``tirl.tools.local_sandbox`` (a local pool of warm workers; its docstring lists what it contains and what not),
``tirl.tools.fusion_sandbox`` (a SandboxFusion server). Their public names are importable from here too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tirl.tools.exec_result import (
    ERROR_KINDS,
    ExecResult,
    Sandbox,
    SandboxClosedError,
    SandboxConfigError,
    SandboxIsolationError,
)
from tirl.tools.fusion_sandbox import FusionSandbox
from tirl.tools.local_sandbox import DEFAULT_PRELOAD, LocalSandbox, check_isolation, probe_isolation

if TYPE_CHECKING:   # a type only: config imports tools (the isolation check), not the other way round
    from tirl.config.schema import SandboxConfig

__all__ = ["DEFAULT_PRELOAD", "ERROR_KINDS", "ExecResult", "FusionSandbox", "LocalSandbox", "Sandbox",
           "SandboxClosedError", "SandboxConfigError", "SandboxIsolationError", "build_sandbox", "check_isolation",
           "probe_isolation", "sandbox_from_config"]

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


def sandbox_from_config(s: SandboxConfig) -> Sandbox:
    """The sandbox the ``sandbox`` config group describes."""
    if s.kind == "fusion":
        return build_sandbox("fusion", url=s.url, timeout_s=s.timeout_s)
    return build_sandbox(s.kind, workers=s.workers, timeout_s=s.timeout_s, memory_mb=s.memory_mb,
                         max_output_bytes=s.max_output_bytes, require_isolation=s.require_isolation)
