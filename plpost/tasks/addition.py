"""Two-digit addition: plpost's demo task with verifiable answers.

Every problem `a + b` has a, b in 10..99, so it is shown to the model as a short expression
("37+48") and answered with a short number ("85"). About 45% of the problems need a carry from
the units into the tens, which makes room for a *systematic* mistake: forgetting that carry
(37+48 -> "75"). The bundled SFT data imitates that mistake on purpose, and the preference /
reward stages are expected to remove it (see scripts/build_assets.py).

Pure Python apart from the reward, which returns a tensor because plpost's reward functions do,
and `TryAgain`, the task as a multi-turn environment (a wrong answer may be corrected).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from plpost.environments import Environment, Episode, Reply

OPERAND_RANGE = range(10, 100)
"""Both operands are two-digit numbers."""


class AdditionProblem(NamedTuple):
    """The problem `a + b`, with its correct answer and two digit-procedure mistakes."""

    a: int
    b: int

    @property
    def question(self) -> str:
        """The user message: just the expression, e.g. "37+48" (short prompts keep batches cheap)."""
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        """The correct sum, e.g. "85"."""
        return str(self.a + self.b)

    @property
    def has_carry(self) -> bool:
        """Whether the units digits overflow into the tens (37+48: 7+8 = 15, so yes)."""
        return self.a % 10 + self.b % 10 >= 10

    @property
    def forgotten_carry_answer(self) -> str:
        """Column addition that never carries: 37+48 -> tens 3+4, units (7+8) mod 10 -> "75".

        Equals `answer` when the problem has no carry: there is nothing to forget.
        """
        return self._column_sum(carry=0)

    @property
    def spurious_carry_answer(self) -> str:
        """Column addition that always carries one: 21+34 -> tens 2+3+1, units 1+4 -> "65".

        Equals `answer` when the problem has a carry: the carry is then due.
        """
        return self._column_sum(carry=1)

    @property
    def plausible_mistake(self) -> str:
        """A wrong answer a student could give: the forgotten carry if one is due, else a spurious one.

        Always differs from `answer` (by exactly 10), so it is the natural "rejected" response.
        """
        return self.forgotten_carry_answer if self.has_carry else self.spurious_carry_answer

    def _column_sum(self, carry: int) -> str:
        tens = self.a // 10 + self.b // 10 + carry
        units = (self.a % 10 + self.b % 10) % 10
        return str(10 * tens + units)


def all_problems() -> list[AdditionProblem]:
    """Every problem of the task (90 * 90 = 8100), in (a, b) order."""
    return [AdditionProblem(a, b) for a in OPERAND_RANGE for b in OPERAND_RANGE]


def random_index(rng: random.Random, n: int) -> int:
    """A uniform index in range(n) drawn from `rng.random()` only.

    `random()` is the one stream Python promises to keep identical across versions for a given
    seed (randrange, choice and shuffle may change), so the shipped data stays reproducible.
    """
    # min(): random() * n can round up to n itself when n is large enough.
    return min(int(rng.random() * n), n - 1)


def sample_problems(
    n: int,
    seed: int,
    *,
    exclude: Iterable[AdditionProblem | tuple[int, int]] = (),
    distinct: bool = False,
) -> list[AdditionProblem]:
    """`n` problems drawn uniformly from all two-digit problems not in `exclude`.

    Deterministic in (n, seed, exclude, distinct). With `distinct=False` draws are independent
    (a problem may repeat, so `n` may exceed the 8100 problems); with `distinct=True` no problem
    repeats, and asking for more than the pool holds raises ValueError.
    `exclude` is how the held-out evaluation problems stay out of every training set.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    excluded = {AdditionProblem(*problem) for problem in exclude}
    pool = [problem for problem in all_problems() if problem not in excluded]
    rng = random.Random(seed)
    if not distinct:
        if n and not pool:
            raise ValueError("every problem is excluded: nothing to sample")
        return [pool[random_index(rng, len(pool))] for _ in range(n)]
    if n > len(pool):
        raise ValueError(f"asked for {n} distinct problems but only {len(pool)} are not excluded")
    # A partial Fisher-Yates shuffle: the first n slots end up a uniform sample without repeats.
    for i in range(n):
        j = i + random_index(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:n]


_FIRST_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: "٣" is not an answer to grade.


def extract_answer(completion: str) -> str | None:
    """The first integer written in `completion`, as written ("85 because..." -> "85"), or None.

    A leading minus sign belongs to the integer; leading zeros are kept ("085" stays "085"), so
    grading stays an exact match on what the model wrote.
    """
    match = _FIRST_INTEGER.search(completion)
    return match.group(0) if match else None


def _completion_text(completion: Any) -> str:
    # Conversational completions arrive as a list of messages; the answer is the last one's content.
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


def exact_match_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **columns: Any
) -> torch.Tensor:
    """1.0 where the first integer of a completion equals its prompt's `answer`, else 0.0.

    prompts, completions, answer: one entry per sample (`answer` is the prompt data's column of
    that name; other columns arrive in `columns` and are ignored). Returns float32, shape (n,).
    """
    if len(completions) != len(answer):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards = [
        float(extract_answer(_completion_text(completion)) == str(expected).strip())
        for completion, expected in zip(completions, answer)
    ]
    return torch.tensor(rewards, dtype=torch.float32)


class TryAgain(Environment):
    """Self-correction as a multi-turn task: a wrong answer is told so and may be tried again.

    Each assistant turn is graded against the row's `answer` (its first integer, as
    `exact_match_reward` grades); right, the episode ends with reward 1; wrong, the user answers
    "wrong, try again" and the policy answers anew, up to `max_turns` turns. Reward 0 for an
    episode that never gets it right. Count its rewards with `plpost.rewards.EnvironmentReward`.
    """

    def start(self, prompt: Sequence[Any], answer: str, **columns: Any) -> Episode:
        return TryAgainEpisode(self, str(answer).strip())


class TryAgainEpisode(Episode):
    def __init__(self, environment: TryAgain, answer: str) -> None:
        super().__init__(environment)
        self.answer = answer

    def respond(self, message: dict[str, Any]) -> Reply:
        if extract_answer(message.get("content") or "") == self.answer:
            return Reply(done=True, reward=1.0)
        return Reply([{"role": "user", "content": "wrong, try again"}], reward=0.0)
