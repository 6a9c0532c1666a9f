"""Markers for locating what a chat template renders: unique strings put around a turn's text fields,
and where they land once the template has rendered them (see plpost.data.chat_template)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from plpost.data.formats import Message

RESERVED = "PLPOSTMARK"
MARKER = RESERVED + "{}Q"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def with_markers(messages: Sequence[Message], turns: list[int], *, around: bool) -> tuple[list[Message], dict[int, list[str]]]:
    """A copy of `messages` with a unique marker inside the leading and trailing whitespace of each text field
    of each turn (content, reasoning, tool-call names), or only after it when not `around`."""
    counter = itertools.count()
    markers: dict[int, list[str]] = {}
    probe = [dict(message) for message in messages]

    def marked(value: str, turn: int) -> str:
        core = value.strip()
        if not core:
            return value
        start = value.find(core)
        pieces = [value[:start]]
        if around:
            pieces.append(MARKER.format(next(counter)))
        pieces += [core, MARKER.format(next(counter)), value[start + len(core) :]]
        markers[turn] += [piece for piece in pieces if piece.startswith(RESERVED)]
        return "".join(pieces)

    for turn in turns:
        markers[turn] = []
        message = probe[turn]
        for field in ("content", *REASONING_FIELDS):
            if isinstance(message.get(field), str):
                message[field] = marked(message[field], turn)
        if message.get("tool_calls"):
            message["tool_calls"] = [marked_tool_call(call, lambda name: marked(name, turn)) for call in message["tool_calls"]]
    return probe, markers


def marked_tool_call(call: Mapping[str, Any], mark) -> dict[str, Any]:
    call = dict(call)
    if isinstance(call.get("function"), Mapping):
        function = dict(call["function"])
        function["name"] = mark(function["name"])
        call["function"] = function
    elif isinstance(call.get("name"), str):
        call["name"] = mark(call["name"])
    return call


def marker_positions(rendered: str, markers: Mapping[int, list[str]]) -> tuple[dict[str, int], str]:
    """Where each marker found in `rendered` stands once every marker is removed, and the text without them.
    A marker the template renders more than once stands where it is first rendered: a turn's own text comes
    before any later echo of it (Gemma 4 names each tool result after the call it answers)."""
    wanted = {marker for turn_markers in markers.values() for marker in turn_markers}
    positions: dict[str, int] = {}
    pieces, cursor, removed = [], 0, 0
    while (found := rendered.find(RESERVED, cursor)) != -1:
        end = rendered.find("Q", found)
        marker = rendered[found : end + 1]
        if end == -1 or marker not in wanted:
            break
        pieces.append(rendered[cursor:found])
        positions.setdefault(marker, found - removed)
        removed += len(marker)
        cursor = end + 1
    pieces.append(rendered[cursor:])
    return positions, "".join(pieces)
