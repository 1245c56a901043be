"""Fully sharded data parallel (torch FSDP2, ``fully_shard``) for a transformers policy.

One FSDP unit per decoder block (the classes the model names in ``_no_split_modules``, so any transformers family
works without a list of layer classes), then the root (embeddings, final norm, LM head). Parameters become
``DTensor`` shards over the mesh; each unit all-gathers its full parameters just before its forward and frees them
after (``reshard_after_forward``), and reduce-scatters its gradients in backward. Frozen and trainable parameters
may share a unit (FSDP2 shards per parameter), so a LoRA policy is sharded the same way: the frozen base is split
over the ranks and so is the (small) adapter.

This is what Lightning's ``ModelParallelStrategy`` expects the module's ``configure_model`` to do
(``hardware=fsdp``, through ``FSDP2Strategy``); it is the direction verl (``fsdp2``) and torch take. Reference:
torch's FSDP2 tutorial and ``torch.distributed.fsdp.fully_shard``.

Sampling over a sharded policy (``full_weights``): every forward of a sharded unit is a collective (an all-gather),
so ranks that run different numbers of decode steps, tool rounds or resamples would wait on each other forever. The
rollout phase therefore gathers the full weights once, generates with no collective at all, and frees them after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure data parallelism: a 1-D mesh over every process of every node
    (``data_parallel`` of size world, ``tensor_parallel`` of size 1), so each rank gets its own share of the data;
    the module shards itself in ``configure_model`` (``shard_policy``). Lightning's default mesh would be
    (nodes, devices per node), which gives all ranks of a node the same data. ``timeout``: seconds (or a timedelta)
    a collective may wait before its rank fails (tests set it short so a desync fails instead of hanging).
    ``kwargs``: ModelParallelStrategy's (``save_distributed_checkpoint``, ``process_group_backend``)."""

    def __init__(self, timeout: float | timedelta | None = None, **kwargs):
        if timeout is not None and not isinstance(timeout, timedelta):
            kwargs["timeout"] = timedelta(seconds=float(timeout))
        elif timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


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
    trains = any(p.requires_grad for p in model.parameters())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keeping them saves one all-gather (a
        # frozen copy has no backward, so it would keep them gathered for good)
        last = trains and i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def sharding_mesh(data_parallel, sharding: str, num_nodes: int):
    """The mesh ``shard_policy`` shards over: ``data_parallel`` itself (``sharding="full"``: every rank holds 1/world
    of each parameter), or for ``"hybrid"`` a 2-D (``replicate``, ``shard``) mesh over the same ranks: shard inside
    a node (fast links), replicate across the ``num_nodes`` nodes (gradients all-reduced once per step over the
    slow network; torch's HSDP). Raises ValueError for another name or ranks that do not split evenly by node."""
    if sharding == "full":
        return data_parallel
    if sharding != "hybrid":
        raise ValueError(f"model.fsdp.sharding='{sharding}' must be 'full' or 'hybrid'.")
    from torch.distributed.device_mesh import init_device_mesh

    world = data_parallel.size()
    if world % num_nodes:
        raise ValueError(f"model.fsdp.sharding=hybrid needs the same number of processes on each of the {num_nodes} "
                         f"nodes, but there are {world} in all; set trainer.devices to the processes per node.")
    return init_device_mesh(data_parallel.device_type, (num_nodes, world // num_nodes),
                            mesh_dim_names=("replicate", "shard"))


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of ``model`` (``fully_shard`` applied), in module order."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every FSDP unit of ``model`` holds its full (unsharded) parameters, gathered once on entry, and its
    forwards run no collective; on exit they are sharded again. Any other model passes through unchanged, and so
    does a nested use. Every rank must enter and leave together (the gather is a collective); what runs inside may
    differ per rank (decode steps, tool rounds, resamples). Use it around generation only, under no grad.

    Memory: the full parameters in the all-gather dtype (``model.fsdp.param_dtype``) on every rank for the whole
    block: bf16 ~16 GB for an 8B model, ~28 GB for 14B; LoRA adds its small adapter."""
    units = fsdp_modules(model)
    if not units or getattr(model, "_tirl_full_weights", False):
        yield model
        return
    # a unit that reshards after its forward would free what it gathered and gather again in the next forward;
    # FSDP2 has a setter for that but no getter, so each unit's own setting is kept to be put back as it was
    states = [unit._get_fsdp_state() for unit in units]
    saved = [(state, state._auto_reshard_after_forward,
              [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]) for state in states]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    model._tirl_full_weights = True
    try:
        handles = [unit.unshard(async_op=True) for unit in units]
        for handle in handles:
            if handle is not None:
                handle.wait()
        yield model
    finally:
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info
        for unit in units:
            unit.reshard()
        model._tirl_full_weights = False


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to a global L2 norm of ``max_norm`` in place; return that norm before
    clipping as a float. Sharded (DTensor) gradients give the norm over every rank's shard (torch's
    ``clip_grad_norm_`` returns it as a DTensor with a pending reduction; ``full_tensor`` completes it), so the
    clip factor and the logged value are the same as one process would compute. A collective under FSDP."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
