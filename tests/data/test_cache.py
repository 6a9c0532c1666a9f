"""Tokenized data is kept in a cache entry keyed by everything that changes it, and read memory-mapped."""

import inspect
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plpost import ChatDataModule, FeedbackDataModule, PreferenceDataModule, PromptDataModule
from plpost.data import DataValidationError
from plpost.data.table import ExampleTable
from conftest import TINY, bundled_pairs


def chats(count: int, *, long_every: int = 0) -> list[dict]:
    """Chats whose answer is longer for every `long_every`-th record (64+ tokens, past max_length=48)."""
    return [
        {"messages": [{"role": "user", "content": f"{i}+{i}"},
                      {"role": "assistant", "content": "4" * (60 if long_every and i % long_every == 0 else i % 7 + 1)}]}
        for i in range(count)
    ]


def counting_preprocess(monkeypatch, module_type) -> list[int]:
    calls = []
    preprocess = module_type.preprocess
    monkeypatch.setattr(module_type, "preprocess", lambda self, *args: calls.append(1) or preprocess(self, *args))
    return calls


def test_a_second_module_with_the_same_settings_reads_the_entry_without_tokenizing(tmp_path, monkeypatch):
    calls = counting_preprocess(monkeypatch, ChatDataModule)
    first = ChatDataModule(TINY, train=chats(10), cache_dir=str(tmp_path))
    first.setup("fit")
    assert len(calls) == 10
    second = ChatDataModule(TINY, train=chats(10), cache_dir=str(tmp_path), batch_size=3, seed=5)  # batching only
    second.setup("fit")
    assert len(calls) == 10 and list(second.train_examples) == list(first.train_examples)
    assert second.counts == first.counts == {"train": {"records": 10, "kept": 10}}
    assert [path.name for path in tmp_path.iterdir() if path.name != ".locks"] == [first.entry("train").name]


# Every argument of each data module either changes the examples (and then the key: the values here
# are other than the defaults) or only how they are batched and loaded.
LOADING = {"tokenizer", "train", "val", "val_size", "batch_size", "eval_batch_size", "num_workers", "shuffle", "seed",
           "group_by_length", "packing", "pad_to_multiple_of", "padding_side", "trust_remote_code", "num_proc",
           "cache_dir", "chat_template"}
CHANGES = {
    ChatDataModule: {"max_length": 64, "overflow": "drop", "chat_template_kwargs": {"date_string": "1 Jan 2026"}},
    PreferenceDataModule: {"max_length": 64, "max_prompt_length": 8, "overflow": "drop", "identical_pairs": "skip",
                           "chat_template_kwargs": {"x": 1}},
    FeedbackDataModule: {"max_length": 64, "max_prompt_length": 8, "overflow": "drop", "identical_pairs": "skip",
                         "chat_template_kwargs": {"x": 1}},
    PromptDataModule: {"max_prompt_length": 8, "overflow": "drop", "completions": True, "chat_template_kwargs": {"x": 1}},
}


@pytest.mark.parametrize("module_type", list(CHANGES))
def test_every_preprocessing_argument_is_part_of_the_key(module_type, tmp_path):
    parameters = set(inspect.signature(module_type.__init__).parameters) - {"self"}
    assert parameters - LOADING == set(CHANGES[module_type])  # a new argument must be sorted into one of the two
    rows = [{"prompt": "1+1=", "completion": "2", "chosen": "2", "rejected": "3", "label": True}]
    base = module_type(TINY, train=rows, cache_dir=str(tmp_path)).entry_folder("train")
    folders = {module_type(TINY, train=rows, cache_dir=str(tmp_path), **{name: value}).entry_folder("train")
               for name, value in CHANGES[module_type].items()}
    assert len(folders) == len(CHANGES[module_type]) and base not in folders
    assert module_type(TINY, train=rows, cache_dir=str(tmp_path), batch_size=2).entry_folder("train") == base


def test_the_source_tokenizer_and_template_are_part_of_the_key(tmp_path, pad_is_eos_tokenizer_dir):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chats(3)))

    def folder(**options):
        return ChatDataModule(**{"tokenizer": TINY, "train": str(path), "cache_dir": str(tmp_path), **options}).entry_folder("train")

    original = folder()
    template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    others = {folder(tokenizer=pad_is_eos_tokenizer_dir), folder(chat_template=template),
              folder(train=chats(3)), folder(train=chats(3)[:2])}
    assert len(others) == 4 and original not in others
    path.write_text(path.read_text().replace("1+1", "1+2"))
    assert folder() != original


def test_records_are_tokenized_alike_in_two_processes_and_counted_alike(tmp_path):
    rows = chats(12, long_every=4)
    one, two = (ChatDataModule(TINY, train=rows, max_length=48, overflow="drop", cache_dir=str(tmp_path / str(n)),
                               num_proc=n) for n in (1, 2))
    for module in (one, two):
        module.setup("fit")
    assert one.counts == two.counts == {"train": {"records": 12, "kept": 9, "dropped (longer than max_length)": 3}}
    assert list(one.train_examples) == list(two.train_examples)
    assert [e["record_index"] for e in two.train_examples] == [i for i in range(12) if i % 4]
    assert len(list((tmp_path / "2").glob("*/examples_*.arrow"))) == 2  # one shard per process


