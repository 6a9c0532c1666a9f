"""Malformed records fail before training with an error naming source, record and field."""

import json

import pytest

from plpost import ChatDataModule
from plpost.data.formats import DataValidationError

GOOD = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}

MALFORMED = [
    # (row, field named in the error, words of the problem)
    ({"messages": [{"role": "asistant", "content": "2"}]}, "messages[0].role", "'asistant' is not a role"),
    ({"messages": [{"content": "2"}]}, "messages[0].role", "is missing"),
    ({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "is empty"),
    ({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": 2}]},
     "messages[1].content", "expected a string, got int"),
    ({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant"}]}, "messages[1].content", "is missing"),
    ({"messages": "hello"}, "messages", "expected a list of messages"),
    ({"messages": []}, "messages", "empty list"),
    ({"messages": [{"role": "user", "content": "1+1"}]}, "messages", "no supervised assistant turn"),
    ({"messages": [{"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "2"}]},
     "messages[0].content", "NUL"),
    ({"messages": ["hi"]}, "messages[0]", "expected a message object"),
    ({"prompt": "1+1"}, "completion", "is missing"),
    ({"prompt": "", "completion": "2"}, "prompt", "is empty"),
    ({"prompt": "1+1", "completion": [{"role": "assistant", "content": "2"}]}, "completion", "both be strings"),
    ({"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "user", "content": "2"}]},
     "completion[0].role", "'user' is not a role"),
    ({"answer": "1+1=2"}, None, "expected a 'messages' field"),
]


@pytest.mark.parametrize(("row", "field", "problem"), MALFORMED)
def test_malformed_record_names_source_record_and_field(tmp_path, row, field, problem):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, GOOD, row]) + "\n")
    data = ChatDataModule("plpost:tiny", train=str(path))
    with pytest.raises(DataValidationError) as error:
        data.setup("fit")
    message = str(error.value)
    assert message.startswith(f"{path}, record 2")
    if field is not None:
        assert f'field "{field}"' in message
    assert problem in message


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataValidationError, match=r"record 1: line 2 is not valid UTF-8"):
        ChatDataModule("plpost:tiny", train=str(path)).setup("fit")


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataValidationError, match=r"record 1: line 2 is not valid JSON"):
        ChatDataModule("plpost:tiny", train=str(path)).setup("fit")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(DataValidationError, match="the file is empty"):
        ChatDataModule("plpost:tiny", train=str(path)).setup("fit")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DataValidationError, match="no such file"):
        ChatDataModule("plpost:tiny", train=str(tmp_path / "nope.jsonl")).setup("fit")


def test_every_local_format_loads_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = []
    for name in ["rows.parquet", "rows.csv", "rows.json", "rows.jsonl"]:
        data = ChatDataModule("plpost:tiny", train=str(tmp_path / name))
        data.setup("fit")
        loaded.append(data.train_examples)
    in_memory = ChatDataModule("plpost:tiny", train=rows)
    in_memory.setup("fit")
    assert all(examples == in_memory.train_examples for examples in loaded)


def test_truncated_dropped_and_empty_records_are_counted(tmp_path):
    long_answer = "9" * 80
    rows = [GOOD, {"messages": [{"role": "user", "content": "1" * 60}, {"role": "assistant", "content": long_answer}]}]
    truncating = ChatDataModule("plpost:tiny", train=rows, max_length=40)
    truncating.setup("fit")
    # The long record's prompt alone fills max_length: nothing supervised is left, so it is skipped.
    assert truncating.counts["train"]["kept"] == 1
    assert sum(v for k, v in truncating.counts["train"].items() if k.startswith("skipped")) == 1
    cut = ChatDataModule("plpost:tiny", train=rows, max_length=70)
    cut.setup("fit")
    assert cut.counts["train"] == {"records": 2, "kept": 2, "truncated": 1}
    dropping = ChatDataModule("plpost:tiny", train=rows, max_length=70, overflow="drop")
    dropping.setup("fit")
    assert dropping.counts["train"]["kept"] == 1 and len(dropping.train_examples) == 1
