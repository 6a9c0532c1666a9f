"""The demo: the data it makes at run time, and the pipeline end to end, shortened."""

import json
import math

import pytest
import torch

from plpost.cli import main
from plpost.demo.data import correct_demonstrations, problem_of, stopped, style_of, style_pairs, styled_answer_correct
from plpost.demo.measure import episode_shares
from plpost.demo.report import TOOL_COLUMNS, TOOL_POLICIES, cell, spread
from plpost.tasks.addition import AdditionProblem


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_correct_demonstrations_keep_the_first_right_sums_in_order():
    # 37+48 = 85, so "75" (the forgotten carry) is dropped; 21+34 = 55 and 50+45 = 95 are kept.
    demonstrations = [chat("37+48", "75"), chat("21+34", "55"), chat("37+48", "85"), chat("50+45", "95")]
    assert correct_demonstrations(demonstrations, 2) == [demonstrations[1], demonstrations[2]]
    with pytest.raises(ValueError, match="asked for 4 correct demonstrations but the data holds 3"):
        correct_demonstrations(demonstrations, 4)


def test_the_two_answer_styles_are_both_correct_and_told_apart():
    prompt = [{"role": "user", "content": "37+48"}]
    assert problem_of(prompt) == AdditionProblem(37, 48) and stopped(AdditionProblem(37, 48)) == "85."
    assert [style_of(text) for text in ("85", " 75", "85.", "75.", "85 since", "")] == [
        "bare", "bare", "stopped", "stopped", None, None]
    assert [styled_answer_correct(prompt, text) for text in ("85", "85.", "75", "75.")] == [True, True, False, False]
    (pair,) = style_pairs([prompt], "stopped")
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("85.", "85")


def test_a_number_over_seeds_is_their_mean_and_half_their_range():
    # 0.5, 0.6, 0.9: mean 2.0 / 3 = 0.6667, range 0.4, so "66.7% ± 20.0"; one seed shows no spread.
    assert spread([0.5, 0.6, 0.9]) == pytest.approx((2.0 / 3, 0.2))
    assert cell([0.5, 0.6, 0.9], "percent") == "66.7% ± 20.0" and cell([1.234], "number") == "1.23"


def test_episode_shares_count_episodes_not_calls():
    # Four episodes: two calls in one, one in another, none in two; one malformed turn, in the episode
    # that called twice. So half the episodes call the tool and a quarter hold a malformed turn.
    statistics = {"tool_calls": torch.tensor([2.0, 1.0, 0.0, 0.0]), "malformed": torch.tensor([1.0, 0.0, 0.0, 0.0]),
                  "turns": torch.tensor([3.0, 2.0, 1.0, 1.0])}
    assert episode_shares(statistics) == {"tool_call_rate": 0.5, "malformed_rate": 0.25, "turns": 1.75}


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    main(["demo", "--quick", "--quiet", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    (result,) = report["results"]
    for folder in ("sft", "sft_clean", "reward", "dpo", "dpo_sigmoid", "dpo_bare", "dpo_stopped", "ppo_exact", "grpo",
                   "sft_tools", "grpo_tools"):
        assert (tmp_path / "seed-0" / folder / "config.json").exists(), folder
    table = result["policies"]
    # Even a short SFT teaches the chat format that the base model never saw.
    assert table["base"]["format"] < 0.2 < table["sft"]["format"]
    assert table["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    # DPO moved the policy away from SFT: a finite, positive KL on its own samples (0 would mean it stayed put).
    for moved in ("dpo", "dpo_sigmoid", "ppo_exact", "grpo"):
        assert 0.0 < table[moved]["kl_to_sft"] < math.inf, (moved, table[moved]["kl_to_sft"])
    for name, points in result["curves"].items():
        assert [point["rollouts"] for point in points][:2] == [0, 1], name
        assert points[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4), name  # the PPO policy starts as the SFT model
    assert set(result["ranking"]["plausible"]) >= {"sft_likelihood", "reward_sampled", "reward_bundled", "implicit_dpo"}
    for name, _ in TOOL_POLICIES:
        for key, _ in TOOL_COLUMNS:
            assert 0.0 <= result["tools"][name][key] <= 1.0, (name, key, result["tools"][name][key])
        assert 1.0 <= result["tools"][name]["turns"] <= 3.0, name  # the calculator episodes' max_turns
    text = (tmp_path / "report.md").read_text()
    assert "| rlhf_kl_0 |" in text and "| rlhf_bundled |" in text and "| dpo_stopped |" in text
    for _, label in TOOL_POLICIES:
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert row.count("%") == len(TOOL_COLUMNS), row
    assert (tmp_path / "report.png").stat().st_size > 1000 and (tmp_path / "overoptimisation.png").stat().st_size > 1000