@pytest.mark.parametrize(("line", "fix", "expected"), [
    ('{"messages": [}', None, r'chats.jsonl, record 9: line 11 is not valid JSON'),
    (None, ("assistant", "asistant"), r'chats.jsonl, record 9, field "messages\[1\].role": \'asistant\' is not a role'),
])
def test_an_error_raised_in_a_worker_process_names_file_record_line_and_field(tmp_path, line, fix, expected):
    lines = [json.dumps(row) for row in chats(12)]
    if line is not None:
        lines[9] = line
    else:
        lines[9] = lines[9].replace(*fix)
    lines.insert(3, "")  # a blank line: records and lines are counted apart
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match=expected):
        ChatDataModule(TINY, train=str(path), cache_dir=str(tmp_path / "cache"), num_proc=2).setup("fit")
    assert not any((tmp_path / "cache").glob("ChatDataModule-*"))  # nothing half-built was kept


def test_of_bad_records_in_two_processes_the_error_names_the_first_of_the_file(tmp_path):
    """Two processes read a half of 200 records each. The first half's bad record (98) comes after 98
    good ones, the second half's (100, not JSON) is its first, so the second process fails first; the
    error names record 98 all the same, as one process reading the file in order would."""
    lines = [json.dumps(row) for row in chats(200)]
    lines[98] = lines[98].replace("assistant", "asistant")
    lines[100] = '{"messages": [}'
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for num_proc in (2, 1):
        with pytest.raises(DataValidationError, match=r'record 98, field "messages\[1\].role"'):
            ChatDataModule(TINY, train=str(path), cache_dir=str(tmp_path / "cache"), num_proc=num_proc).setup("fit")
    assert not any((tmp_path / "cache").glob("ChatDataModule-*"))


def test_the_cache_location_is_the_argument_else_the_environment_and_is_printed_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PLPOST_DATA_CACHE", str(tmp_path / "from-env"))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        for _ in range(2):
            ChatDataModule(TINY, train=chats(2)).setup("fit")
    assert any((tmp_path / "from-env").iterdir())
    told = [record.getMessage() for record in caplog.records if "keeps tokenized data in" in record.getMessage()]
    assert told == [f"plpost keeps tokenized data in {tmp_path / 'from-env'} (set cache_dir or $PLPOST_DATA_CACHE to move it)"]
    ChatDataModule(TINY, train=chats(2), cache_dir=str(tmp_path / "given")).setup("fit")
    assert any((tmp_path / "given").iterdir())


def test_a_split_is_a_memory_mapped_view_that_pickles_as_its_folder(tmp_path):
    data = PreferenceDataModule(TINY, train=bundled_pairs(200), cache_dir=str(tmp_path))
    data.setup("fit")
    examples = data.train_examples
    assert isinstance(examples, ExampleTable) and len(examples) == 200
    as_lists = sum(len(pickle.dumps(example)) for example in examples)
    shipped = pickle.dumps(examples)
    assert len(shipped) < as_lists / 10  # indices and a folder name, not the examples
    assert pickle.loads(shipped) == examples and examples[3:5] == [examples[3], examples[4]]
    weights = examples.column("weights")
    assert weights.shape == (200, 2) and np.all(weights[:, 0] == 1.0)


def test_val_size_holds_out_a_seeded_random_sample_of_the_whole_split(tmp_path):
    def split(seed):
        data = ChatDataModule(TINY, train=chats(40), val_size=8, seed=seed, cache_dir=str(tmp_path))
        data.setup("fit")
        return [e["record_index"] for e in data.train_examples], [e["record_index"] for e in data.val_examples]

    train, val = split(0)
    assert sorted(train + val) == list(range(40)) and len(val) == 8 and val == sorted(val)
    assert val != list(range(8)) and split(0) == (train, val) and split(1)[1] != val


def test_feedback_examples_read_from_the_table_carry_their_mismatched_completion(tmp_path):
    data = FeedbackDataModule(TINY, train=bundled_pairs(6), cache_dir=str(tmp_path))
    data.setup("fit")
    examples = list(data.train_examples)
    for position, example in enumerate(examples):
        partner = next(e for e in examples[position + 1 :] + examples if e["prompt_ids"] != example["prompt_ids"])
        assert example["example_index"] == position
        assert example["mismatched_ids"] == partner["completion_ids"][: 1024 - len(example["prompt_ids"])]
    lengths = data.train_examples.column("lengths")
    assert lengths.tolist() == [data.example_length(example) for example in examples]


@pytest.mark.slow
def test_in_a_two_process_run_one_process_tokenizes_and_both_read_the_entry(tmp_path):
    """Lightning runs prepare_data on local rank 0 only; rank 1 waits for it and memory-maps the entry."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("prepare_once.py")
    subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "cache")], check=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert [rank["tokenized"] for rank in ranks] == [16, 0]
    assert {rank["examples"] for rank in ranks} == {"ExampleTable"} and ranks[0]["folder"] == ranks[1]["folder"]
