"""Chat tokenization that supervises exactly the assistant tokens, end-of-turn token included.

Assistant spans come from the tokenizer's own chat template. A template with
``{% generation %}`` markers gives them directly (`return_assistant_tokens_mask`). Templates
without markers (many instruct models ship none) use the documented fallback: the span of
assistant turn i is the difference between the rendering of messages[:i] with the generation
prompt and the rendering of messages[:i+1], which holds whenever the template renders a
conversation as the concatenation of its turns; that is checked, and a template that breaks it
gets an error naming the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from plpost.data.formats import DataValidationError, Message

IGNORE_INDEX = -100
Overflow = Literal["truncate", "drop", "error"]
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TokenizedExample(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    """input_ids where supervised, IGNORE_INDEX elsewhere."""
    truncated: bool


class Overflowed(Exception):
    """Raised for a record longer than max_length when the policy is to drop it."""


@contextmanager
def template_refusals_named(source: str, index: int, field: str) -> Iterator[None]:
    """Turns an error the chat template raises on purpose (``raise_exception('...')``, e.g.
    "roles must alternate") into a DataValidationError naming the record and field."""
    try:
        yield
    except TemplateError as error:
        raise DataValidationError(source, index, field, f"the chat template refuses it: {error}") from None


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


Prompt = str | list[Message]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """A message list is rendered with the chat template and the generation prompt; a string as is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and GENERATION_MARKER.search(template) is not None


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that close an assistant turn; they are always supervised so generation stops."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def _require_prefix(prefix: list[int], full: list[int], what: str) -> None:
    if full[: len(prefix)] != prefix:
        raise ValueError(
            f"the chat template does not render {what} as a token prefix of the whole conversation, so assistant "
            "tokens cannot be located; pass a `chat_template` whose assistant turns are wrapped in "
            "{% generation %}...{% endgeneration %}"
        )


def conversation_mask(
    tokenizer: PreTrainedTokenizerBase, context: list[Message], supervised: list[Message]
) -> tuple[list[int], list[bool]]:
    """Token ids of context + supervised and a mask that is True on the assistant turns of `supervised`."""
    messages = context + supervised
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]]
        if context:
            prompt = chat_ids(tokenizer, context, add_generation_prompt=True)
            _require_prefix(prompt, ids, "the prompt")
            mask[: len(prompt)] = [False] * len(prompt)
    else:
        ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
        mask = [False] * len(ids)
        for position in range(len(context), len(messages)):
            if messages[position]["role"] != "assistant":
                continue
            if position == 0:  # transformers renders no empty conversation, so the header has no prefix to diff
                raise TemplateError(
                    "an assistant turn opens the conversation, and without {% generation %} markers in the template "
                    "its role header cannot be told from its content; start with another turn, or pass a "
                    "`chat_template` whose assistant turns are wrapped in {% generation %}...{% endgeneration %}"
                )
            start = chat_ids(tokenizer, messages[:position], add_generation_prompt=True)
            end = chat_ids(tokenizer, messages[: position + 1], add_generation_prompt=False)
            _require_prefix(start, end, f"the conversation before message {position}")
            _require_prefix(end, ids, f"the conversation up to message {position}")
            mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    closers = end_of_turn_ids(tokenizer)
    for position in range(1, len(ids)):
        if mask[position - 1] and not mask[position] and ids[position] in closers:
            mask[position] = True
    return ids, mask


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


def tokenize_supervised(
    tokenizer: PreTrainedTokenizerBase,
    context: list[Message] | str,
    supervised: list[Message] | str,
    *,
    max_length: int,
    overflow: Overflow,
    source: str,
    index: int,
) -> TokenizedExample:
    """Tokenizes one validated record; the overflow policy decides what happens past max_length.

    "truncate" keeps the first max_length tokens (what was cut is reported by `truncated`),
    "drop" raises Overflowed so the caller counts and skips the record, "error" raises a
    DataValidationError naming the record.
    """
    if isinstance(supervised, str):
        ids, mask = text_mask(tokenizer, context, supervised)
    else:
        ids, mask = conversation_mask(tokenizer, context, supervised)
    truncated = len(ids) > max_length
    if truncated:
        if overflow == "error":
            raise DataValidationError(source, index, None, f"{len(ids)} tokens exceed max_length={max_length}")
        if overflow == "drop":
            raise Overflowed
        ids, mask = ids[:max_length], mask[:max_length]
    labels = [token if supervised_token else IGNORE_INDEX for token, supervised_token in zip(ids, mask)]
    return TokenizedExample(ids, labels, truncated)
