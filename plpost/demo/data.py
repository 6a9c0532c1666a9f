"""The demo's data made at run time from the bundled addition files: the clean demonstrations,
preference pairs labelled by the checker from a policy's own samples, and two answer styles; and
the calculator task's demonstrations and environment."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plpost.data.sources import load_source
from plpost.environments import Environment
from plpost.generation import generate_texts
from plpost.tasks.addition import AdditionProblem
from plpost.tasks.calculator import CALCULATOR_TOOLS

DATA = "plpost:data/addition/"
MAX_NEW_TOKENS = 10
"""Room for every answer the demo grades with its end-of-turn token ("99+99=198" is 9 tokens, then 1)."""
CALCULATOR_SFT = "plpost:data/calculator/sft.jsonl"
TOOL_TURN_TOKENS = 64
"""Room for one turn of a calculator episode: a call is about 55 tokens of the bundled byte-level tokenizer."""


def calculator_environment() -> Environment:
    """The `add` tool on offer; 3 turns leave room to call it, read its result and answer."""
    return Environment(tools=CALCULATOR_TOOLS, max_turns=3)


def rows(name: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (all with None) of a bundled addition file, e.g. "eval"."""
    return list(load_source(DATA + f"{name}.jsonl"))[:limit]


def problem_of(prompt: Sequence[dict]) -> AdditionProblem:
    """The problem a one-turn addition prompt asks ("37+48" -> AdditionProblem(37, 48))."""
    a, b = prompt[-1]["content"].split("+")
    return AdditionProblem(int(a), int(b))


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def correct_demonstrations(demonstrations: Iterable[dict], size: int) -> list[dict]:
    """The first `size` demonstrations whose answer is the correct sum (the checker's filter)."""
    kept = [row for row in demonstrations if row["messages"][1]["content"] == problem_of(row["messages"][:1]).answer]
    if len(kept) < size:
        raise ValueError(f"asked for {size} correct demonstrations but the data holds {len(kept)}")
    return kept[:size]


def checker_pairs(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list], *,
    samples_per_prompt: int, seed: int,
) -> list[dict]:
    """Preference pairs as RLHF collects them: `samples_per_prompt` samples of `policy` per prompt
    (temperature 1), each distinct wrong one paired against the correct sum that the checker knows.

    A prompt whose samples are all correct gives no pair: there is nothing to prefer. Nor does a
    sample no chat message may hold: an empty one, or one with bytes that decode to a control character.
    """
    torch.manual_seed(seed)
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    texts = generate_texts(policy, tokenizer, repeated, max_new_tokens=MAX_NEW_TOKENS, do_sample=True,
                           batch_size=512).texts
    pairs = []
    for index, prompt in enumerate(prompts):
        answer = problem_of(prompt).answer
        samples = texts[index * samples_per_prompt : (index + 1) * samples_per_prompt]
        for wrong in sorted({text for text in samples if text.strip() not in (answer, "") and text.isprintable()}):
            pairs.append({"prompt": prompt, "chosen": assistant(answer), "rejected": assistant(wrong)})
    return pairs


def bare(problem: AdditionProblem) -> str:
    """The short answer style: the sum alone, "85"."""
    return problem.answer


def stopped(problem: AdditionProblem) -> str:
    """The other, equally correct answer style: the sum with a full stop, "85."."""
    return f"{problem.answer}."


STYLES = {"bare": bare, "stopped": stopped}
_STYLE_PATTERNS = {"bare": re.compile(r"[0-9]+"), "stopped": re.compile(r"[0-9]+\.")}


def style_pairs(prompts: Sequence[list], preferred: str) -> list[dict]:
    """Pairs of two correct answers to each prompt, the `preferred` style chosen over the other."""
    (other,) = set(STYLES) - {preferred}
    return [
        {"prompt": prompt, "chosen": assistant(STYLES[preferred](problem)), "rejected": assistant(STYLES[other](problem))}
        for prompt, problem in ((prompt, problem_of(prompt)) for prompt in prompts)
    ]


def style_of(completion: str) -> str | None:
    """"bare" or "stopped" for an answer written in that style (right or wrong), else None."""
    return next((name for name, pattern in _STYLE_PATTERNS.items() if pattern.fullmatch(completion.strip())), None)


def styled_answer_correct(prompt: Sequence[dict], completion: str) -> bool:
    """Whether a completion is the correct answer in either style."""
    problem = problem_of(prompt)
    return completion.strip() in {style(problem) for style in STYLES.values()}
