"""Advantage shaping, chosen by ``method.shaping.kind``: ``none``, or D-CORE's DA-GRPO.

In a zero-variance group (all G samples scored the same) GRPO's advantage is exactly 0 and the group teaches
nothing; DA-GRPO gives each such response token A = min(α·H, δ) with H the rollout policy's entropy there, which
keeps reflective, high-entropy reasoning from collapsing. The math is ``tirl.rl.core.da_grpo_shape``.
"""

from __future__ import annotations

import torch

from tirl.config.schema import ShapingConfig
from tirl.rl import core

SHAPINGS = ("none", "da_grpo")


def shape_advantages(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
                     cfg: ShapingConfig) -> tuple[torch.Tensor, float]:
    """Per-token advantages [N, T] after shaping, and the fraction of loss tokens that were shaped."""
    if cfg.kind not in SHAPINGS:
        raise ValueError(f"method.shaping.kind='{cfg.kind}' must be one of {list(SHAPINGS)}.")
    zero = (advantages == 0) & (mask > 0)
    frac = zero.sum().item() / max(mask.sum().item(), 1.0)
    if cfg.kind == "none":
        return advantages, 0.0
    return core.da_grpo_shape(advantages, entropy, mask, cfg.alpha, cfg.delta), frac
