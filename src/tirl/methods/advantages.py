"""Episode-level samples: group-normalised advantages (``tirl.rl.core.group_advantages``) over the rollouts that
survive THOR's episode filter when it is on, one ``Sample`` per surviving trajectory."""

from __future__ import annotations

from collections import defaultdict

import torch

from tirl.config.schema import AdvantageConfig
from tirl.methods.episode_filter import EpisodeFilter
from tirl.rl import core
from tirl.rl.batch import Sample
from tirl.rollout.types import Trajectory


def episode_samples(trajs: list[Trajectory], rewards: list[float], a: AdvantageConfig,
                    episode_filter: EpisodeFilter | None, G: int, tokenizer) -> tuple[list[Sample], dict]:
    """Group-normalised advantages (over survivors of THOR's filter when it is on) → one Sample per trajectory.
    ``a.scale == "batch"`` divides by the std of all kept rewards instead of each group's (Dr. GRPO-style "none"
    centring first). Returns the samples and the filter's stats plus ``groups_kept``."""
    keep = [True] * len(trajs)
    stats: dict = {}
    if episode_filter is not None:
        keep, rewards, stats = episode_filter(trajs, rewards, G, tokenizer)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        if keep[i]:
            groups[t.meta["group"]].append(i)
    samples = []
    if a.scale == "batch":
        kept = [i for idx in groups.values() for i in idx]
        batch_std = torch.tensor([rewards[i] for i in kept]).std() if len(kept) > 1 else torch.tensor(0.0)
    for idx in groups.values():
        r = torch.tensor([rewards[i] for i in idx], dtype=torch.float64)
        adv = core.group_advantages(r, len(idx), scale="none" if a.scale == "batch" else a.scale, eps=a.eps)
        if a.scale == "batch":
            adv = adv / (batch_std + a.eps)
        for i, ai in zip(idx, adv.tolist()):
            t = trajs[i]
            samples.append(Sample(t.prompt_ids, t.response_ids, t.response_mask, t.log_probs, t.entropies, ai,
                                  group=t.meta["group"]))
    stats["groups_kept"] = len(groups)
    return samples, stats
