"""PromptDataModule: left-padded prompts with the generation prompt, extra columns passed through,
validation naming source/record/field, and a counted overflow policy."""

import json

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from plpost.data.formats import DataValidationError
from plpost.data.prompts import PromptBatch, PromptDataModule
from conftest import TINY

MESSAGES = [{"role": "user", "content": "37+48"}]


def batch_of(data: PromptDataModule) -> PromptBatch:
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_message_and_string_prompts_are_left_padded_with_columns_kept(tokenizer):
    rows = [
        {"prompt": MESSAGES, "answer": "85", "meta": {"carry": True}},
        {"prompt": "12", "answer": "7", "meta": {"carry": False}},
    ]
    batch = batch_of(PromptDataModule(TINY, rows, batch_size=2, shuffle=False))
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)
    chat = list(rendered["input_ids"])
    plain = tokenizer("12")["input_ids"]
    assert chat[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # the generation prompt ends the row
    pad = len(chat) - len(plain)
    assert batch.input_ids.tolist() == [chat, [tokenizer.pad_token_id] * pad + plain]
    assert batch.attention_mask.tolist() == [[1] * len(chat), [0] * pad + [1] * len(plain)]
    assert batch.prompts == [MESSAGES, "12"]
    assert batch.columns == {"answer": ["85", "7"], "meta": [{"carry": True}, {"carry": False}]}


def test_lightning_moves_tensors_and_leaves_the_lists():
    rows = [{"prompt": MESSAGES, "answer": "85"}]
    batch = batch_of(PromptDataModule(TINY, rows, batch_size=1))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, PromptBatch)
    assert moved.input_ids.device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert moved.prompts == [MESSAGES] and moved.columns == {"answer": ["85"]}


MALFORMED = [
    ({"answer": "1"}, "prompt", "is missing"),
    ({"prompt": ""}, "prompt", "is empty"),
    ({"prompt": 12}, "prompt", "expected a list of messages, got int"),
    ({"prompt": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}, "prompt",
     "ends with an assistant turn"),
    ({"prompt": [{"role": "robot", "content": "1+1"}]}, "prompt[0].role", "'robot' is not a role"),
]


@pytest.mark.parametrize(("row", "field", "problem"), MALFORMED)
def test_malformed_prompt_names_source_record_and_field(tmp_path, row, field, problem):
    path = tmp_path / "prompts.jsonl"
    good = {"prompt": MESSAGES, "answer": "85"}
    path.write_text("\n".join(json.dumps(r) for r in [good, {**good, **row} if "prompt" in row else row]) + "\n")
    with pytest.raises(DataValidationError) as error:
        PromptDataModule(TINY, str(path)).setup("fit")
    assert str(error.value).startswith(f"{path}, record 1, field \"{field}\"")
    assert problem in str(error.value)


def long_and_short_rows():
    return [{"prompt": [{"role": "user", "content": "1+2+3+4+5+6+7+8"}]}, {"prompt": MESSAGES}]


def test_truncation_keeps_the_end_of_the_prompt_and_is_counted(tokenizer):
    """The long prompt renders to <|user|> + 15 characters + <|end|><|assistant|> = 18 tokens;
    with max_prompt_length 10 the last 10 are kept, so it still ends with the generation prompt."""
    data = PromptDataModule(TINY, long_and_short_rows(), batch_size=2, shuffle=False, max_prompt_length=10)
    batch = batch_of(data)
    full = tokenizer.apply_chat_template(long_and_short_rows()[0]["prompt"], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    assert len(full) == 18
    assert batch.input_ids[0].tolist() == list(full[-10:])
    assert data.counts["train"] == {"records": 2, "kept": 2, "truncated": 1}


def test_drop_and_error_policies():
    data = PromptDataModule(TINY, long_and_short_rows(), max_prompt_length=10, overflow="drop")
    data.setup("fit")
    assert len(data.train_examples) == 1
    assert data.counts["train"] == {"records": 2, "kept": 1, "dropped (longer than max_prompt_length)": 1}
    with pytest.raises(DataValidationError, match=r'in-memory rows, record 0, field "prompt": 18 tokens exceed'):
        PromptDataModule(TINY, long_and_short_rows(), max_prompt_length=10, overflow="error").setup("fit")
