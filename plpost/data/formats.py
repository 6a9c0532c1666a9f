"""Record validation: every row is checked before any tokenization or training.

A malformed record raises `DataValidationError` naming the source, the record index and the
field, e.g. ``train.jsonl, record 1841, field "messages[2].role": 'asistant' is not a role``.

Policies for inputs that are unusual but not wrong:
- Turns need not alternate. Messages in any order of system, user, assistant and tool (two
  user turns in a row, an assistant turn first, a system turn mid-conversation) are rendered by
  the chat template as given, and every assistant turn is supervised. A template that refuses
  an order (some raise "roles must alternate") gives a DataValidationError naming the record.
- Any Unicode text is accepted (emoji, right-to-left scripts, combining marks) except NUL and
  unpaired surrogates (which JSON can encode but are not text a tokenizer can take).
- Every message field a chat template can render reaches it as written: `content` (a string, or
  a list of text parts, joined), `tool_calls` (content may then be null or empty; arguments as an
  object or a JSON string, as given; the list itself may be a JSON string), `tool_call_id`, `name`, and a reasoning trace
  (`reasoning_content` or `thinking`, handed to the template under the name it reads). `weight`
  (0 or 1) on an assistant turn says whether it is supervised. A field plpost does not know is an
  error, and so is a field the template does not render (see plpost.data.chat_template); a field
  that holds null (or, for a field plpost does not know, an empty list or object) counts as absent. Row fields that a format does not use are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "thinking", "weight")
FLOAT32_MAX = 3.4028234663852886e38


class CsvRow(dict):
    """A row read from a CSV file: every cell is text, so a number may be written as one."""


class DataValidationError(ValueError):
    """A record that cannot be trained on; the message names source, record and field."""

    def __init__(self, source: str, record: int | None, field: str | None, problem: str) -> None:
        where = [source]
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f'field "{field}"')
        super().__init__(f"{', '.join(where)}: {problem}")
        self.source, self.record, self.field, self.problem = source, record, field, problem

    def __reduce__(self):
        # Raised in the processes that preprocess records, and re-raised in the one that waits for them.
        return type(self), (self.source, self.record, self.field, self.problem)


class RecordChecker:
    """Validates the fields of one record and raises errors that say where the problem is."""

    def __init__(self, source: str, index: int, row: Any) -> None:
        self.source, self.index = source, index
        if not isinstance(row, Mapping):
            self.fail(None, f"expected an object with named fields, got {type(row).__name__}")
        self.row = row

    def fail(self, field: str | None, problem: str):
        raise DataValidationError(self.source, self.index, field, problem)

    def text(self, value: Any, field: str, *, allow_empty: bool = False) -> str:
        if value is None:
            self.fail(field, "is missing")
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            self.fail(field, "is empty")
        if "\x00" in value:
            self.fail(field, "contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            where = f"{value[error.start]!r} at character {error.start}"
            self.fail(field, f"contains an unpaired surrogate ({where}), which is not text")
        return value

    def messages(self, value: Any, field: str, *, allowed_roles: tuple[str, ...] = ROLES) -> list[Message]:
        if not isinstance(value, list):
            self.fail(field, f"expected a list of messages, got {type(value).__name__}")
        if not value:
            self.fail(field, "is an empty list of messages")
        return [self.message(message, f"{field}[{position}]", allowed_roles) for position, message in enumerate(value)]

    def message(self, message: Any, where: str, allowed_roles: tuple[str, ...]) -> Message:
        if not isinstance(message, Mapping):
            self.fail(where, f"expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            self.fail(f"{where}.role", "is missing")
        if role not in allowed_roles:
            self.fail(f"{where}.role", f"{role!r} is not a role (expected one of: {', '.join(allowed_roles)})")
        for key, value in message.items():
            if value not in (None, [], {}) and key not in MESSAGE_FIELDS:  # an empty value holds nothing to drop
                self.fail(f"{where}.{key}", f"is not a message field plpost knows ({', '.join(MESSAGE_FIELDS)}); remove it")
        checked: Message = {"role": role}
        if isinstance(message.get("tool_calls"), str):  # as some exports store it
            message = {**message, "tool_calls": self.json_text(message["tool_calls"], f"{where}.tool_calls")}
        if message.get("tool_calls"):
            if role != "assistant":
                self.fail(f"{where}.tool_calls", f"only assistant turns make tool calls, not {role!r}")
            checked["tool_calls"] = self.tool_calls(message["tool_calls"], f"{where}.tool_calls")
        content = self.content(message.get("content"), f"{where}.content", role, has_tool_calls="tool_calls" in checked)
        if content is not None:
            checked["content"] = content
        reasoning = [key for key in ("reasoning_content", "thinking") if message.get(key) is not None]
        if len(reasoning) == 2:
            self.fail(f"{where}.thinking", "and reasoning_content both hold a reasoning trace; keep one")
        if reasoning:
            if role != "assistant":
                self.fail(f"{where}.{reasoning[0]}", f"only assistant turns carry a reasoning trace, not {role!r}")
            checked["reasoning_content"] = self.text(message[reasoning[0]], f"{where}.{reasoning[0]}")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                checked[key] = self.text(message[key], f"{where}.{key}")
        if message.get("weight") is not None:
            checked["weight"] = self.weight(message["weight"], f"{where}.weight", role)
        return checked

    def content(self, value: Any, field: str, role: str, *, has_tool_calls: bool) -> str | None:
        """A message's text: a string, or a list of text parts joined; None or empty only where allowed."""
        if value is None and has_tool_calls:
            return None
        if isinstance(value, list):
            value = "".join(self.text_part(part, f"{field}[{position}]") for position, part in enumerate(value))
        empty_allowed = has_tool_calls or role not in ("assistant", "user")
        return self.text(value, field, allow_empty=empty_allowed)

    def text_part(self, part: Any, field: str) -> str:
        if not isinstance(part, Mapping):
            self.fail(field, f"expected a content part object, got {type(part).__name__}")
        if part.get("type") != "text":
            self.fail(f"{field}.type", f"{part.get('type')!r} parts cannot be trained on by a text model (only 'text' parts)")
        return self.text(part.get("text"), f"{field}.text", allow_empty=True)

    def tool_calls(self, value: Any, field: str) -> list[dict[str, Any]]:
        """OpenAI-style calls ({"type": "function", "function": {"name", "arguments"}}) or flat {"name", "arguments"}."""
        if not isinstance(value, list):
            self.fail(field, f"expected a list of tool calls, got {type(value).__name__}")
        for position, call in enumerate(value):
            where = f"{field}[{position}]"
            if not isinstance(call, Mapping):
                self.fail(where, f"expected a tool call object, got {type(call).__name__}")
            function = call.get("function", call)
            if "function" in call:
                where += ".function"
                if not isinstance(function, Mapping):
                    self.fail(where, f"expected an object with name and arguments, got {type(function).__name__}")
            self.text(function.get("name"), f"{where}.name")
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                self.json_text(arguments, f"{where}.arguments")
            elif not isinstance(arguments, Mapping):
                self.fail(f"{where}.arguments", f"expected an object or a JSON string, got {type(arguments).__name__}")
        return [dict(call) for call in value]

    def json_text(self, value: str, field: str) -> Any:
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError) as error:
            self.fail(field, f"is a string that is not valid JSON ({error})")

    def weight(self, value: Any, field: str, role: str) -> int:
        if role != "assistant":
            self.fail(field, f"only assistant turns are supervised, so only they take a weight (this is {role!r})")
        if isinstance(value, str) and isinstance(self.row, CsvRow):
            value = self.parse_number(value, field)
        if value not in (0, 1) or not isinstance(value, (int, float)):
            self.fail(field, f"{value!r} is not a weight (expected 0: not supervised, or 1: supervised)")
        return int(value)

    def number(self, name: str) -> float | None:
        """An optional numeric field, checked to be finite in float32 (the dtype batches carry it in)."""
        value = self.row.get(name)
        if value is None or (value == "" and isinstance(self.row, CsvRow)):
            return None
        if isinstance(value, str) and isinstance(self.row, CsvRow):
            value = self.parse_number(value, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, f"expected a number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            self.fail(name, "is an integer too large for float64, so it is not a finite number in float32 either")
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            self.fail(name, f"{number:g} is not a finite number in float32, the dtype batches carry it in")
        return number

    def boolean(self, name: str) -> bool:
        """A required true/false field (in a CSV file, the text true or false, any case)."""
        value = self.field(name)
        if isinstance(value, str) and isinstance(self.row, CsvRow) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {value!r} ({type(value).__name__})")
        return value

    def parse_number(self, value: str, field: str) -> float:
        try:
            return float(value)
        except ValueError:
            self.fail(field, f"{value!r} is not a number")

    def tools(self) -> list[dict[str, Any]] | None:
        """The row's tool schemas (a list of objects, or a JSON string of one), handed to the chat template."""
        tools = self.row.get("tools")
        if tools is None:
            return None
        if isinstance(tools, str):
            tools = self.json_text(tools, "tools")
        if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
            self.fail("tools", "expected a list of tool schemas (objects)")
        return [dict(tool) for tool in tools] or None

    def field(self, name: str) -> Any:
        if name not in self.row or self.row[name] is None:
            self.fail(name, "is missing")
        return self.row[name]


def as_prompt_and_completion(checker: RecordChecker) -> tuple[list[Message] | str, list[Message] | str]:
    """Reads a prompt/completion row: both strings, or both message lists (completion: assistant turns)."""
    prompt, completion = checker.field("prompt"), checker.field("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            checker.fail(name, f"expected a string or a list of messages, got {type(value).__name__}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return checker.text(prompt, "prompt"), checker.text(completion, "completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return (
            checker.messages(prompt, "prompt"),
            checker.messages(completion, "completion", allowed_roles=("assistant",)),
        )
    checker.fail("completion", "prompt and completion must both be strings or both be message lists")


class ChatRow(NamedTuple):
    """A validated SFT record: context (not supervised) and the supervised part.

    context None: a language-modelling text; strings: prompt and completion as text; message
    lists: a conversation (context [] for a `messages` row) with the row's tool schemas.
    """

    context: list[Message] | str | None
    supervised: list[Message] | str
    tools: list[dict[str, Any]] | None


def validate_chat_row(source: str, index: int, row: Any) -> ChatRow:
    """A chat/SFT row: `messages` (every assistant turn without weight 0 is supervised),
    `prompt` and `completion` (only the completion is), or `text` (every token is)."""
    checker = RecordChecker(source, index, row)
    tools = checker.tools()
    if row.get("messages") is not None:
        messages = checker.messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
            checker.fail("messages", "has no supervised assistant turn, so there is nothing to learn from")
        return ChatRow([], messages, tools)
    if "prompt" in row or "completion" in row:
        return ChatRow(*as_prompt_and_completion(checker), tools)
    if row.get("text") is not None:
        return ChatRow(None, checker.text(row["text"], "text"), None)
    checker.fail(
        "messages", f"expected a 'messages' field, 'prompt' and 'completion' fields, or a 'text' field, found {sorted(row)}"
    )


def validate_prompt_row(source: str, index: int, row: Any) -> tuple[list[Message] | str, list[dict[str, Any]] | None]:
    """A prompt row's `prompt` (a non-empty string, or messages ending in a user or tool turn) and its tools."""
    checker = RecordChecker(source, index, row)
    prompt = checker.field("prompt")
    if isinstance(prompt, str):
        return checker.text(prompt, "prompt"), None
    messages = checker.messages(prompt, "prompt")
    if messages[-1]["role"] == "assistant":
        checker.fail("prompt", "ends with an assistant turn, so there is nothing left to answer")
    return messages, checker.tools()
