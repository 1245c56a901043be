"""The update schedule of one rollout round: which samples each optimizer step trains on (pure, no tensors).

verl's vocabulary: a *rollout round* samples ``rollout_batch_size`` prompts (G samples each); the round is split
into PPO *mini-batches* of whole groups, one optimizer step each; ``ppo_epochs`` repeats the pass over the round
with a fresh shuffle; each mini-batch is run in *micro-batches* for memory (the module's job). A group is every
sample that shares one advantage baseline: an episode group (one prompt's G samples) or a THOR step-level group
(one failing prefix's continuations) alike.

The number of mini-batches per round is fixed (``rollout_batch_size / mini_batch_size``) even when THOR's filter
drops groups or its step level adds some, so a round is always the same number of optimizer steps and
``trainer.max_steps``, the LR schedule and checkpoints keep counting optimizer steps. The shuffle is a function of
(seed, round, epoch, rank) only — it draws from no global RNG (sampling stays unshifted) and the round index is
``global_step // steps_per_round``, so a run resumed from a checkpoint shuffles exactly as the uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

from tirl.errors import UserError


class ScheduleError(UserError, ValueError):
    """A rollout/mini-batch/world-size combination that cannot be split evenly; the message says how to fix it."""


def mini_batches_per_round(rollout_batch_size: int, mini_batch_size: int | None) -> int:
    """Optimizer steps per pass over a round: rollout_batch_size / mini_batch_size (None: the whole round, 1).
    Raises ScheduleError when mini_batch_size does not divide rollout_batch_size."""
    if mini_batch_size is None:
        return 1
    if mini_batch_size < 1 or rollout_batch_size % mini_batch_size:
        raise ScheduleError(f"method.rollout_batch_size={rollout_batch_size} must be a multiple of "
                            f"method.mini_batch_size={mini_batch_size} (prompts per optimizer step); pick a divisor, "
                            f"e.g. method.mini_batch_size={_divisor_near(rollout_batch_size, mini_batch_size)}.")
    return rollout_batch_size // mini_batch_size


def steps_per_round(rollout_batch_size: int, mini_batch_size: int | None, ppo_epochs: int) -> int:
    """Optimizer steps one rollout round makes (= one Lightning ``training_step``): mini-batches × ppo_epochs."""
    return mini_batches_per_round(rollout_batch_size, mini_batch_size) * ppo_epochs


def check_world_size(rollout_batch_size: int, mini_batch_size: int | None, world_size: int) -> None:
    """Every rank must roll out the same number of prompts and hold the same share of every mini-batch.
    Raises ScheduleError naming the key to change."""
    if rollout_batch_size % world_size:
        raise ScheduleError(f"method.rollout_batch_size={rollout_batch_size} (prompts per round over all ranks) must "
                            f"be a multiple of the {world_size} training processes; set it to "
                            f"{max(world_size, rollout_batch_size // world_size * world_size)} or change trainer.devices.")
    if mini_batch_size is not None and mini_batch_size % world_size:
        raise ScheduleError(f"method.mini_batch_size={mini_batch_size} (prompts per optimizer step over all ranks) "
                            f"must be a multiple of the {world_size} training processes; set it to a multiple of "
                            f"{world_size} that divides method.rollout_batch_size={rollout_batch_size}.")


def _divisor_near(n: int, want: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - want), d))


def round_permutation(n: int, seed: int, round_index: int, epoch: int, rank: int = 0) -> list[int]:
    """A permutation of range(n), a function of its arguments only (a private ``random.Random``)."""
    order = list(range(n))
    random.Random(f"tirl-minibatch:{seed}:{round_index}:{epoch}:{rank}").shuffle(order)
    return order


def plan_round(group_keys: Sequence[Hashable], num_mini_batches: int, ppo_epochs: int, seed: int = 0,
               round_index: int = 0, rank: int = 0) -> list[list[int]]:
    """Row indices of each optimizer step of a round: ``ppo_epochs × num_mini_batches`` lists, in step order.

    group_keys: one key per sample (row) of this rank's round; rows with equal keys are one group and always land
    in the same mini-batch, in their original order. Each epoch shuffles the groups (``round_permutation``) and
    cuts them into ``num_mini_batches`` contiguous runs whose sizes differ by at most one group; a run may be empty
    (fewer groups than mini-batches on this rank) — the module still takes its step so every rank takes the same
    number. With one mini-batch the groups keep their order (the step sums the same rows either way).
    Raises ValueError for num_mini_batches or ppo_epochs < 1.
    """
    if num_mini_batches < 1 or ppo_epochs < 1:
        raise ValueError(f"num_mini_batches and ppo_epochs must be >= 1, got {num_mini_batches} and {ppo_epochs}.")
    rows_of: dict[Hashable, list[int]] = {}
    for row, key in enumerate(group_keys):
        rows_of.setdefault(key, []).append(row)
    groups = list(rows_of.values())
    plan = []
    for epoch in range(ppo_epochs):
        order = (round_permutation(len(groups), seed, round_index, epoch, rank) if num_mini_batches > 1
                 else list(range(len(groups))))
        base, extra = divmod(len(groups), num_mini_batches)
        start = 0
        for j in range(num_mini_batches):
            size = base + (j < extra)
            plan.append([row for g in order[start:start + size] for row in groups[g]])
            start += size
    return plan


def token_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Micro-batches of a mini-batch's rows by a token budget (verl's ``use_dynamic_bsz``): indices into ``lengths``,
    each row exactly once, each micro-batch's tokens ≤ ``budget`` except a row longer than the budget, which gets a
    micro-batch of its own; as few micro-batches as first-fit-decreasing needs, with tokens balanced between them.

    lengths: tokens per row (what a packed forward reads). Method: the rows over budget alone; the rest
    first-fit-decreasing (FFD) into bins of ``budget`` — k bins; then the longest-processing-time rule (each row,
    longest first, to the least-loaded of k' bins) for the smallest k' ≥ ceil(tokens/budget) whose bins all fit,
    which balances the bins (LPT is within 4/3 of the optimal makespan, Graham 1969); FFD's bins when none does.
    Micro-batches come longest first and list their rows in ascending order. Raises ValueError for budget < 1.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}.")
    big = [[i] for i, n in enumerate(lengths) if n > budget]
    rest = sorted((i for i, n in enumerate(lengths) if n <= budget), key=lambda i: (-lengths[i], i))
    ffd: list[list[int]] = []
    loads: list[int] = []
    for i in rest:
        j = next((j for j, load in enumerate(loads) if load + lengths[i] <= budget), None)
        if j is None:
            ffd.append([i])
            loads.append(lengths[i])
        else:
            ffd[j].append(i)
            loads[j] += lengths[i]
    bins = ffd
    for k in range(max(1, -(-sum(lengths[i] for i in rest) // budget)), len(ffd) + 1):
        lpt: list[list[int]] = [[] for _ in range(k)]
        lpt_loads = [0] * k
        for i in rest:
            j = min(range(k), key=lambda b: (lpt_loads[b], b))
            lpt[j].append(i)
            lpt_loads[j] += lengths[i]
        if max(lpt_loads) <= budget:
            bins = lpt
            break
    out = [sorted(b) for b in big + bins if b]
    return sorted(out, key=lambda b: (-sum(lengths[i] for i in b), b))
