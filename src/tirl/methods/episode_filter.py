"""THOR's episode-level filter: which rollouts the episode-level GRPO learns from.

Episode level: GRPO on final-answer correctness over trajectories that survive the filter — no failed call,
not too short, a ``\\boxed{}`` answer; a trajectory with heavy repetition scores 0; a group with too few
survivors is dropped and dynamic sampling (``GRPOModule.make_experience``) refills the batch.
"""

from __future__ import annotations

from collections import Counter

from tirl.config.schema import EpisodeFilterConfig
from tirl.rewards.math import last_boxed
from tirl.rewards.repetition import has_heavy_repetition
from tirl.rollout.types import Trajectory


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
            elif sum(t.response_mask) < c.min_response_tokens:
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
