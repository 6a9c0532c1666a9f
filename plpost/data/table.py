"""A split's examples, read from the memory-mapped Arrow files of its cache entry.

The table holds one row per example and one placeholder row per record that preprocessing
skipped; `kept_rows` says which rows are examples. A view is a selection of those examples (all of
them, or a validation sample), so a split costs the memory of its index arrays only, whatever the
size of the data: an example becomes Python objects when it is read, and a DataLoader worker maps
the same files (a view pickles as its folder and selection).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from plpost.data.source_tables import decoded

MANIFEST = "manifest.json"
READ_CHUNK = 1024
# Every page a read faults in (and the kernel's read-around of it) stays in the process's resident set
# until it is released: released after this many examples, a reading process's memory stays flat however
# much of the table an epoch reads. The pages stay in the page cache, so reading them again costs no I/O.
# A read in shuffled order maps about 1 MB per example here (the page cache's large folios are mapped
# whole, whatever the access advice), so the resident set between releases grows by up to that much each.
RELEASE_EVERY = 32


def memory_mapped(path: Path) -> tuple[pa.Table, mmap.mmap]:
    """The Arrow table of a file, zero-copy over a read-only map of it (kept to release its pages)."""
    with open(path, "rb") as stream:
        mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    return pa.ipc.open_stream(pa.py_buffer(mapped)).read_all(), mapped


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


class ExampleTable(Sequence):
    """Examples of one cache entry, in source order (or a selection of them), as dicts of Python values.

    positions: indices into the entry's examples (None: all of them, in order).
    """

    def __init__(self, folder: Path, positions: np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.fields = self.manifest["fields"]
        self.object_fields = set(self.manifest["object_fields"])
        tables, self.maps = zip(*(memory_mapped(self.folder / shard) for shard in self.manifest["shards"]))
        self.table = pa.concat_tables(tables).select(self.fields)
        self.unreleased = 0
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self.manifest["arrays"]}
        self.kept_rows = self.arrays["kept_rows"]
        self.positions = np.arange(len(self.kept_rows)) if positions is None else np.asarray(positions, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "positions": self.positions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["positions"])

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: int | slice) -> dict | list[dict]:
        if isinstance(key, slice):
            return self.read(self.positions[key])
        return self.read(self.positions[[key]])[0]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.positions), READ_CHUNK):
            yield from self.read(self.positions[start : start + READ_CHUNK])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} examples in {self.folder})"

    def content_key(self) -> str:
        """What identifies these examples without reading them: the entry's folder, named by the key
        of everything that made it (source, tokenizer, template, settings), and the selection."""
        import hashlib

        return f"{self.folder.name}/{hashlib.sha256(self.positions.tobytes()).hexdigest()}"

    def read(self, positions: np.ndarray) -> list[dict]:
        """The examples at `positions` (indices into the entry's examples)."""
        # Row by row: `take` on a table of many chunks would first concatenate each whole column.
        examples = [self.finish(int(position), self.table.slice(int(self.kept_rows[position]), 1).to_pylist()[0])
                    for position in positions]
        self.unreleased += len(examples)
        if self.unreleased >= RELEASE_EVERY and hasattr(mmap, "MADV_DONTNEED"):
            for mapped in self.maps:
                mapped.madvise(mmap.MADV_DONTNEED)
            self.unreleased = 0
        return examples

    def finish(self, position: int, row: dict[str, Any]) -> dict[str, Any]:
        """The example at `position` from its table row: object fields decoded."""
        for field in self.object_fields:
            row[field] = decoded(row[field])
        return row

    def column(self, name: str) -> np.ndarray:
        """A per-example array of the entry (weights, lengths), for this selection."""
        return np.asarray(self.arrays[name][self.positions])

    def select(self, positions: np.ndarray) -> ExampleTable:
        """The examples at `positions` of this view, as a view of their own."""
        view = type(self).__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.positions = self.positions[positions]
        return view
