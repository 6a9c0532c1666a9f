"""Where rows come from: a Hub dataset, local JSONL/JSON/Parquet/CSV files, or an in-memory list.

Hub datasets and Parquet files (typed by their schema) are read by `datasets`. JSON, JSON Lines
and CSV files and in-memory lists stay Python objects (CSV cells are strings): Arrow would give
every row one schema, silently turning a mistyped field into another type (a number answer into
a string, or the reverse) or into null, which validation must see as the user wrote it. The
local files' readers, and what they refuse, are in `plpost.data.local_files`.

For preprocessing (`plpost.data.source_tables`), rows are never given an Arrow schema either: a JSON Lines
file is kept as the text of each line (parsed in the process that preprocesses it), other local
files and in-memory rows as the JSON text of what was read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import datasets

from plpost.assets import resolve_pretrained
from plpost.data.cache import file_digest, rows_digest
from plpost.data.formats import DataValidationError
from plpost.data.local_files import Rows, checked_format, local_format, read_local


@dataclass
class DataSource:
    """A dataset to read.

    Args:
        path: a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, or any of these with
            ``.gz``), a bundled file (``plpost:data/addition/sft.jsonl``), or a Hugging Face Hub
            dataset name.
        split: the split to read, with an optional slice (``train``, ``test[:5%]``,
            ``train[100:200]``). A local file is one split, ``train``, and takes slices too.
        name: the configuration name of a Hub dataset, if it has several.
        limit: read only the first `limit` rows of the split (for quick runs); None reads everything.
        streaming: read the rows as training consumes them, tokenized on the fly, never cached (for sets
            larger than the disk budget; a Hub dataset, or a local JSON Lines or Parquet file). What a
            streamed set cannot promise is in docs/data-at-scale.md.
    """

    path: str
    split: str = "train"
    name: str | None = None
    limit: int | None = None
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"{self.path}: limit={self.limit!r} must be a whole number of rows, at least 1 (or None: all)")


SourceLike = Union[str, DataSource, list[dict[str, Any]]]


def as_data_source(source: str | DataSource | Mapping[str, Any]) -> DataSource:
    """A DataSource from a path, or from its fields as a mapping (``{"path": ..., "split": ...}``, as YAML writes it)."""
    if isinstance(source, DataSource):
        return source
    if isinstance(source, str):
        return DataSource(path=source)
    unknown = sorted(set(source) - set(DataSource.__dataclass_fields__))
    if unknown or "path" not in source:
        raise ValueError(f"a data source takes path, split, name, limit and streaming; got {sorted(source)}")
    return DataSource(**source)


def describe(source: SourceLike) -> str:
    if isinstance(source, list):
        return "in-memory rows"
    return as_data_source(source).path


def load_source(source: SourceLike) -> Rows:
    """Reads `source` into indexable rows; raises DataValidationError for unreadable or empty input."""
    if isinstance(source, list):
        return in_memory_rows(source)
    source = as_data_source(source)
    local = local_path(source)
    rows = load_hub_dataset(source) if local is None else select_split(read_local(local), source.split, source.path)
    return limited(rows, source)


def source_fingerprint(source: SourceLike) -> dict[str, Any]:
    """What identifies the rows `source` reads: a hash of a local file's bytes or of in-memory rows, a Hub
    dataset's own fingerprint, with the split and limit read from it."""
    if isinstance(source, list):
        return {"rows": rows_digest(in_memory_rows(source))}
    source = as_data_source(source)
    local = local_path(source)
    if local is not None:
        checked_format(local)
        content = {"file": file_digest(local)}
    else:
        content = {"hub": source.path, "name": source.name, "fingerprint": load_hub_dataset(source)._fingerprint}
    return {**content, "split": source.split, "limit": source.limit}


def in_memory_rows(rows: list) -> list:
    if not rows:
        raise DataValidationError("in-memory rows", None, None, "the list of rows is empty")
    return rows


def local_path(source: DataSource) -> Path | None:
    """The local file `source` names, or None for a Hub dataset name."""
    local = Path(resolve_pretrained(source.path)).expanduser()
    return local if local_format(local) is not None or local.exists() or looks_like_a_path(source.path) else None


def limited(rows: Rows, source: DataSource) -> Rows:
    if len(rows) == 0:
        raise DataValidationError(source.path, None, None, "the dataset has no rows")
    if source.limit is not None and source.limit < len(rows):
        rows = rows.select(range(source.limit)) if isinstance(rows, datasets.Dataset) else rows[: source.limit]
    return rows


def looks_like_a_path(name: str) -> bool:
    """A name no Hub dataset can have: relative or absolute paths, home folders, Windows drives."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def load_hub_dataset(source: DataSource) -> datasets.Dataset:
    try:
        return datasets.load_dataset(resolve_pretrained(source.path), source.name, split=source.split)
    except Exception as error:  # datasets raises many types (offline, not found, bad split, auth)
        raise DataValidationError(
            source.path, None, None,
            f"is not a local file, and no Hub dataset by that name could be loaded: {type(error).__name__}: {error}",
        ) from None


def select_split(rows: Rows, split: str, name: str) -> Rows:
    """The split of a one-split local file: all of it for "train", or the slices "train[...]" names."""
    if split == "train":
        return rows
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(rows)})
    except (ValueError, KeyError, AssertionError) as error:
        raise DataValidationError(
            name, None, None,
            f"split {split!r} cannot be read from a local file, which is one split, 'train' (slices such as "
            f"'train[:100]' or 'train[10%:]' work): {error}",
        ) from None
    indices = [index for part in instructions for index in range(part.from_, part.to)]
    return rows.select(indices) if isinstance(rows, datasets.Dataset) else [rows[index] for index in indices]
