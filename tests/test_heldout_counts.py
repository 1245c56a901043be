"""Held-out accuracy under several ranks counts every record once: the repeats a DistributedSampler pads with are
dropped, and means are taken over the samples of all ranks, not averaged per rank."""

from __future__ import annotations

import itertools

import pytest
from torch.utils.data import DistributedSampler

from tirl.modules.validation import heldout_means, is_padding


@pytest.mark.parametrize("n,world,shuffle", itertools.product([1, 5, 7, 8, 64], [1, 2, 3, 4], [False, True]))
def test_dropping_the_samplers_repeats_leaves_every_record_exactly_once(n, world, shuffle):
    dataset = list(range(n))
    kept = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        local = list(sampler)
        assert len(local) == -(-n // world)          # every rank reads as many records (repeats included)
        kept += [i for pos, i in enumerate(local) if not is_padding(pos, sampler)]
    assert sorted(kept) == dataset


def test_a_plain_loader_has_no_repeats():
    assert not is_padding(10**6, None)


def test_means_weight_each_sample_not_each_rank():
    # rank 0: 3 samples, 3 correct; rank 1: 1 sample, wrong. Mean of rank means = 0.5; over samples = 0.75.
    ranks = [[{"correct": 1.0, "reward": 1.0, "len": 4}] * 3, [{"correct": 0.0, "reward": -1.0, "len": 8}]]

    def sum_over_ranks(_mine):   # what the all-reduce returns: the same totals on every rank
        return {"correct": 3.0, "reward": 2.0, "len": 20.0, "n": 4.0}

    assert heldout_means(ranks[0], sum_over_ranks) == {"acc": 0.75, "reward": 0.5, "response_len": 5.0}
    one = heldout_means(ranks[0], lambda mine: mine)       # one process: its own sums
    assert one == {"acc": 1.0, "reward": 1.0, "response_len": 4.0}
