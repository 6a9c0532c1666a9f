"""Verifiable rewards: extraction, matching, the format reward and DAPO's overlong penalty."""

import math

import pytest
import torch

from plpost.rewards import Responses, RewardScorer
from plpost.verifiable import (
    AnswerReward,
    FormatReward,
    OverlongPenalty,
    boxed_answer,
    exact_match,
    last_number,
    numeric_match,
    overlong_penalty,
    tagged_answer,
)


def responses(completions, lengths=None, **columns) -> Responses:
    n = len(completions)
    ids = torch.zeros(n, 3, dtype=torch.long)
    return Responses([""] * n, list(completions), columns, ids, torch.ones_like(ids), ids, torch.ones(n, dtype=torch.bool),
                     None if lengths is None else torch.tensor(lengths))


def test_answer_extraction():
    assert last_number("3 apples, then 1,234.5 pears; so -7") == "-7"
    assert last_number("it is 1,234.5") == "1234.5" and last_number("none") is None
    assert boxed_answer(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert boxed_answer(r"\boxed{12") is None  # cut off before the brace closed
    assert tagged_answer("<answer> 4 </answer> ... <answer>\n5\n</answer>") == "5"
    assert tagged_answer("<ans>5</ans>", tag="ans") == "5" and tagged_answer("5") is None


def test_exact_and_numeric_match():
    assert exact_match(" $42$. ", "42") and not exact_match(None, "42") and not exact_match("42.0", "42")
    assert numeric_match("42.0", "42") and numeric_match(r"\frac{1}{2}", "0.5") and numeric_match("-3/4", "-0.75")
    assert numeric_match("1,000", "1000") and not numeric_match("0.51", "0.5") and not numeric_match(None, "1")
    assert numeric_match(r"x^2", r"x ^ 2") and not numeric_match(r"\sqrt{2}", "1.41421356")  # text, not algebra


def test_answer_reward_scores_matches_and_leaves_rows_without_an_answer_out():
    reward = AnswerReward(extract="boxed", match="numeric")
    scores = reward(responses([r"\boxed{0.5}", r"\boxed{3}", "no box", r"\boxed{1}"], answer=["1/2", "4", "1", None]))
    assert scores[:3].tolist() == [1.0, 0.0, 0.0] and math.isnan(scores[3])
    with pytest.raises(KeyError, match="'solution'.*answer"):
        AnswerReward(answer_column="solution")(responses(["1"], answer=["1"]))


def test_format_reward():
    reward = FormatReward()
    scores = reward(responses(["<think>2+2 is 4</think> <answer>4</answer>", "<answer>4</answer>",
                               "<think>a\nb</think>\n<answer>4</answer>\n"]))
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_overlong_penalty_by_hand():
    """L_max 20, L_cache 4: up to 16 tokens no penalty; 18 is halfway down the ramp (-0.5); 20 is -1."""
    penalty = overlong_penalty(torch.tensor([5, 16, 17, 18, 20, 25]), max_completion_length=20, buffer=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert OverlongPenalty(20, 4)(responses(["a", "b"], lengths=[18, 3])).tolist() == [-0.5, 0.0]
    with pytest.raises(ValueError, match="buffer"):
        OverlongPenalty(8, 9)


def test_sum_of_sources_leaves_out_those_that_do_not_apply():
    """Answer (weight 1) + format (weight 0.5): a row without an answer scores the format alone;
    NaN only if no source applies."""
    scorer = RewardScorer([AnswerReward(extract="tag", match="exact"), FormatReward(weight=0.5)])
    out = scorer(responses(["<think>x</think><answer>4</answer>", "<think>x</think><answer>5</answer>"],
                           answer=["4", None]))
    assert out.scores.tolist() == [1.5, 0.5]
    only = RewardScorer([AnswerReward()])(responses(["1"], answer=[None]))
    assert math.isnan(only.scores[0])
