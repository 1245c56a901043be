"""THOR's name for the RL module: ``GRPOModule`` with the episode filter and the step level on
(``tirl.methods.episode_filter``, ``tirl.methods.step_level``; preset ``configs/method/thor.yaml``).

It adds nothing but a check of the preset, and stays so that ``_target_: tirl.modules.thor.ThorModule`` and
``ThorModule.load_from_checkpoint`` keep working; ``GRPOModule`` with the same config is the same module.
"""

from __future__ import annotations

from tirl.modules.grpo import GRPOModule


class ThorModule(GRPOModule):
    """GRPO with THOR's episode filter and step level switched on (see configs/method/thor.yaml)."""

    def __init__(self, method, model, rollout, sandbox, tokenizer, init_from=None):
        if not (method.episode_filter.enabled or method.step_level.enabled):
            raise ValueError("ThorModule needs method.episode_filter.enabled or method.step_level.enabled; "
                             "use method=grpo for plain GRPO.")
        super().__init__(method, model, rollout, sandbox, tokenizer, init_from)
