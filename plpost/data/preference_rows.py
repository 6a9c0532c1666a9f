"""Validation of preference records: a prompt and two different completions of it, or one
completion labelled desirable or not (unpaired feedback).

Rows are {prompt, chosen, rejected} (explicit prompt) or {chosen, rejected} full conversations
sharing a prefix (implicit prompt), as strings or message lists, with an optional `margin` and
`tools`. The UltraFeedback-binarized layout (a string prompt with chosen and rejected as whole
conversations that open with it) is read as the conversations' shared prompt. Unpaired rows
are {prompt, completion, label} (TRL's unpaired preference format), label true or false.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple

from plpost.data.base import SkipRecord
from plpost.data.formats import Message, RecordChecker, as_prompt_and_completion

IdenticalPairs = Literal["error", "skip"]


class PreferenceRow(NamedTuple):
    """A validated record: a prompt and two different completions of it (all strings, or all messages)."""

    prompt: list[Message] | str
    chosen: list[Message] | str
    rejected: list[Message] | str
    margin: float | None
    tools: list[dict[str, Any]] | None


def validate_preference_row(source: str, index: int, row: Any, *, identical_pairs: IdenticalPairs) -> PreferenceRow:
    """Checks one record; `identical_pairs` says what a pair with chosen == rejected is.

    Explicit prompt: ``{"prompt", "chosen", "rejected"}``, all strings or all message lists (the
    prompt does not end with an assistant turn; the completions are assistant turns).
    Implicit prompt: ``{"chosen", "rejected"}``, two whole conversations. Message lists are
    split after their longest run of equal leading messages, so the prompt always ends at a
    message boundary; strings after their longest common leading text (which must not be empty).
    A string prompt with message-list completions is a user turn: the conversations' shared
    prompt, which must end with it (UltraFeedback), or, for completions of assistant turns only,
    the one turn before them.
    """
    checker = RecordChecker(source, index, row)
    chosen, rejected = checker.field("chosen"), checker.field("rejected")
    prompt = row.get("prompt")
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = conversations_after_text_prompt(checker, prompt, chosen, rejected, identical_pairs)
    if prompt is None:
        if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
            checker.fail("rejected", "chosen and rejected must both be strings or both be message lists")
        read = checker.messages if isinstance(chosen, list) else checker.text
        chosen, rejected = read(chosen, "chosen"), read(rejected, "rejected")
        refuse_identical(checker, chosen, rejected, identical_pairs)
        prompt, chosen, rejected = split_shared_prompt(checker, chosen, rejected)
    elif not isinstance(prompt, (str, list)):
        checker.fail("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}")
    as_text = isinstance(prompt, str)
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(completion, str) != as_text:
            checker.fail(name, "prompt, chosen and rejected must all be strings or all be message lists")
    if as_text:
        prompt = checker.text(prompt, "prompt")
        chosen, rejected = checker.text(chosen, "chosen"), checker.text(rejected, "rejected")
        if all(len(completion) > len(prompt) and completion.startswith(prompt) for completion in (chosen, rejected)):
            checker.fail(
                "chosen", "and rejected both repeat the prompt at their start, so the prompt would be read twice; "
                "give the completions without it, or leave out `prompt` to take the shared text as the prompt",
            )
    else:
        prompt = checker.messages(prompt, "prompt")
        if prompt[-1]["role"] == "assistant":
            checker.fail("prompt", "ends with an assistant turn, so there is nothing left to answer")
        chosen = checker.messages(chosen, "chosen", allowed_roles=("assistant",))
        rejected = checker.messages(rejected, "rejected", allowed_roles=("assistant",))
    refuse_identical(checker, chosen, rejected, identical_pairs)
    return PreferenceRow(prompt, chosen, rejected, checker.number("margin"), None if as_text else checker.tools())


class FeedbackRow(NamedTuple):
    """A validated unpaired record: a prompt, one completion of it, and whether it is desirable."""

    prompt: list[Message] | str
    completion: list[Message] | str
    desirable: bool
    tools: list[dict[str, Any]] | None


def validate_feedback_row(source: str, index: int, row: Any) -> FeedbackRow:
    """Checks one ``{"prompt", "completion", "label"}`` record: prompt and completion both strings
    or both message lists (the prompt does not end with an assistant turn, the completion is
    assistant turns), label a boolean (true: desirable)."""
    checker = RecordChecker(source, index, row)
    prompt, completion = as_prompt_and_completion(checker)
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        checker.fail("prompt", "ends with an assistant turn, so there is nothing left to answer")
    return FeedbackRow(prompt, completion, checker.boolean("label"), None if isinstance(prompt, str) else checker.tools())


def conversations_after_text_prompt(
    checker: RecordChecker, prompt: str, chosen: list, rejected: list, identical_pairs: IdenticalPairs
) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen, rejected) of a string prompt given with message-list completions."""
    prompt = checker.text(prompt, "prompt")
    chosen, rejected = checker.messages(chosen, "chosen"), checker.messages(rejected, "rejected")
    if chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant":
        return [{"role": "user", "content": prompt}], chosen, rejected
    refuse_identical(checker, chosen, rejected, identical_pairs)
    shared, chosen, rejected = split_shared_prompt(checker, chosen, rejected)
    if shared[-1]["role"] != "user" or shared[-1].get("content") != prompt:
        checker.fail(
            "prompt", f"is a string, but the conversations in chosen and rejected share messages 0..{len(shared) - 1}, "
            "which do not end with a user turn holding this text; give the prompt as those messages or leave it out",
        )
    return shared, chosen, rejected


def refuse_identical(
    checker: RecordChecker, chosen: Any, rejected: Any, identical_pairs: IdenticalPairs, when: str = ""
) -> None:
    if chosen != rejected:
        return
    if identical_pairs == "skip":
        raise SkipRecord("skipped (chosen identical to rejected)")
    checker.fail(
        "rejected", f"is identical to chosen{' ' + when if when else ''}, so the pair prefers nothing "
        "(identical_pairs: skip drops such pairs)",
    )


def split_shared_prompt(
    checker: RecordChecker, chosen: list[Message] | str, rejected: list[Message] | str
) -> tuple[list[Message] | str, list[Message] | str, list[Message] | str]:
    """(prompt, chosen completion, rejected completion) of two different whole conversations."""
    if isinstance(chosen, str):
        shared = len(os.path.commonprefix([chosen, rejected]))
        if shared == 0:
            checker.fail("prompt", "is missing, and chosen and rejected share no leading text to take as the prompt")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            checker.fail("prompt", "is missing, and chosen and rejected share no leading message to take as the prompt")
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            for position in range(shared, len(messages)):
                if messages[position]["role"] != "assistant":
                    checker.fail(
                        f"{name}[{position}].role",
                        f"is {messages[position]['role']!r} after the prompt shared with the other completion "
                        f"(messages 0..{shared - 1}); the completions must be assistant turns",
                    )
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion[shared:] or (isinstance(completion, str) and not completion[shared:].strip()):
            checker.fail(name, "has nothing after the prompt it shares with the other completion")
    return chosen[:shared], chosen[shared:], rejected[shared:]
