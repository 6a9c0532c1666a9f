"""PreferenceDataModule: prompt extraction, completion labels, validation, truncation, padding."""

import json

import pytest
import torch
from conftest import TINY, chat, supervised_spans

from plpost.data.formats import DataValidationError
from plpost.data.preference import PreferenceBatch, PreferenceDataModule
from plpost.data.tokenize import IGNORE_INDEX


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


EXPLICIT = {"prompt": user("37+48"), "chosen": assistant("85"), "rejected": assistant("75")}


def examples(rows, **settings) -> list[dict]:
    data = PreferenceDataModule(TINY, train=rows, **settings)
    data.setup("fit")
    return data.train_examples


def batch_of(rows, **settings) -> tuple[PreferenceBatch, PreferenceDataModule]:
    data = PreferenceDataModule(TINY, train=rows, shuffle=False, **settings)
    data.setup("fit")
    return data.collate_fn()([(example, None) for example in data.train_examples]), data


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def test_message_rows_render_prompt_then_completion_and_supervise_only_the_completion(tokenizer):
    batch, _ = batch_of([EXPLICIT])
    chosen, rejected = batch.input_ids
    assert decode(tokenizer, chosen) == "<|user|>37+48<|end|><|assistant|>85<|end|>"
    assert decode(tokenizer, rejected) == "<|user|>37+48<|end|><|assistant|>75<|end|>"
    # Exactly one supervised run per row: the answer and its end token, nothing of the prompt.
    assert [decode(tokenizer, s) for s in supervised_spans(chosen.tolist(), batch.labels[0].tolist())] == ["85<|end|>"]
    assert [decode(tokenizer, s) for s in supervised_spans(rejected.tolist(), batch.labels[1].tolist())] == ["75<|end|>"]
    prompt = tokenizer.apply_chat_template(user("37+48"), add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = list(prompt["input_ids"])
    for row, labels in zip(batch.input_ids, batch.labels):
        assert row[: len(prompt_ids)].tolist() == prompt_ids  # the prompt as generation sees it is a prefix
        assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
        assert (labels[len(prompt_ids) :] != IGNORE_INDEX).all()


def test_implicit_prompt_gives_the_same_tokens_as_the_explicit_one():
    implicit = {"chosen": chat("37+48", "85"), "rejected": chat("37+48", "75")}
    assert examples([implicit]) == examples([EXPLICIT])


def test_implicit_prompt_of_multi_turn_conversations_ends_at_the_last_shared_message():
    """The first assistant turn is shared, so it belongs to the prompt; only the last turn differs."""
    implicit = {"chosen": chat("1+1", "2", "and 37+48?", "85"), "rejected": chat("1+1", "2", "and 37+48?", "75")}
    explicit = {"prompt": chat("1+1", "2", "and 37+48?"), "chosen": assistant("85"), "rejected": assistant("75")}
    assert examples([implicit]) == examples([explicit])


def test_implicit_prompt_of_strings_is_the_common_leading_text(tokenizer):
    implicit = {"chosen": "Q: 37+48 A: 85", "rejected": "Q: 37+48 A: 75"}
    explicit = {"prompt": "Q: 37+48 A: ", "chosen": "85", "rejected": "75"}
    assert examples([implicit]) == examples([explicit])
    batch, _ = batch_of([explicit])
    spans = supervised_spans(batch.input_ids[0].tolist(), batch.labels[0].tolist())
    assert [decode(tokenizer, s) for s in spans] == ["85<|end|>"]  # string completions end with EOS


def test_pad_is_eos_keeps_the_final_eos_supervised_and_attended(pad_is_eos_tokenizer_dir):
    rows = [EXPLICIT, {"prompt": user("1+1"), "chosen": assistant("2"), "rejected": assistant("12")}]
    data = PreferenceDataModule(pad_is_eos_tokenizer_dir, train=rows, shuffle=False)
    data.setup("fit")
    batch = data.collate_fn()([(e, None) for e in data.train_examples])
    eos = data.tokenizer.eos_token_id
    for row, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask):
        last = int(mask.sum()) - 1
        assert row[last] == eos and labels[last] == eos
        assert (labels[last + 1 :] == IGNORE_INDEX).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_side(padding_side, tokenizer):
    rows = [
        {**EXPLICIT, "margin": 0.5},
        {"prompt": user("99+99"), "chosen": assistant("198"), "rejected": assistant("1"), "margin": 2},
    ]
    batch, _ = batch_of(rows, padding_side=padding_side)
    assert batch.input_ids.shape[0] == 4
    unpadded = [
        "<|user|>37+48<|end|><|assistant|>85<|end|>", "<|user|>99+99<|end|><|assistant|>198<|end|>",
        "<|user|>37+48<|end|><|assistant|>75<|end|>", "<|user|>99+99<|end|><|assistant|>1<|end|>",
    ]
    for row, mask, positions, text in zip(batch.input_ids, batch.attention_mask, batch.position_ids, unpadded):
        real = mask.bool()
        assert decode(tokenizer, row[real]) == text
        assert positions[real].tolist() == list(range(int(real.sum())))  # as if the row were alone
        length, width = int(real.sum()), len(row)
        ones, zeros = [1] * length, [0] * (width - length)
        assert mask.tolist() == (ones + zeros if padding_side == "right" else zeros + ones)
    assert batch.margin.tolist() == [0.5, 2.0]
    assert batch.pair_index.tolist() == [0, 1]
    assert float(batch.pair_normalizer) == 2.0


