"""Where rows come from: a Hub dataset, local JSONL/JSON/Parquet/CSV files, or an in-memory list.

All three end as a `datasets.Dataset`. Local JSON Lines files are first read line by line so
that a line that is not UTF-8 or not JSON is reported with its file and line number, which the
`datasets` JSON reader cannot do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


def load_source(source: SourceLike) -> datasets.Dataset:
    """Reads `source` into a Dataset; raises DataValidationError for unreadable or empty input."""
    if isinstance(source, list):
        if not source:
            raise DataValidationError("in-memory rows", None, None, "the list of rows is empty")
        dataset = datasets.Dataset.from_list(source)
        return dataset
    if isinstance(source, str):
        source = DataSource(path=source)
    path = resolve_pretrained(source.path)
    local = Path(path)
    if local.suffix in LOCAL_BUILDERS or local.exists():
        dataset = _load_local(local)
    else:
        dataset = datasets.load_dataset(path, source.name, split=source.split)
    if len(dataset) == 0:
        raise DataValidationError(source.path, None, None, "the dataset has no rows")
    if source.limit is not None:
        dataset = dataset.select(range(min(source.limit, len(dataset))))
    return dataset


def _load_local(path: Path) -> datasets.Dataset:
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
        _check_json_lines(path)
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _check_json_lines(path: Path) -> None:
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
                json.loads(line)
            except json.JSONDecodeError as error:
                raise DataValidationError(
                    str(path), record, None, f"line {line_number} is not valid JSON ({error.msg})"
                ) from None
            record += 1
