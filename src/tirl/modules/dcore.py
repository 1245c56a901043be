"""D-CORE stage 2: DA-GRPO — GRPO whose zero-advantage tokens get an entropy-shaped advantage.

In a zero-variance group (all G samples scored the same) GRPO's advantage is exactly 0 and the group teaches
nothing; D-CORE gives each such response token A = min(α·H, δ) with H the rollout policy's entropy there, which
keeps reflective, high-entropy reasoning from collapsing. The math is ``tirl.rl.core.da_grpo_shape``; the D-CORE
reward is ``tirl.rewards.toolcall.dcore_reward``; defaults are in ``configs/method/dcore.yaml``.
"""

from __future__ import annotations

import torch

from tirl.config.schema import ShapingConfig
from tirl.modules.grpo import GRPOModule
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


class DCoreModule(GRPOModule):
    """GRPO with ``shaping.kind=da_grpo`` and the D-CORE tool-call reward (see configs/method/dcore.yaml)."""

    def __init__(self, method, model, rollout, sandbox, tokenizer, init_from=None):
        if method.shaping.kind != "da_grpo":
            raise ValueError("DCoreModule needs method.shaping.kind=da_grpo; use method=grpo for plain GRPO.")
        super().__init__(method, model, rollout, sandbox, tokenizer, init_from)
