"""THOR's step level: does this code block run?

For a trajectory whose call failed, cut back to L_suf tokens before the failing code block, sample G
continuations from that prefix that stop at the next closing fence, and reward each by whether its block runs
(exit 0 and non-empty stdout). Each prefix is its own group; only the regenerated suffix gets loss. The RL module
adds L_step to L_episode, each normalised over its own tokens.
"""

from __future__ import annotations

import torch

from tirl.config.schema import StepLevelConfig
from tirl.rl import core
from tirl.rl.batch import Sample
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams, Trajectory
from tirl.tools.text_format import last_code_block


class StepLevel:
    def __init__(self, cfg: StepLevelConfig):
        self.cfg = cfg

    def prefixes(self, trajs: list[Trajectory]) -> list[tuple[list[int], int]]:
        """(context, response tokens it keeps) up to L_suf tokens before each trajectory's first failing block
        (never into a tool output)."""
        out = []
        for t in trajs:
            for k, call in enumerate(t.calls):
                if not call.passed:
                    floor = t.calls[k - 1].output_end if k else 0
                    cut = max(floor, call.code_start - self.cfg.suffix_tokens)
                    out.append((t.prompt_ids + t.response_ids[:cut], cut))
                    break
            if len(out) >= self.cfg.max_prefixes:
                break
        return out

    def __call__(self, trajs: list[Trajectory], loop: ToolLoop, sandbox, tokenizer) -> tuple[list[Sample], dict]:
        cut = self.prefixes(trajs)
        if not cut:
            return [], {"prefixes": 0.0}
        prefixes = [p for p, _ in cut]
        G = self.cfg.group_size
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=loop.cfg.temperature,
                                top_p=loop.cfg.top_p, top_k=loop.cfg.top_k, stop_at_code=True)
        # each continuation's own budget: the step's cap, within what is left of its trajectory's response budget
        budgets = [max(1, min(self.cfg.max_new_tokens, loop.cfg.max_total_tokens - kept)) for _, kept in cut]
        gens = loop.backend.generate([p for p in prefixes for _ in range(G)], params,
                                     max_new_tokens=[b for b in budgets for _ in range(G)])
        codes = [last_code_block(tokenizer.decode(g.ids)) if g.stop_reason == "tool" else None for g in gens]
        ran = sandbox.run_batch([c for c in codes if c is not None])
        it = iter(ran)
        rewards = torch.tensor([float(next(it).passed) if c is not None else 0.0 for c in codes], dtype=torch.float64)
        adv = core.group_advantages(rewards, G)
        samples = [Sample(prefixes[i // G], g.ids, [1] * len(g.ids), g.log_probs, g.entropies, a, level="step",
                          group=i // G)
                   for i, (g, a) in enumerate(zip(gens, adv.tolist())) if g.ids]
        return samples, {"prefixes": float(len(prefixes)), "samples": float(len(samples)),
                         "pass_rate": rewards.mean().item()}
