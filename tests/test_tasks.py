"""The addition task: arithmetic of answers and mistakes, sampling, grading, and the shipped data."""

import json
from functools import cache

import pytest
import torch

from plpost.assets import resolve_pretrained
from plpost.tasks import AdditionProblem, exact_match_reward, extract_answer, sample_problems
from plpost.tasks.addition import all_problems


@pytest.mark.parametrize(
    ("a", "b", "answer", "has_carry", "forgotten", "spurious"),
    [
        # 7+8 = 15: carry due. Forgetting it leaves tens 3+4 = 7 -> 75; "always carry" is right.
        (37, 48, "85", True, "75", "85"),
        # 1+4 = 5: no carry. Forgetting changes nothing; a spurious carry makes tens 2+3+1 -> 65.
        (21, 34, "55", False, "55", "65"),
        # 5+5 = 10: the smallest carry. 19+81 = 100, tens 1+8 = 9 without the carry -> 90.
        (55, 55, "110", True, "100", "110"),
        (19, 81, "100", True, "90", "100"),
        # 4+5 = 9: the largest sum without a carry; the spurious carry reaches three digits.
        (94, 95, "189", False, "189", "199"),
        (99, 99, "198", True, "188", "198"),
        (10, 10, "20", False, "20", "30"),
    ],
)
def test_answers_and_mistakes_on_hand_picked_cases(a, b, answer, has_carry, forgotten, spurious):
    problem = AdditionProblem(a, b)
    assert problem.question == f"{a}+{b}"
    assert problem.answer == answer
    assert problem.has_carry is has_carry
    assert problem.forgotten_carry_answer == forgotten
    assert problem.spurious_carry_answer == spurious
    assert problem.plausible_mistake == (forgotten if has_carry else spurious)


def test_plausible_mistake_is_always_wrong_by_exactly_ten():
    """Forgetting a due carry loses 10; adding an undue one gains 10. Checked on all 8100 problems."""
    for problem in all_problems():
        expected_shift = -10 if problem.has_carry else 10
        assert int(problem.plausible_mistake) - int(problem.answer) == expected_shift, problem


def test_sample_problems_is_deterministic_and_in_range():
    first = sample_problems(500, seed=7)
    assert first == sample_problems(500, seed=7)
    assert first != sample_problems(500, seed=8)
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in first)
    assert all(isinstance(p, AdditionProblem) for p in first)


def test_sample_problems_exclude_and_distinct():
    held_out = sample_problems(300, seed=0, distinct=True)
    assert len(set(held_out)) == 300
    training = sample_problems(20_000, seed=1, exclude=held_out)
    assert not set(training) & set(held_out)
    # Plain tuples are accepted in `exclude` too.
    assert (37, 48) not in sample_problems(2_000, seed=2, exclude=[(37, 48)])
    everything_else = sample_problems(8100 - 300, seed=3, exclude=held_out, distinct=True)
    assert len(set(everything_else) | set(held_out)) == 8100
    with pytest.raises(ValueError, match="distinct"):
        sample_problems(8100 - 299, seed=3, exclude=held_out, distinct=True)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("85", "85"),
        ("  85  ", "85"),
        ("85<|end|>", "85"),
        ("The answer is 85.", "85"),
        ("85 or 75", "85"),
        ("8 5", "8"),
        ("085", "085"),  # kept as written: grading is an exact match
        ("-3", "-3"),
        ("3.5", "3"),
        ("", None),
        ("eighty-five", None),
        ("٨٥", None),  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_exact_match_reward_values_and_dtype():
    rewards = exact_match_reward(
        prompts=["37+48", "21+34", "55+55", "10+10"],
        completions=["85", "65", " 110<|end|>", "no idea"],
        answer=["85", "55", "110", "20"],
        has_carry=[True, False, True, False],  # extra columns are accepted and ignored
    )
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_exact_match_reward_accepts_message_completions_and_checks_lengths():
    conversational = [[{"role": "assistant", "content": "85"}], [{"role": "assistant", "content": "75"}]]
    rewards = exact_match_reward(prompts=[None, None], completions=conversational, answer=["85", "85"])
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        exact_match_reward(prompts=[None, None], completions=["1", "2"], answer=["1"])


# -- the shipped data ------------------------------------------------------------------------


@cache
def shipped(name: str) -> list[dict]:
    path = resolve_pretrained(f"plpost:data/addition/{name}.jsonl")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def problem_of(question: str) -> AdditionProblem:
    a, b = question.split("+")
    return AdditionProblem(int(a), int(b))


def first_user_message(row: dict) -> str:
    messages = row["messages"] if "messages" in row else row["prompt"]
    return messages[0]["content"]


def test_shipped_sizes_and_row_shapes():
    sizes = {name: len(shipped(name)) for name in ["sft", "preference", "prompts", "eval"]}
    assert sizes == {"sft": 20_000, "preference": 6_000, "prompts": 4_000, "eval": 300}
    assert [m["role"] for m in shipped("sft")[0]["messages"]] == ["user", "assistant"]
    assert set(shipped("preference")[0]) == {"prompt", "chosen", "rejected"}
    assert set(shipped("prompts")[0]) == {"prompt", "answer"}
    assert set(shipped("eval")[0]) == {"prompt", "answer", "has_carry"}


def test_shipped_eval_is_held_out_from_every_training_file():
    eval_problems = {problem_of(first_user_message(row)) for row in shipped("eval")}
    assert len(eval_problems) == 300
    for name in ["sft", "preference", "prompts"]:
        training_problems = {problem_of(first_user_message(row)) for row in shipped(name)}
        assert not training_problems & eval_problems, name


def test_shipped_sft_forgets_65_percent_of_carries_and_nothing_else():
    forgotten = correct_carries = 0
    for row in shipped("sft"):
        problem = problem_of(row["messages"][0]["content"])
        shown = row["messages"][1]["content"]
        if not problem.has_carry:
            assert shown == problem.answer, row
        elif shown == problem.forgotten_carry_answer:
            forgotten += 1
        else:
            assert shown == problem.answer, row
            correct_carries += 1
    assert forgotten / (forgotten + correct_carries) == pytest.approx(0.65, abs=0.005)


def test_shipped_preferences_reward_and_grading_columns_are_correct():
    for row in shipped("preference"):
        problem = problem_of(row["prompt"][0]["content"])
        assert row["chosen"] == [{"role": "assistant", "content": problem.answer}]
        assert row["rejected"] == [{"role": "assistant", "content": problem.plausible_mistake}]
    for name in ["prompts", "eval"]:
        for row in shipped(name):
            problem = problem_of(row["prompt"][0]["content"])
            assert row["answer"] == problem.answer
            if name == "eval":
                assert row["has_carry"] is problem.has_carry
