"""Where rows come from: a Hub dataset, local JSONL/JSON/Parquet/CSV files, or an in-memory list.

Hub datasets and Parquet files (typed by their schema) are read by `datasets`. JSON, JSON Lines
and CSV files and in-memory lists stay Python objects (CSV cells are strings): Arrow would give
every row one schema, silently turning a mistyped field into another type (a number answer into
a string, or the reverse) or into null, which validation must see as the user wrote it. The
local readers also refuse what a generic reader lets through: a key written twice in one object
(JSON keeps the last silently), a CSV row with more or fewer cells than the header, text that is
not UTF-8; each error names the file, the record and, for JSON Lines and CSV, the line. A byte
order mark (as Excel writes) is skipped, `.gz` files are decompressed, and extensions are read
case-insensitively.

For preprocessing (`plpost.data.source_tables`), rows are never given an Arrow schema either: a JSON Lines
file is kept as the text of each line (parsed in the process that preprocesses it), other local
files and in-memory rows as the JSON text of what was read.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import datasets
import pyarrow as pa

from plpost.assets import resolve_pretrained
from plpost.data.cache import file_digest, rows_digest
from plpost.data.formats import CsvRow, DataValidationError

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


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
Rows = Sequence[Mapping[str, Any]]


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


def local_format(path: Path) -> str | None:
    """".jsonl", ".json", ".parquet" or ".csv" for such a file (optionally gzipped, any case), else None."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LOCAL_FORMATS else None


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


def checked_format(path: Path) -> str:
    """The format of a local data file; raises DataValidationError for a folder, a missing file or another type."""
    name = str(path)
    if path.is_dir():
        raise DataValidationError(name, None, None, f"is a folder; name a data file in it ({', '.join(LOCAL_FORMATS)})")
    if not path.is_file():
        raise DataValidationError(name, None, None, "no such file")
    data_format = local_format(path)
    if data_format is None:
        raise DataValidationError(
            name, None, None,
            f"unknown file type {''.join(path.suffixes)!r} (expected one of: {', '.join(LOCAL_FORMATS)}, optionally .gz)",
        )
    return data_format


def read_local(path: Path) -> Rows:
    name = str(path)
    data_format = checked_format(path)
    if data_format == ".parquet":
        return read_parquet(path)
    raw = read_bytes(path)
    if not raw.strip():
        raise DataValidationError(name, None, None, "the file is empty")
    if data_format == ".jsonl":
        return read_json_lines(name, raw)
    text = decode(name, raw)
    return read_json(name, text) if data_format == ".json" else read_csv(name, text)


def read_bytes(path: Path) -> bytes:
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataValidationError(str(path), None, None, f"is not a readable gzip file ({error})") from None


def decode(name: str, raw: bytes, *, line: int | None = None, record: int | None = None) -> str:
    """UTF-8 text without a leading byte order mark; an error names the line of the bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        where = line if line is not None else raw.count(b"\n", 0, error.start) + 1
        raise DataValidationError(
            name, record, None, f"line {where} is not valid UTF-8 ({error.reason}: byte {raw[error.start]:#04x})"
        ) from None


class DuplicateKeys(dict):
    """A JSON object that had a key more than once; `key` is the first repeated key."""

    key: str


def object_with_duplicates_marked(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = next((key for position, key in enumerate(keys) if key in keys[:position]), None)
    if repeated is None:
        return dict(pairs)
    marked = DuplicateKeys(pairs)
    marked.key = repeated
    return marked


def refuse_duplicate_keys(name: str, record: int, row: Any, line: int | None = None) -> None:
    """Raises for the first object in `row` (searched without recursion) that repeated a key."""
    stack: list[tuple[str, Any]] = [("", row)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, DuplicateKeys):
            where = f"{field}.{value.key}" if field else value.key
            at_line = f" (line {line})" if line is not None else ""
            raise DataValidationError(
                name, record, where, f"is written more than once in one object{at_line}; JSON readers keep only the last"
            )
        if isinstance(value, dict):
            stack += [(f"{field}.{key}" if field else key, child) for key, child in value.items()]
        elif isinstance(value, list):
            stack += [(f"{field}[{position}]", child) for position, child in enumerate(value)]


def parse_json(name: str, text: str, record: int | None, line: int | None) -> Any:
    try:
        return json.loads(text, object_pairs_hook=object_with_duplicates_marked)
    except json.JSONDecodeError as error:
        at = f"line {line}" if line is not None else f"line {error.lineno}"
        raise DataValidationError(name, record, None, f"{at} is not valid JSON ({error.msg}, column {error.colno})") from None
    except RecursionError:
        at = f"line {line}" if line is not None else "the file"
        raise DataValidationError(name, record, None, f"{at} nests objects or lists too deeply to read") from None


def read_json_lines(name: str, raw: bytes) -> list:
    return [json_line_row(name, text, record, line) for record, (line, text) in enumerate(json_line_texts(name, raw.split(b"\n")))]


def json_line_texts(name: str, lines: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that holds a record: decoded, blank lines skipped."""
    records = 0
    for line_number, line in enumerate(lines, start=1):
        text = decode(name, line, line=line_number, record=records)
        if text.strip():
            records += 1
            yield line_number, text


