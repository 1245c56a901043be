"""The reference policy for the KL term, at the lowest memory cost each setup allows.

The reference is always the RL starting point: ``model.name_or_path`` with the ``init_from`` weights, any LoRA
adapter those carried already merged in (``tirl.models.load``), so the KL is 0 at the first step.

- beta == 0: there is no reference at all (no copy, no forward pass).
- LoRA: the reference *is* that starting model — the same weights with the RL adapter switched off — so it costs
  no second model.
- full fine-tune with beta > 0: a frozen deep copy taken at the start of RL (under FSDP: copied from the whole
  policy before sharding, then sharded itself, so each rank holds 1/world of it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def needs_frozen_reference(policy: nn.Module, kl_coef: float) -> bool:
    """Whether the KL term needs a frozen copy of ``policy`` (a full fine-tune with beta > 0)."""
    return kl_coef != 0 and not is_lora(policy)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_frozen_reference(policy: nn.Module, kl_coef: float) -> nn.Module | None:
    """The frozen copy a full fine-tune needs, or None when no copy is needed (beta = 0 or LoRA). Raises
    RuntimeError for a sharded ``policy`` (a copy of one rank's shards is no model: copy first, then shard both)."""
    if not needs_frozen_reference(policy, kl_coef):
        return None
    from tirl.models.sharding import is_sharded

    if is_sharded(policy):
        raise RuntimeError("The frozen reference must be copied from the policy before it is sharded.")
    return freeze(copy.deepcopy(policy))


@contextmanager
def reference_model(policy: nn.Module, frozen: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the module whose forward gives reference log-probs; use it under ``torch.no_grad``."""
    if frozen is not None:
        yield frozen
        return
    if not is_lora(policy):
        raise RuntimeError("A reference model was requested but the policy has no LoRA adapter and no frozen copy was made.")
    was_training = policy.training
    policy.eval()
    ctx = policy.disable_adapter() if is_lora(policy) else nullcontext()
    try:
        with ctx, torch.no_grad():
            yield policy
    finally:
        policy.train(was_training)
