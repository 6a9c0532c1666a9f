"""The sampler hands every index the loss weight of the optimizer step it lands in."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plpost.data.sampler import AccumulationWindowSampler, DataPosition, length_grouped_order


def test_window_weights_single_device():
    """weights 1..10, micro-batch 2, accumulation 2: steps hold indices 0-3, 4-7, 8-9, so their
    weights are 1+2+3+4 = 10, 5+6+7+8 = 26 and 9+10 = 19 (the short last window counts what it holds)."""
    sampler = AccumulationWindowSampler(list(range(1, 11)), batch_size=2, accumulate=2, shuffle=False)
    assert list(sampler) == [(i, w) for i, w in zip(range(10), [10] * 4 + [26] * 4 + [19] * 2)]


def test_ranks_split_the_data_and_agree_on_each_window():
    """Two ranks, micro-batch 2, accumulation 1: a step takes global positions 0-3, i.e. two per rank;
    both ranks report the same total for the step, and together they see every index once."""
    weights = [3, 1, 4, 1, 5, 9, 2, 6]
    ranks = [
        list(AccumulationWindowSampler(weights, batch_size=2, num_replicas=2, rank=r, shuffle=True, seed=7))
        for r in (0, 1)
    ]
    assert sorted(i for rank in ranks for i, _ in rank) == list(range(8))
    for step in range(2):
        rank0, rank1 = ranks[0][2 * step : 2 * step + 2], ranks[1][2 * step : 2 * step + 2]
        step_indices = [i for i, _ in rank0 + rank1]
        expected = sum(weights[i] for i in step_indices)
        assert {w for _, w in rank0 + rank1} == {expected}


def test_uneven_split_wraps_around_and_counts_repeats():
    """5 examples on 2 ranks: 3 each, the first index repeated, as DistributedSampler does."""
    weights = [1, 1, 1, 1, 1]
    ranks = [list(AccumulationWindowSampler(weights, batch_size=4, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert [i for i, _ in ranks[0]] == [0, 2, 4] and [i for i, _ in ranks[1]] == [1, 3, 0]
    assert {w for rank in ranks for _, w in rank} == {6.0}


def test_set_epoch_reshuffles_deterministically():
    sampler = AccumulationWindowSampler([1.0] * 50, batch_size=5, seed=1)
    first = [i for i, _ in sampler]
    assert first == [i for i, _ in sampler]
    sampler.set_epoch(1)
    assert first != [i for i, _ in sampler]
    assert sorted(first) == list(range(50))


def test_length_grouped_order_sorts_within_groups_and_keeps_a_short_block_last():
    """order 0..8, block 2, groups of 2 blocks: groups are {0,1,2,3}, {4,5,6,7} and {8}.
    Lengths 5,1,7,3 | 2,8,4,6 | 9. Sorted longest first, group 1 is 2,0,3,1 -> blocks (2,0), (3,1);
    group 2 is 5,7,6,4 -> blocks (5,7), (6,4); group 3 is the short block (8). Only whole blocks
    are shuffled, and only within their group."""
    lengths = torch.tensor([5, 1, 7, 3, 2, 8, 4, 6, 9])
    grouped = length_grouped_order(torch.arange(9), lengths, block=2, blocks_per_group=2,
                                   generator=torch.Generator().manual_seed(0)).tolist()
    blocks = [tuple(grouped[i : i + 2]) for i in range(0, 9, 2)]
    assert set(blocks[:2]) == {(2, 0), (3, 1)}
    assert set(blocks[2:4]) == {(5, 7), (6, 4)}
    assert blocks[4] == (8,)


def test_length_grouped_blocks_are_shuffled_within_a_group():
    """Without the block shuffle, each group's steps would run longest to shortest; with it, over
    many seeds the longest block of a group comes first only about as often as chance (1 in 8)."""
    lengths = torch.arange(64)
    firsts = [
        length_grouped_order(torch.arange(64), lengths, block=4, blocks_per_group=8,
                             generator=torch.Generator().manual_seed(seed))[0].item() == 31
        for seed in range(200)
    ]
    assert 0.05 < sum(firsts) / len(firsts) < 0.25


def padded_tokens(indices: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(
        len(batch) * max(lengths[i] for i in batch)
        for batch in (indices[s : s + batch_size] for s in range(0, len(indices), batch_size))
    )


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60),
    batch_size=st.integers(1, 5),
    accumulate=st.integers(1, 3),
    replicas=st.integers(1, 3),
    group=st.integers(1, 6),
    seed=st.integers(0, 3),
)
def test_grouping_keeps_the_epoch_and_the_step_normalisers(lengths, batch_size, accumulate, replicas, group, seed):
    """With any layout, grouping by length changes the order only: the ranks together see the same
    multiset of examples, every rank's window weight is the weight its step really holds (weights
    are the lengths here, as for SFT loss tokens), and on one device a step never pads more in
    total than the shuffled order does when the epoch is whole batches (sorting a group is the
    partition with the least padding; a short last batch may land elsewhere)."""
    def ranks(group_by_length):
        return [
            list(AccumulationWindowSampler(lengths, batch_size=batch_size, accumulate=accumulate, num_replicas=replicas,
                                           rank=r, seed=seed, lengths=lengths, group_by_length=group_by_length))
            for r in range(replicas)
        ]

    plain, grouped = ranks(None), ranks(group)
    assert sorted(i for rank in grouped for i, _ in rank) == sorted(i for rank in plain for i, _ in rank)
    window = batch_size * accumulate
    for start in range(0, len(grouped[0]), window):
        step = [pair for rank in grouped for pair in rank[start : start + window]]
        assert {w for _, w in step} == {sum(lengths[i] for i, _ in step)}
    if replicas == 1 and len(lengths) % batch_size == 0:
        plain_order, grouped_order = [i for i, _ in plain[0]], [i for i, _ in grouped[0]]
        assert padded_tokens(grouped_order, lengths, batch_size) <= padded_tokens(plain_order, lengths, batch_size)


def test_grouped_resume_yields_the_rest_of_the_epoch():
    lengths = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 3]

    def sampler():
        return AccumulationWindowSampler(
            lengths, batch_size=2, accumulate=2, seed=5, lengths=lengths, group_by_length=3
        )

    full = sampler()
    full.set_epoch(2)
    resumed = sampler()
    resumed.resume_at(DataPosition(epoch=2, batches=3))
    assert list(resumed) == list(full)[6:]


@pytest.mark.parametrize("bad", [0, -2, True])
def test_group_by_length_must_be_a_positive_number_of_batches(bad):
    with pytest.raises(ValueError, match="group_by_length"):
        AccumulationWindowSampler([1.0] * 4, batch_size=2, lengths=[1] * 4, group_by_length=bad)


def test_group_by_length_needs_a_length_per_example():
    with pytest.raises(ValueError, match="one length per example"):
        AccumulationWindowSampler([1.0] * 4, batch_size=2, lengths=[1] * 3, group_by_length=2)