def test_pair_normalizer_is_the_sampler_window_when_given():
    """Each pair weighs 1 pair and its predicted chosen tokens (all of them: the prompt precedes
    them); the sampler's window sums both, and a batch without a window counts its own."""
    batch, data = batch_of([EXPLICIT] * 3)
    windowed = data.collate_fn()([(e, [12.0, 40.0]) for e in data.train_examples[:2]])
    assert float(windowed.pair_normalizer) == 12.0 and batch.margin is None
    assert float(windowed.chosen_token_normalizer) == 40.0
    chosen_tokens = len(data.train_examples[0]["chosen_ids"])
    assert data.example_weight(data.train_examples[0]) == (1.0, chosen_tokens)
    assert float(batch.chosen_token_normalizer) == 3 * chosen_tokens


def test_identical_pairs_are_refused_or_skipped_and_counted():
    same = {"prompt": user("1+1"), "chosen": assistant("2"), "rejected": assistant("2")}
    same_implicit = {"chosen": chat("1+1", "2"), "rejected": chat("1+1", "2")}
    for row in (same, same_implicit):
        with pytest.raises(DataValidationError, match=r'record 1, field "rejected": is identical to chosen'):
            PreferenceDataModule(TINY, train=[EXPLICIT, row]).setup("fit")
    data = PreferenceDataModule(TINY, train=[EXPLICIT, same, same_implicit], identical_pairs="skip")
    data.setup("fit")
    assert data.counts["train"] == {"records": 3, "kept": 1, "skipped (chosen identical to rejected)": 2}


MALFORMED = [
    # (row, field named in the error, words of the problem)
    ({"prompt": user("1+1"), "rejected": assistant("3")}, "chosen", "is missing"),
    ({"prompt": user("1+1"), "chosen": assistant("2")}, "rejected", "is missing"),
    ({"prompt": 7, "chosen": "2", "rejected": "3"}, "prompt", "expected a string or a list of messages, got int"),
    ({"prompt": "", "chosen": "2", "rejected": "3"}, "prompt", "is empty"),
    ({"prompt": "1+1", "chosen": "  ", "rejected": "3"}, "chosen", "is empty"),
    ({"prompt": "1+1", "chosen": "2", "rejected": assistant("3")}, "rejected", "all be strings or all be message lists"),
    ({"prompt": user("1+1"), "chosen": "2", "rejected": assistant("3")}, "chosen", "all be strings or all be message lists"),
    ({"prompt": user("1+1"), "chosen": [], "rejected": assistant("3")}, "chosen", "empty list"),
    ({"prompt": user("1+1"), "chosen": assistant(""), "rejected": assistant("3")}, "chosen[0].content", "is empty"),
    ({"prompt": user("1+1"), "chosen": assistant("2"), "rejected": assistant(3)}, "rejected[0].content", "expected a string, got int"),
    ({"prompt": user("1+1"), "chosen": user("2"), "rejected": assistant("3")}, "chosen[0].role", "'user' is not a role"),
    ({"prompt": chat("1+1", "2"), "chosen": assistant("2"), "rejected": assistant("3")}, "prompt", "ends with an assistant turn"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": assistant("2"), "rejected": assistant("3")}, "prompt[0].content", "is empty"),
    ({"prompt": user("1+1"), "chosen": assistant("2"), "rejected": assistant("3"), "margin": "big"}, "margin", "expected a number, got str"),
    ({"prompt": user("1+1"), "chosen": assistant("2"), "rejected": assistant("3"), "margin": float("nan")}, "margin", "not a finite number"),
    ({"chosen": "2", "rejected": "3"}, "prompt", "share no leading text"),
    ({"chosen": assistant("2"), "rejected": assistant("3")}, "prompt", "share no leading message"),
    ({"chosen": chat("1+1", "2"), "rejected": chat("1+1")}, "rejected", "has nothing after the prompt"),
    ({"chosen": "1+1=2", "rejected": "1+1=2 "}, "chosen", "has nothing after the prompt"),
    ({"chosen": "1+1=2", "rejected": chat("1+1", "2")}, "rejected", "both be strings or both be message lists"),
    ({"chosen": chat("1+1", "2", "3+3", "6"), "rejected": chat("1+1", "2", "4+4", "8")}, "chosen[2].role", "must be assistant turns"),
    ({"chosen": chat("1+1", "2"), "rejected": [{"role": "user", "content": "1+1"}, {"role": "asistant", "content": "3"}]},
     "rejected[1].role", "'asistant' is not a role"),
]


@pytest.mark.parametrize(("row", "field", "problem"), MALFORMED)
def test_malformed_record_names_source_record_and_field(tmp_path, row, field, problem):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(EXPLICIT), json.dumps(EXPLICIT), json.dumps(row, allow_nan=True)]
    path.write_text("\n".join(lines) + "\n")
    rows = [EXPLICIT, EXPLICIT, row]  # in memory too: a NaN margin does not survive every JSON reader
    for source, name in ((str(path), str(path)), (rows, "in-memory rows")):
        with pytest.raises(DataValidationError) as error:
            PreferenceDataModule(TINY, train=source).setup("fit")
        message = str(error.value)
        assert message.startswith(f"{name}, record 2, field \"{field}\"") and problem in message, message


