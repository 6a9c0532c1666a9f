"""Record validation: every row is checked before any tokenization or training.

A malformed record raises `DataValidationError` naming the source, the record index and the
field, e.g. ``train.jsonl, record 1841, field "messages[2].role": 'asistant' is not a role``.

Policies for inputs that are unusual but not wrong:
- Turns need not alternate. Messages in any order of system, user, assistant and tool (two
  user turns in a row, an assistant turn first, a system turn mid-conversation) are rendered by
  the chat template as given, and every assistant turn is supervised. A template that refuses
  an order (some raise "roles must alternate") gives a DataValidationError naming the record,
  and so does an opening assistant turn under a template without {% generation %} markers
  (where such a turn starts cannot be located then; see plpost.data.tokenize).
- Any Unicode text is accepted (emoji, right-to-left scripts, combining marks) except NUL and
  unpaired surrogates (which JSON can encode but are not text a tokenizer can take).
- Only `role` and `content` of a message are rendered; other message fields are ignored, and
  so are fields of a row that its format does not use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]


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
        checked = []
        for position, message in enumerate(value):
            where = f"{field}[{position}]"
            if not isinstance(message, Mapping):
                self.fail(where, f"expected a message object, got {type(message).__name__}")
            role = message.get("role")
            if role is None:
                self.fail(f"{where}.role", "is missing")
            if role not in allowed_roles:
                self.fail(f"{where}.role", f"{role!r} is not a role (expected one of: {', '.join(allowed_roles)})")
            content = self.text(message.get("content"), f"{where}.content", allow_empty=role not in ("assistant", "user"))
            checked.append({"role": role, "content": content})
        return checked

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


def validate_chat_row(source: str, index: int, row: Any) -> tuple[list[Message] | str, list[Message] | str]:
    """A chat/SFT row as (context, supervised): `messages` rows supervise every assistant turn.

    Returns ([], messages) for conversational rows, so the caller supervises every assistant
    message of the second part and none of the first.
    """
    checker = RecordChecker(source, index, row)
    if row.get("messages") is not None:
        messages = checker.messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            checker.fail("messages", "has no assistant turn, so there is nothing to learn from")
        return [], messages
    if "prompt" in row or "completion" in row:
        return as_prompt_and_completion(checker)
    checker.fail("messages", f"expected a 'messages' field or 'prompt' and 'completion' fields, found {sorted(row)}")


def validate_prompt_row(source: str, index: int, row: Any) -> list[Message] | str:
    """A prompt row's `prompt`: a non-empty string, or messages ending in a user (or tool) turn."""
    checker = RecordChecker(source, index, row)
    prompt = checker.field("prompt")
    if isinstance(prompt, str):
        return checker.text(prompt, "prompt")
    messages = checker.messages(prompt, "prompt")
    if messages[-1]["role"] == "assistant":
        checker.fail("prompt", "ends with an assistant turn, so there is nothing left to answer")
    return messages
