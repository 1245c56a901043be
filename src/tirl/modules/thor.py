"""THOR's hierarchical RL: the episode level (final answer) and the step level (does this code block run?).

Episode level: GRPO on final-answer correctness over trajectories that survive the filter — no failed call,
not too short, a ``\\boxed{}`` answer; a trajectory with heavy repetition scores 0; a group with too few
survivors is dropped and dynamic sampling refills the batch.

Step level: for a trajectory whose call failed, cut back to L_suf tokens before the failing code block, sample G
continuations from that prefix that stop at the next closing fence, and reward each by whether its block runs
(exit 0 and non-empty stdout). Each prefix is its own group; only the regenerated suffix gets loss. The module
adds L_step to L_episode, each normalised over its own tokens.
"""

from __future__ import annotations

from collections import Counter

import torch

from tirl.config.schema import EpisodeFilterConfig, StepLevelConfig
from tirl.modules.grpo import GRPOModule
from tirl.modules.rl_batch import Sample
from tirl.rewards.math import last_boxed
from tirl.rewards.repetition import has_heavy_repetition
from tirl.rl import core
from tirl.rollout.tool_loop import ToolLoop
from tirl.rollout.types import SamplingParams, Trajectory
from tirl.tools.text_format import last_code_block


class EpisodeFilter:
    def __init__(self, cfg: EpisodeFilterConfig):
        self.cfg = cfg

    def __call__(self, trajs: list[Trajectory], rewards: list[float], group_size: int,
                 tokenizer) -> tuple[list[bool], list[float], dict]:
        c = self.cfg
        keep, out_rewards, why = [], list(rewards), Counter()
        for i, t in enumerate(trajs):
            text = t.model_text(tokenizer)      # the model's own text: a printed \boxed{} is not its answer
            reason = None
            if c.drop_failed_calls and t.failed_calls:
                reason = "failed_call"
            elif sum(t.model_mask) < c.min_response_tokens:
                reason = "too_short"
            elif c.drop_no_boxed and last_boxed(text) is None:
                reason = "no_boxed"
            if reason:
                why[reason] += 1
            elif c.zero_on_repetition and has_heavy_repetition(text):
                out_rewards[i] = 0.0
                why["repetition_zeroed"] += 1
            keep.append(reason is None)
        by_group: dict[int, list[int]] = {}
        for i, t in enumerate(trajs):
            by_group.setdefault(t.meta["group"], []).append(i)
        for idx in by_group.values():
            alive = [i for i in idx if keep[i]]
            flat = len({out_rewards[i] for i in alive}) <= 1
            if len(alive) < c.min_group_survivors or (c.drop_zero_variance and flat):
                why["groups_dropped_zero_variance" if alive and len(alive) >= c.min_group_survivors
                    else "groups_dropped_few_survivors"] += 1
                for i in idx:
                    keep[i] = False
        stats = {f"dropped_{k}" if not k.startswith("groups") and k != "repetition_zeroed" else k: float(v)
                 for k, v in why.items()}
        stats["kept_frac"] = sum(keep) / max(len(keep), 1)
        return keep, out_rewards, stats


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
        samples = [Sample(prefixes[i // G], g.ids, [1] * len(g.ids), g.logprobs, g.entropies, a, level="step")
                   for i, (g, a) in enumerate(zip(gens, adv.tolist())) if g.ids]
        return samples, {"prefixes": float(len(prefixes)), "samples": float(len(samples)), "pass_rate": rewards.mean().item()}


class ThorModule(GRPOModule):
    """GRPO with THOR's episode filter and step level switched on (see configs/method/thor.yaml)."""

    def __init__(self, method, model, rollout, sandbox, tokenizer, init_from=None):
        if not (method.episode_filter.enabled or method.step_level.enabled):
            raise ValueError("ThorModule needs method.episode_filter.enabled or method.step_level.enabled; "
                             "use method=grpo for plain GRPO.")
        super().__init__(method, model, rollout, sandbox, tokenizer, init_from)
