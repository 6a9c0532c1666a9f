"""Two-digit addition with a calculator: the addition task, where the policy may call a tool.

The problems, answers and grading are those of `plpost.tasks.addition`; what changes is that the
model can hand the sum to `add`, a plain Python function, instead of working it out digit by digit.
A tool demonstration is four turns:

    user       "37+48"
    assistant  (no text) a call: add(a=37, b=48)
    tool       "85"                          what `add` returned
    assistant  "85"

and a direct one is the addition task's two turns, where the answer may show the forgotten carry.
The bundled SFT data (scripts/build_assets.py) mixes both: with the tool on offer the model calls it
only sometimes and forgets carries when it does not, so RL with the tool has a reward to gain by
calling it more often. GRPO prompts and the held-out evaluation are the addition task's own files;
the environment offers the tools.
"""

from __future__ import annotations

from typing import Any

from transformers.utils import get_json_schema

from plpost.tasks.addition import AdditionProblem


def add(a: int, b: int) -> int:
    """Add two integers, exactly.

    Args:
        a: The first addend.
        b: The second addend.

    Returns:
        The sum a + b.
    """
    return a + b


CALCULATOR_TOOLS = [add]
"""The tools a calculator episode offers, as plain functions (their schemas come from their signatures)."""


def calculator_tool_schemas() -> list[dict[str, Any]]:
    """The JSON schemas of CALCULATOR_TOOLS, as a data row's `tools` column and apply_chat_template take them."""
    return [get_json_schema(tool) for tool in CALCULATOR_TOOLS]


def add_call(problem: AdditionProblem) -> dict[str, Any]:
    """The OpenAI-style tool call that asks `add` for the problem's sum."""
    return {"type": "function", "function": {"name": add.__name__, "arguments": {"a": problem.a, "b": problem.b}}}


def tool_demonstration(problem: AdditionProblem) -> list[dict[str, Any]]:
    """The conversation that solves `problem` with the tool: ask, call, the tool's result, answer it."""
    result = str(add(problem.a, problem.b))
    return [
        {"role": "user", "content": problem.question},
        {"role": "assistant", "content": "", "tool_calls": [add_call(problem)]},
        {"role": "tool", "name": add.__name__, "content": result},
        {"role": "assistant", "content": result},
    ]


def direct_demonstration(problem: AdditionProblem, answer: str) -> list[dict[str, Any]]:
    """The conversation that answers `problem` without the tool, with `answer` (right or not)."""
    return [{"role": "user", "content": problem.question}, {"role": "assistant", "content": answer}]
