"""Property-based fuzzing of tokenization and collation, for chats and preference pairs.

Conversations of random roles, orders and Unicode contents (chat-template special tokens
included, as injected text), random max_length and batch layouts. The tokens are checked
against an independent reconstruction: the bundled template renders each message as
``<|role|>content<|end|>``, so each message is its role's control token, its content tokenized
as text (a special token's spelling in it stays text) and the control token ``<|end|>``; the
content and ``<|end|>`` of every assistant turn are supervised. That is computed without plpost's
masking code (neither generation markers nor prefix differences), and both of plpost's masking
paths must agree with it.
"""

import re

import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plpost import ChatDataModule, PreferenceDataModule
from plpost.data.base import SkipRecord
from plpost.data.collate import count_loss_tokens
from plpost.data.chat_markers import RESERVED
from plpost.data.formats import DataValidationError
from plpost.data.tokenize import IGNORE_INDEX
from plpost.hf import load_tokenizer

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = load_tokenizer(TINY)
SPECIAL_TEXT = ["<|end|>", "<|assistant|>", "<|user|>", "<pad>"]

words = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
# Text holding plpost's own marker is refused by design (`test_the_reserved_marker_is_refused_by_field`).
contents = st.lists(st.one_of(words, st.sampled_from(SPECIAL_TEXT)), min_size=1, max_size=3).map("".join).filter(
    lambda text: RESERVED not in text)
said = contents.filter(lambda text: text.strip())  # user and assistant turns must say something


@st.composite
def conversations(draw) -> list[dict]:
    """1-6 messages in any order, at least one assistant turn; system and tool may be empty."""
    roles = draw(st.lists(st.sampled_from(["system", "user", "assistant", "tool"]), min_size=1, max_size=6))
    roles[draw(st.integers(0, len(roles) - 1))] = "assistant"
    return [{"role": r, "content": draw(said if r in ("user", "assistant") else contents)} for r in roles]


@st.composite
def pairs(draw) -> dict:
    prompt = draw(conversations())
    prompt[-1] = {"role": "user", "content": draw(said)}
    chosen, rejected = draw(st.lists(said, min_size=2, max_size=2, unique=True))
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def rendered(messages: list[dict], supervised_from: int) -> tuple[str, list[tuple[int, int]]]:
    """The bundled template's text, and the character spans of the content + <|end|> of each
    assistant message from position `supervised_from` on (earlier ones are prompt)."""
    text, spans = "", []
    for position, message in enumerate(messages):
        text += f"<|{message['role']}|>"
        start = len(text)
        text += message["content"] + "<|end|>"
        if message["role"] == "assistant" and position >= supervised_from:
            spans.append((start, len(text)))
    return text, spans