def json_line_row(name: str, text: str, record: int, line: int) -> Any:
    row = parse_json(name, text, record, line)
    refuse_duplicate_keys(name, record, row, line)
    return row


def binary_lines(path: Path) -> Iterator[bytes]:
    """The lines of a (possibly gzipped) file, read as a stream."""
    if path.suffix.lower() != ".gz":
        with open(path, "rb") as stream:
            yield from stream
        return
    try:
        with gzip.open(path, "rb") as stream:
            yield from stream
    except (OSError, EOFError, zlib.error) as error:
        raise DataValidationError(str(path), None, None, f"is not a readable gzip file ({error})") from None


STAGED_SCHEMA = pa.schema([("_line", pa.int64()), ("_text", pa.large_string())])


def stage_json_lines(path: Path, staging: Path, batch_rows: int = 10_000) -> datasets.Dataset:
    """The records of a JSON Lines file as a memory-mapped table of (line number, text), written to `staging`."""
    name, target = str(path), staging / "rows.arrow"
    staging.mkdir(parents=True, exist_ok=True)
    records = 0
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, STAGED_SCHEMA) as writer:
        lines, texts = [], []
        for line, text in json_line_texts(name, binary_lines(path)):
            lines.append(line)
            texts.append(text)
            if len(lines) == batch_rows:
                writer.write_batch(pa.record_batch([lines, texts], schema=STAGED_SCHEMA))
                records, lines, texts = records + len(lines), [], []
        if lines:
            writer.write_batch(pa.record_batch([lines, texts], schema=STAGED_SCHEMA))
            records += len(lines)
    if records == 0:
        raise DataValidationError(name, None, None, "the file is empty")
    return datasets.Dataset.from_file(str(target))


def read_json(name: str, text: str) -> list:
    rows = parse_json(name, text, None, None)
    if not isinstance(rows, list):
        raise DataValidationError(name, None, None, "expected a JSON array of records (or use .jsonl)")
    for record, row in enumerate(rows):
        refuse_duplicate_keys(name, record, row)
    return rows


def read_csv(name: str, text: str) -> list[CsvRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        repeated = next((column for position, column in enumerate(header) if column in header[:position]), None)
        if repeated is not None:
            raise DataValidationError(name, None, repeated, "is a column name used twice in the header (line 1)")
        return list(csv_rows(name, reader, header))
    except csv.Error as error:
        raise DataValidationError(name, None, None, f"line {reader.line_num} is not valid CSV ({error})") from None


def csv_rows(name: str, reader: Iterator[list[str]], header: list[str]) -> Iterator[CsvRow]:
    record = 0
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise DataValidationError(
                name, record, None,
                f"line {reader.line_num} has {len(cells)} cells but the header has {len(header)} columns (a comma "
                "inside a cell needs the cell in double quotes)",
            )
        yield CsvRow(zip(header, cells))
        record += 1


def read_parquet(path: Path) -> Rows:
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, and datasets wraps them in several types
        raise DataValidationError(str(path), None, None, f"is not a readable Parquet file ({type(error).__name__}: {error})") from None
