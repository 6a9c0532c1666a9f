"""Streamed training sets: rows read and tokenized as training consumes them, never cached.

For a set larger than the disk budget, a source with ``streaming: true`` is read by a
`datasets.IterableDataset` (a Hub dataset streamed, or a local JSON Lines or Parquet file read row
by row), each rank reading its own part (`datasets.distributed.split_dataset_by_node`: whole shards
when their number divides by the ranks, else one row in `world_size`). Rows are shuffled in a
seeded buffer, reshuffled each pass (seed + pass), and `preprocess` validates and tokenizes each
one in the training process. Passes follow one another without end: a stream has no length, so
training stops at `max_steps`, and no rank ever runs out of batches before the others.

What a streamed set cannot promise, unlike a cached one (the data module refuses what needs it):
the exact epoch (a pass ends when a rank's part ends, and ranks' parts differ by the records
skipped), the normaliser of the whole optimizer step (the loss is normalised by each micro-batch's
own tokens or pairs), a seeded random validation sample (`val_size`), length grouping, a whole set
for stages that precompute over it (reference log-probs), loader worker processes, and errors
before training (a bad record stops training when it is reached, named by file, record and field).

Resuming is exact: the data module saves the micro-batches trained on, and each rank reads its
stream again in the same seeded order and leaves out that many batches of examples, so every rank
continues where it was. The rows left out are read and tokenized again (not trained on), which
costs time in proportion to how far training got. (The iterable's own `state_dict` would start
faster but does not keep its shuffle buffer, so the order after a resume would differ.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset

from plpost.data.formats import DataValidationError
from plpost.data.prepared import SkipRecord
from plpost.data.source_tables import RowKind, table_rows
from plpost.data.local_files import binary_lines, checked_format, json_line_texts
from plpost.data.sources import DataSource, SourceLike, as_data_source, local_path

if TYPE_CHECKING:
    from plpost.data.base import PostTrainingDataModule

RECORD = "_record"
SHUFFLE_BUFFER = 10_000  # rows; a shuffle drawn from a window this wide of the stream


def streamed(source: SourceLike | None) -> DataSource | None:
    """`source` as a DataSource if it is streamed."""
    if source is None or isinstance(source, list):
        return None
    source = as_data_source(source)
    return source if source.streaming else None


def check_streamable(module: PostTrainingDataModule) -> None:
    """Refuses what a streamed set cannot give: a streamed validation set, or, for a streamed training
    set, options that need the whole set."""
    if module.val_source is not None and streamed(module.val_source) is not None:
        raise ValueError("a validation set is read whole at every validation: give `val` with `streaming: false`")
    if module.streamed_train is None:
        return
    refused = {
        "val_size": "holds out a random sample of the whole set",
        "group_by_length": "sorts by the lengths of the whole set",
        "num_workers": "starts loader processes, and each would read the whole stream (a stream is tokenized "
                       "in the training process)",
    }
    for option, reason in refused.items():
        if getattr(module, option):
            raise ValueError(f"{option}={getattr(module, option)!r} {reason}, which a streamed training set cannot "
                             f"do: leave {option} out, or set `streaming: false`")


def stream_source(source: DataSource) -> tuple[datasets.IterableDataset, RowKind]:
    """The rows of `source` as a stream, each with its record index (`RECORD`), and how they are stored."""
    if "[" in source.split:
        raise ValueError(f"{source.path}: split {source.split!r}: a streamed source is read whole; slices need `streaming: false`")
    local = local_path(source)
    if local is None:
        try:
            rows = datasets.load_dataset(source.path, source.name, split=source.split, streaming=True)
        except Exception as error:  # datasets raises many types (offline, not found, bad split, auth)
            raise DataValidationError(source.path, None, None, f"cannot be streamed: {type(error).__name__}: {error}") from None
        rows, kind = rows.map(lambda _, index: {RECORD: index}, with_indices=True), "arrow"
    elif checked_format(local) == ".jsonl":
        features = datasets.Features({RECORD: datasets.Value("int64"), "_line": datasets.Value("int64"),
                                      "_text": datasets.Value("large_string")})
        rows, kind = datasets.IterableDataset.from_generator(json_lines, features, gen_kwargs={"path": str(local)}), "json-line"
    elif checked_format(local) == ".parquet":
        rows = datasets.load_dataset("parquet", data_files=str(local), split="train", streaming=True)
        rows, kind = rows.map(lambda _, index: {RECORD: index}, with_indices=True), "arrow"
    else:
        raise ValueError(f"{source.path}: a {checked_format(local)} file is read whole; stream a JSON Lines or Parquet file")
    return (rows.take(source.limit) if source.limit is not None else rows), kind


def json_lines(path: str) -> Iterator[dict[str, Any]]:
    for record, (line, text) in enumerate(json_line_texts(path, binary_lines(Path(path)))):
        yield {RECORD: record, "_line": line, "_text": text}


class StreamedExamples(IterableDataset):
    """This rank's examples of a streamed source, as `(example, None)` items (None: no window weight,
    so each micro-batch is normalised by what it holds), in passes without end; `skip` examples
    (those already trained on) are left out at the start."""

    def __init__(
        self, module: PostTrainingDataModule, source: DataSource, *, rank: int, world_size: int, shuffle: bool,
        seed: int, skip: int = 0,
    ) -> None:
        self.module, self.source, self.skip = module, source, skip
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed

    def passes(self) -> Iterator[tuple[dict, None]]:
        rows, kind = stream_source(self.source)
        rows = split_dataset_by_node(rows, rank=self.rank, world_size=self.world_size)
        if self.shuffle:
            rows = rows.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
        produced_any = False
        for number in itertools.count():
            rows.set_epoch(number)
            for item in self.examples(rows, kind):
                produced_any = True
                yield item
            if not produced_any:
                raise DataValidationError(self.source.path, None, None, f"no record of rank {self.rank}'s part is usable")

    def examples(self, rows: datasets.IterableDataset, kind: RowKind) -> Iterator[tuple[dict, None]]:
        name = self.source.path
        for stored in rows:
            index = stored.pop(RECORD)
            row = next(table_rows(name, {key: [value] for key, value in stored.items()}, [index], kind))
            try:
                produced = self.module.preprocess(name, index, row)
            except SkipRecord:
                continue
            for example in produced if isinstance(produced, list) else [produced]:
                example.pop("truncated", None)
                yield example, None

    def __iter__(self) -> Iterator[tuple[dict, None]]:
        items = self.passes()
        for _ in range(self.skip):
            next(items)
        yield from items