def reconstructed(messages: list[dict], supervised_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) message by message: control tokens around each content tokenized as text."""
    text, _ = rendered(messages, supervised_from)
    assert TOKENIZER.apply_chat_template(messages, tokenize=False) == text  # the rendering assumed above
    end = TOKENIZER.convert_tokens_to_ids("<|end|>")
    ids, labels = [], []
    for position, message in enumerate(messages):
        content = TOKENIZER(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        turn = [*content, end]
        supervised = message["role"] == "assistant" and position >= supervised_from
        ids += [TOKENIZER.convert_tokens_to_ids(f"<|{message['role']}|>"), *turn]
        labels += [IGNORE_INDEX, *(turn if supervised else [IGNORE_INDEX] * len(turn))]
    return ids, labels


def without_generation_markers():
    """The bundled tokenizer with a template that has no {% generation %} markers (they are not needed)."""
    plain = load_tokenizer(TINY)
    plain.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", plain.chat_template)
    return plain


def chat_module(tokenizer, max_length: int) -> ChatDataModule:
    data = ChatDataModule(TINY, train=[{}], max_length=max_length)
    data._tokenizer = tokenizer  # share one loaded tokenizer across examples
    return data


CHAT_MODULES = {"markers": TOKENIZER, "no-markers": without_generation_markers()}


def assert_batch_invariants(batch, examples, *, label_field="labels") -> None:
    """Shapes agree, rows hold their example left-aligned, padding is never supervised."""
    shape = batch.input_ids.shape
    assert batch.labels.shape == shape and batch.attention_mask.shape == shape and batch.position_ids.shape == shape
    assert not (batch.labels[batch.attention_mask == 0] != IGNORE_INDEX).any()
    supervised = batch.labels != IGNORE_INDEX
    assert torch.equal(batch.labels[supervised], batch.input_ids[supervised])


@pytest.mark.parametrize("masking", list(CHAT_MODULES))
@FUZZ
@given(
    records=st.lists(conversations(), min_size=1, max_size=4),
    max_length=st.integers(4, 96),
    packing=st.booleans(),
    pad_to_multiple_of=st.sampled_from([1, 8]),
)
def test_chat_tokens_and_batches(masking, records, max_length, packing, pad_to_multiple_of):
    data = chat_module(CHAT_MODULES[masking], max_length)
    data.packing, data.pad_to_multiple_of = packing, pad_to_multiple_of
    kept = []
    for index, messages in enumerate(records):
        try:
            example = data.preprocess("fuzz", index, {"messages": messages})
        except SkipRecord:
            continue
        ids, labels = reconstructed(messages)
        assert example["input_ids"] == ids[:max_length]
        assert example["labels"] == labels[:max_length]  # supervised exactly inside assistant spans
        assert example.pop("truncated") == (len(ids) > max_length)
        assert count_loss_tokens(example["labels"]) >= 1  # kept examples always teach something
        kept.append(example)
    if not kept:
        return
    batch = data.collate_fn()([(example, None) for example in kept])
    assert batch.record_index.tolist() == [e["record_index"] for e in kept]
    assert batch.loss_normalizer == sum(count_loss_tokens(e["labels"]) for e in kept)
    if packing:
        assert batch.attention_mask is None and batch.input_ids.shape == (1, sum(len(e["input_ids"]) for e in kept))
        starts = (batch.position_ids[0] == 0).nonzero().flatten()
        assert len(starts) == len(kept) and (batch.labels[0, starts] == IGNORE_INDEX).all()
        return
    assert_batch_invariants(batch, kept)
    assert batch.input_ids.shape[1] % pad_to_multiple_of == 0
    for row, example in enumerate(kept):
        length = len(example["input_ids"])
        assert batch.attention_mask[row].sum() == length <= max_length
        assert batch.labels[row, :length].tolist() == example["labels"]


PREFERENCE = PreferenceDataModule(TINY, train=[{}])
PREFERENCE._tokenizer = TOKENIZER


@FUZZ
@given(
    records=st.lists(pairs(), min_size=1, max_size=4),
    max_length=st.integers(8, 96),
    padding_side=st.sampled_from(["right", "left"]),
)
def test_preference_tokens_and_batches(records, max_length, padding_side):
    PREFERENCE.max_length, PREFERENCE.padding_side = max_length, padding_side
    kept = []
    for index, row in enumerate(records):
        try:
            example = PREFERENCE.preprocess("fuzz", index, row)
        except SkipRecord:
            continue
        except DataValidationError as refusal:
            # Two answers that differ only past max_length train nothing: refused by default (identical_pairs).
            assert refusal.field == "rejected" and "identical to chosen as tokens" in refusal.problem, refusal
            continue
        for name in ("chosen", "rejected"):
            ids, labels = reconstructed(row["prompt"] + row[name], supervised_from=len(row["prompt"]))
            prompt = len(example["prompt_ids"])
            assert example["prompt_ids"] == ids[:prompt]
            assert all(label == IGNORE_INDEX for label in labels[:prompt])  # the prompt is never supervised
            completion = example[f"{name}_ids"]
            assert 1 <= len(completion) and prompt + len(completion) <= max_length
            assert completion == labels[prompt : prompt + len(completion)]  # exactly the assistant span's tokens
        kept.append(example)
    if not kept:
        return
    batch = PREFERENCE.collate_fn()([(example, None) for example in kept])
    count = len(kept)
    assert batch.input_ids.shape[0] == 2 * count and batch.pair_index.tolist() == [e["pair_index"] for e in kept]
    assert_batch_invariants(batch, kept)
    for side, name in enumerate(("chosen_ids", "rejected_ids")):
        for i, example in enumerate(kept):
            row = side * count + i
            real = batch.attention_mask[row].bool()
            assert batch.input_ids[row, real].tolist() == example["prompt_ids"] + example[name]
            targets = batch.labels[row, real]
            assert targets[targets != IGNORE_INDEX].tolist() == example[name]
            assert (batch.labels[row] != IGNORE_INDEX).sum() >= 1


def test_the_reserved_marker_is_refused_by_field():
    """plpost locates assistant spans with a marker text; a record that holds that text is refused,
    naming where, instead of being split at the wrong place."""
    row = {"prompt": [{"role": "user", "content": f"what is {RESERVED}?"}],
           "chosen": [{"role": "assistant", "content": "0"}], "rejected": [{"role": "assistant", "content": "1"}]}
    with pytest.raises(DataValidationError, match="which plpost reserves") as refusal:
        PREFERENCE.preprocess("pairs.jsonl", 3, row)
    assert refusal.value.field == "prompt" and "record 3" in str(refusal.value)
