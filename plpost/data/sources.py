"""Where rows come from: a Hub dataset, local JSONL/JSON/Parquet/CSV files, or an in-memory list.

Hub datasets and Parquet files (typed by their schema) are read by `datasets`. JSON, JSON Lines
and CSV files and in-memory lists stay Python objects (CSV cells are strings): Arrow would give every row one schema, silently turning a mistyped
field into another type (a number answer into a string, or the reverse) or into null, which
validation must see as the user wrote it. JSON Lines are read line by line so that a line that
is not UTF-8 or not JSON is reported with its file and line number.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Union

import datasets

from plpost.assets import resolve_pretrained
from plpost.data.formats import DataValidationError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataSource:
    """A dataset to read.

    Args:
        path: a local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``), a bundled file
            (``plpost:data/addition/sft.jsonl``), or a Hugging Face Hub dataset name.
        split: the split of a Hub dataset (``train``, ``test[:5%]``, ...); local files have one.
        name: the configuration name of a Hub dataset, if it has several.
        limit: read only the first `limit` rows (for quick runs); None reads everything.
    """

    path: str
    split: str = "train"
    name: str | None = None
    limit: int | None = None


SourceLike = Union[str, DataSource, list[dict[str, Any]]]


def describe(source: SourceLike) -> str:
    if isinstance(source, list):
        return "in-memory rows"
    return source if isinstance(source, str) else source.path


Rows = Sequence[Mapping[str, Any]]


def load_source(source: SourceLike) -> Rows:
    """Reads `source` into indexable rows; raises DataValidationError for unreadable or empty input."""
    if isinstance(source, list):
        if not source:
            raise DataValidationError("in-memory rows", None, None, "the list of rows is empty")
        return source
    if isinstance(source, str):
        source = DataSource(path=source)
    path = resolve_pretrained(source.path)
    local = Path(path)
    if local.suffix in LOCAL_BUILDERS or local.exists():
        rows = _load_local(local)
    else:
        rows = datasets.load_dataset(path, source.name, split=source.split)
    if len(rows) == 0:
        raise DataValidationError(source.path, None, None, "the dataset has no rows")
    if source.limit is not None and source.limit < len(rows):
        rows = rows.select(range(source.limit)) if isinstance(rows, datasets.Dataset) else rows[: source.limit]
    return rows


def _load_local(path: Path) -> Rows:
    if not path.is_file():
        raise DataValidationError(str(path), None, None, "no such file")
    builder = LOCAL_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataValidationError(
            str(path), None, None, f"unknown file type {path.suffix!r} (expected one of: {', '.join(LOCAL_BUILDERS)})"
        )
    if path.stat().st_size == 0:
        raise DataValidationError(str(path), None, None, "the file is empty")
    if path.suffix == ".jsonl":
        return _read_json_lines(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _read_csv(path: Path) -> list:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise DataValidationError(str(path), None, None, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _read_json(path: Path) -> list:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataValidationError(str(path), None, None, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataValidationError(str(path), None, None, f"not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(rows, list):
        raise DataValidationError(str(path), None, None, "expected a JSON array of records (or use .jsonl)")
    return rows


def _read_json_lines(path: Path) -> list:
    rows = []
    record = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataValidationError(
                    str(path), record, None, f"line {line_number} is not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataValidationError(
                    str(path), record, None, f"line {line_number} is not valid JSON ({error.msg})"
                ) from None
            record += 1
    return rows
