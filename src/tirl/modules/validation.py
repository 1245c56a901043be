"""Held-out validation of the RL module: per-sample outcomes and the accuracy they add up to, overall and per kind
(BFCL category or math level)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from tirl.rollout.types import Trajectory


def record_kind(record: dict) -> str | None:
    """What a held-out prompt's accuracy is broken down by: its BFCL category, else its math level."""
    if record.get("category"):
        return str(record["category"])
    if record.get("level") is not None:
        return f"level{record['level']}"
    return None


def heldout_outcomes(records: list[dict], trajs: list[Trajectory], rewards: list[float],
                     correct: list[float]) -> list[dict]:
    """One ``{"correct", "reward", "len", "kind", "record"}`` per rollout; ``record`` = ``t.meta["group"]``, the
    index of its prompt in ``records``."""
    return [{"correct": c, "reward": r, "len": len(t.response_ids), "kind": record_kind(records[t.meta["group"]]),
             "record": t.meta["group"]} for t, r, c in zip(trajs, rewards, correct)]


def is_padding(position: int, sampler) -> bool:
    """Whether this rank's ``position``-th record (0-based, in the order it read them) is a repeat that torch's
    ``DistributedSampler`` added so every rank reads as many records: it pads the (possibly shuffled) index list to a
    multiple of the world size by repeating its head and deals position p of that list to rank p mod world, so this
    rank's record ``position`` is list position rank + world·position, a repeat when that is past the dataset's end.
    Any other sampler (one process, a plain loader) adds no repeats."""
    from torch.utils.data import DistributedSampler

    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    return sampler.rank + sampler.num_replicas * position >= len(sampler.dataset)


def heldout_means(outs: list[dict], sum_over_ranks: Callable[[dict], dict]) -> dict[str, float]:
    """Accuracy, reward and response length over every rank's outcomes: sums and counts are added over ranks and
    divided after (a mean of per-rank means would weight a rank with fewer samples like the others)."""
    totals = sum_over_ranks({"correct": sum(o["correct"] for o in outs), "reward": sum(o["reward"] for o in outs),
                             "len": sum(o["len"] for o in outs), "n": float(len(outs))})
    n = max(totals["n"], 1.0)
    return {"acc": totals["correct"] / n, "reward": totals["reward"] / n, "response_len": totals["len"] / n}


def accuracy_by_kind(outs: list[dict], mean_over_ranks: Callable[[dict], dict]) -> dict[str, float]:
    """Accuracy per BFCL category or math level, over all ranks: a single number can hide a trade, e.g. RL
    that learns to call functions more often wins on `simple` what it loses on `irrelevance`. Ranks may hold
    different kinds, so sums and counts go through ``mean_over_ranks`` (its key agreement) and are divided after."""
    stats: dict[str, float] = defaultdict(float)
    for o in outs:
        if o.get("kind") is not None:
            stats[f"correct/{o['kind']}"] += o["correct"]
            stats[f"n/{o['kind']}"] += 1
    stats = mean_over_ranks(dict(stats))
    kinds = sorted(k.split("/", 1)[1] for k in stats if k.startswith("n/") and stats[k] > 0)
    return {kind: stats[f"correct/{kind}"] / stats[f"n/{kind}"] for kind in kinds}
