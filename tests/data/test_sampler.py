"""The sampler hands every index the loss weight of the optimizer step it lands in."""

from plpost.data.sampler import AccumulationWindowSampler


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
