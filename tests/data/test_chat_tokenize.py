"""Golden masking tests: the supervised tokens are exactly the assistant text plus its end token."""

import re

import pytest
import torch
from conftest import chat, supervised_spans

from plpost.data.chat_template import ChatTemplate, TemplateMismatch
from plpost.data.collate import collate_chat
from plpost.data.tokenize import IGNORE_INDEX, tokenize_supervised
from plpost.hf import load_tokenizer

GENERATION_BLOCK = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def tokenize(tokenizer, context, supervised, max_length=256, overflow="truncate", **template_kwargs):
    return tokenize_supervised(
        ChatTemplate(tokenizer, template_kwargs), context, supervised, max_length=max_length, overflow=overflow,
        source="test", index=0,
    )


def decoded_spans(tokenizer, example):
    return [tokenizer.decode(span) for span in supervised_spans(example.input_ids, example.labels)]


def test_single_turn_supervises_answer_and_end_token(tokenizer):
    example = tokenize(tokenizer, [], chat("37+48", "85"))
    assert decoded_spans(tokenizer, example) == ["85<|end|>"]
    assert tokenizer.decode(example.input_ids) == "<|user|>37+48<|end|><|assistant|>85<|end|>"


def test_every_assistant_turn_of_a_multi_turn_chat_is_supervised(tokenizer):
    messages = [{"role": "system", "content": "Add."}, *chat("1+2", "3", "and 4+4?", "8 ✓")]
    example = tokenize(tokenizer, [], messages)
    assert decoded_spans(tokenizer, example) == ["3<|end|>", "8 ✓<|end|>"]


def test_generation_markers_do_not_change_the_mask(tokenizer):
    """The mask comes from where each turn lands in the rendering, so a template with
    {% generation %} markers and the same template without them give the same tokens and labels."""
    plain = load_tokenizer("plpost:tiny")
    plain.chat_template = GENERATION_BLOCK.sub("", plain.chat_template)
    assert "generation %" not in plain.chat_template
    messages = chat("12+13", "25", "30+41", "71")
    assert tokenize(plain, [], messages) == tokenize(tokenizer, [], messages)


def test_a_template_that_drops_a_turn_is_refused_naming_it(tokenizer):
    dropping = load_tokenizer("plpost:tiny")
    # Renders the user turns and only the last assistant turn: the first is nowhere in the text.
    dropping.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] != 'assistant' or loop.last -%}{{ '<|' + m['role'] + '|>' }}"
        "{{ m['content'] }}<|end|>{%- endif -%}{%- endfor -%}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(TemplateMismatch, match="does not render this assistant turn") as refused:
        tokenize(dropping, [], chat("1+1", "2", "2+2", "4"))
    assert refused.value.message == 1


def test_a_template_that_drops_a_system_prompt_is_refused_naming_it(tokenizer):
    """Mistral's templates keep the system prompt only when the conversation ends with a user turn."""
    dropping = load_tokenizer("plpost:tiny")
    dropping.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] != 'system' or messages[-1]['role'] == 'user' -%}"
        "{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}<|end|>{%- endif -%}{%- endfor -%}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(TemplateMismatch, match="does not render this message's content") as refused:
        tokenize(dropping, [], [{"role": "system", "content": "Add."}, *chat("1+1", "2")])
    assert (refused.value.message, refused.value.field) == (0, "content")


