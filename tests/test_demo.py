"""The demo pipeline end to end, shortened: every stage trains, exports and is measured."""

import json

import pytest

from plpost.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    main(["demo", "--quick", "--out", str(tmp_path)])
    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        assert (tmp_path / stage / "config.json").exists(), stage
    report = json.loads((tmp_path / "report.json").read_text())
    table = report["table"]
    # Even a short SFT teaches the chat format that the base model never saw.
    assert table["base"]["format"] < 0.2 < table["sft"]["format"]
    assert table["dpo"]["kl_to_sft"] >= -0.5 and "kl_to_sft" in table["ppo"] and "kl_to_sft" in table["grpo"]
    assert 0.0 <= table["reward_model"]["pairwise_accuracy"] <= 1.0
    assert "| sft |" in (tmp_path / "report.md").read_text() and "| grpo |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 1000
