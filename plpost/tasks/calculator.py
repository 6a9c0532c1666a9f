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

`calculate`, an arithmetic evaluator for word problems (GSM8K and the like), is the tool of the GPU
recipe (configs/gpu/grpo-tools-qwen2.5-0.5b.yaml).
"""

from __future__ import annotations

import ast
import operator
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


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
LARGEST_POWER = 64
"""The largest exponent `calculate` raises to: a policy's 9**9**9 would take the process down."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "(12 + 30) * 4 / 3".

    Returns:
        Its value: an integer where it is a whole number, else a decimal.
    """
    value = evaluate(ast.parse(expression, mode="eval").body)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in SIGNS:
        return SIGNS[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > LARGEST_POWER:
            raise ValueError(f"exponents are limited to {LARGEST_POWER}, got {right}")
        return ARITHMETIC[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")


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
