"""Where each assistant turn lies in one rendering of the whole conversation.

The conversation is rendered once, as the model will see it in training, and each assistant turn
is located in that text by a second rendering, the probe, in which short markers are inserted
around the turn's text fields (content, reasoning, tool-call names). Removing the markers from
the probe must give the first rendering back, character for character; then the markers say
exactly where each field landed, whatever the template does around them (trimming, folding a
system prompt into a user turn, stripping reasoning from earlier turns, splitting a ``<think>``
block off the content). No template has to be prefix-stable, and none needs ``{% generation %}``
markers, which are not trusted either (some put the role header inside the generation block).

A turn's supervised span then runs from the end of its role header to the end of the first
end-of-turn token after its last field. The role header is the template's own generation prompt
(what the model is given before it answers): the longest prefix of it, cut at its token
boundaries, that opens the turn. So what is supervised is exactly what the model must generate
after the generation prompt, including text the template adds inside the turn (a ``<think>``
block, tool-call syntax), and never the header.

Over 300 lines: one algorithm (render, probe, locate each field, map text to tokens), whose steps
are checked against each other; the marker rendering is `plpost.data.chat_markers`.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, NamedTuple

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from plpost.data.chat_markers import MARKER, REASONING_FIELDS, RESERVED, marker_positions, with_markers
from plpost.data.control_tokens import ControlTokens
from plpost.data.formats import Message
FIELD_READ = re.compile(r"""(?:\.|\[['"])(reasoning_content|thinking|reasoning)\b""")
PLPOST_FIELDS = ("weight",)  # read by plpost, never rendered
RENDERED_FIELDS = ("reasoning_content", "tool_calls", "name")
# <|tool_response> is where Gemma 4 hands a tool call over to the tool, as its template writes after every call.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<turn|>", "<|tool_response>")


class TemplateMismatch(ValueError):
    """The chat template cannot render a conversation as written, or its assistant turns cannot be located.

    `message` and `field` (when known) say where: message index in the conversation, and its field.
    """

    def __init__(self, problem: str, *, message: int | None = None, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.message, self.field = problem, message, field


class Span(NamedTuple):
    start: int
    end: int


class RenderedChat(NamedTuple):
    """One conversation as the model sees it: the token ids and, per located assistant turn, its token span."""

    input_ids: list[int]
    turn_spans: list[Span]
    """[start, end) token positions of each located assistant turn, in order."""
    turn_messages: list[int]
    """The message index of each span."""


class ChatTemplate:
    """A tokenizer's chat template, rendered with fixed keyword arguments (``enable_thinking``,
    ``date_string``, ...), and the assistant turns located in what it renders."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template_kwargs: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The template's text for `messages`; a reasoning trace goes under the field this template reads."""
        if not self.tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; pass `chat_template` (a Jinja string or .jinja file)")
        rendered = []
        for message in messages:
            message = {key: value for key, value in message.items() if key not in PLPOST_FIELDS}
            if "reasoning_content" in message and self.reasoning_field not in (None, "reasoning_content"):
                message[self.reasoning_field] = message.pop("reasoning_content")
            rendered.append(message)
        return self.tokenizer.apply_chat_template(
            rendered, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
        )

    def check_fields_rendered(self, messages: Sequence[Message], tools: list | None = None, text: str | None = None) -> None:
        """Raises TemplateMismatch naming a field the user wrote that this template does not render:
        the content of a system, user or tool message, a reasoning trace, tool calls, a name, tools.

        A field counts as rendered when removing it changes the text, or, for a template that drops it from
        earlier turns on purpose (Qwen3 keeps reasoning only after the last user turn), when it changes the
        text of the conversation that ends with its message. `name` on a tool message (the function it
        answers) and tool-call ids are links, which templates may leave implicit in the order of turns.
        """
        text = self.render(messages, tools=tools) if text is None else text
        for position, message in enumerate(messages):
            content = message.get("content")
            if message["role"] != "assistant" and isinstance(content, str) and not renders_text(content, text):
                raise TemplateMismatch(
                    "the chat template does not render this message's content in this conversation, so training "
                    "would silently drop it (Mistral's templates keep the system prompt only when the conversation "
                    "ends with a user turn: render it into the last user turn instead); pass a `chat_template` "
                    "that renders it", message=position, field="content",
                )
        if tools and not self.renders_otherwise(messages, None, text):
            raise TemplateMismatch("the chat template does not render tools, so the model would never see them", field="tools")
        for position, message in enumerate(messages):
            for field in RENDERED_FIELDS:
                if field not in message or (field == "name" and message["role"] == "tool"):
                    continue
                without = {key: value for key, value in message.items() if key != field}
                if self.renders_otherwise([*messages[:position], without, *messages[position + 1 :]], tools, text):
                    continue
                ending_here = messages[: position + 1]
                if self.renders_otherwise([*messages[:position], without], tools, self.render(ending_here, tools=tools)):
                    continue
                raise TemplateMismatch(
                    f"the chat template does not render `{field}`, so training would silently drop it; remove the field "
                    "or pass a `chat_template` that renders it", message=position, field=field,
                )

    def renders_otherwise(self, messages: Sequence[Message], tools: list | None, text: str) -> bool:
        try:
            return self.render(messages, tools=tools) != text
        except TemplateError:  # the template needs the field to render at all
            return True

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of rendered text and their character offsets, tokenized as apply_chat_template does."""
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation or backend.padding or backend.encode_special_tokens != self.tokenizer.split_special_tokens:
            # Settings another caller left on the backend, which the tokenizer's own call resets.
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), [tuple(offset) for offset in encoded["offset_mapping"]]
        # What the tokenizer's call does for one text, without its conversions (a third of the time here).
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_rendering(
        self, messages: Sequence[Message], text: str, *, add_generation_prompt: bool = False, tools: list | None = None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and offsets of `text`, the rendering of `messages`, in which only the template's own
        markers are control tokens: a special token's spelling inside a message or tool schema is text."""
        if not self.control_tokens.written_in([messages, tools]):
            return self.encode(text)
        defused = self.control_tokens.defused([list(messages), tools])
        defused_text = self.render(defused[0], add_generation_prompt=add_generation_prompt, tools=defused[1])
        if self.control_tokens.restored(defused_text) != text:
            raise TemplateMismatch(
                "a message holds the spelling of a control token of the tokenizer, and the chat template renders "
                "the conversation otherwise when that text changes, so it cannot be kept as text"
            )
        return self.control_tokens.encode(defused_text)

    @cached_property
    def control_tokens(self) -> ControlTokens:
        return ControlTokens(self.tokenizer)

    def prompt_ids(self, messages: Sequence[Message], tools: list | None = None) -> list[int]:
        """A prompt as generation sees it: rendered with the generation prompt."""
        text = self.render(messages, add_generation_prompt=True, tools=tools)
        return self.encode_rendering(messages, text, add_generation_prompt=True, tools=tools)[0]

    @cached_property
    def reasoning_field(self) -> str | None:
        """The message field this template reads a reasoning trace from, if any."""
        read = set(FIELD_READ.findall(self.tokenizer.chat_template))
        return next((name for name in REASONING_FIELDS if name in read), None)

    @cached_property
    def header_prefixes(self) -> list[str]:
        """The generation prompt's prefixes at its token boundaries, longest first. A template whose
        generation prompt is empty (Mistral's) opens an answer right after the user turn's closing text
        (``[/INST]``), so that text is the header then; [] if there is neither."""
        user = MARKER.format("user")
        probe = [{"role": "user", "content": user}]
        try:
            bare, prompted = self.render(probe), self.render(probe, add_generation_prompt=True)
        except TemplateError:  # a template that refuses a lone user turn gives no header to match
            return []
        header = prompted[len(os.path.commonprefix([bare, prompted])) :]
        if not header and user in bare:
            header = bare[bare.index(user) + len(user) :]
        if not header:
            return []
        _, offsets = self.encode(header)
        ends = sorted({end for _, end in offsets if end > 0} | {len(header)}, reverse=True)
        return [header[:end] for end in ends]

    @cached_property
    def end_of_turn_ids(self) -> set[int]:
        """Tokens that close an assistant turn: EOS, the usual end-of-turn tokens, and the special token
        this template writes right after an answer."""
        tokenizer = self.tokenizer
        ids = end_of_turn_tokens(tokenizer)
        if not tokenizer.chat_template:
            return ids
        answer = MARKER.format("answer")
        try:
            text = self.render([{"role": "user", "content": MARKER.format("user")}, {"role": "assistant", "content": answer}])
        except TemplateError:
            return ids
        token_ids, offsets = self.encode(text)
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        after = text.find(answer) + len(answer)
        following = [t for t, (start, _) in zip(token_ids, offsets) if start >= after and t in special]
        return ids | set(following[:1])

    def check_offsets(self) -> None:
        if not self.tokenizer.is_fast:
            raise ValueError(
                f"{type(self.tokenizer).__name__} is not a fast tokenizer: locating assistant turns needs the token "
                "offsets only fast (Rust) tokenizers give; load the model's tokenizer.json"
            )

    def locate(self, messages: Sequence[Message], *, first: int = 0, tools: list | None = None) -> RenderedChat:
        """Token ids of the whole conversation and the spans of its assistant turns from message `first` on
        (turns with ``weight: 0`` are rendered but not located).

        Raises TemplateMismatch, naming the message, when a field is not rendered (`check_fields_rendered`),
        when a turn's text is not in the rendering, changes the rendering around it when it changes, or is
        not followed by an end-of-turn token.
        """
        self.check_offsets()
        text = self.render(messages, tools=tools)
        self.check_fields_rendered(messages, tools, text)
        turns = [
            position for position in range(first, len(messages))
            if messages[position]["role"] == "assistant" and messages[position].get("weight", 1) != 0
        ]
        anchors = self.anchors(messages, turns, text, tools)
        token_ids, offsets = self.encode_rendering(messages, text, tools=tools)
        closers = self.end_of_turn_ids
        spans, lower = [], 0
        bounds = [anchor.start for anchor in anchors[1:]] + [len(text)]
        starts, ends = zip(*offsets) if offsets else ((), ())
        # As tokenizers emit them; then both searches are bisections.
        ordered = all(map(operator.le, starts, starts[1:])) and all(map(operator.le, ends, ends[1:]))
        for position, (anchor_start, anchor_end), bound in zip(turns, anchors, bounds):
            start = self.header_end(text, lower, anchor_start)
            after = bisect.bisect_left(starts, anchor_end) if ordered else 0
            closer = next(
                (index for index in range(after, len(offsets))
                 if starts[index] >= anchor_end and token_ids[index] in closers),
                None,
            )
            if closer is None or offsets[closer][0] >= bound:
                raise TemplateMismatch(
                    f"the chat template ends this assistant turn without an end-of-turn token (any of "
                    f"{sorted(closers)}), so the model could not learn where its answers stop", message=position,
                )
            first_token = first_token_after(starts, ends, start, ordered)
            spans.append(Span(first_token, closer + 1))
            lower = offsets[closer][1]
        return RenderedChat(token_ids, spans, turns)

    def header_end(self, text: str, lower: int, anchor_start: int) -> int:
        """Where the turn's role header ends: after the latest occurrence, within text[lower:], of the longest
        generation-prompt prefix that starts before the turn's first field (it may end inside it: DeepSeek-R1's
        generation prompt opens the <think> block that the content holds)."""
        for prefix in self.header_prefixes:
            found = text.rfind(prefix, lower, anchor_start + len(prefix) - 1)
            if found != -1:
                return found + len(prefix)
        return anchor_start

    def anchors(self, messages: Sequence[Message], turns: list[int], text: str, tools: list | None) -> list[Span]:
        """Per turn, the character span in `text` from its first to its last rendered text field."""
        if not turns:
            return []
        if RESERVED in text:
            raise TemplateMismatch(f"the conversation contains the text {RESERVED!r}, which plpost reserves")
        for around in (True, False):  # markers on both sides of each field, then (if that changes the rendering) after it
            probe, markers = with_markers(messages, turns, around=around)
            rendered = self.render(probe, tools=tools)
            positions, unmarked = marker_positions(rendered, markers)
            if unmarked == text:
                break
        else:
            raise TemplateMismatch(
                "the chat template renders the conversation differently when the text of its assistant turns "
                "changes, so their tokens cannot be located in the rendering", message=turns[0],
            )
        anchors = []
        for turn in turns:
            found = [positions[marker] for marker in markers[turn] if marker in positions]
            if not found:
                raise TemplateMismatch(
                    "the chat template does not render this assistant turn's text at all (not its content, "
                    "reasoning or tool calls), so there is nothing to learn from it", message=turn,
                )
            anchors.append(Span(min(found), max(found)))
        return anchors


def first_token_after(starts: Sequence[int], ends: Sequence[int], position: int, ordered: bool) -> int:
    """The first token that ends after character `position`, or is empty and starts at or after it.

    With offsets in order, every token that starts at or after `position` qualifies, and an earlier one
    only by ending after it: the first such is found by bisection."""
    if ordered:
        return bisect.bisect_right(ends, position, 0, bisect.bisect_left(starts, position))
    return next(index for index, (token_start, token_end) in enumerate(zip(starts, ends))
                if token_end > position or (token_start == token_end and token_start >= position))


def renders_text(content: str, text: str) -> bool:
    """Whether `text` holds `content` (trimmed), as written or JSON-escaped (Llama 3.1 writes tool results with tojson)."""
    core = content.strip()
    return core in text or json.dumps(core, ensure_ascii=False)[1:-1] in text or json.dumps(core)[1:-1] in text


def end_of_turn_tokens(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS and the end-of-turn tokens of the common chat formats that this vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids
