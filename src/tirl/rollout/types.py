"""What rollouts produce: token-exact records of who wrote which token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """The knobs shared by every prompt of one ``generate`` call. A per-prompt quantity (each trajectory's remaining
    token budget) never lives here: it goes to ``generate(..., max_new_tokens=[...])``, one entry per prompt."""

    max_new_tokens: int = 256           # the budget of a prompt when the call gives no per-prompt budgets
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    stop_at_code: bool = True           # pause when a ```python block closes (the environment runs it)


def prompt_budgets(n_prompts: int, params: SamplingParams, max_new_tokens: Sequence[int] | None) -> list[int]:
    """Each prompt's token budget for one ``generate`` call: ``max_new_tokens[i]`` when given, else
    ``params.max_new_tokens`` for all. Raises ValueError when the list's length is not ``n_prompts`` or a budget is
    below 1 (a prompt with no budget left must not be sent)."""
    budgets = [params.max_new_tokens] * n_prompts if max_new_tokens is None else [int(b) for b in max_new_tokens]
    if len(budgets) != n_prompts:
        raise ValueError(f"generate got {len(budgets)} token budgets for {n_prompts} prompts; give one per prompt.")
    if any(b < 1 for b in budgets):
        raise ValueError(f"generate got a token budget of {min(budgets)}; every prompt needs at least 1 token.")
    return budgets


@dataclass
class Generation:
    """One backend call's continuation of one prompt."""

    ids: list[int]
    log_probs: list[float]               # log p(token) under the rollout policy at the rollout temperature
    entropies: list[float]              # entropy of that distribution at each step
    stop_reason: str                    # "eos" | "tool" (a code block closed) | "length"
    code_start: int | None = None       # index in ids of the token where the closing block's ```python begins


@dataclass
class ToolCall:
    """One executed code block: token spans are indices into Trajectory.response_ids."""

    code: str
    code_start: int                     # first token of the ```python fence (model-written)
    code_end: int                       # one past the closing fence token
    output_start: int                   # first environment token
    output_end: int
    passed: bool                        # THOR's rule: exit 0 and non-empty stdout
    error: str | None
    feedback: str                       # what the model was shown


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)     # 1 = model-written, 0 = tool output
    log_probs: list[float] = field(default_factory=list)     # 0.0 on tool tokens
    entropies: list[float] = field(default_factory=list)    # 0.0 on tool tokens
    calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str = ""                                   # eos | length | tool_rounds
    corrections: int = 0                                    # self-correction resamples taken
    meta: dict = field(default_factory=dict)                # prompt record id, group index, …

    def append(self, ids: list[int], model_written: bool, log_probs=None, entropies=None) -> None:
        n = len(ids)
        self.response_ids += ids
        self.response_mask += [int(model_written)] * n
        self.log_probs += list(log_probs) if log_probs is not None else [0.0] * n
        self.entropies += list(entropies) if entropies is not None else [0.0] * n

    def truncate(self, length: int) -> None:
        """Drop every response token from ``length`` on (and calls that started there)."""
        for name in ("response_ids", "response_mask", "log_probs", "entropies"):
            setattr(self, name, getattr(self, name)[:length])
        self.calls = [c for c in self.calls if c.output_end <= length]

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    @property
    def failed_calls(self) -> int:
        return sum(not c.passed for c in self.calls)

    def model_text(self, tokenizer, drop_ids: tuple[int, ...] = ()) -> str:
        """What the model wrote, as text: its own token runs decoded and joined, the environment's left out, and
        trailing ``drop_ids`` (end-of-turn, padding) dropped. Rewards, answer extraction and format checks read
        this, never the whole response: a tool output that prints ``\\boxed{4}`` or ``</think>`` is not the model's."""
        runs = [self.response_ids[s:e] for s, e, model_written in self.segments() if model_written]
        while runs and runs[-1] and runs[-1][-1] in drop_ids:
            runs[-1] = runs[-1][:-1]
        return "".join(tokenizer.decode(r) for r in runs)

    def segments(self) -> list[tuple[int, int, bool]]:
        """Maximal runs of (start, end, model_written) over the response."""
        out, start = [], 0
        for i in range(1, len(self.response_mask) + 1):
            if i == len(self.response_mask) or self.response_mask[i] != self.response_mask[start]:
                out.append((start, i, bool(self.response_mask[start])))
                start = i
        return out
