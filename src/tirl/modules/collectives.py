"""The collectives the RL module needs under DDP/FSDP (``torch.distributed``); each is the identity on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max, ``op="max"``) ``t`` over ranks in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def all_reduce_scalar(value: float, op: str = "sum", device=None) -> float:
    """``value`` summed (or maxed) over ranks."""
    if not is_distributed():
        return value
    return all_reduce_(torch.tensor([float(value)], device=device), op).item()


def mean_over_ranks(metrics: dict[str, float], device=None) -> dict[str, float]:
    """Every metric averaged over ranks. Ranks may hold different keys (a filter reason seen on one rank only), so the
    key set is agreed first and a missing key counts as 0 on that rank."""
    if not is_distributed() or dist.get_world_size() == 1:
        return metrics
    key_sets: list = [None] * dist.get_world_size()
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted(set().union(*key_sets))
    t = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))
