"""Local data files read as the user wrote them: JSON Lines, JSON and CSV rows stay Python objects
(CSV cells strings), Parquet is read by `datasets` (typed by its schema). Each reader refuses what a
generic reader lets through: a key written twice in one object, a CSV row with more or fewer cells
than the header, text that is not UTF-8; each error names the file, the record and, for JSON Lines
and CSV, the line. A byte order mark is skipped, `.gz` files are decompressed, and extensions are
read case-insensitively (see `plpost.data.sources` for the other sources)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from plpost.data.formats import CsvRow, DataValidationError

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
Rows = Sequence[Mapping[str, Any]]


def local_format(path: Path) -> str | None:
    """".jsonl", ".json", ".parquet" or ".csv" for such a file (optionally gzipped, any case), else None."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LOCAL_FORMATS else None


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
