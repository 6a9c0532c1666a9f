"""Verifiable rewards: answers extracted from a completion and checked against the prompt row's
reference answer, a format reward, and DAPO's overlong-response penalty.

Extraction and matching are small pure functions of strings; `AnswerReward`, `FormatReward` and
`OverlongPenalty` are the reward sources built on them, ready for `rewards:` in a config:

    rewards:
      - class_path: plpost.verifiable.AnswerReward
        init_args: {extract: boxed, match: numeric, answer_column: answer}
      - class_path: plpost.verifiable.FormatReward
        init_args: {weight: 0.1}

Numeric matching parses plain numbers (with thousands separators, a sign, a decimal point),
fractions ``a/b`` and ``\\frac{a}{b}``; anything else is compared as normalised text. It is not a
computer-algebra check: ``\\sqrt{2}/2`` and ``1/\\sqrt{2}`` do not match.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

from plpost.rewards import Responses, RewardSource

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$|^(-?[\d.]+)\s*/\s*(-?[\d.]+)$")


def last_number(text: str) -> str | None:
    """The last number written in `text`, thousands separators removed ("1,234.5" -> "1234.5"), or None."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in `text`, nested braces kept whole, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[begin:position].strip()
            depth -= 1
    return None  # never closed: the completion was cut off


def tagged_answer(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>`` in `text`, stripped, or None."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def normalize_answer(answer: str) -> str:
    """Whitespace, surrounding ``$``, a trailing period and ``\\left``/``\\right`` removed."""
    answer = answer.strip().rstrip(".").strip().strip("$").replace("\\left", "").replace("\\right", "")
    return re.sub(r"\s+", "", answer)


def parse_number(answer: str) -> Fraction | float | None:
    """The value of a plain number or a fraction (``3/4``, ``\\frac{3}{4}``), else None."""
    answer = normalize_answer(answer).replace(",", "")
    fraction = _FRACTION.match(answer)
    try:
        if fraction:
            sign = -1 if fraction.group(1) else 1
            latex = fraction.group(2) is not None
            numerator, denominator = fraction.group(2, 3) if latex else fraction.group(4, 5)
            return sign * Fraction(numerator) / Fraction(denominator)
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(predicted: str | None, expected: str) -> bool:
    """Equal after `normalize_answer`; a missing prediction never matches."""
    return predicted is not None and normalize_answer(predicted) == normalize_answer(str(expected))


def numeric_match(predicted: str | None, expected: str, *, rel_tol: float = 1e-6) -> bool:
    """Equal as numbers within `rel_tol` (1/2 == 0.5 == \\frac{1}{2}), or else as normalised text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(str(expected))
    if a is None or b is None:
        return exact_match(predicted, expected)
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


EXTRACTORS = {"last_number": last_number, "boxed": boxed_answer, "tag": tagged_answer}


class AnswerReward(RewardSource):
    """1.0 when the answer extracted from a completion matches the row's reference answer, else 0.0.

    A row whose reference answer is None (or missing from a row) is not applicable: NaN.

    Args:
        extract: "boxed": the last ``\\boxed{}``; "tag": the last ``<tag>...</tag>``;
            "last_number": the last number in the completion.
        match: "numeric" (see `numeric_match`) or "exact" (normalised text).
        answer_column: the prompt data's column that holds the reference answer.
        tag: the tag for extract="tag".
        weight: its weight in the sum of sources.
        name: how it is logged (default: "answer").
    """

    def __init__(
        self,
        extract: Literal["boxed", "tag", "last_number"] = "boxed",
        match: Literal["numeric", "exact"] = "numeric",
        answer_column: str = "answer",
        tag: str = "answer",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name or "answer")
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {', '.join(EXTRACTORS)}, got {extract!r}")
        self.extract, self.match, self.answer_column, self.tag = extract, match, answer_column, tag

    def source(self) -> str:
        return f"AnswerReward(extract={self.extract}, match={self.match}, answer_column={self.answer_column})"

    def extracted(self, completion: str) -> str | None:
        return tagged_answer(completion, self.tag) if self.extract == "tag" else EXTRACTORS[self.extract](completion)

    def forward(self, responses: Responses) -> Tensor:
        if self.answer_column not in responses.columns:
            raise KeyError(f"AnswerReward reads the column {self.answer_column!r}, which the prompt rows do not have "
                           f"(they have: {', '.join(responses.columns) or 'no other column'})")
        matches = numeric_match if self.match == "numeric" else exact_match
        scores = [
            math.nan if expected is None else float(matches(self.extracted(completion), str(expected)))
            for completion, expected in zip(responses.completions, responses.columns[self.answer_column])
        ]
        return torch.tensor(scores, dtype=torch.float32, device=responses.input_ids.device)


THINK_THEN_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


class FormatReward(RewardSource):
    """1.0 when the whole completion matches `pattern` (regex, dot matches newlines), else 0.0.

    Args:
        pattern: default: reasoning in ``<think>...</think>``, then ``<answer>...</answer>``.
        weight: its weight in the sum of sources.
        name: how it is logged (default: "format").
    """

    def __init__(self, pattern: str = THINK_THEN_ANSWER, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name or "format")
        self.pattern = re.compile(pattern, flags=re.DOTALL)

    def source(self) -> str:
        return f"FormatReward({self.pattern.pattern!r})"

    def forward(self, responses: Responses) -> Tensor:
        scores = [float(self.pattern.fullmatch(completion) is not None) for completion in responses.completions]
        return torch.tensor(scores, dtype=torch.float32, device=responses.input_ids.device)


def overlong_penalty(lengths: Tensor, *, max_completion_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), per completion, float32.

    lengths: (B,) completion tokens. With L_max = max_completion_length and L_cache = buffer:
        0                                   if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache     if L_max - L_cache < L <= L_max   (0 down to -1)
        -1                                  if L > L_max
    E.g. L_max 20, L_cache 4: L = 16 -> 0, L = 18 -> -0.5, L = 20 -> -1.
    """
    if not 0 < buffer <= max_completion_length:
        raise ValueError(f"buffer must be in 1..max_completion_length, got {buffer} and {max_completion_length}")
    lengths = lengths.float()
    ramp = (max_completion_length - buffer - lengths) / buffer
    return ramp.clamp(min=-1.0, max=0.0)


class OverlongPenalty(RewardSource):
    """DAPO's overlong penalty (see `overlong_penalty`) on the completion's length in tokens.

    Args:
        max_completion_length: L_max, usually the stage's max_new_tokens.
        buffer: L_cache, the length of the ramp from 0 to -1 before L_max.
        weight: its weight in the sum of sources.
        name: how it is logged (default: "overlong").
    """

    def __init__(self, max_completion_length: int, buffer: int, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name or "overlong")
        overlong_penalty(torch.zeros(1), max_completion_length=max_completion_length, buffer=buffer)  # checks now
        self.max_completion_length, self.buffer = max_completion_length, buffer

    def source(self) -> str:
        return f"OverlongPenalty({self.max_completion_length}, {self.buffer})"

    def forward(self, responses: Responses) -> Tensor:
        if responses.completion_lengths is None:
            raise ValueError("OverlongPenalty needs the completions' token lengths, which these responses lack")
        return overlong_penalty(responses.completion_lengths, max_completion_length=self.max_completion_length,
                                buffer=self.buffer).to(responses.input_ids.device)
