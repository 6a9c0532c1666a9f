"""The bundled tiny tokenizer renders tools and tool calls, and parses a generated turn back.

Tools are one system line of names; a call is `<call>{"name": ..., "arguments": ...}</call>` inside
the assistant turn, before its <|end|>. Conversations without tools or calls render exactly as
they did before the template learnt them, so every existing dataset and model trained on the tiny
format sees the same tokens.
"""

import json
from pathlib import Path

import pytest

from plpost.assets import resolve_pretrained

# The bundled template before tools, verbatim: the reference for byte-identical renderings.
TEMPLATE_BEFORE_TOOLS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user, assistant or tool') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
USER = {"role": "user", "content": "37+48"}
ADD_SCHEMA = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def call(a: int, b: int) -> dict:
    return {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def token_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"]


def addition_conversations() -> list[tuple[list[dict], bool]]:
    """Every conversation of the bundled addition data, with whether it is rendered as a prompt."""
    conversations = []
    for path in sorted(Path(resolve_pretrained("plpost:data/addition/sft.jsonl")).parent.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "messages" in row:
                conversations.append((row["messages"], False))
            elif "chosen" in row:
                conversations += [(row["prompt"] + row["chosen"], False), (row["prompt"] + row["rejected"], False)]
            else:
                conversations.append((row["prompt"], True))
    return conversations


# -- nothing changes without tools -----------------------------------------------------------


def test_every_bundled_addition_conversation_renders_byte_identically(tokenizer):
    """20,000 SFT rows, 6,000 pairs (both sides), 4,000 prompts and 300 eval prompts."""
    conversations = addition_conversations()
    assert len(conversations) == 20_000 + 2 * 6_000 + 4_000 + 300
    for messages, as_prompt in conversations:
        new = render(tokenizer, messages, add_generation_prompt=as_prompt)
        old = render(tokenizer, messages, add_generation_prompt=as_prompt, chat_template=TEMPLATE_BEFORE_TOOLS)
        assert new == old, messages


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Add the numbers."}, USER, {"role": "assistant", "content": "85"}],
        [USER, {"role": "assistant", "content": "85 🎉"}, {"role": "tool", "content": "checked: 85"},
         {"role": "user", "content": "21+34"}, {"role": "assistant", "content": "55"}],
        [{"role": "tool", "name": "add", "content": "85"}, {"role": "assistant", "content": "  spaced \n"}],
        [USER, {"role": "assistant", "content": ""}],
        [{"role": "system", "content": ""}, USER],
        [USER, {"role": "assistant", "content": "<call>not a call</call>"}],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_conversations_without_tools_render_as_before(tokenizer, messages, add_generation_prompt):
    new = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    old = render(tokenizer, messages, add_generation_prompt=add_generation_prompt, chat_template=TEMPLATE_BEFORE_TOOLS)
    assert new == old


# -- tools and calls -------------------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first addend.
        b: The second addend.
    """
    return a + b


@pytest.mark.parametrize(
    "tools",
    [
        [ADD_SCHEMA, {"type": "function", "function": {"name": "multiply"}}],
        [{"name": "add", "description": "bare schema"}, {"name": "multiply"}],  # without the function wrapper
        [add, {"name": "multiply"}],  # apply_chat_template turns a function into its schema
    ],
)
def test_tools_are_one_system_line_of_names_before_the_messages(tokenizer, tools):
    rendered = render(tokenizer, [USER], tools=tools, add_generation_prompt=True)
    assert rendered == "<|system|>tools: add, multiply<|end|><|user|>37+48<|end|><|assistant|>"


@pytest.mark.parametrize(
    ("message", "calls_text"),
    [
        ({"role": "assistant", "content": "", "tool_calls": [call(37, 48)]},
         '<call>{"name": "add", "arguments": {"a": 37, "b": 48}}</call>'),
        ({"role": "assistant", "content": None, "tool_calls": [call(37, 48)]},
         '<call>{"name": "add", "arguments": {"a": 37, "b": 48}}</call>'),
        ({"role": "assistant", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},  # flat call, no content
         '<call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call>'),
        ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": '{"a":1, "b":2}'}}]},
         '<call>{"name": "add", "arguments": {"a":1, "b":2}}</call>'),  # a JSON string is written as it is
        ({"role": "assistant", "content": "Adding:", "tool_calls": [call(37, 48), call(1, 2)]},
         'Adding:<call>{"name": "add", "arguments": {"a": 37, "b": 48}}</call>'
         '<call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call>'),
    ],
)
def test_a_tool_call_is_its_json_between_call_tags_before_the_end_token(tokenizer, message, calls_text):
    assert render(tokenizer, [USER, message]) == f"<|user|>37+48<|end|><|assistant|>{calls_text}<|end|>"


def tool_conversation() -> list[dict]:
    return [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [call(37, 48)]},
        {"role": "tool", "name": "add", "content": "85"},
        {"role": "assistant", "content": "85"},
    ]


def test_assistant_mask_covers_calls_and_end_tokens_never_tools_or_tool_results(tokenizer):
    out = tokenizer.apply_chat_template(
        tool_conversation(), tools=[ADD_SCHEMA], return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == (
        '<call>{"name": "add", "arguments": {"a": 37, "b": 48}}</call><|end|>85<|end|>'
    )
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|system|>tools: add<|end|><|user|>37+48<|end|><|assistant|><|tool|>85<|end|><|assistant|>"
    )


def test_generation_prompt_with_tools_is_a_token_prefix_of_the_conversation(tokenizer):
    conversation = tool_conversation()
    for turn in (1, 3):  # before the call, and after the tool's result
        prompt = token_ids(tokenizer, conversation[:turn], tools=[ADD_SCHEMA], add_generation_prompt=True)
        full = token_ids(tokenizer, conversation[: turn + 1], tools=[ADD_SCHEMA])
        assert full[: len(prompt)] == prompt


# -- parsing a generated turn back -----------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "85"},
        {"role": "assistant", "content": "", "tool_calls": [call(37, 48)]},
        {"role": "assistant", "content": "Two sums: ", "tool_calls": [call(37, 48), call(10, 99)]},
    ],
    ids=["no call", "one call", "two calls"],
)
def test_parse_response_gives_back_the_message_that_rendered_the_turn(tokenizer, message):
    prompt = token_ids(tokenizer, [USER], tools=[ADD_SCHEMA], add_generation_prompt=True)
    full = token_ids(tokenizer, [USER, message], tools=[ADD_SCHEMA])
    generated = full[len(prompt) :]  # what the model writes after the generation prompt, <|end|> included
    assert tokenizer.decode(generated).endswith("<|end|>")
    assert tokenizer.parse_response(generated, prefix=prompt) == message
    assert tokenizer.parse_response(generated, prefix="") == message
    assert tokenizer.parse_response(tokenizer.decode(generated), prefix="") == message


def parse_text(tokenizer, text: str) -> dict:
    return tokenizer.parse_response(tokenizer(text, add_special_tokens=False)["input_ids"], prefix="")


@pytest.mark.parametrize(
    "generated",
    [
        '<call>{"name": "add", "arguments": {"a": 37,}}</call><|end|>',  # a trailing comma
        "<call>add(37, 48)</call><|end|>",
        '<call>{"name": "add", "arguments": {"a": 3',  # cut off by the token budget before </call>
    ],
)
def test_a_malformed_call_raises_value_error(tokenizer, generated):
    """transformers' json content parser raises ValueError (its message starts "json parser could not
    parse"); the episode code catches that type and treats the turn as a malformed call."""
    with pytest.raises(ValueError, match="json parser could not parse"):
        parse_text(tokenizer, generated)


def test_parse_response_leaves_checking_the_shape_of_a_call_to_the_caller(tokenizer):
    """Valid JSON of the wrong shape parses without error, so the episode checks name and arguments."""
    parsed = parse_text(tokenizer, "<call>[37, 48]</call><|end|>")
    assert parsed["tool_calls"] == [{"type": "function", "function": [37, 48]}]


def test_text_after_the_end_token_replaces_the_content_so_a_turn_is_parsed_up_to_its_end(tokenizer):
    """The parser reads one turn: generation stops at <|end|>, and anything after it (padding of a
    batch, a next turn) must be cut before parsing, or it becomes the content."""
    assert parse_text(tokenizer, "85<|end|>")["content"] == "85"
    assert parse_text(tokenizer, "85<|end|><pad><pad>")["content"] == "<pad><pad>"
