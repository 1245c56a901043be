"""Generation for evaluation through the rollout backends: batched chat turns (BFCL) and batched
tool-integrated solutions with the sandbox and optional THOR self-correction (math)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from tirl.benchmarks.math_eval import MathSample
from tirl.config.schema import RolloutConfig
from tirl.data.prompts import PromptEncoder
from tirl.rollout.backend import HFBackend
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams, Trajectory

log = logging.getLogger(__name__)


@dataclass
class EvalGenerator:
    """Prompts records exactly as training does (``tirl.data.prompts.PromptEncoder``: the task's prompt, the
    tokenizer's chat template, left-truncation), generates through the backend."""

    backend: HFBackend
    tokenizer: Any
    rollout: RolloutConfig
    enable_thinking: bool = True
    tool_prompt: str = "system"
    sandbox: Any = None                 # needed only by solve()
    generated_tokens: int = 0           # model-written tokens over the run (throughput figures)

    def __post_init__(self) -> None:
        self.prompts = PromptEncoder(self.tokenizer, self.enable_thinking, self.tool_prompt,
                                     self.rollout.max_prompt_tokens)

    @property
    def truncated_prompts(self) -> int:
        return self.prompts.truncated

    def encode_chat(self, record: dict[str, Any]) -> list[int]:
        """Prompt ids of a record (``{"messages", "task"?, "tools"?}``), as training renders it."""
        return self.prompts.ids(record)

    def decode(self, ids: list[int]) -> str:
        while ids and ids[-1] in self.backend.stop_token_ids:   # the end-of-turn token is markup, not answer
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def chat(self, conversations: list[list[dict[str, Any]]]) -> list[tuple[str, int]]:
        """One assistant turn per conversation (messages shown as they are): (text, generated tokens)."""
        params = SamplingParams(max_new_tokens=self.rollout.max_new_tokens, temperature=self.rollout.temperature,
                                top_p=self.rollout.top_p, top_k=self.rollout.top_k, stop_at_code=False)
        gens = self.backend.generate([self.encode_chat({"messages": m}) for m in conversations], params)
        self.generated_tokens += sum(len(g.ids) for g in gens)
        return [(self.decode(g.ids), len(g.ids)) for g in gens]

    def solve(self, records: list[dict[str, Any]], n_samples: int) -> list[list[MathSample]]:
        """`n_samples` tool-integrated solutions per record (code run in the sandbox, output appended)."""
        if self.sandbox is None:
            raise RuntimeError("EvalGenerator.solve needs a sandbox to run the model's code; pass sandbox=.")
        loop = ToolLoop(self.backend, self.sandbox, self.tokenizer, self.rollout)
        prompts = [self.encode_chat(r) for r in records for _ in range(n_samples)]
        trajs = loop.run(prompts)
        samples = [self._sample(t) for t in trajs]
        self.generated_tokens += sum(s.model_tokens for s in samples)
        return [samples[i * n_samples:(i + 1) * n_samples] for i in range(len(records))]

    def _sample(self, t: Trajectory) -> MathSample:
        return MathSample(text=self.decode(t.response_ids),
                          model_text=t.model_text(self.tokenizer, tuple(self.backend.stop_token_ids)),
                          response_tokens=len(t.response_ids),
                          model_tokens=sum(t.response_mask), calls=t.num_calls,
                          passed_calls=t.num_calls - t.failed_calls, corrections=t.corrections,
                          stop_reason=t.stop_reason)


def eval_rollout_config(rollout: RolloutConfig, temperature: float, top_p: float) -> RolloutConfig:
    """The rollout settings with the task's sampling (greedy BFCL, sampled math) in place of training's."""
    return dataclasses.replace(rollout, temperature=temperature, top_p=top_p)