def test_a_template_that_is_not_prefix_stable_is_located(tokenizer):
    """This template writes a marker before the LAST assistant turn only (as Qwen3 writes its
    <think> block), so the conversation up to turn 1 is not a token prefix of the whole one. Each
    turn is still located in the one rendering: turn 1 supervises "2<|end|>", and the final turn
    everything after its header, the template's marker included."""
    unstable = load_tokenizer("plpost:tiny")
    unstable.chat_template = (
        "{%- for m in messages -%}{{ '<|' + m['role'] + '|>' }}{%- if m['role'] == 'assistant' and loop.last -%}"
        "{{ '<|system|>' }}{%- endif -%}{{ m['content'] }}<|end|>{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    example = tokenize(unstable, [], chat("1+1", "2", "2+2", "4"))
    assert decoded_spans(unstable, example) == ["2<|end|>", "<|system|>4<|end|>"]


def test_an_opening_assistant_turn_is_located(tokenizer):
    example = tokenize(tokenizer, [], [{"role": "assistant", "content": "Hi"}, *chat("1+1", "2")])
    assert decoded_spans(tokenizer, example) == ["Hi<|end|>", "2<|end|>"]


def test_weight_zero_turns_are_context_only(tokenizer):
    messages = chat("1+1", "3", "1+1", "2")
    messages[1]["weight"] = 0
    example = tokenize(tokenizer, [], messages)
    assert decoded_spans(tokenizer, example) == ["2<|end|>"]
    assert tokenizer.decode(example.input_ids).count("3<|end|>") == 1  # still rendered, as context


def test_prompt_completion_messages_supervise_only_the_completion(tokenizer):
    prompt = chat("1+1", "2", "5+5")
    example = tokenize(tokenizer, prompt, [{"role": "assistant", "content": "10"}])
    assert decoded_spans(tokenizer, example) == ["10<|end|>"]


def test_prompt_completion_strings_supervise_completion_and_eos(tokenizer):
    example = tokenize(tokenizer, "Q: 2+2 A:", " 4")
    assert decoded_spans(tokenizer, example) == [" 4<|end|>"]
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_pad_equal_to_eos_keeps_the_final_eos_supervised(pad_is_eos_tokenizer_dir):
    tokenizer = load_tokenizer(pad_is_eos_tokenizer_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize(tokenizer, [], chat("1+1", "2"))
    long = tokenize(tokenizer, [], chat("10+10", "20", "30+30", "60"))
    batch = collate_chat([(short._asdict(), None), (long._asdict(), None)], pad_token_id=tokenizer.pad_token_id)
    row = batch.labels[0]
    length = len(short.input_ids)
    assert row[length - 1] == tokenizer.eos_token_id  # the real end of turn is a target
    assert (row[length:] == IGNORE_INDEX).all()  # the pad copies of it are not
    assert (batch.input_ids[0, length:] == tokenizer.eos_token_id).all()
    assert batch.attention_mask[0].sum() == length


def test_truncation_policies(tokenizer):
    messages = chat("12+34", "46")
    full = tokenize(tokenizer, [], messages)
    cut = tokenize(tokenizer, [], messages, max_length=len(full.input_ids) - 1)
    assert cut.truncated and cut.input_ids == full.input_ids[:-1]
    assert not full.truncated
    from plpost.data.formats import DataValidationError
    from plpost.data.tokenize import Overflowed

    with pytest.raises(Overflowed):
        tokenize(tokenizer, [], messages, max_length=4, overflow="drop")
    with pytest.raises(DataValidationError, match="record 0.*exceed max_length=4"):
        tokenize(tokenizer, [], messages, max_length=4, overflow="error")


def test_packed_batch_restarts_positions_and_never_predicts_across_sequences(tokenizer):
    a = tokenize(tokenizer, [], chat("1+1", "2"))._asdict()
    b = tokenize(tokenizer, [], chat("22+33", "55"))._asdict()
    batch = collate_chat([(a, None), (b, None)], pad_token_id=tokenizer.pad_token_id, packing=True)
    n = len(a["input_ids"])
    assert batch.input_ids.shape == (1, n + len(b["input_ids"]))
    assert batch.attention_mask is None
    assert batch.position_ids[0, n] == 0 and batch.position_ids[0, n - 1] == n - 1
    assert batch.labels[0, n] == IGNORE_INDEX
    assert batch.loss_normalizer == 5  # "2<|end|>" and "55<|end|>"
    assert torch.equal(batch.labels[0, :n], torch.tensor(a["labels"]))
