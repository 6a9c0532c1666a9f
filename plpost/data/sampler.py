"""Sampling that knows the optimizer step each example lands in, so losses normalise per step.

A loss averaged per micro-batch changes with the micro-batch size when examples carry unequal
numbers of loss tokens (an 8x1 and a 2x4 layout weigh tokens differently). The correct
normaliser is the number of loss tokens (or pairs) in the whole optimizer step, over every
micro-batch of the accumulation window and every device. The sampler computes it up front from
per-example weights: every rank draws the same seeded permutation, so each rank knows the total
of the window without communicating, and hands it to the collate function with each index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


@dataclass
class DataPosition:
    """How far training got: `batches` micro-batches of epoch `epoch` were handed to training steps."""

    epoch: int = 0
    batches: int = 0

    def advance(self, epoch: int) -> None:
        """One more batch of `epoch` was trained on (the first of a new epoch restarts the count)."""
        self.batches = self.batches + 1 if epoch == self.epoch else 1
        self.epoch = epoch


class AccumulationWindowSampler(DistributedSampler):
    """Yields `(index, window_weight)` for this rank, in micro-batch order.

    weights: per example, what the loss is normalised by (loss tokens, or 1 per pair), or a
    tuple of such numbers per example (pairs and chosen tokens), each summed on its own: the
    window weight is then a list.
    Ranks interleave as in DistributedSampler (global position p belongs to rank p % replicas),
    and each optimizer step consumes batch_size * accumulate positions per rank. The last
    window of an epoch may be shorter; its weight is what it actually holds. When the example
    count does not divide evenly across ranks the order wraps around, as DistributedSampler
    does, and the repeated examples count in the normaliser like any other.

    Subclasses DistributedSampler so Lightning keeps it instead of injecting its own and calls
    `set_epoch` on it, which reshuffles per epoch.

    lengths / group_by_length: with both, each epoch's order is grouped by length (see
    `length_grouped_order`) in blocks of one micro-batch on every rank, so every rank's micro-batch
    holds examples of similar length and padding falls. The window weights are summed over the
    grouped order, so the loss normalisation holds as without grouping.

    `resume_at(position)` makes the iteration of that position's epoch start after the batches
    it says were already trained on; the skipped indices are never yielded, so their examples
    are never loaded or collated. Other epochs are unaffected.
    """

    def __init__(
        self,
        weights: Sequence[float],
        *,
        batch_size: int,
        accumulate: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group_by_length: int | None = None,
    ) -> None:
        super().__init__(weights, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        check_group_by_length(group_by_length)
        if group_by_length is not None and (lengths is None or len(lengths) != len(weights)):
            raise ValueError("group_by_length needs one length per example")
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.group_by_length = group_by_length
        self.batch_size = batch_size
        self.window = batch_size * accumulate
        self.resume_position = DataPosition()

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def resume_at(self, position: DataPosition) -> None:
        """Starts at `position`: its epoch, after its batches (a finished epoch resumes at the next)."""
        if position.batches >= self.batches_per_epoch:
            position = DataPosition(position.epoch + 1, 0)
        self.resume_position = position
        self.set_epoch(position.epoch)

    def global_order(self) -> torch.Tensor:
        count = len(self.weights)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        if self.total_size > count:
            repeats = math.ceil(self.total_size / count)
            order = order.repeat(repeats)
        order = order[: self.total_size]
        if self.group_by_length is None:
            return order
        return length_grouped_order(
            order, self.lengths, block=self.batch_size * self.num_replicas, blocks_per_group=self.group_by_length,
            generator=generator,
        )

    def __iter__(self) -> Iterator[tuple[int, float | list[float]]]:
        order = self.global_order()
        span = self.window * self.num_replicas
        window_weights = [self.weights[order[start : start + span]].sum(0).tolist() for start in range(0, len(order), span)]
        skipped = self.resume_position.batches * self.batch_size if self.epoch == self.resume_position.epoch else 0
        for position in range(skipped, self.num_samples):
            yield int(order[position * self.num_replicas + self.rank]), window_weights[position // self.window]


def check_group_by_length(group_by_length: int | None) -> None:
    if group_by_length is not None and (isinstance(group_by_length, bool) or group_by_length < 1):
        raise ValueError(f"group_by_length must be a number of micro-batches >= 1 (or None), got {group_by_length!r}")


def length_grouped_order(
    order: torch.Tensor, lengths: torch.Tensor, *, block: int, blocks_per_group: int, generator: torch.Generator
) -> torch.Tensor:
    """`order` rearranged so that each run of `block` consecutive positions holds similar lengths.

    order: example indices; lengths: per example index. The order is cut into groups of
    `block * blocks_per_group` positions; each group is sorted by length (longest first, ties in
    their shuffled order) and cut into blocks, the partition of a whole group with the fewest
    pads. Its full blocks are then shuffled with `generator`, so steps do not go from long to short
    in a saw-tooth; a short last block stays last. No example leaves its group: each group still
    draws from the whole shuffled epoch, and a larger group trades that randomness for less
    padding (with 1, every block keeps its examples and only their order within it changes).
    """
    group = block * blocks_per_group
    pieces = []
    for start in range(0, len(order), group):
        members = order[start : start + group]
        members = members[torch.sort(lengths[members], descending=True, stable=True).indices]
        full = len(members) // block
        blocks = members[: full * block].view(full, block)[torch.randperm(full, generator=generator)]
        pieces += [blocks.reshape(-1), members[full * block :]]
    return torch.cat(pieces)


class WeightedExamples(Dataset):
    """Examples indexed either by position or by the `(index, window_weight)` pairs of the sampler."""

    def __init__(self, examples: Sequence[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, float]) -> tuple[dict, float | None]:
        if isinstance(key, tuple):
            index, window_weight = key
            return self.examples[index], window_weight
        return self.examples[key], None


class ResumableDataLoader(DataLoader):
    """The training DataLoader. Its position is saved and restored by the data module, which
    builds the sampler already at that position (see `plpost.data.base`); these two methods
    only tell Lightning that the loader resumes mid-epoch, so it does not warn that it cannot."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
