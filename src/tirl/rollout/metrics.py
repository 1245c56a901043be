"""Per-step statistics of a batch of rollouts (``train/*`` metrics): reward, accuracy, lengths, entropy, tool use."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tirl.config.schema import RolloutConfig
from tirl.rollout.types import Trajectory
from tirl.tools.calls import parse_calls
from tirl.tools.text_format import split_reasoning

# tasks whose tool use is text graded against a gold answer, never run: the sandbox is not theirs
SANDBOX_FREE_TASKS = ("toolcall",)


def count_function_calls(response: str) -> int:
    """Function calls in a response's final answer (the text after ``</think>``); 0 when it is not a call list."""
    calls = parse_calls(split_reasoning(response)[1])
    return len(calls) if isinstance(calls, list) else 0


def uses_sandbox(t: Trajectory, cfg: RolloutConfig) -> bool:
    """Whether the rollout could run code: tool rounds are on and its task executes code (math), not function
    calling, whose calls are text graded against the gold."""
    return cfg.max_tool_rounds > 0 and t.meta.get("task") not in SANDBOX_FREE_TASKS


def rollout_metrics(trajs: list[Trajectory], rewards: list[float], correct: list[float], cfg: RolloutConfig,
                    response_text: Callable[[Trajectory], str]) -> dict:
    """Per-step rollout statistics. Names say what they count: ``sandbox_*`` over rollouts that could run code
    (absent when none could), ``function_calls_per_sample`` over function-calling rollouts (absent otherwise)."""
    r = torch.tensor(rewards)
    model_tokens = [sum(t.response_mask) for t in trajs]
    ent = [e for t in trajs for e, mm in zip(t.entropies, t.response_mask) if mm]
    out = {
        "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
        "acc": sum(correct) / max(len(correct), 1),
        "response_len": sum(len(t.response_ids) for t in trajs) / max(len(trajs), 1),
        "model_tokens": sum(model_tokens) / max(len(trajs), 1),
        "entropy": sum(ent) / max(len(ent), 1),
        "truncated_frac": sum(t.stop_reason == "length" for t in trajs) / max(len(trajs), 1),
    }
    coded = [t for t in trajs if uses_sandbox(t, cfg)]
    if coded:
        n_runs = sum(t.num_calls for t in coded)
        out["sandbox_calls_per_sample"] = n_runs / len(coded)
        out["sandbox_pass_rate"] = (sum(c.passed for t in coded for c in t.calls) / n_runs) if n_runs else 0.0
        if cfg.self_correction.enabled:
            out["corrections_per_sample"] = sum(t.corrections for t in coded) / len(coded)
    calling = [t for t in trajs if t.meta.get("task") in SANDBOX_FREE_TASKS]
    if calling:
        out["function_calls_per_sample"] = sum(count_function_calls(response_text(t)) for t in calling) / len(calling)
    return out
