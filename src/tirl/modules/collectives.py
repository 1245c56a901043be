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


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` (picklable objects, every rank gets the list); ``[obj]`` on one process.

    For per-rank state in a checkpoint: Lightning writes the non-tensor part of a checkpoint (``meta.pt`` of a
    sharded one, the whole ``.ckpt`` under DDP) from rank 0 alone, so what differs between ranks (RNG streams,
    refill positions) must be gathered into it. A collective: every rank must call it."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def own_entry(per_rank: list, rank: int, what: str):
    """This rank's entry of a list ``gather_objects`` wrote; with another number of ranks than saved it, rank 0's
    entry and one warning (the run goes on, but does not continue exactly). Raises nothing."""
    import logging

    if rank < len(per_rank) and (not is_distributed() or len(per_rank) == dist.get_world_size()):
        return per_rank[rank]
    world = dist.get_world_size() if is_distributed() else 1
    logging.getLogger(__name__).warning(
        "The checkpoint's %s was saved by %d rank(s) and is resumed by %d: rank %d takes rank 0's, so the run does "
        "not continue exactly.", what, len(per_rank), world, rank)
    return per_rank[0]
