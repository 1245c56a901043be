"""Config → backends → resumable run → output JSONL + report, for ``src/distill.py`` and ``src/tirgen.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tirl.data.jsonl import read_jsonl, write_atomic, write_jsonl
from tirl.errors import UserError
from tirl.pipelines.chat_backends import ChatBackend, ChatParams, build_chat_backend, check_chat_backend
from tirl.pipelines.distill import Distiller, DistillSettings
from tirl.pipelines.runner import drop_counts, run_items
from tirl.pipelines.tirgen import TIRGenerator, TIRGenSettings, call_histogram, select_samples

SFT_KEYS = ("messages", "tools", "loss_on")


class InputError(UserError, ValueError):
    """The pipeline input cannot be read."""


def read_inputs(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of a JSONL file; a record without an id gets ``line-<n>``."""
    rows = []
    for n, row in read_jsonl(path, error=InputError):
        if isinstance(row, dict):
            row.setdefault("id", f"line-{n}")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_inputs(cfg: Any) -> list[dict]:
    """``input.path`` (JSONL) or ``input.synthetic`` (the project's toolcall/math generators)."""
    inp = cfg.input
    if inp.get("path"):
        if not Path(inp.path).exists():
            raise InputError(f"input.path '{inp.path}' does not exist; point it at a JSONL file.")
        return read_inputs(inp.path, inp.get("limit"))
    kind, n, seed = inp.synthetic.kind, int(inp.synthetic.n), int(inp.synthetic.seed)
    if kind == "toolcall":
        from tirl.data.synthetic_toolcall import make_toolcall_rl_prompts

        return make_toolcall_rl_prompts(n, seed)
    if kind == "math":
        from tirl.data.synthetic_math import make_math_rl_prompts

        return make_math_rl_prompts(n, seed)
    raise InputError(f"input.synthetic.kind='{kind}' must be toolcall or math.")


def chat_params(node: Any) -> ChatParams:
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return ChatParams(**d)


def _backends(cfg: Any, roles: tuple[str, str]) -> dict[str, ChatBackend]:
    shared: dict = {}
    nodes = {role: OmegaConf.to_container(cfg.backends[role], resolve=True) if isinstance(cfg.backends[role], DictConfig)
             else dict(cfg.backends[role]) for role in roles}
    for role, node in nodes.items():   # every role can run here before the first one loads a model
        check_chat_backend(node, role)
    return {role: build_chat_backend(node, shared) for role, node in nodes.items()}


def _close_own(backends: dict[str, ChatBackend], own: bool) -> None:
    """Close the backends a job built itself (each once: roles may share one), e.g. shut a vLLM engine down."""
    if own:
        for backend in {id(b): b for b in backends.values()}.values():
            backend.close()


def _finish(out: Path, samples: list[dict], report: dict) -> dict:
    write_jsonl(out, ({k: s[k] for k in SFT_KEYS if k in s} for s in samples))
    write_atomic(out.with_suffix(".report.json"), json.dumps(report, indent=2) + "\n")
    return report


def run_distill(cfg: Any, backends: dict[str, ChatBackend] | None = None, show_progress: bool = True) -> dict:
    records = load_inputs(cfg)
    own_backends = backends is None
    backends = backends or _backends(cfg, ("decomposer", "policy"))
    settings = DistillSettings(chat_params(cfg.decomposer_params), chat_params(cfg.policy_params), cfg.composition)
    job = Distiller(backends["decomposer"], backends["policy"], settings, seed=int(cfg.seed))
    out = Path(cfg.output)
    try:
        finished = run_items(records, job, out, int(cfg.max_concurrency), "distill", show_progress)
    finally:
        _close_own(backends, own_backends)
    samples = [s for r in finished for s in r["samples"]]
    report = {**drop_counts(finished), "samples": len(samples),
              "templates": _count(r["info"].get("template") for r in finished if r["status"] == "kept"),
              "backends": {role: b.stats.as_dict() for role, b in backends.items()}}
    return _finish(out, samples, report)


def run_tirgen(cfg: Any, backends: dict[str, ChatBackend] | None = None, sandbox=None,
               show_progress: bool = True) -> dict:
    records = load_inputs(cfg)
    own_backends = backends is None
    backends = backends or _backends(cfg, ("actor", "critic"))
    own_sandbox = sandbox is None
    if own_sandbox:
        from tirl.tools.sandbox import build_sandbox

        spec = OmegaConf.to_container(cfg.sandbox) if isinstance(cfg.sandbox, DictConfig) else dict(cfg.sandbox)
        sandbox = build_sandbox(**{k: v for k, v in spec.items() if v is not None})   # the sandbox group: url null unless fusion
    f = cfg.filters
    settings = TIRGenSettings(chat_params(cfg.actor_params), chat_params(cfg.critic_params), max_steps=int(cfg.max_steps),
                              min_chars=int(f.min_chars), max_chars=int(f.max_chars),
                              max_thin_fraction=float(f.max_thin_fraction), one_call_keep_prob=float(f.one_call_keep_prob))
    job = TIRGenerator(backends["actor"], backends["critic"], sandbox, settings, seed=int(cfg.seed))
    out = Path(cfg.output)
    try:
        finished = run_items(records, job, out, int(cfg.max_concurrency), "tirgen", show_progress)
    finally:
        _close_own(backends, own_backends)
        if own_sandbox:
            sandbox.close()
    samples, selection_drops = select_samples(finished, settings.one_call_keep_prob, int(cfg.seed))
    report = drop_counts(finished)
    report.update(samples=len(samples), selection_drops=dict(selection_drops),
                  code_calls_histogram=call_histogram(samples),
                  backends={role: b.stats.as_dict() for role, b in backends.items()})
    return _finish(out, samples, report)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
