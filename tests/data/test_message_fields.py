"""Every field a chat template can render reaches it; a field it cannot render is a named error.

The template below renders tools, tool calls and a reasoning trace the way Qwen3's does, in the
bundled tokenizer's vocabulary: tools in a system block, each call after the content, and the
reasoning of the final assistant turn only (earlier turns lose theirs, on purpose).
"""

import pytest
from conftest import TINY, supervised_spans

from plpost import ChatDataModule, PreferenceDataModule, PromptDataModule
from plpost.data.formats import DataValidationError

TOOL_TEMPLATE = (
    "{%- if tools -%}<|system|>tools: {{ tools | tojson }}<|end|>{%- endif -%}"
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>' }}"
    "{%- if m['role'] == 'assistant' and loop.last and m.reasoning_content -%}<think>{{ m.reasoning_content }}</think>"
    "{%- endif -%}{{ m.content if m.content is string else '' }}"
    "{%- for call in m.tool_calls or [] -%}<call>{{ call.function.name }} {{ call.function.arguments | tojson }}</call>"
    "{%- endfor -%}<|end|>{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
USER = {"role": "user", "content": "1+2"}


def supervised_texts(tokenizer, rows, **kwargs):
    data = ChatDataModule(TINY, train=rows, **{"chat_template": TOOL_TEMPLATE, **kwargs})
    data.setup("fit")
    return [
        [tokenizer.decode(span) for span in supervised_spans(example["input_ids"], example["labels"])]
        for example in data.train_examples
    ]


def refusal(rows, **kwargs) -> str:
    with pytest.raises(DataValidationError) as refused:
        ChatDataModule(TINY, train=rows, **{"chat_template": TOOL_TEMPLATE, **kwargs}).setup("fit")
    return str(refused.value)


def test_tool_calls_with_null_content_tool_results_and_tools_are_rendered_and_supervised(tokenizer):
    row = {
        "tools": TOOLS,
        "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "name": "add", "tool_call_id": "c1", "content": "3"},
                     {"role": "assistant", "content": "3"}],
    }
    (spans,) = supervised_texts(tokenizer, [row])
    assert spans == ['<call>add {"a": 1, "b": 2}</call><|end|>', "3<|end|>"]


def test_tool_calls_stored_as_a_json_string_and_empty_export_fields_are_read(tokenizer):
    """Some exports keep the list of calls as one JSON string, and write empty fields (OpenAI's
    `annotations: []`, `refusal: null`) that hold nothing."""
    import json

    message = {"role": "assistant", "content": None, "tool_calls": json.dumps([CALL]), "annotations": [], "refusal": None}
    (spans,) = supervised_texts(tokenizer, [{"messages": [USER, message]}])
    assert spans == ['<call>add {"a": 1, "b": 2}</call><|end|>']


def test_arguments_given_as_a_json_string_are_rendered_as_written(tokenizer):
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    row = {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [call]}]}
    (spans,) = supervised_texts(tokenizer, [row])
    assert spans == ['<call>add "{\\"a\\": 1}"</call><|end|>']  # this template applies tojson to what it is given


def test_reasoning_of_the_final_turn_is_supervised_and_earlier_turns_follow_the_template(tokenizer):
    """The template keeps reasoning only on the last turn: the first turn's trace is dropped by the
    template's design (it renders when its turn is last), so it is not an error."""
    messages = [USER, {"role": "assistant", "content": "3", "reasoning_content": "one plus two"},
                {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4", "thinking": "two twos"}]
    (spans,) = supervised_texts(tokenizer, [{"messages": messages}])
    assert spans == ["3<|end|>", "<think>two twos</think>4<|end|>"]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "assistant", "content": "3", "reasoning_content": "one plus two"}, "messages[1].reasoning_content"),
        ({"role": "assistant", "content": "3", "name": "calculator"}, "messages[1].name"),
    ],
)
def test_a_field_the_template_does_not_render_is_named(message, field):
    problem = refusal([{"messages": [USER, message]}], chat_template=None)  # the bundled template renders neither
    assert f'record 0, field "{field}"' in problem and "does not render" in problem


def test_tools_the_template_does_not_render_are_named():
    without_tools = (  # the bundled format, minus its tools line
        "{%- for m in messages -%}{{ '<|' + m['role'] + '|>' + m['content'] }}<|end|>{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )
    problem = refusal([{"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": "3"}]}], chat_template=without_tools)
    assert 'record 0, field "tools"' in problem


@pytest.mark.parametrize(
    ("message", "field", "problem"),
    [
        ({"role": "assistant", "content": "3", "metadata": {"id": 1}}, "messages[1].metadata", "not a message field"),
        ({"role": "assistant", "content": [{"type": "image", "url": "x"}]}, "messages[1].content[0].type", "'image'"),
        ({"role": "user", "content": "3", "tool_calls": [CALL]}, "messages[1].tool_calls", "only assistant"),
        ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": "{"}}]},
         "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
        ({"role": "assistant", "content": "3", "weight": 0.5}, "messages[1].weight", "not a weight"),
        ({"role": "assistant", "content": "3", "reasoning_content": "a", "thinking": "b"}, "messages[1].thinking",
         "keep one"),
        ({"role": "assistant", "content": None}, "messages[1].content", "is missing"),
    ],
)
def test_malformed_message_fields_are_named(message, field, problem):
    error = refusal([{"messages": [USER, message]}])
    assert f'field "{field}"' in error and problem in error


def test_content_parts_are_joined_and_weight_zero_turns_are_context(tokenizer):
    parts = [{"type": "text", "text": "1"}, {"type": "text", "text": "+2"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "4", "weight": 0},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "3", "weight": 1}]
    data = ChatDataModule(TINY, train=[{"messages": messages}])
    data.setup("fit")
    (example,) = data.train_examples
    assert tokenizer.decode(example["input_ids"]) == "<|user|>1+2<|end|><|assistant|>4<|end|><|user|>again<|end|><|assistant|>3<|end|>"
    assert [tokenizer.decode(span) for span in supervised_spans(example["input_ids"], example["labels"])] == ["3<|end|>"]