def test_margin_given_for_some_records_only_is_refused():
    with pytest.raises(DataValidationError, match=r'record 1, field "margin": is missing, but other records'):
        PreferenceDataModule(TINY, train=[{**EXPLICIT, "margin": 1.0}, EXPLICIT]).setup("fit")


def test_template_whose_prompt_is_not_a_token_prefix_is_located(tokenizer):
    """A template that renders the last user turn differently (with a "?") when no answer follows
    it: the pair's prompt is the prompt as rendered before its completions, not as generation would
    render it alone, and each completion is exactly its answer and end token."""
    template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'user' %}<|user|>{{ m['content'] }}?<|end|>"
        "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    data = PreferenceDataModule(TINY, train=[EXPLICIT], chat_template=template)
    data.setup("fit")
    (pair,) = data.train_examples
    assert tokenizer.decode(pair["prompt_ids"]) == "<|user|>37+48<|end|><|assistant|>"
    assert tokenizer.decode(pair["chosen_ids"]) == "85<|end|>"
    assert tokenizer.decode(pair["rejected_ids"]) == "75<|end|>"


def long_row(answer_digits: int) -> dict:
    return {"prompt": user("1+1"), "chosen": assistant("2" * answer_digits), "rejected": assistant("3")}


def test_truncation_cuts_the_completion_end_and_is_counted():
    """Prompt <|user|>1+1<|end|><|assistant|> is 6 tokens; max_length 10 leaves 4 completion tokens."""
    kept = examples([long_row(8), long_row(2)], max_length=10)
    assert [len(e["prompt_ids"]) for e in kept] == [6, 6]
    assert [len(e["chosen_ids"]) for e in kept] == [4, 3]  # 4 of 9; "22<|end|>" fits whole
    data = PreferenceDataModule(TINY, train=[long_row(8), long_row(2)], max_length=10)
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 2, "truncated": 1}


def test_overflow_drop_and_error():
    data = PreferenceDataModule(TINY, train=[long_row(8), long_row(2)], max_length=10, overflow="drop")
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 1, "dropped (longer than max_length)": 1}
    with pytest.raises(DataValidationError, match=r'record 0, field "chosen": prompt \+ chosen is 15 tokens'):
        PreferenceDataModule(TINY, train=[long_row(8)], max_length=10, overflow="error").setup("fit")


def test_long_prompts_keep_their_end_and_pairs_left_without_completion_are_skipped(tokenizer):
    """<|user|>12345678+1<|end|><|assistant|> is 13 tokens: max_prompt_length 5 keeps its last 5."""
    long_prompt = {"prompt": user("12345678+1"), "chosen": assistant("2"), "rejected": assistant("3")}
    kept = examples([long_prompt], max_length=20, max_prompt_length=5)
    assert decode(tokenizer, kept[0]["prompt_ids"]) == "8+1<|end|><|assistant|>"
    assert kept[0]["chosen_ids"] == tokenizer("2<|end|>", add_special_tokens=False)["input_ids"]
    # Without max_prompt_length the 13 prompt tokens fill max_length=10: nothing of a completion is left.
    data = PreferenceDataModule(TINY, train=[long_prompt, long_row(1)], max_length=10)
    data.setup("fit")
    assert data.counts["train"] == {"records": 2, "kept": 1, "skipped (a completion has no token left after truncation)": 1}


def test_length_grouped_training_batches_pad_less_and_hold_the_same_pairs():
    """Pairs of 1 to 40 digits in random order, 4 per batch: grouped in runs of 5 batches, the
    epoch feeds fewer padded tokens, yet holds every pair once and normalises each step by the
    pairs it holds."""
    digits = torch.randint(1, 41, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"prompt": user(f"{i}"), "chosen": assistant("7" * n), "rejected": assistant("3" * n)}
            for i, n in enumerate(digits)]

    def epoch(group_by_length):
        data = PreferenceDataModule(TINY, train=rows, batch_size=4, seed=1, group_by_length=group_by_length)
        data.setup("fit")
        return list(data.train_dataloader())

    plain, grouped = epoch(None), epoch(5)
    assert sorted(i for b in grouped for i in b.pair_index.tolist()) == list(range(40))
    assert all(b.pair_normalizer.item() == 4 for b in grouped)
    fed = [sum(b.input_ids.numel() for b in batches) for batches in (plain, grouped)]
    assert fed[1] < 0.8 * fed[0]
