"""Environments: what answers the policy in a multi-turn episode (tools, a user, a game).

An episode starts from a prompt row. The policy writes an assistant turn; the environment
answers it with a `Reply`: messages the policy sees next (tool results, a user turn), whether the
episode ends, and a reward; then the policy writes again, up to `max_turns` turns or
`max_episode_tokens` tokens after the prompt. `plpost.episodes` plays the episodes; only the
policy's own tokens are trained.

Plain Python tools need no class: `Environment(tools=[add])` runs every tool call of a turn and
answers with their results (or their errors, which the policy sees like results), and ends the
episode at the first turn without a call. Each tool is a function with type hints and a
docstring; its schema, rendered into the prompt by the chat template, is transformers'
`get_json_schema` of it. An environment with a state of its own subclasses `Environment` and
returns an `Episode` from `start`:

    class GuessTheNumber(Environment):
        def start(self, prompt, **columns):
            return Guesses(int(columns["secret"]))

    class Guesses(Episode):
        def __init__(self, secret):
            self.secret = secret

        def respond(self, message):
            guess = first_integer(message["content"])
            if guess == self.secret:
                return Reply(done=True, reward=1.0)
            hint = "higher" if guess is not None and guess < self.secret else "lower"
            return Reply([{"role": "user", "content": hint}])

Episodes must be reproducible from their row (draw any randomness from a seed in the row): a
run resumed from a checkpoint replays the sampler's random numbers, not the environment's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from transformers.utils import get_json_schema

Message = dict[str, Any]


class Reply(NamedTuple):
    """The environment's answer to one assistant turn.

    messages: shown to the policy before its next turn (tool results, a user turn), rendered by
        the chat template; none (and not `done`) also ends the episode: the policy has nothing new to answer.
    done: the episode ends here; `messages` are then kept in the conversation but never shown.
    reward: added to the episode's environment reward (None: this turn gives none).
    tool_calls, tool_errors: the calls this reply answers, and how many of them failed (logged).
    """

    messages: Sequence[Message] = ()
    done: bool = False
    reward: float | None = None
    tool_calls: int = 0
    tool_errors: int = 0


class Episode:
    """One episode's state: it answers each assistant turn. The default answers tool calls
    with the environment's tools and ends at the first turn without one."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def respond(self, message: Message) -> Reply:
        """The answer to `message`, the policy's turn as the tokenizer's response parser reads it
        ({"role": "assistant", "content": ..., "tool_calls": [...]})."""
        calls = message.get("tool_calls") or []
        if not calls:
            return Reply(done=True)
        results = [self.environment.call(call) for call in calls]
        return Reply([result for result, _ in results], tool_calls=len(calls),
                     tool_errors=sum(failed for _, failed in results))

    def malformed(self, text: str, error: Exception) -> Reply:
        """The answer to a turn the response parser cannot read (a broken tool call): an error the
        policy sees, as a tool result. Counted as malformed, not as a tool error."""
        return Reply([{"role": "tool", "name": "error", "content": f"error: malformed tool call: {error}"}])


class Environment:
    """Python tools and the limits of an episode; subclasses change how episodes go (`start`).

    Args:
        tools: plain functions with type hints and a docstring, called by name with the arguments
            the policy wrote.
        max_turns: the most assistant turns in one episode.
        max_episode_tokens: the most tokens after the prompt, the policy's and the environment's
            together (None: only `max_turns` times the stage's `max_new_tokens`, plus the replies).
    """

    def __init__(self, tools: Sequence[Callable[..., Any]] = (), *, max_turns: int = 4,
                 max_episode_tokens: int | None = None) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_episode_tokens is not None and max_episode_tokens < 1:
            raise ValueError(f"max_episode_tokens must be >= 1, got {max_episode_tokens}")
        self.tools = {tool_name(tool): tool for tool in tools}
        if len(self.tools) != len(tools):
            raise ValueError(f"tools need distinct names, got {[tool_name(tool) for tool in tools]}")
        self.schemas = [get_json_schema(tool) for tool in tools]
        self.max_turns = max_turns
        self.max_episode_tokens = max_episode_tokens

    def start(self, prompt: Sequence[Message], **columns: Any) -> Episode:
        """A new episode for a prompt row: its messages and its other fields (`answer`, ...)."""
        return Episode(self)

    def call(self, call: Mapping[str, Any]) -> tuple[Message, bool]:
        """Runs one tool call; (the tool message, whether it failed). A failure (unknown tool,
        arguments that do not bind, an exception inside) is answered with its error as the result."""
        function = call.get("function", call)
        name = str(function.get("name", ""))
        reply = {"role": "tool", "name": name}
        if call.get("id") is not None:
            reply["tool_call_id"] = call["id"]
        try:
            tool = self.tools.get(name)
            if tool is None:
                raise LookupError(f"no tool named {name!r}; the tools are {sorted(self.tools)}")
            arguments = function.get("arguments") or {}
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(arguments, Mapping):
                raise TypeError(f"arguments must be an object, got {type(arguments).__name__}")
            result = tool(**arguments)
        except Exception as error:  # the policy sees every failure of its call, whatever it is
            return {**reply, "content": f"error: {type(error).__name__}: {error}"}, True
        return {**reply, "content": result_text(result)}, False


def tool_name(tool: Callable[..., Any]) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def result_text(result: Any) -> str:
    """A tool's result as the text of its message: strings as they are, anything else as JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except TypeError:
        return str(result)
