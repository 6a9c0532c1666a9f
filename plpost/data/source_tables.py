"""Rows of a source as a `datasets` table for preprocessing in worker processes (`plpost.data.prepared`),
and the JSON text that plpost's tables hold where a value is kept as written."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

from plpost.data.formats import CsvRow, DataValidationError
from plpost.data.local_files import Rows, checked_format, json_line_row, stage_json_lines
from plpost.data.sources import SourceLike, as_data_source, in_memory_rows, limited, load_source, local_path, select_split

# How the rows of a source table are stored: a JSON Lines file as each line's text (parsed where the
# rows are preprocessed, so 1M lines are never Python objects at once), other local files and
# in-memory rows as JSON text (kept exactly as read: a CSV cell stays text), Hub datasets and Parquet as Arrow.
RowKind = Literal["json-line", "encoded", "csv", "arrow"]
"""("csv": encoded rows of a CSV file, read back as `CsvRow`s, whose text cells may spell numbers.)"""


def source_table(source: SourceLike, staging: Path) -> tuple[datasets.Dataset, RowKind]:
    """The rows of `source` as a datasets.Dataset (a JSON Lines file is staged under `staging`), and how they
    are stored; raises DataValidationError as `load_source` does."""
    if isinstance(source, list):
        return encoded_rows(in_memory_rows(source)), "encoded"
    data_source = as_data_source(source)
    local = local_path(data_source)
    if local is not None and checked_format(local) == ".jsonl":
        return limited(select_split(stage_json_lines(local, staging), data_source.split, data_source.path), data_source), "json-line"
    rows = load_source(data_source)
    if isinstance(rows, datasets.Dataset):
        return rows, "arrow"
    return encoded_rows(rows, str(local)), "csv" if rows and isinstance(rows[0], CsvRow) else "encoded"


def table_rows(name: str, batch: Mapping[str, list], indices: Sequence[int], kind: RowKind) -> Iterator[Any]:
    """The rows a batch of a `source_table` holds, as `load_source` reads them (record = index), one at a
    time: a record that cannot be read raises when its turn comes, after the records before it."""
    if kind == "json-line":
        return (json_line_row(name, text, record, line) for text, line, record in zip(batch["_text"], batch["_line"], indices))
    if kind == "encoded":
        return (decoded(row) for row in batch["_row"])
    if kind == "csv":
        return (CsvRow(decoded(row)) for row in batch["_row"])
    return (dict(zip(batch, values)) for values in zip(*batch.values()))


def encoded(value: Any) -> bytes:
    """`value` as plpost stores it in a table: its JSON text. Not a pickle, so that reading a table back
    (a staged source, a cache entry on disk) can never run code."""
    return json.dumps(value, ensure_ascii=False).encode()


def decoded(data: bytes) -> Any:
    return json.loads(data)


def encoded_rows(rows: Rows, name: str = "in-memory rows") -> datasets.Dataset:
    """Rows as a one-column table of their JSON text; a value JSON cannot hold (a Python object in an
    in-memory row) is refused by record, since it could not reach the tables unchanged."""
    stored = []
    for record, row in enumerate(rows):
        try:
            stored.append(encoded(row))
        except (TypeError, ValueError) as error:
            raise DataValidationError(name, record, None, f"holds a value that is not JSON data ({error})") from None
    return datasets.Dataset.from_dict({"_row": stored})
