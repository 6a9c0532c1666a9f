"""Reading the tool calls of a policy's turn in its model family's own format.

A turn is parsed with transformers' response parsing (`tokenizer.parse_response`) and a response
template: the tokenizer's own `response_template` where it has one (the bundled tokenizer does),
else the Hermes one (`<tool_call>` JSON objects: Qwen2.5, Qwen3, Hermes and the templates derived
from them) when the chat template writes tool calls that way. What a parser returns is then checked
for a shape a template can write back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from plpost.data.chat_template import ChatTemplate

HERMES_PROBE = '<tool_call>\n{"name": "probe", "arguments": {"x": 1}}\n</tool_call>'
"""How the Hermes format (Qwen2.5, Qwen3, Hermes, and the templates derived from them) writes a
call of probe(x=1): a JSON object inside <tool_call> tags."""


def hermes_response_template(assistant_header: str, end_texts: Sequence[str]) -> dict[str, Any]:
    """transformers' response template for the Hermes format: an optional <think> trace, <tool_call>
    JSON objects, and the content up to one of `end_texts` (the stop tokens)."""
    ends = "|".join(re.escape(text) for text in end_texts)
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": assistant_header,
        "fields": {
            "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
            "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                           "content": "json", "transform": {"type": "function", "function": "{content}"}},
            "content": {"close_pattern": rf"(?:{ends})\s*", "content": "text"},
        },
    }


def response_template_of(template: ChatTemplate, stop_ids: Sequence[int]) -> dict[str, Any]:
    """How a turn's tool calls are read: the tokenizer's own `response_template` (transformers'
    response parsing), else the Hermes one when the chat template writes calls that way, else an
    error naming the template."""
    tokenizer = template.tokenizer
    own = getattr(tokenizer, "response_template", None)
    if own is not None:
        return own
    user = [{"role": "user", "content": "."}]
    call = {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}
    try:
        written = template.render([*user, {"role": "assistant", "content": "", "tool_calls": [call]}])
        header = template.render(user, add_generation_prompt=True)[len(template.render(user)):]
    except Exception:  # a template that cannot write a tool call at all
        written, header = "", ""
    if HERMES_PROBE in written and header:
        return hermes_response_template(header, tokenizer.convert_ids_to_tokens(sorted(stop_ids)))
    raise ValueError(
        f"the tokenizer of {tokenizer.name_or_path} has no response_template and its chat template does not write "
        "tool calls in the Hermes format (<tool_call> JSON), so the tool calls of a turn cannot be read: set "
        "tokenizer.response_template (transformers' response parsing) to one for its model family"
    )


def well_formed_calls(calls: Any) -> list[dict[str, Any]]:
    """Parsed tool calls as templates write them back, {"type": "function", "function": {"name",
    "arguments"}} (arguments {} when the call gave none); a shape no template can write back is
    refused (a response parser reads any JSON inside the call markers, a list included)."""
    checked = []
    for call in calls if isinstance(calls, list) else [calls]:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]
                and isinstance(function.get("arguments", {}), dict | str)):
            raise ValueError(f"a tool call is an object with a name and arguments, not {call!r}")
        checked.append({**call, "type": call.get("type", "function"), "function": {"arguments": {}, **function}})
    return checked
