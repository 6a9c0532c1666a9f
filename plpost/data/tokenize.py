"""Tokenization that supervises exactly the assistant tokens, end-of-turn token included.

Conversations are rendered by the tokenizer's own chat template, once, and each assistant turn
is located in that rendering (see plpost.data.chat_template): no template has to render a
conversation as the concatenation of its turns, and none needs ``{% generation %}`` markers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from plpost.data.chat_template import ChatTemplate, Span, TemplateMismatch
from plpost.data.formats import DataValidationError, Message

IGNORE_INDEX = -100
Overflow = Literal["truncate", "drop", "error"]
Prompt = str | list[Message]


class TokenizedExample(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    """input_ids where supervised, IGNORE_INDEX elsewhere."""
    truncated: bool


class Overflowed(Exception):
    """Raised for a record longer than max_length when the policy is to drop it."""


@contextmanager
def template_refusals_named(source: str, index: int, fields: Sequence[str] | str) -> Iterator[None]:
    """Turns an error the chat template raises on purpose (``raise_exception('...')``, e.g. "roles must
    alternate"), or a conversation it cannot render as written, into a DataValidationError naming the
    record and field. `fields`: the field name of each message of the conversation in order (a
    TemplateMismatch names its message by position), or one name for the whole record."""
    try:
        yield
    except TemplateError as error:
        field = fields if isinstance(fields, str) else fields[0].split("[")[0]
        raise DataValidationError(source, index, field, f"the chat template refuses it: {error}") from None
    except TemplateMismatch as error:
        if isinstance(fields, str):
            field = fields
        elif error.message is None:
            field = error.field or fields[0].split("[")[0]
        else:
            field = fields[error.message] + (f".{error.field}" if error.field else "")
        raise DataValidationError(source, index, field, error.problem) from None


def message_fields(name: str, messages: Sequence[Message]) -> list[str]:
    """["messages[0]", "messages[1]", ...]: how errors name each message of a field."""
    return [f"{name}[{position}]" for position in range(len(messages))]


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
    template = ChatTemplate(tokenizer)
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    return template.encode_rendering(messages, text, add_generation_prompt=add_generation_prompt)[0]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """A message list is rendered with the chat template and the generation prompt; a string as is."""
    return encode_prompt(ChatTemplate(tokenizer), prompt)


def encode_prompt(template: ChatTemplate, prompt: Prompt, tools: list | None = None) -> list[int]:
    """A string prompt's tokens (with the tokenizer's special tokens), or a message prompt as generation
    sees it: rendered with `tools` and the generation prompt."""
    if isinstance(prompt, str):
        return list(template.tokenizer(prompt)["input_ids"])
    return template.prompt_ids(prompt, tools)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that close an assistant turn; they are always supervised so generation stops."""
    return ChatTemplate(tokenizer).end_of_turn_ids


def conversation_mask(
    template: ChatTemplate, context: list[Message], supervised: list[Message], tools: list | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of context + supervised and a mask that is True on the assistant turns of `supervised`
    (those not given ``weight: 0``), from each turn's first generated token to its end-of-turn token."""
    messages = context + supervised
    rendered = template.locate(messages, first=len(context), tools=tools)
    mask = [False] * len(rendered.input_ids)
    for start, end in rendered.turn_spans:
        mask[start:end] = [True] * (end - start)
    return rendered.input_ids, mask


def text_mask(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """Plain-text prompt/completion: prompt tokens (with the tokenizer's special tokens) + completion + EOS.

    The two parts are tokenized separately, as they are at generation time, where the model
    continues the tokens of the prompt alone.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, so a completion cannot be ended; set tokenizer.eos_token")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def completion_after_text(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> list[int]:
    """The completion's tokens and EOS, as they follow a text prompt (see `text_mask`)."""
    ids, supervised = text_mask(tokenizer, prompt, completion)
    return [token for token, is_completion in zip(ids, supervised) if is_completion]


def language_model_mask(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[bool]]:
    """A plain-text row for language modelling: every token (with the tokenizer's special tokens) and EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, so a text cannot be ended; set tokenizer.eos_token")
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids)


def tokenize_supervised(
    template: ChatTemplate,
    context: list[Message] | str | None,
    supervised: list[Message] | str,
    *,
    max_length: int,
    overflow: Overflow,
    source: str,
    index: int,
    tools: list | None = None,
) -> TokenizedExample:
    """Tokenizes one validated record; the overflow policy decides what happens past max_length.

    context None with a string: a language-modelling text (every token supervised); two strings:
    prompt and completion as text; message lists: a conversation through the chat template.

    "truncate" keeps the first max_length tokens (what was cut is reported by `truncated`),
    "drop" raises Overflowed so the caller counts and skips the record, "error" raises a
    DataValidationError naming the record.
    """
    if context is None:
        ids, mask = language_model_mask(template.tokenizer, supervised)
        spans = [Span(0, len(ids))]
    elif isinstance(supervised, str):
        ids, mask = text_mask(template.tokenizer, context, supervised)
        spans = [Span(mask.index(True), len(ids))]
    else:
        rendered = template.locate(context + supervised, first=len(context), tools=tools)
        ids, spans = rendered.input_ids, rendered.turn_spans
    truncated = len(ids) > max_length
    if truncated:
        if overflow == "error":
            raise DataValidationError(source, index, None, f"{len(ids)} tokens exceed max_length={max_length}")
        if overflow == "drop":
            raise Overflowed
        ids = ids[:max_length]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:  # a span past a truncation keeps what is left of it
        labels[start:end] = ids[start:end]
    return TokenizedExample(ids, labels, truncated)
