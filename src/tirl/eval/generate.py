"""Generation for evaluation through the rollout backends: batched chat turns (BFCL) and batched
tool-integrated solutions with the sandbox and optional THOR self-correction (math)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from tirl.config.schema import RolloutConfig
from tirl.data.chat import get_chat_format, render_prompt
from tirl.eval.math_eval import MathSample
from tirl.rollout.backend import HFBackend
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams, Trajectory

log = logging.getLogger(__name__)


@dataclass
class EvalGenerator:
    """Renders chats (Qwen3 conventions), left-truncates over-long prompts, generates through the backend."""

    backend: HFBackend
    tokenizer: Any
    rollout: RolloutConfig
    chat_format: str = "chatml"
    enable_thinking: bool = True
    sandbox: Any = None                 # needed only by solve()
    truncated_prompts: int = 0
    generated_tokens: int = 0           # model-written tokens over the run (throughput figures)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = render_prompt(messages, get_chat_format(self.chat_format), enable_thinking=self.enable_thinking)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.rollout.max_prompt_tokens:
            # keep the end: the question and the assistant header matter more than the top of a long system prompt
            self.truncated_prompts += 1
            ids = ids[-self.rollout.max_prompt_tokens:]
        return ids

    def decode(self, ids: list[int]) -> str:
        while ids and ids[-1] in self.backend.stop_token_ids:   # the end-of-turn token is markup, not answer
            ids = ids[:-1]
        return self.tokenizer.decode(ids)

    def chat(self, conversations: list[list[dict[str, Any]]]) -> list[tuple[str, int]]:
        """One assistant turn per conversation: (text, generated tokens)."""
        params = SamplingParams(max_new_tokens=self.rollout.max_new_tokens, temperature=self.rollout.temperature,
                                top_p=self.rollout.top_p, top_k=self.rollout.top_k, stop_at_code=False)
        gens = self.backend.generate([self.encode_chat(m) for m in conversations], params)
        self.generated_tokens += sum(len(g.ids) for g in gens)
        return [(self.decode(g.ids), len(g.ids)) for g in gens]

    def solve(self, conversations: list[list[dict[str, Any]]], n_samples: int) -> list[list[MathSample]]:
        """`n_samples` tool-integrated solutions per conversation (code run in the sandbox, output appended)."""
        if self.sandbox is None:
            raise RuntimeError("EvalGenerator.solve needs a sandbox to run the model's code; pass sandbox=.")
        loop = ToolLoop(self.backend, self.sandbox, self.tokenizer, self.rollout)
        prompts = [self.encode_chat(m) for m in conversations for _ in range(n_samples)]
        trajs = loop.run(prompts)
        samples = [self._sample(t) for t in trajs]
        self.generated_tokens += sum(s.model_tokens for s in samples)
        return [samples[i * n_samples:(i + 1) * n_samples] for i in range(len(conversations))]

    def _sample(self, t: Trajectory) -> MathSample:
        return MathSample(text=self.decode(t.response_ids),
                          model_text=t.model_text(self.tokenizer, tuple(self.backend.stop_token_ids)),
                          response_tokens=len(t.response_ids),
                          model_tokens=sum(t.model_mask), calls=t.num_calls,
                          passed_calls=t.num_calls - t.failed_calls, corrections=t.corrections,
                          stop_reason=t.stop_reason)


def eval_rollout_config(rollout: RolloutConfig, temperature: float, top_p: float) -> RolloutConfig:
    """The rollout settings with the task's sampling (greedy BFCL, sampled math) in place of training's."""
    return dataclasses.replace(rollout, temperature=temperature, top_p=top_p)
