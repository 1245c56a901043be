"""D-CORE stage 2's name for the RL module: ``GRPOModule`` with DA-GRPO advantage shaping
(``tirl.methods.shaping``) and the D-CORE tool-call reward (``tirl.rewards.toolcall.dcore_reward``); preset
``configs/method/dcore.yaml``.

It adds nothing but a check of the preset, and stays so that ``_target_: tirl.modules.dcore.DCoreModule`` and
checkpoints saved from it keep loading; ``GRPOModule`` with the same config is the same module.
"""

from __future__ import annotations

from tirl.modules.grpo import GRPOModule


class DCoreModule(GRPOModule):
    """GRPO with ``shaping.kind=da_grpo`` and the D-CORE tool-call reward (see configs/method/dcore.yaml)."""

    def __init__(self, method, model, rollout, sandbox, tokenizer, init_from=None):
        if method.shaping.kind != "da_grpo":
            raise ValueError("DCoreModule needs method.shaping.kind=da_grpo; use method=grpo for plain GRPO.")
        super().__init__(method, model, rollout, sandbox, tokenizer, init_from)
