"""The benchmark harness (benchmarks/): identical data for every framework, honest timing, and a
2-step run of the raw torch loop end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.data import chat_rows, preference_rows, tokenize_chat, tokenize_pair  # noqa: E402
from benchmarks.measure import StepClock  # noqa: E402
from benchmarks.presets import get_preset  # noqa: E402

PRESET = get_preset("cpu-tiny")


@pytest.fixture(scope="module")
def bench_tokenizer():
    return AutoTokenizer.from_pretrained(bench_run.TOKENIZER_DIR)


def test_rows_are_reproducible_long_tailed_and_never_need_truncation(bench_tokenizer):
    rows = chat_rows(PRESET, 64, bench_tokenizer)
    assert rows == chat_rows(PRESET, 64, bench_tokenizer)  # same seed, same rows, for every framework
    lengths = sorted(len(tokenize_chat(bench_tokenizer, row["messages"])[0]) for row in rows)
    assert lengths[-1] <= PRESET.max_length
    median = lengths[len(lengths) // 2]
    assert lengths[0] < median / 2 and lengths[-1] > 1.8 * median  # long-tailed, not one length
    for row in preference_rows(PRESET, 32, bench_tokenizer):
        prompt, chosen, rejected = tokenize_pair(bench_tokenizer, row)
        assert max(len(prompt) + len(chosen), len(prompt) + len(rejected)) <= PRESET.max_length
        assert chosen != rejected


def test_raw_loop_sees_the_tokens_plpost_chat_data_module_makes(bench_tokenizer):
    from plpost.data.chat import ChatDataModule

    rows = chat_rows(PRESET, 16, bench_tokenizer)
    data = ChatDataModule(str(bench_run.TOKENIZER_DIR), train=rows, max_length=PRESET.max_length, shuffle=False)
    data.setup("fit")
    assert data.counts["train"] == {"records": 16, "kept": 16}  # nothing dropped or truncated
    for row, example in zip(rows, data.train_examples):
        ids, labels = tokenize_chat(bench_tokenizer, row["messages"])
        assert (example["input_ids"], example["labels"]) == (ids, labels)


def test_raw_loop_sees_the_tokens_plpost_preference_data_module_makes(bench_tokenizer):
    from plpost.data.preference import PreferenceDataModule

    rows = preference_rows(PRESET, 16, bench_tokenizer)
    data = PreferenceDataModule(str(bench_run.TOKENIZER_DIR), train=rows, max_length=PRESET.max_length, shuffle=False)
    data.setup("fit")
    assert data.counts["train"] == {"records": 16, "kept": 16}
    for row, example in zip(rows, data.train_examples):
        ids = (example["prompt_ids"], example["chosen_ids"], example["rejected_ids"])
        assert ids == tokenize_pair(bench_tokenizer, row)


def test_raw_loop_packed_pairs_score_what_padded_pairs_score(bench_tokenizer):
    """The raw loop's padding-free preference variant (what a packed PreferenceDataModule would gain)
    must compute the same per-sequence log-probs and rewards as the padded batch: position ids
    restarting per sequence make attention block-diagonal, so packing changes nothing but the cost."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from benchmarks.frameworks.raw_stages import preference_batches, reward_loss, sequence_logps

    preset = get_preset("smoke")
    rows = preference_rows(preset, preset.steps * preset.batch_size, bench_tokenizer)
    padded = preference_batches("padded", preset, rows, bench_tokenizer)[0]
    packed = preference_batches("padding-free", preset, rows, bench_tokenizer)[0]
    assert padded.attention_mask.sum() == packed.input_ids.numel()
    config = LlamaConfig(**preset.model, pad_token_id=bench_tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, packed), sequence_logps(model, padded), rtol=1e-5, atol=1e-4)
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(LlamaConfig(**config.to_dict(), num_labels=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reward_loss(reward_model, packed), reward_loss(reward_model, padded))


def test_clock_times_only_the_steps_after_warmup(monkeypatch):
    """Steps end at t = 1, 3, 6, 10 with 2 warmup steps: the timed window is 3 -> 10 = 7 s for the
    last 2 steps, whose batches hold 5 + 7 real tokens: 12 / 7 tokens/s; the warmup's 200 never count.
    The process used 2.5 - 1.0 = 1.5 CPU-seconds in the same window."""
    import torch

    ends, cpu_ends = iter([1.0, 3.0, 6.0, 10.0]), iter([0.5, 1.0, 1.5, 2.5])
    monkeypatch.setattr("benchmarks.measure.time.perf_counter", lambda: next(ends))
    monkeypatch.setattr("benchmarks.measure.time.process_time", lambda: next(cpu_ends))
    clock = StepClock(warmup_steps=2, device="cpu")
    for real in (100, 100, 5, 7):
        clock.batch(torch.zeros(1, 10, dtype=torch.long), torch.tensor([[1] * real + [0] * (10 - real)]))
        clock.step_end()
    summary = clock.summary()
    assert summary["timed_steps"] == 2
    assert summary["time_s"] == 7.0
    assert summary["real_tokens"] == 12 and summary["fed_tokens"] == 20
    assert summary["tokens_per_s"] == pytest.approx(12 / 7)
    assert summary["cpu_s"] == 1.5 and summary["tokens_per_cpu_s"] == pytest.approx(12 / 1.5)


def test_two_step_raw_loop_run_writes_json_and_markdown(tmp_path):
    report = bench_run.main([
        "--preset", "smoke", "--frameworks", "raw", "--stages", "sft", "--variants", "padding-free",
        "--warmup", "1", "--steps", "2", "--no-extras",
        "--out-dir", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md"), "--workdir", str(tmp_path / "work"),
    ])
    (run,) = report["runs"]
    assert run["ok"], run.get("traceback")
    assert run["timed_steps"] == 2 and run["tokens_match_data"]
    assert json.loads(next(tmp_path.glob("smoke-*.json")).read_text())["runs"][0]["tokens_per_s"] > 0
    assert "| sft | padding-free | raw |" in (tmp_path / "RESULTS.md").read_text()


def test_trl_and_the_raw_loop_get_the_pairs_in_the_order_plpost_groups_them(bench_tokenizer):
    """In the "length-grouped" case plpost's sampler orders the rows itself; the other frameworks
    are handed the rows in `length_grouped_row_order`, which must be that very order, or the three
    would train on different batches."""
    from benchmarks.data import length_grouped_row_order
    from plpost.data.preference import PreferenceDataModule

    rows = preference_rows(PRESET, 6 * PRESET.batch_size + 3, bench_tokenizer)
    data = PreferenceDataModule(str(bench_run.TOKENIZER_DIR), train=rows, batch_size=PRESET.batch_size,
                                max_length=PRESET.max_length, shuffle=False, seed=PRESET.seed,
                                group_by_length=PRESET.length_group_batches)
    data.setup("fit")
    plpost_order = [i for batch in data.train_dataloader() for i in batch.pair_index.tolist()]
    order = length_grouped_row_order(PRESET, rows, bench_tokenizer)
    assert plpost_order == order and order != sorted(order)


def test_ppo_measurement_times_rollouts_after_the_first(tmp_path, bench_tokenizer):
    """The smoke preset's PPO: its one timed rollout (the first is warmup) of 4 prompts is timed
    and split between generation and update."""
    from benchmarks.ppo_rollouts import measure

    preset = get_preset("smoke")
    bench_run.build_model_folder(preset, tmp_path / "model")
    result = measure(preset, str(tmp_path / "model"), preference_rows(preset, 3, bench_tokenizer))
    assert result["rollouts"] == 1 and result["prompts_per_rollout"] == 4
    assert 0 < result["generation_share"] < 1
    assert result["episodes_per_s"] == pytest.approx(4 / (result["generation_s"] + result["update_s"]))
    assert 1 <= result["response_length"] <= 8
