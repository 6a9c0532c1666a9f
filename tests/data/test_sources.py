"""Local files as users have them (gzip, a byte order mark, upper-case extensions, CSV numbers), and
every way a file can be wrong named by file, record, line and field in plpost's own error."""

import gzip
import json

import pytest
from conftest import TINY

from plpost import ChatDataModule, PreferenceDataModule
from plpost.data.formats import DataValidationError
from plpost.data.sources import DataSource, load_source

ROW = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def refused(path, **source) -> DataValidationError:
    with pytest.raises(DataValidationError) as error:
        load_source(DataSource(str(path), **source))
    return error.value


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("train.jsonl.gz", gzip.compress(jsonl([ROW, ROW]))),
        ("train.json.gz", gzip.compress(json.dumps([ROW, ROW]).encode())),
        ("TRAIN.JSONL", jsonl([ROW, ROW])),
        ("bom.jsonl", b"\xef\xbb\xbf" + jsonl([ROW, ROW])),
        ("bom.json", b"\xef\xbb\xbf" + json.dumps([ROW, ROW]).encode()),
    ],
    ids=lambda value: value if isinstance(value, str) else "",  # the bytes vary with gzip's timestamp
)
def test_compressed_bom_and_upper_case_files_are_read(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert list(load_source(str(path))) == [ROW, ROW]


def test_a_csv_saved_by_excel_reads_its_numbers_where_numbers_belong(tmp_path):
    """A BOM before the header, CRLF line ends, and the margin as text: read as the number it spells."""
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected,margin\r\n1+1=,2,3,1.5\r\n\"2+2, then=\",4,5,2\r\n")
    data = PreferenceDataModule(TINY, train=str(path))
    data.setup("fit")
    assert [example["margin"] for example in data.train_examples] == [1.5, 2.0]


def test_a_csv_row_with_the_wrong_number_of_cells_is_named_with_its_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n1+1=,2,3\n2+2=,4,5,6\n")
    error = refused(path)
    assert error.record == 1 and "line 3 has 4 cells but the header has 3 columns" in str(error)


def test_a_csv_margin_that_is_not_a_number_is_named(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\n1+1=,2,3,high\n")
    with pytest.raises(DataValidationError, match="record 0, field \"margin\": 'high' is not a number"):
        PreferenceDataModule(TINY, train=str(path)).setup("fit")


def test_a_duplicate_key_is_named_with_record_line_and_field(tmp_path):
    """JSON keeps the last of two equal keys: a role written twice would turn a user turn into a
    supervised assistant turn without a word."""
    path = tmp_path / "train.jsonl"
    twice = '{"messages": [{"role": "user", "role": "assistant", "content": "1+1"}]}'
    path.write_bytes(jsonl([ROW]) + twice.encode() + b"\n")
    error = refused(path)
    assert (error.record, error.field) == (1, "messages[0].role") and "line 2" in str(error)
    array = tmp_path / "train.json"
    array.write_text(f"[{json.dumps(ROW)}, {twice}]")
    assert (refused(array).record, refused(array).field) == (1, "messages[0].role")


@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", list(range(10))), ("train[:3]", [0, 1, 2]), ("train[7:]", [7, 8, 9]), ("train[20%:40%]", [2, 3]),
     ("train[:2]+train[-1:]", [0, 1, 9])],
)
def test_a_split_slice_on_a_local_file_is_honoured(tmp_path, split, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl([{"i": i} for i in range(10)]))
    assert [row["i"] for row in load_source(DataSource(str(path), split=split))] == expected


def test_a_split_a_local_file_does_not_have_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl([ROW]))
    assert "one split, 'train'" in str(refused(path, split="test"))


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_limit_must_be_a_positive_whole_number(limit):
    with pytest.raises(ValueError, match="limit"):
        DataSource("rows.jsonl", limit=limit)


def test_limit_keeps_exactly_the_first_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl([{"i": i} for i in range(5)]))
    assert [row["i"] for row in load_source(DataSource(str(path), limit=5))] == [0, 1, 2, 3, 4]
    assert [row["i"] for row in load_source(DataSource(str(path), limit=2))] == [0, 1]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bad.parquet", b"not parquet at all", "is not a readable Parquet file"),
        ("bad.jsonl.gz", b"not gzip", "is not a readable gzip file"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nests objects or lists too deeply"),
        ("latin1.csv", "prompt,completion\ncafé,ok\n".encode("latin-1"), "line 2 is not valid UTF-8"),
        ("latin1.json", b'[\n{"text":\n"caf\xe9"}]', "line 3 is not valid UTF-8"),
        ("empty.jsonl", b"\n\n", "the file is empty"),
        ("rows.txt", b"hello", "unknown file type '.txt'"),
    ],
)
def test_unreadable_files_are_named_in_plposts_own_error(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    error = refused(path)
    assert str(path) in str(error) and problem in str(error)


def test_a_deeply_nested_jsonl_line_is_named_with_its_record_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(jsonl([ROW]) + b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    error = refused(path)
    assert error.record == 1 and "line 2 nests" in str(error)


def test_a_mistyped_local_path_and_a_folder_are_named_as_such(tmp_path):
    assert "no such file" in str(refused(tmp_path / "typo" / "train.jsonl"))
    assert "no such file" in str(refused("./data/missing"))
    assert "is a folder" in str(refused(tmp_path))


def test_a_hub_name_that_cannot_be_loaded_is_named(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    error = refused("someone/no-such-dataset-here")
    assert "no Hub dataset by that name could be loaded" in str(error)


def test_a_margin_beyond_float32_is_named_before_training():
    """1e39 is finite in float64 but inf in the float32 batch the loss would read it from."""
    row = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    for margin in (1e39, 10**400):
        with pytest.raises(DataValidationError, match='record 0, field "margin": .*float32'):
            PreferenceDataModule(TINY, train=[{**row, "margin": margin}]).setup("fit")


def test_sft_reads_a_gzipped_file_end_to_end(tmp_path):
    path = tmp_path / "chat.JSONL.GZ"
    path.write_bytes(gzip.compress(jsonl([ROW] * 3)))
    data = ChatDataModule(TINY, train=str(path))
    data.setup("fit")
    assert len(data.train_examples) == 3


def test_a_source_given_as_a_mapping_is_read_as_yaml_writes_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl([{"i": i} for i in range(4)]))
    assert [row["i"] for row in load_source({"path": str(path), "split": "train[1:]", "limit": 2})] == [1, 2]
    with pytest.raises(ValueError, match="path, split, name, limit and streaming"):
        load_source({"path": str(path), "splits": "train"})
