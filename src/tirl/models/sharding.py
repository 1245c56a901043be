"""Fully sharded data parallel (torch FSDP2, ``fully_shard``) for a transformers policy.

One FSDP unit per decoder block (the classes the model names in ``_no_split_modules``, so any transformers family
works without a list of layer classes), then the root (embeddings, final norm, LM head). Parameters become
``DTensor`` shards over the mesh; each unit all-gathers its full parameters just before its forward and frees them
after (``reshard_after_forward``), and reduce-scatters its gradients in backward. Frozen and trainable parameters
may share a unit (FSDP2 shards per parameter), so a LoRA policy is sharded the same way: the frozen base is split
over the ranks and so is the (small) adapter.

This is what Lightning's ``ModelParallelStrategy`` expects the module's ``configure_model`` to do
(``hardware=fsdp``); it is the direction verl (``fsdp2``) and torch take. Reference: torch's FSDP2 tutorial and
``torch.distributed.fsdp.fully_shard``.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a transformers model, possibly inside a peft wrapper), in order.

    Found by the class names the model declares in ``_no_split_modules``. Raises ValueError when the model names
    none or none of its modules has such a class (shard it by hand, or add ``_no_split_modules`` to its class)."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no decoder block class in _no_split_modules, so FSDP cannot "
                         f"find its layers; use a transformers model that does, or hardware=ddp.")
    return blocks


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model`` or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_policy(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
                 cpu_offload: bool = False) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: each decoder block (``decoder_blocks``), then the root. Returns ``model``.

    ``mesh``: a 1-D ``DeviceMesh`` (shard over all its ranks) or 2-D (replicate over dim 0, shard over dim 1: hybrid
    sharding across nodes). ``param_dtype``: the dtype parameters are all-gathered and computed in (bf16 on GPUs:
    fp32 master shards, bf16 compute, as verl's default mixed precision); None keeps the stored dtype.
    ``reduce_dtype``: the dtype gradients are reduce-scattered in (fp32: sums of bf16 gradients lose low bits).
    ``cpu_offload``: shards, gradients and optimizer state live on the CPU between uses (slow; fits more).
    Raises ValueError when the blocks cannot be found (``decoder_blocks``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keeping them saves one all-gather
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model