def test_chat_template_kwargs_reach_every_rendering(tokenizer):
    template = "{{ greeting }}" + TOOL_TEMPLATE
    data = ChatDataModule(TINY, train=[{"messages": [USER, {"role": "assistant", "content": "3"}]}],
                          chat_template=template, chat_template_kwargs={"greeting": "hello"})
    data.setup("fit")
    assert tokenizer.decode(data.train_examples[0]["input_ids"]).startswith("hello<|user|>")
    prompts = PromptDataModule(TINY, train=[{"prompt": [USER]}], chat_template=template,
                               chat_template_kwargs={"greeting": "hello"})
    prompts.setup("fit")
    assert tokenizer.decode(prompts.train_examples[0]["input_ids"]) == "hello<|user|>1+2<|end|><|assistant|>"


def test_text_rows_train_every_token_and_eos(tokenizer):
    data = ChatDataModule(TINY, train=[{"text": "12+30=42"}])
    data.setup("fit")
    (example,) = data.train_examples
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == "12+30=42"


def test_prompt_tools_reach_the_rendered_prompt(tokenizer):
    data = PromptDataModule(TINY, train=[{"prompt": [USER], "tools": TOOLS}], chat_template=TOOL_TEMPLATE)
    data.setup("fit")
    assert tokenizer.decode(data.train_examples[0]["input_ids"]).startswith('<|system|>tools: [{"type": "function"')


# -- preference layouts --------------------------------------------------------------------------
def pairs(rows, **kwargs):
    data = PreferenceDataModule(TINY, train=rows, **kwargs)
    data.setup("fit")
    return data.train_examples


def test_ultrafeedback_layout_reads_the_conversations_shared_prompt(tokenizer):
    """UltraFeedback-binarized: a string prompt, and chosen / rejected as whole conversations that open with it."""
    row = {"prompt": "1+2", "chosen": [USER, {"role": "assistant", "content": "3"}],
           "rejected": [USER, {"role": "assistant", "content": "4"}], "score_chosen": 9.0}
    (pair,) = pairs([row])
    assert tokenizer.decode(pair["prompt_ids"]) == "<|user|>1+2<|end|><|assistant|>"
    assert (tokenizer.decode(pair["chosen_ids"]), tokenizer.decode(pair["rejected_ids"])) == ("3<|end|>", "4<|end|>")
    only_answers = {"prompt": "1+2", "chosen": [{"role": "assistant", "content": "3"}],
                    "rejected": [{"role": "assistant", "content": "4"}]}
    assert pairs([only_answers])[0]["prompt_ids"] == pair["prompt_ids"]


def test_a_string_prompt_that_is_not_the_conversations_user_turn_is_named():
    row = {"prompt": "2+2", "chosen": [USER, {"role": "assistant", "content": "3"}],
           "rejected": [USER, {"role": "assistant", "content": "4"}]}
    with pytest.raises(DataValidationError, match='record 0, field "prompt": is a string, but the conversations'):
        pairs([row])


def test_a_prompt_repeated_at_the_start_of_both_completions_is_named():
    with pytest.raises(DataValidationError, match='field "chosen": and rejected both repeat the prompt'):
        pairs([{"prompt": "Q: 1+2 A:", "chosen": "Q: 1+2 A: 3", "rejected": "Q: 1+2 A: 4"}])


def test_pairs_identical_after_truncation_follow_identical_pairs():
    """The answers differ only past max_length: cut there, the pair prefers nothing."""
    row = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "33333333"}],
           "rejected": [{"role": "assistant", "content": "33333334"}]}
    with pytest.raises(DataValidationError, match="identical to chosen as tokens"):
        pairs([row], max_length=8)
    data = PreferenceDataModule(TINY, train=[row, {**row, "rejected": [{"role": "assistant", "content": "4"}]}],
                                max_length=8, identical_pairs="skip")
    data.setup("fit")
    assert data.counts["train"]["skipped (chosen identical to rejected)"] == 1


def test_pair_tool_calls_are_part_of_the_completion(tokenizer):
    row = {"tools": TOOLS, "prompt": [USER], "chosen": [{"role": "assistant", "content": None, "tool_calls": [CALL]}],
           "rejected": [{"role": "assistant", "content": "4"}]}
    (pair,) = pairs([row], chat_template=TOOL_TEMPLATE)
    assert tokenizer.decode(pair["chosen_ids"]) == '<call>add {"a": 1, "b": 2}</call><|end|>'
    assert tokenizer.decode(pair["prompt_ids"]).startswith("<|system|>tools:")
