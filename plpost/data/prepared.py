"""Preprocessing into a cache entry: every record validated and tokenized once, in parallel, into Arrow.

`datasets.Dataset.map` runs the data module's `preprocess` (a pure function of one row) over the
source's rows in `num_proc` processes, each writing its shard of the table; the per-example
weights and lengths the sampler needs are written beside it as numpy arrays. The entry is built
in a staging folder under a file lock and renamed into place when complete, so concurrent
processes (the ranks of a machine) build it once and the others wait and read it, and an
interrupted build leaves nothing that could be read as complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from plpost.data.cache import digest
from plpost.data.formats import DataValidationError
from plpost.data.source_tables import RowKind, source_table, table_rows
from plpost.data.sources import SourceLike, describe
from plpost.data.table import MANIFEST

if TYPE_CHECKING:
    from plpost.data.base import PostTrainingDataModule

KEPT = "kept"
# Below this many records per process, starting another process costs more than it saves.
RECORDS_PER_PROCESS = 5_000
PROGRESS_FROM = 10_000  # records; a progress bar for fewer would be gone before it is read


class SkipRecord(Exception):
    """Raised by `preprocess` for a record that the stated policy skips; its reason is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_num_proc(records: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, records // RECORDS_PER_PROCESS))


def preprocess_rows(
    batch: dict[str, list], indices: list[int], *, module: PostTrainingDataModule, name: str, kind: RowKind,
    fields: list[str], failures: Path,
) -> dict[str, list]:
    """The table rows of a batch of records: each kept record's examples (the first carries the record's
    outcome, "kept"), or one placeholder row naming why the record was skipped.

    A bad record is written to `failures` (see `record_failure`), and the batch ends there."""
    out: dict[str, list] = {field: [] for field in [*fields, "_outcome", "_truncated", "_weight", "_length"]}
    if first_failure(failures, before=indices[0]) is not None:
        return out  # a record before this batch is bad: nothing in it can be the first bad one
    rows = table_rows(name, batch, indices, kind)
    for index in indices:
        try:
            produced = module.preprocess(name, index, next(rows))
        except DataValidationError as error:
            record_failure(failures, index, error)
            return out
        except SkipRecord as skip:
            for field in fields:
                out[field].append(None)
            out["_outcome"].append(skip.reason)
            out["_truncated"].append(False)
            out["_weight"].append(None)
            out["_length"].append(None)
            continue
        produced = produced if isinstance(produced, list) else [produced]
        truncated = any([example.pop("truncated", False) for example in produced])  # a list: every flag is popped
        for position, example in enumerate(produced):
            stored = module.stored(example)
            for field in fields:
                out[field].append(stored[field])
            out["_outcome"].append(KEPT if position == 0 else "")
            out["_truncated"].append(truncated and position == 0)
            out["_weight"].append(module.example_weight(example))
            out["_length"].append(module.example_length(example))
    return out


def record_failure(failures: Path, index: int, error: DataValidationError) -> None:
    """Keeps a bad record's error where every process that preprocesses sees it. Processes read their
    shards in parallel and the first to fail is not the one with the first bad record, so none raises:
    each stops at its first bad record, or at a batch after a bad record that another found, and the
    lowest is raised once all are done (`raise_first_failure`)."""
    failures.mkdir(parents=True, exist_ok=True)
    staged = failures / f".{index}.{os.getpid()}"
    staged.write_text(json.dumps([error.source, error.record, error.field, error.problem]))
    staged.rename(failures / f"{index:015d}.json")  # whole, or not there


def first_failure(failures: Path, before: int | None = None) -> Path | None:
    """The error file of the lowest bad record found so far (below `before` if given), if any."""
    if not failures.is_dir():
        return None
    found = min((path for path in failures.glob("*.json")), default=None)
    return found if found is not None and (before is None or int(found.stem) < before) else None


def raise_first_failure(failures: Path) -> None:
    found = first_failure(failures)
    if found is not None:
        raise DataValidationError(*json.loads(found.read_text()))


def prepared_entry(
    module: PostTrainingDataModule, source: SourceLike, folder: Path, *, num_proc: int | None
) -> Path:
    """`folder`, the cache entry of `source` under `module`'s settings: read if it exists, else built once
    (other processes asking for it meanwhile wait for it)."""
    if (folder / MANIFEST).is_file():
        return folder
    locks = folder.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{folder.name}.lock")):
        if not (folder / MANIFEST).is_file():
            staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                build_entry(module, source, staging, num_proc=num_proc)
                staging.rename(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_entry(module: PostTrainingDataModule, source: SourceLike, staging: Path, *, num_proc: int | None) -> None:
    name = describe(source)
    rows, kind = source_table(source, staging / "source")
    processes = num_proc or default_num_proc(len(rows))
    rank_zero_info(f"tokenizing {len(rows)} records of {name} in {processes} process(es), once, into {staging.parent}")
    features = module.table_features()
    fields = [field for field in features if not field.startswith("_")]
    quiet = len(rows) < PROGRESS_FROM and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.utils.disable_progress_bars()
    failures = staging / "failures"
    try:
        table = rows.map(
            partial(preprocess_rows, module=module, name=name, kind=kind, fields=fields, failures=failures),
            batched=True, with_indices=True, num_proc=processes if processes > 1 else None,
            remove_columns=rows.column_names, features=features, load_from_cache_file=False,
            cache_file_name=str(staging / "examples.arrow"), new_fingerprint=digest(staging.name), desc=f"Tokenizing {name}",
        )
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()
    raise_first_failure(failures)
    written = table.data.table
    outcomes = Counter({entry["values"]: entry["counts"] for entry in pc.value_counts(written["_outcome"]).to_pylist()})
    outcomes.pop("", None)  # the second and later examples of a record
    kept_rows = np.flatnonzero(pc.is_in(written["_outcome"], pa.array([KEPT, ""])).to_numpy(zero_copy_only=False))
    truncated = int(pc.sum(written["_truncated"]).as_py() or 0)
    if truncated:
        outcomes["truncated"] = truncated
    if not len(kept_rows):
        # Every record cut to nothing or dropped by max_length: the limit is below the prompts.
        too_short = all("max_length" in reason or "truncation" in reason for reason in outcomes)
        fix = f"; raise max_length (now {module.max_length}) above the prompts' length" if too_short else ""
        raise DataValidationError(name, None, None, f"no record is usable ({dict(outcomes)}){fix}")
    arrays = {
        "kept_rows": kept_rows,
        "weights": column_array(written["_weight"].take(kept_rows), np.float64),
        "lengths": column_array(written["_length"].take(kept_rows), np.int64),
    }
    arrays.update(module.finish_split(name, written.select(fields), kept_rows))
    for array_name, array in arrays.items():
        np.save(staging / f"{array_name}.npy", array)
    shutil.rmtree(staging / "source", ignore_errors=True)
    manifest = {
        "source": name,
        "counts": {"records": len(rows), **outcomes},
        "shards": [Path(file["filename"]).name for file in table.cache_files],
        "fields": fields,
        "object_fields": sorted(module.object_fields),
        "arrays": sorted(arrays),
        "settings": module.cache_settings(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=repr))


def column_array(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A per-example column as numpy: (n,) for numbers, (n, k) for fixed-size lists of numbers."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
        return flat.reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False).astype(dtype)
